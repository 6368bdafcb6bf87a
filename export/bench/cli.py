"""The command line of `python -m export.bench` (`xattn bench`): flags first, then the build half.

Parsing needs neither TensorFlow nor numpy, so a bad flag is refused at once, and a runtime-only
install (`pip install 'xattn[runtime]'`) gets one line naming the extra to install (exit 2)
instead of an ImportError's traceback; the benchmark's own modules (export.bench.suite) are
imported only after both checks.
"""

from __future__ import annotations

from export.bench.options import build_parser
from export.reporting import check_build_half, report_failures


def main(argv: list[str] | None = None, *, blas_pinned: bool = False) -> int:
    """Run the benchmark; `blas_pinned` says numpy loaded with one BLAS thread (`__main__`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _, code = report_failures(parser.prog, lambda: check_build_half(parser.prog))
    if code:
        return code
    from export.bench.suite import run_parsed  # lazy: TensorFlow, once the flags are known good

    args.blas_pinned = blas_pinned
    return run_parsed(args, parser.prog)
