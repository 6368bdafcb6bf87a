"""`python -m export.tflm`: build, verify and publish TFLM (microcontroller) artifacts (the shared CLI)."""

from export.cli import main as export_main
from export.reporting import exit_with


def main(argv: list[str] | None = None) -> int:
    return export_main(argv, formats=("tflm",), prog="python -m export.tflm")


if __name__ == "__main__":
    exit_with(main())
