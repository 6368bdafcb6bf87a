"""The command line of `python -m export` and its per-format entry points: parse (export.flags),
resolve (export.request), export, print the table; typed errors become one line and an exit code.

Exit codes: the error classes define them (export.errors.exit_codes; `--help` lists them);
export.reporting turns a typed error into one line and its code.
"""

from __future__ import annotations

import logging

from export import resources
from export.deployment import summary as deployment_summary
from export.errors import reader_may_leave
from export.flags import SHAPE_DEFAULTS, build_parser, check_length_flags, check_model_flags
from export.formats import FORMAT_NAMES, get_format
from export.reporting import check_build_half, configure_logging, report_failures
from export.request import resolve_request
from export.runtime import signing

__all__ = ["SHAPE_DEFAULTS", "build_parser", "configure_logging", "main", "print_table",
           "report_failures", "resolve_request"]

log = logging.getLogger("export")


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


def main(argv: list[str] | None = None, *, formats: tuple[str, ...] = FORMAT_NAMES,
         prog: str = "python -m export") -> int:
    parser = build_parser(formats, prog)
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    if args.int8_io and args.quantize == "int8-cpu":
        parser.error("--int8-io needs the integer-only --quantize int8; int8-cpu keeps the "
                     "attention core in float32. Received: --quantize int8-cpu --int8-io")
    if args.int8_io and args.quantize != "int8":
        parser.error(f"--int8-io needs --quantize int8. Received: --quantize {args.quantize}")
    if args.int8_io and not any(get_format(f).int8_io for f in formats):
        # ONNX int8 is weight-only: float32 inputs and outputs; only TFLite files take int8 ones.
        parser.error("--int8-io applies to TFLite only; ONNX int8 files take and return float32")
    mixed = check_length_flags(args, formats) or check_model_flags(args, formats)
    if mixed:
        parser.error(mixed)
    if args.max_rel_error is not None and args.quantize == "none":
        parser.error("--max-rel-error gates a --quantize variant (float32 artifacts gate on "
                     "--atol). Received: --max-rel-error without --quantize")

    def export():
        check_build_half(prog)  # the runtime half alone: one line naming the extra, exit 2
        resources.check_output_dir(args.output_dir)
        if args.sign_key:  # a bad key fails before anything is built (or TensorFlow loads)
            signing.load_signer(args.sign_key)
        if args.arm:  # so does a missing qemu or a failed download (cached: export.caches)
            from export import arm  # lazy: qemu's cache and the verifier, with --arm only

            arm.provision(arm.DEFAULT_CACHE)
        from export.pipeline import export_artifacts  # lazy: TensorFlow, after the cheap refusals

        request = resolve_request(args, formats)
        resources.check_memory(request.specs, parameters=(
            request.model.parameters if request.model is not None else None))
        with resources.typed_os_errors(request.output_dir), resources.progress():
            return export_artifacts(request)

    results, code = report_failures(prog, export, interrupted="interrupted; nothing published")
    if code:
        return code
    if not args.quiet:
        with reader_may_leave():
            print_table(results)
    return 0
