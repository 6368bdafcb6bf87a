"""`python -m export.tflite`: build, verify and publish TFLite artifacts (the shared CLI, one format)."""

from export.cli import main as export_main
from export.reporting import exit_with


def main(argv: list[str] | None = None) -> int:
    return export_main(argv, formats=("tflite",), prog="python -m export.tflite")


if __name__ == "__main__":
    exit_with(main())
