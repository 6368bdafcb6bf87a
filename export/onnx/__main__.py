"""`python -m export.onnx`: build, verify and publish ONNX artifacts (the shared CLI, one format)."""

from export.cli import main as export_main
from export.reporting import exit_with


def main(argv: list[str] | None = None) -> int:
    return export_main(argv, formats=("onnx",), prog="python -m export.onnx")


if __name__ == "__main__":
    exit_with(main())
