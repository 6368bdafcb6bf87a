"""`python -m export`: every format (SavedModel, TFLite, ONNX) in one run."""

import sys

from export.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m export"))
