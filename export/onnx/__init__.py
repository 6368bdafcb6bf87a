"""ONNX: the builder (`build`: tf2onnx, named inputs and outputs, reproducible bytes), its graph
check (`check`) and its variants (`quantize`). `python -m export.onnx` is `__main__`.

Importing the package imports none of them: `check` stays usable without TensorFlow.
"""
