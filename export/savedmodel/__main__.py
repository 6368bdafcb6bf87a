"""`python -m export.savedmodel`: build, verify and publish SavedModel artifacts (the shared CLI)."""

from export.cli import main as export_main
from export.reporting import exit_with


def main(argv: list[str] | None = None) -> int:
    return export_main(argv, formats=("savedmodel",), prog="python -m export.savedmodel")


if __name__ == "__main__":
    exit_with(main())
