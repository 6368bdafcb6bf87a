"""The one rule for an artifact's base name (`--name`, a `--model` file's stem, the default names):
checked by the parser of every entry point (export.flags) and again by every spec, so no name
can reach a path or a C++ identifier unchecked. No imports beyond the standard library."""

from __future__ import annotations

import re

from export.errors import SpecError

MAX_NAME_LENGTH = 128
# fullmatch, not match with `$`: `$` also matches before a final newline (`'nl\n'`).
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}")
NAME_RULE = (f"1-{MAX_NAME_LENGTH} characters of letters, digits, '_', '-' or '.', starting with a "
             "letter or digit")


def is_valid_name(name: object) -> bool:
    """Whether `name` is an acceptable base name: a single path component that stays inside the
    output folder (no `/`, no `..`, no leading `.`/`-`), free of whitespace and control
    characters, and short enough for every suffix a format adds."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: object, what: str = "name") -> str:
    """`name` if it follows the rule, else SpecError (exit 2) naming `what` and the value."""
    if not is_valid_name(name):
        raise SpecError(f"`{what}` must be {NAME_RULE}. Received: {what}={name!r}")
    return name
