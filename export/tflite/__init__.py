"""TFLite (LiteRT): the builder (`build`: builtin ops only, static shapes, signature
`serving_default`), its graph check (`check`) and its converter options for variants
(`quantize`). `python -m export.tflite` is `__main__`.

Importing the package imports none of them: `check` stays usable without TensorFlow.
"""
