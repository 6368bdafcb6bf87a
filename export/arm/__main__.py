"""`python -m export.arm [PATH]`: the published artifacts verified under aarch64 emulation."""

import sys

from export.arm.cli import main

if __name__ == "__main__":
    sys.exit(main())
