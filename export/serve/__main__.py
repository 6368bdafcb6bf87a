"""`python -m export.serve PATH`: verify, then serve ONNX and TFLite artifacts on Ray Serve."""

import sys

from export.runtime.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
