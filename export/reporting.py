"""How every command reports (`python -m export...`, `xattn`): the name it runs under, its
logging, and typed errors turned into one line on stderr and an exit code (export.errors).

Standard library only: the runtime half's commands (verify, serve, arm) report through it
without importing the build half's command line (export.cli).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from export.errors import INTERRUPTED_EXIT_CODE, ExportError, UsageError, printable

T = TypeVar("T")

# `xattn <command>` runs an entry point's main() under the name the user typed (export.command,
# `running_as`): a parser built meanwhile with one of these `python -m` names takes the other.
PROG_NAMES: dict[str, str] = {}


# What exporting imports that the runtime half (pip install ".[runtime]") does not install.
BUILD_HALF_PACKAGES = ("tensorflow", "keras", "tf2onnx", "onnx")


def check_build_half(prog: str) -> None:
    """UsageError (exit 2) naming the extra to install when a command of the build half runs
    where only the runtime half is installed: one line instead of an ImportError's traceback."""
    missing = [p for p in BUILD_HALF_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f"{display_prog(prog)} exports, which needs the build half: "
                         f"{', '.join(missing)} not installed here (pip install 'xattn[build]')")


def display_prog(prog: str) -> str:
    """The name a command runs under: `prog`, or what `xattn` calls it while it runs it."""
    return PROG_NAMES.get(prog, prog)


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    logger = logging.getLogger("export")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def report_failures(prog: str, call: Callable[[], T], *,
                    interrupted: str = "interrupted") -> tuple[T | None, int]:
    """Run `call()`: a typed error or Ctrl-C becomes one line on stderr and its exit code.

    Returns `(result, 0)`, or `(None, exit code)`; every entry point's main() reports this way.
    """
    prog = display_prog(prog)
    # From here on Ctrl-C raises KeyboardInterrupt, so staging folders are removed on the way out
    # (before, export/__init__ exits at once: nothing has been written yet).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return call(), 0
    except ExportError as e:
        # Escaped: messages quote names read from files (a manifest's artifact), and a newline
        # or an ANSI code in one would forge lines (`✓ ... verified`) on the terminal.
        print(f"{prog}: error: {printable(str(e))}", file=sys.stderr)
        return None, e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return None, INTERRUPTED_EXIT_CODE


def exit_with(code: int) -> NoReturn:
    """End a command's process with `code` (every `python -m` entry and `xattn`).

    After Ctrl-C (130, already reported and cleaned up), without the interpreter's teardown: a
    KeyboardInterrupt raised inside Python code that a C extension ran (pybind11's exec, during
    TensorFlow's import) leaves CPython believing it went unhandled, whoever caught it, and its
    teardown then ends the process by SIGINT (status -2) instead of 130."""
    if code == INTERRUPTED_EXIT_CODE:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)
