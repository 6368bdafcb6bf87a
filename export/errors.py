"""Typed errors of the artifact builder; only the command lines (export.reporting) make exit codes."""

from __future__ import annotations

import contextlib
import os
import sys
import unicodedata


class ExportError(ValueError):
    """Base class of every failure the builder reports to a user."""

    exit_code = 1
    # How a `--help` epilog names this kind of failure (export.errors.exit_codes_epilog): the first
    # class defined with an exit code names it.
    brief = "an artifact failed verification (nothing published)"


class SpecError(ExportError):
    """An impossible configuration: sizes, batch, names, flags that contradict each other."""

    exit_code = 2
    brief = "usage error (a bad flag, an impossible configuration)"


class WeightsError(ExportError):
    """A `--weights`, `--model` or `--saved-model` file that is missing, unreadable, unsafe or does
    not fit the shapes."""

    exit_code = 3
    brief = "a --weights, --model or --saved-model file that is missing, unsafe or does not fit"


class CalibrationError(ExportError):
    """A calibration file with missing arrays, wrong shapes or dtypes."""

    exit_code = 2


class ConversionError(ExportError):
    """A converter (TensorFlow, tf2onnx, the TFLite converter) failed."""

    exit_code = 4
    brief = "a converter failed"


class ParityError(ExportError):
    """An artifact's outputs differ from the Keras reference beyond the tolerance."""

    exit_code = 1


class GraphCheckError(ExportError):
    """An artifact holds something its runtime should not see (dynamic shapes, non-builtin ops)."""

    exit_code = 1


class ArenaError(ExportError):
    """A TFLM file that does not run in the tensor arena allowed (`--arena-limit`), or in any
    arena the search tries."""

    exit_code = 1


class ManifestError(ExportError):
    """A manifest, golden file or artifact that cannot be trusted (verify)."""

    exit_code = 1


class InputError(ExportError):
    """Arrays fed to an artifact that do not fit its inputs: missing, extra, wrong shape or dtype."""

    exit_code = 2


class UsageError(ExportError):
    """A command line that cannot be acted on: no such path, nothing to verify."""

    exit_code = 2


class SigningError(ExportError):
    """A `--sign-key` / `--public-key` that is missing or not an elliptic-curve PEM key, or no
    model-signing package to use it."""

    exit_code = 2


class OutputDirError(ExportError):
    """`--output-dir` cannot be written: a regular file, a read-only file system, no permission."""

    exit_code = 5
    brief = "--output-dir cannot be written (a file, read-only)"


class DiskFullError(ExportError):
    """No space left on the device (or over quota) while writing into `--output-dir`."""

    exit_code = 6
    brief = "disk full"


class OutOfMemoryError(ExportError):
    """The configuration needs more memory than this machine has available (estimated before
    building, or a failed allocation in numpy or TensorFlow)."""

    exit_code = 7
    brief = "not enough memory"


class ProvisionError(ExportError):
    """The emulated ARM check (export.arm) lacks a tool or a download: qemu-aarch64-static or
    mmdebstrap missing, the arm64 root file system or the aarch64 wheels failing to download."""

    exit_code = 8
    brief = "--arm: qemu or mmdebstrap missing, or a download failed"


class EmulatorError(ExportError):
    """The verifier could not run (or said nothing readable) under aarch64 emulation."""

    exit_code = 9
    brief = "--arm: the emulated verifier crashed"


class Interrupted(ExportError):
    """Stopped by Ctrl-C or SIGINT (128 + SIGINT, as shells report it); whatever was staged is
    removed, nothing is published. Never raised: the code Python's KeyboardInterrupt becomes."""

    exit_code = 130
    brief = "interrupted"


INTERRUPTED_EXIT_CODE = Interrupted.exit_code


def error_classes() -> list[type[ExportError]]:
    """Every typed error, in the order this module defines them (the base class first)."""
    found = [ExportError]
    pending = [ExportError]
    while pending:
        for sub in pending.pop(0).__subclasses__():
            if sub.__module__ == __name__ and sub not in found:
                found.append(sub)
                pending.append(sub)
    order = {name: i for i, name in enumerate(globals())}
    return sorted(found, key=lambda c: order.get(c.__name__, len(order)))


def exit_codes() -> dict[int, str]:
    """Exit code -> what it means, from the error classes (the first one defining a code names
    it), with 0 for success: the one table the `--help` epilogs and the docs are made from."""
    codes = {0: "ok"}
    for cls in error_classes():
        codes.setdefault(cls.exit_code, cls.brief)
    return dict(sorted(codes.items()))


def exit_codes_epilog(codes: tuple[int, ...] | None = None,
                      meaning: dict[int, str] | None = None) -> str:
    """`exit codes: 0 ok; 1 ...; 130 interrupted`, for an argparse epilog.

    `codes`: the codes the command can return (default: every one); `meaning`: a command's own
    wording of some of them, `{1: "a file failed"}`; each code must be one an error class defines.
    """
    table = exit_codes()
    meaning = meaning or {}
    wanted = tuple(table) if codes is None else tuple(codes)
    unknown = sorted({c for c in (*wanted, *meaning) if c not in table})
    if unknown:
        raise ValueError(f"exit codes no error class defines: {unknown}")
    return "exit codes: " + "; ".join(f"{c} {meaning.get(c, table[c])}" for c in wanted)


@contextlib.contextmanager
def reader_may_leave():
    """Print results to a reader that may stop early (`... | head -1`) without a traceback.

    The work is done by the time its lines are printed: when the reader closes the pipe, the rest
    of the lines are dropped and the command's exit code still says how the work went. stdout is
    pointed at os.devnull so that the interpreter's last flush cannot raise again (the Python
    docs' "Note on SIGPIPE").
    """
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name: a one-line reason."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def one_line(text: str, limit: int = 300) -> str:
    """`text` with its whitespace (newlines included) collapsed, cut at `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: object, limit: int = 60) -> str:
    """repr(value) cut at `limit` characters: a value read from a file, quoted in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def printable(text: str) -> str:
    """`text` safe for a terminal: control, format and separator characters escaped.

    Strings read from a file (a manifest's `artifact`, a reason quoting it) may hold newlines, ANSI
    escape codes or bidi overrides that would forge or hide lines; each becomes `\\xNN`/`\\uNNNN`.
    """
    out = []
    for char in str(text):
        if unicodedata.category(char) in _UNPRINTABLE:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


# Cc control (newline, ESC), Cf format (bidi overrides), Cs/Co/Cn, Zl/Zp line and paragraph separators.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
