"""The runtime half: what runs on a device, with numpy and the runtimes only (the `runtime` extra).

The manifest (read, validate against its JSON Schema), the golden vectors, the gate, the runners
(onnxruntime, LiteRT; TensorFlow only for SavedModel files), `verify` and `serve`. Nothing here
imports the build half or TensorFlow, Keras, tf2onnx or onnx (tests/test_structure.py proves it
from the import graph). The `python -m export.verify` and `python -m export.serve` commands are
aliases of `export.runtime.verify` and `export.runtime.serve`.
"""
