"""The ORT (ORT Mobile) format: our ONNX file serialized by onnxruntime into its `.ort` flatbuffer.

`build.py` converts (`build_ort`), `check.py` checks the file in onnxruntime, `serialize.py` is the
child process that writes the bytes; `python -m export.ort` is the shared CLI for this format.
"""
