"""`python -m export.ort`: build, verify and publish ORT Mobile artifacts (the shared CLI, one format)."""

from export.cli import main as export_main
from export.reporting import exit_with


def main(argv: list[str] | None = None) -> int:
    return export_main(argv, formats=("ort",), prog="python -m export.ort")


if __name__ == "__main__":
    exit_with(main())
