"""The xattn artifact builder: SavedModel, TFLite and ONNX files verified against the Keras layer.

Importing this package never imports TensorFlow: `python -m export.verify` runs with numpy and
the runtimes only. TensorFlow's C++ logs are silenced here, before any submodule imports it.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _interrupted_early(signum, frame):  # pragma: no cover - exercised in a subprocess
    # Ctrl-C while `python -m export...` is still importing: nothing has been written yet.
    os.write(2, f"python -m {__name__}: interrupted while starting; nothing written\n".encode())
    os._exit(130)


# `python -m export.<entry>` imports this package while sys.argv[0] is still "-m": an entry of
# ours is starting. Until export.reporting.report_failures takes over, Ctrl-C ends it in one line
# instead of a KeyboardInterrupt traceback from deep inside an import.
if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_early)

from export.formats import FORMAT_NAMES as FORMATS  # noqa: E402  (after the environment)

__all__ = ["FORMATS"]
