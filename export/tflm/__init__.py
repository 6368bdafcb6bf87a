"""TensorFlow Lite for Microcontrollers: the full-int8 TFLite file verified on TFLM's own
interpreter (`runtime`), the ops TFLM has kernels for (`ops`), its graph check (`check`), the
builder (`build`: the file, its smallest tensor arena, the C++ of `cpp`). `python -m export.tflm`
is `__main__`.

Importing the package imports none of them: `runtime`, `ops` and `check` need numpy and
tflite-micro only (`export.runtime.verify` runs TFLM files with them).
"""
