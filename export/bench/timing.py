"""Timing: one call as a Python user makes it, interleaved rounds, parity on the bench inputs."""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable

import numpy as np

from export import reference
from export.bench.build import Artifact, LengthSet
from export.bench.floor import floor_distance, one_op_graph, sgemm_call, sgemm_gflops
from export.bench.options import PARITY_SEED, VARIANT_LABEL
from export.bench.peak import documented_flops
from export.errors import ExportError
from export.formats import get_format
from export.graph import executed_flops
from export.runtime import check
from export.runtime.runtimes import onnx_session, tflite_interpreter

log = logging.getLogger("export")


def make_call(artifact: Artifact, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], list]:
    """One inference as a Python user makes it, outputs fetched."""
    if artifact.runtime == "onnx":
        session = onnx_session(artifact.path, threads)
        names = [o.name for o in session.get_outputs()]
        bound = {i.name: _feed(i.name, i.shape, feeds) for i in session.get_inputs()}

        def run_onnx():
            return session.run(names, bound)

        run_onnx.output_names = names
        return run_onnx
    interpreter = tflite_interpreter(artifact.path, threads)
    runner = interpreter.get_signature_runner("serving_default")
    inputs = [(d["index"], _feed(name, d["shape"], feeds).astype(d["dtype"], copy=False))
              for name, d in runner.get_input_details().items()]
    outputs = runner.get_output_details()
    out_index = [d["index"] for d in outputs.values()]
    set_tensor, invoke, get_tensor = interpreter.set_tensor, interpreter.invoke, interpreter.get_tensor

    def run_tflite():
        for index, array in inputs:
            set_tensor(index, array)
        invoke()
        return [get_tensor(i) for i in out_index]

    run_tflite.output_names = list(outputs)
    run_tflite.interpreter = interpreter  # keep it alive with the function
    return run_tflite


def _feed(name: str, shape, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The array for input `name`; Keras's exports may name inputs otherwise (`inputs_0`): then
    the one array of that shape."""
    if name in feeds:
        return feeds[name]
    dims = [None if not isinstance(d, (int, np.integer)) or d < 0 else int(d) for d in shape]
    fits = [a for a in feeds.values() if a.ndim == len(dims)
            and all(d is None or d == s for d, s in zip(dims, a.shape))]
    if len(fits) != 1:
        raise ExportError(f"cannot tell which array feeds input {name!r} of shape {list(shape)}")
    return fits[0]


def time_interleaved(calls: dict[str, Callable[[], object]], *, iterations: int, warmup: int,
                     max_seconds: float) -> dict[str, np.ndarray]:
    """Per-call latencies (µs) of each callable, run in alternating rounds.

    Interleaving spreads any slow phase of a shared machine over every candidate alike; the
    number of calls is capped by `max_seconds` per candidate (estimated from the warm-up).
    """
    slowest = 0.0
    for fn in calls.values():
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        # Slow cells (long sequences) warm up within a fraction of the budget.
        count = max(1, min(warmup, int(0.2 * max_seconds / max(first, 1e-9))))
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        slowest = max(slowest, (time.perf_counter() - t0) / count)
    n = min(iterations, max(min(iterations, 20), int(max_seconds / max(slowest, 1e-9))))
    rounds = max(1, min(20, n // 5))
    per_round = math.ceil(n / rounds)
    samples: dict[str, list[int]] = {k: [] for k in calls}
    keys = list(calls)
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for key in keys if r % 2 == 0 else reversed(keys):
                fn, bucket = calls[key], samples[key]
                for _ in range(per_round):
                    t0 = clock()
                    fn()
                    bucket.append(clock() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {k: np.asarray(v, dtype=np.float64) / 1e3 for k, v in samples.items()}


def _stats(us: np.ndarray) -> dict:
    return {"median": float(np.median(us)), "p90": float(np.percentile(us, 90)), "n": int(us.size)}


def _parity(model, call, feeds) -> dict:
    """max abs diff and relative L2 error against the Keras layer on the bench inputs."""
    metrics = check.parity_metrics(reference.run_reference(model, feeds),
                                   dict(zip(call.output_names, call())))
    return {"max_abs": metrics["max_abs"], "rel_l2": metrics["rel_l2"]}


def bench_length(ls: LengthSet, args, peak_gflops: float, workdir: str) -> list[dict]:
    """One row per (batch, runtime, variant) of this length: ours, Keras's, and the cell's floor
    (a one-op graph's call overhead and an SGEMM, timed in the same interleaved rounds)."""
    rows = []
    sgemm = sgemm_call(workdir, args.threads)
    for batch in args.batch:
        spec_b = ls.spec.replace(batch=batch)
        feeds = reference.make_inputs(spec_b, batch, PARITY_SEED)
        for runtime in args.runtimes:
            keras = ls.find("keras", runtime, "none", batch)
            ours = {v: ls.find("ours", runtime, v, batch) for v in args.variants}
            overhead = Artifact("floor", runtime, "none", one_op_graph(runtime, spec_b, workdir),
                                batch)
            calls = {"keras": make_call(keras, feeds, args.threads),
                     "overhead": make_call(overhead, feeds, args.threads), "sgemm": sgemm}
            for v, a in ours.items():
                if a is not None and a.error is None:
                    calls[v] = make_call(a, feeds, args.threads)
            parity = {k: _parity(ls.model, fn, feeds) for k, fn in calls.items()
                      if k not in ("overhead", "sgemm")}
            timings = time_interleaved(calls, iterations=args.iterations, warmup=args.warmup,
                                       max_seconds=args.max_seconds)
            keras_stats = _stats(timings["keras"])
            overhead_stats = _stats(timings["overhead"])
            cell_peak = sgemm_gflops(float(np.median(timings["sgemm"])))
            doc = documented_flops(ls.spec, batch)
            for v, a in ours.items():
                row = {
                    "runtime": get_format(runtime).runtime_label, "format": runtime, "variant": v,
                    "query_len": ls.spec.query_len, "kv_len": ls.spec.kv_len, "batch": batch,
                    "threads": args.threads,
                    "keras_us": keras_stats, "keras_bytes": keras.bytes,
                    "keras_max_abs": parity["keras"]["max_abs"],
                    "keras_rel_l2": parity["keras"]["rel_l2"],
                    "documented_mflop": doc / 1e6,
                }
                if a is None or a.error is not None:
                    row.update(error=a.error if a else "not built")
                    rows.append(row)
                    continue
                stats = _stats(timings[v])
                executed = executed_flops(ls.spec, a.layout or "onnx", batch=batch)
                gflops = doc / stats["median"] / 1e3
                row.update(
                    ours_us=stats, ours_bytes=a.bytes, ours_max_abs=parity[v]["max_abs"],
                    ours_rel_l2=parity[v]["rel_l2"],
                    ours_layout=a.layout, ours_onnx_batch=(
                        "dynamic" if a.batch is None else a.batch) if runtime == "onnx" else batch,
                    manifest_parity=a.manifest_parity,
                    speedup=keras_stats["median"] / stats["median"],
                    executed_mflop=executed / 1e6,
                    gflops=gflops, executed_gflops=executed / stats["median"] / 1e3,
                    keras_gflops=doc / keras_stats["median"] / 1e3,
                    pct_peak=100 * gflops / peak_gflops,
                    executed_pct_peak=100 * executed / stats["median"] / 1e3 / peak_gflops,
                    overhead_us=overhead_stats, cell_peak_gflops=cell_peak,
                    **floor_distance(stats["median"], overhead_stats["median"], executed,
                                     cell_peak),
                )
                rows.append(row)
                log.info("bench    %s %s L=%d/%d b=%d: ours %.1f µs, Keras %.1f µs (%.2fx); "
                         "%.2fx the floor", get_format(runtime).runtime_label, VARIANT_LABEL[v],
                         ls.spec.query_len, ls.spec.kv_len, batch, stats["median"],
                         keras_stats["median"], row["speedup"], row["floor_distance"])
    return rows
