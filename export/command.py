"""`xattn <command>`: one console script over every entry point (`[project.scripts]`).

`xattn export [FORMAT] ...`, `xattn verify`, `xattn serve`, `xattn bench [serve]`, `xattn arm`:
each runs the entry point's own main(argv) under the name typed, so `python -m export.onnx ...`
and `xattn export onnx ...` are one command with two spellings. The formats are the registry's
(export.formats): a new format is a new `xattn export` choice without a line here. Importing this
module imports no TensorFlow: `xattn --help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from export.errors import exit_codes_epilog
from export.flags import OneLineParser
from export.formats import FORMAT_NAMES, REGISTRY
from export.reporting import PROG_NAMES, exit_with

PROG = "xattn"


@dataclass(frozen=True)
class Command:
    """One `xattn` command: the `python -m` entry it is, and what `xattn --help` says of it."""

    name: str
    module: str  # the `python -m` module it is also run as (an alias where the code moved)
    help: str
    cli: str = ""  # the module whose main(argv) runs it, when not `<module>.cli` (the code moved)

    @property
    def alias(self) -> str:
        return f"python -m {self.module}"


COMMANDS = (
    Command("export", "export", "build, verify and publish artifacts: every default format "
                                f"({', '.join(FORMAT_NAMES)}), or one: xattn export FORMAT"),
    Command("verify", "export.verify", "check published artifacts against their manifests "
                                       "(numpy and the runtimes only)", cli="export.runtime.verify.cli"),
    Command("serve", "export.serve", "verify, then serve artifacts over the Open Inference "
                                     "Protocol (HTTP, gRPC)", cli="export.runtime.serve.cli"),
    Command("bench", "export.bench", "benchmark the runtimes on fresh builds; `xattn bench serve`: "
                                     "the serving load benchmark"),
    Command("arm", "export.arm", "verify artifacts under aarch64 emulation (qemu)"),
)
BY_NAME = {c.name: c for c in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    """The tree `xattn --help` shows: commands, and `export`'s formats under it.

    The leaves' own flags are their entry points' parsers (built when a command runs, so that
    `xattn --help` imports none of them); `xattn COMMAND --help` prints those.
    """
    parser = OneLineParser(
        prog=PROG,
        description="Build, verify, serve and benchmark xattn artifacts. Each command is also "
                    "`python -m <module>` (shown in brackets); `xattn COMMAND --help` for its flags.",
        epilog=exit_codes_epilog(),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands",
        help="one of " + ", ".join(c.name for c in COMMANDS) + "; `xattn export FORMAT` for one "
             "format (" + ", ".join(REGISTRY) + ")")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=f"{command.help} [{command.alias}]",
                                  add_help=False)
        if command.name == "export":
            formats = sub.add_subparsers(dest="format", metavar="FORMAT", title="formats")
            for fmt in REGISTRY.values():
                formats.add_parser(fmt.name, add_help=False,
                                   help=f"{fmt.title} only [python -m export.{fmt.name}]")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`xattn`'s entry: the command's own main(argv), or the tree's help or usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        # Ctrl-C while a command is still importing: one line, not a traceback (as export/__init__
        # does for `python -m`); the command's report_failures takes over once it runs.
        signal.signal(signal.SIGINT, _interrupted_early)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        if not argv:
            parser.error("a command is required: " + ", ".join(BY_NAME))
        parser.parse_args(argv[:1])  # prints the help or the version, exits 0
    command = BY_NAME.get(argv[0])
    if command is None:
        parser.error(f"unknown command {argv[0]!r}; commands: {', '.join(BY_NAME)}")
    return entry(command.name, argv[1:])()


def entry(name: str, argv: list[str]) -> Callable[[], int]:
    """The call that runs command `name` with the rest of the command line `argv`."""
    if name == "export":
        from export.cli import main as export_main  # lazy: the export parser, only for this command

        if argv[:1] and argv[0] in REGISTRY:
            fmt, rest = argv[0], argv[1:]
            return lambda: export_main(rest, formats=(fmt,), prog=f"{PROG} export {fmt}")
        return lambda: export_main(argv, prog=f"{PROG} export")
    if name == "bench":
        # lazy: export.bench's __main__ pins BLAS to one thread before numpy loads; imported, it
        # does that and says whether it could (numpy not yet loaded) in _BLAS_PINNED.
        pinned = importlib.import_module("export.bench.__main__")
        if argv[:1] == ["serve"]:
            from export.runtime.serve.loadbench import main as serve_main  # lazy: only `xattn bench serve`

            return lambda: serve_main(argv[1:], prog=f"{PROG} bench serve")
        # lazy: only for this command; it parses, then checks for the build half (TensorFlow)
        from export.bench.cli import main as bench_main

        return _running_as("python -m export.bench", f"{PROG} bench",
                           lambda: bench_main(argv, blas_pinned=pinned._BLAS_PINNED))
    command = BY_NAME[name]
    # lazy: each command's own module (serve and arm import more than --help needs)
    module = importlib.import_module(command.cli or f"{command.module}.cli")
    return _running_as(command.alias, f"{PROG} {name}", lambda: module.main(argv))


def _running_as(alias: str, name: str, call: Callable[[], int]) -> Callable[[], int]:
    def run() -> int:
        with running_as(alias, name):
            return call()

    return run


@contextlib.contextmanager
def running_as(alias: str, name: str) -> Iterator[None]:
    """While inside, the parsers and error lines of `alias` (`python -m export.verify`) say `name`."""
    before = PROG_NAMES.get(alias)
    PROG_NAMES[alias] = name
    try:
        yield
    finally:
        if before is None:
            PROG_NAMES.pop(alias, None)
        else:
            PROG_NAMES[alias] = before


def _version() -> str:
    from importlib import metadata  # lazy: only for --version

    try:
        return metadata.version("xattn")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout, not installed
        return "(not installed)"


def _interrupted_early(signum, frame):  # pragma: no cover - exercised in a subprocess
    os.write(2, f"{PROG}: interrupted while starting; nothing written\n".encode())
    os._exit(130)


def run() -> None:
    """The `xattn` console script: main(), its status through exit_with (Ctrl-C: 130)."""
    exit_with(main())


if __name__ == "__main__":  # pragma: no cover - `xattn` is the console script
    run()
