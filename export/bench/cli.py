"""The command line of `python -m export.bench` (`xattn bench`): flags first, then the build half.

Parsing needs neither TensorFlow nor numpy, so a bad flag is refused at once, and a runtime-only
install (`pip install 'xattn[runtime]'`) gets one line naming the extra to install (exit 2)
instead of an ImportError's traceback; the benchmark's own modules (export.bench.suite) are
imported only after both checks.
"""

from __future__ import annotations

import argparse

from export.bench.options import build_parser
from export.flags import SHAPE_DEFAULTS
from export.reporting import check_build_half, report_failures


def main(argv: list[str] | None = None, *, blas_pinned: bool = False) -> int:
    """Run the benchmark; `blas_pinned` says numpy loaded with one BLAS thread (`__main__`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None:
        given = _given(parser, argv, LAYER_ONLY)
        if given:
            flag = "--" + given[0].replace("_", "-")
            parser.error(f"--model and {flag} cannot be combined: the model's inputs give the "
                         f"shapes and it holds its weights. Received: --model {args.model} {flag}")
    _, code = report_failures(parser.prog, lambda: check_build_half(parser.prog))
    if code:
        return code
    from export.bench.suite import run_parsed  # lazy: TensorFlow, once the flags are known good

    args.blas_pinned = blas_pinned
    return run_parsed(args, parser.prog)


# The lone layer's flags: a --model run would ignore them (its group's title says they do not apply).
LAYER_ONLY = (*SHAPE_DEFAULTS, "seed", "lengths", "buckets")
_UNSET = object()


def _given(parser: argparse.ArgumentParser, argv: list[str] | None, dests) -> list[str]:
    """Which of `dests` the command line gave (their defaults hide it): parsed again over a
    namespace already holding them, which argparse leaves alone unless a flag sets them."""
    probe = argparse.Namespace(**{d: _UNSET for d in dests})
    parser.parse_args(argv, probe)
    return [d for d in dests if getattr(probe, d) is not _UNSET]
