"""The whole benchmark: build, measure, report (`python -m export.bench` runs `main`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile

from export import publish, reference
from export.bench.buckets import render_buckets, run_buckets
from export.bench.build import build_length
from export.bench.model import render_model, run_model
from export.bench.peak import _merge_peaks, measure_peak
from export.bench.report import _sizes, evaluate_verdicts, machine, render
from export.bench.startup import measure_startup
from export.bench.timing import bench_length
from export.errors import SpecError
from export.flags import SHAPE_DEFAULTS
from export.reporting import configure_logging, report_failures
from export.spec import ArtifactSpec

log = logging.getLogger("export")


def run(args: argparse.Namespace) -> dict:
    """Everything `main` does but printing: build, measure, return the report."""
    if args.buckets:
        context = (contextlib.nullcontext(args.keep_dir) if args.keep_dir
                   else tempfile.TemporaryDirectory(prefix="xattn-bench-"))
        with context as workdir:
            os.makedirs(workdir, exist_ok=True)
            return {"machine": machine(), "buckets": run_buckets(args, workdir)}
    base = {k: getattr(args, k) for k in SHAPE_DEFAULTS}
    lengths = [(n, n) for n in args.lengths] if args.lengths else [(args.query_len, args.kv_len)]
    specs = [ArtifactSpec(**{**base, "query_len": q, "kv_len": kv}) for q, kv in lengths]
    weights = reference.random_weights(specs[0], args.seed)
    report = {
        "machine": machine(),
        "versions": publish.versions(),
        "config": {**base, "lengths": [list(x) for x in lengths], "batch": args.batch,
                   "threads": args.threads, "runtimes": args.runtimes, "variants": args.variants,
                   "onnx_batch": args.onnx_batch, "keras_onnx_batch": args.keras_onnx_batch,
                   "iterations": args.iterations,
                   "warmup": args.warmup, "max_seconds": args.max_seconds, "seed": args.seed},
        "method": ("interleaved rounds in one process, one call at a time, outputs fetched: "
                   "onnxruntime session.run(names, feeds); LiteRT set_tensor/invoke/get_tensor; "
                   "median and p90 over the timed calls"),
    }
    quiet_native = not args.verbose
    context = (contextlib.nullcontext(args.keep_dir) if args.keep_dir
               else tempfile.TemporaryDirectory(prefix="xattn-bench-"))
    with context as workdir:
        os.makedirs(workdir, exist_ok=True)
        peaks = [measure_peak(args.threads, blas_pinned=args.blas_pinned)]
        log.info("bench    SGEMM peak %.0f GFLOP/s (%s)", peaks[0]["gflops"], peaks[0]["source"])
        rows: list[dict] = []
        for spec in specs:
            ls = build_length(spec, weights, args, workdir, quiet_native)
            rows += bench_length(ls, args, peaks[0]["gflops"], workdir)
            peaks.append(measure_peak(args.threads, blas_pinned=args.blas_pinned))
        peak = _merge_peaks(peaks)
        for r in rows:  # against the highest peak seen in the whole run
            if "gflops" in r:
                r["pct_peak"] = 100 * r["gflops"] / peak["gflops"]
                r["executed_pct_peak"] = 100 * r["executed_gflops"] / peak["gflops"]
        report["peak"] = peak
        report["latency"] = rows
        report["sizes"] = _sizes(rows)
        if args.startup:
            report["startup"] = measure_startup(args, workdir)
    verdicts = evaluate_verdicts(report)
    if verdicts is not None:
        report["verdicts"] = verdicts
        if args.iterations < 100:
            report["verdicts_note"] = "(few iterations: a smoke run, not a measurement)"
    else:
        report["verdicts_note"] = ("verdicts not judged: the targets are stated at units 64, "
                                   "heads 4, lengths 10, features 64, one thread")
    return report


def run_parsed(args: argparse.Namespace, prog: str) -> int:
    """Run the benchmark on parsed flags (export.bench.cli parses them); print, write --json."""
    configure_logging(args.verbose, args.quiet)
    if args.model:
        report, code = report_failures(prog, lambda: run_model(args))
    else:
        report, code = report_failures(prog, lambda: run(args))
    if code:
        return code
    if args.model:
        print(render_model(report))
    elif "buckets" in report:
        print(render_buckets(report["buckets"]))
    else:
        print(render(report))
    if report.get("verdicts") and report.get("verdicts_note"):
        print(report["verdicts_note"])
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2, sort_keys=True)
                f.write("\n")
        except OSError as e:
            print(f"{prog}: error: cannot write --json {args.json}: {e.strerror or e}",
                  file=sys.stderr)
            return SpecError.exit_code
    return 0
