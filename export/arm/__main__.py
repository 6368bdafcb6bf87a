"""`python -m export.arm [PATH]`: the published artifacts verified under aarch64 emulation."""

from export.arm.cli import main
from export.reporting import exit_with

if __name__ == "__main__":
    exit_with(main())
