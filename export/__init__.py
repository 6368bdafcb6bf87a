"""The xattn artifact builder: SavedModel, TFLite and ONNX files verified against the Keras layer.

Importing this package never imports TensorFlow: `python -m export.verify` runs with numpy and
the runtimes only. TensorFlow's C++ logs are silenced here, before any submodule imports it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from export.formats import FORMAT_NAMES as FORMATS  # noqa: E402  (after the environment)

__all__ = ["FORMATS"]
