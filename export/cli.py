"""The command line of `python -m export` and its per-format entry points: parse (export.flags),
resolve (export.request), export, print the table; typed errors become one line and an exit code.

Exit codes: 0 success; 1 an artifact failed verification (nothing published); 2 usage error
(bad flag, impossible configuration, bad calibration file, bad signing key); 3 a `--weights` file
that is missing, unsafe or does not fit; 4 a converter failed; 5 `--output-dir` cannot be written;
6 no space left on the device; 7 not enough memory; 8 `--arm`: qemu/mmdebstrap missing or a
download failed; 9 `--arm`: the emulated verifier crashed; 130 interrupted.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from export import resources, signing
from export.deployment import summary as deployment_summary
from export.errors import INTERRUPTED_EXIT_CODE, ExportError, printable, reader_may_leave
from export.flags import SHAPE_DEFAULTS, build_parser, check_length_flags, check_model_flags
from export.formats import FORMAT_NAMES, get_format
from export.request import resolve_request

__all__ = ["SHAPE_DEFAULTS", "build_parser", "configure_logging", "main", "print_table",
           "report_failures", "resolve_request"]

log = logging.getLogger("export")
T = TypeVar("T")


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    logger = logging.getLogger("export")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def print_table(results) -> None:
    """The closing table on stdout: artifact, size, max abs diff, rel L2, placement (the
    manifest's `deployment`, export.deployment.summary), path."""
    rows = [("artifact", "size", "max abs diff", "rel L2", "placement", "path")]
    for r in results:
        rows.append((
            f"{r.format}{'' if r.spec.quantize == 'none' else ' ' + r.spec.quantize}",
            _human_size(r.bytes),
            f"{r.parity['max_abs']:.2e}",
            f"{r.parity['rel_l2']:.1e}",
            deployment_summary(r.manifest.get("deployment")),
            r.path,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _human_size(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


def report_failures(prog: str, call: Callable[[], T], *,
                    interrupted: str = "interrupted") -> tuple[T | None, int]:
    """Run `call()`: a typed error or Ctrl-C becomes one line on stderr and its exit code.

    Returns `(result, 0)`, or `(None, exit code)`; every entry point's main() reports this way.
    """
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


def main(argv: list[str] | None = None, *, formats: tuple[str, ...] = FORMAT_NAMES,
         prog: str = "python -m export") -> int:
    parser = build_parser(formats, prog)
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    if getattr(args, "int8_io", False) and getattr(args, "quantize", "none") != "int8":
        parser.error(f"--int8-io needs --quantize int8. Received: --quantize {args.quantize}")
    if getattr(args, "int8_io", False) and not any(get_format(f).int8_io for f in formats):
        # ONNX int8 is weight-only: float32 inputs and outputs; only TFLite files take int8 ones.
        parser.error("--int8-io applies to TFLite only; ONNX int8 files take and return float32")
    mixed = check_length_flags(args, formats) or check_model_flags(args)
    if mixed:
        parser.error(mixed)
    if getattr(args, "max_rel_error", None) is not None and getattr(args, "quantize", "none") == "none":
        parser.error("--max-rel-error gates a --quantize variant (float32 artifacts gate on "
                     "--atol). Received: --max-rel-error without --quantize")

    def export():
        from export.pipeline import export_artifacts  # lazy: TensorFlow, after parsing

        resources.check_output_dir(args.output_dir)
        if args.sign_key:  # a bad key fails before anything is built
            signing.load_signer(args.sign_key)
        if args.arm:  # so does a missing qemu or a failed download (cached in build/arm)
            from export import arm  # lazy: qemu's cache and the verifier, with --arm only

            arm.provision(arm.DEFAULT_CACHE)
        request = resolve_request(args, formats)
        resources.check_memory(request.specs, parameters=(
            request.model.model.count_params() if request.model is not None else None))
        with resources.typed_os_errors(request.output_dir), resources.progress():
            return export_artifacts(request)

    results, code = report_failures(prog, export, interrupted="interrupted; nothing published")
    if code:
        return code
    if not args.quiet:
        with reader_may_leave():
            print_table(results)
    return 0
