"""`python -m export`: every format (SavedModel, TFLite, ONNX) in one run."""

from export.cli import main
from export.reporting import exit_with

if __name__ == "__main__":
    exit_with(main(prog="python -m export"))
