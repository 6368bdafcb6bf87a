"""`python -m export.bench --buckets 16,64,256`: what length buckets buy at run time.

A short request (the smallest bucket's lengths) three ways, batch 1, interleaved in one process:
through the largest-length file with masks (what one static file makes a user do), through the
bucketed file's smallest signature (LiteRT) or the dynamic-length ONNX file at its own length,
and (onnxruntime) through a static ONNX file of exactly that length, the best a file can do.
Every file is built and verified by `export.pipeline.export_artifacts`, as a user gets it.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from export import publish, reference
from export.bench.build import _quiet_native
from export.bench.report import _table
from export.bench.timing import _stats, time_interleaved
from export.flags import SHAPE_DEFAULTS
from export.pipeline import ExportRequest, export_artifacts
from export.runtime.runtimes import onnx_session, tflite_interpreter
from export.spec import ArtifactSpec, bucket_key

log = logging.getLogger("export")


def _tflite_call(path: str, signature: str, feeds: dict, threads: int):
    interpreter = tflite_interpreter(path, threads)
    runner = interpreter.get_signature_runner(signature)
    # The signature runner's own call (what a Python user makes); allocation happens once here.
    runner(**feeds)

    def call():
        return runner(**feeds)

    call.interpreter = interpreter
    return call


def _onnx_call(path: str, feeds: dict, threads: int):
    session = onnx_session(path, threads)
    names = [o.name for o in session.get_outputs()]

    def call():
        return session.run(names, feeds)

    return call


def _padded(feeds: dict, tq: int, tkv: int) -> dict:
    """A (1, Tq_s) request padded to (1, tq) with masks marking its real positions."""
    q, m = feeds["source1"], feeds["source2"]
    out = {
        "source1": np.zeros((1, tq, q.shape[2]), np.float32),
        "source2": np.zeros((1, tkv, m.shape[2]), np.float32),
        "query_mask": np.arange(tq)[None] < q.shape[1],
        "value_mask": np.arange(tkv)[None] < m.shape[1],
    }
    out["source1"][:, :q.shape[1]] = q
    out["source2"][:, :m.shape[1]] = m
    return out


def run_buckets(args, workdir: str) -> dict:
    """Build the files, time the short request, return the report's `buckets` section."""
    base = {k: getattr(args, k) for k in SHAPE_DEFAULTS if k not in ("query_len", "kv_len")}
    lengths = args.buckets
    bucketed = ArtifactSpec(**base, lengths=lengths)
    (sq, skv), (lq, lkv) = bucketed.lengths[0], bucketed.lengths[-1]
    large = ArtifactSpec(**base, query_len=lq, kv_len=lkv, query_mask=True, value_mask=True)
    small = ArtifactSpec(**base, query_len=sq, kv_len=skv, query_mask=True, value_mask=True)
    weights = reference.random_weights(small, args.seed)
    built = {}
    t0 = time.perf_counter()
    for tag, spec, formats in (("bucketed", bucketed, args.runtimes), ("large", large, args.runtimes),
                               ("small", small, ["onnx"] if "onnx" in args.runtimes else [])):
        specs = {f: spec.replace(batch=1) for f in formats}
        if not specs:
            continue
        with _quiet_native(not args.verbose):
            results = export_artifacts(ExportRequest(
                specs=specs, output_dir=os.path.join(workdir, f"buckets_{tag}"), seed=args.seed,
                weights=weights, weights_source=f"seed {args.seed}"))
        for r in results:
            built[(tag, r.format)] = r
    log.info("bench    built the bucket files (%.1f s)", time.perf_counter() - t0)

    request = reference.make_inputs(small.replace(query_mask=False, value_mask=False), 1,
                                    args.seed + 1)
    exact = _padded(request, sq, skv)  # all-true masks
    padded = _padded(request, lq, lkv)
    rows = []
    small_key, large_key = bucket_key(sq, skv), bucket_key(lq, lkv)
    if "tflite" in args.runtimes:
        calls = {
            f"{large_key} file, masks": _tflite_call(built[("large", "tflite")].path,
                                                     "serving_default", padded, args.threads),
            f"bucketed {small_key}": _tflite_call(built[("bucketed", "tflite")].path, small_key,
                                                  exact, args.threads),
        }
        rows += _timed("LiteRT", calls, args)
    if "onnx" in args.runtimes:
        calls = {
            f"{large_key} file, masks": _onnx_call(built[("large", "onnx")].path, padded, args.threads),
            f"dynamic-length at {sq}x{skv}": _onnx_call(built[("bucketed", "onnx")].path, exact,
                                                       args.threads),
            f"static {small_key} file": _onnx_call(built[("small", "onnx")].path, exact, args.threads),
        }
        rows += _timed("onnxruntime", calls, args)
    sizes = {f"{tag} {fmt}": r.bytes for (tag, fmt), r in built.items()}
    return {"request": [sq, skv], "largest": [lq, lkv], "lengths": [list(p) for p in lengths],
            "rows": rows, "bytes": sizes, "versions": publish.versions()}


def _timed(runtime: str, calls: dict, args) -> list[dict]:
    timings = time_interleaved(calls, iterations=args.iterations, warmup=args.warmup,
                               max_seconds=args.max_seconds)
    first = next(iter(calls))
    base = _stats(timings[first])["median"]
    rows = []
    for label in calls:
        stats = _stats(timings[label])
        rows.append({"runtime": runtime, "path": label, "us": stats,
                     "speedup": base / stats["median"]})
        log.info("bench    %s %s: %.1f µs (%.1fx)", runtime, label, stats["median"],
                 base / stats["median"])
    return rows


def render_buckets(section: dict) -> str:
    sq, skv = section["request"]
    header = ["runtime", f"a {sq}x{skv} request through", "median µs", "p90 µs",
              "vs the largest file"]
    rows = [[r["runtime"], r["path"], f"{r['us']['median']:.1f}", f"{r['us']['p90']:.1f}",
             f"{r['speedup']:.1f}x"] for r in section["rows"]]
    text = [f"length buckets {','.join(f'{q}x{kv}' for q, kv in section['lengths'])}, "
            f"batch 1, one call at a time, interleaved", _table(header, rows)]
    onnx = {r["path"].split(" ")[0]: r for r in section["rows"] if r["runtime"] == "onnxruntime"}
    if "dynamic-length" in onnx and "static" in onnx:
        ratio = onnx["dynamic-length"]["us"]["median"] / onnx["static"]["us"]["median"]
        text.append(f"dynamic-length ONNX at {sq}x{skv} / static {sq}x{skv} ONNX: {ratio:.2f}x")
    return "\n".join(text)
