"""`python -m export.serve PATH`: verify, then serve ONNX and TFLite artifacts on Ray Serve."""

from export.reporting import exit_with
from export.runtime.serve.cli import main

if __name__ == "__main__":
    exit_with(main())
