"""This machine's single-thread SGEMM peak (numpy's BLAS and onnxruntime's MLAS), measured in the run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from export.bench.options import PEAK_SIZES
from export.runtime.runtimes import onnx_session
from export.spec import ArtifactSpec

log = logging.getLogger("export")


def documented_flops(spec: ArtifactSpec, batch: int) -> int:
    """The layer's FLOPs as documented (2 per multiply-add), whatever the graph runs.

    Both Dense projections, the query/key/value/output projections (key_dim = units), the
    scores and the weighted sum: 50.46 MFLOP at units 64, heads 4, lengths 10, features 64,
    batch 32.
    """
    u, h = spec.units, spec.heads
    tq, tkv = spec.query_len, spec.kv_len
    macs = (tq * spec.query_features * u + tkv * spec.kv_features * u  # Dense projections
            + tq * u * h * u + 2 * tkv * u * h * u  # query, key, value
            + 2 * h * tq * tkv * u  # scores, weighted sum
            + tq * h * u * u)  # output projection
    return 2 * batch * macs


def _sgemm_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peak(threads: int, *, blas_pinned: bool = False,
                 sizes: tuple[int, ...] = PEAK_SIZES) -> dict:
    """Single-process SGEMM throughput (GFLOP/s, median of several calls, best over sizes).

    Two libraries: numpy's BLAS (OpenBLAS here) and onnxruntime's MLAS MatMul on square
    float32 matrices, each with `threads` threads. The higher is the machine's peak: on a CPU
    OpenBLAS does not recognise it falls back to older kernels (AVX2 on an AVX-512 Zen 5),
    which would flatter every percentage.
    """
    rng = np.random.default_rng(0)
    result = {"numpy": {"gflops": 0.0, "size": None, "library": _blas_name(),
                        "threads_pinned": blas_pinned and threads == 1},
              "onnxruntime": {"gflops": 0.0, "size": None, "library": f"MLAS (onnxruntime "
                                                                      f"{ort.__version__})"}}
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        c = np.empty_like(a)
        reps = max(5, min(40, int(1e9 / n**3)))
        gflops = 2 * n**3 / _sgemm_seconds(lambda: np.matmul(a, b, out=c), reps) / 1e9  # noqa: B023
        if gflops > result["numpy"]["gflops"]:
            result["numpy"].update(gflops=gflops, size=n)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["A", "B"], ["C"])], "sgemm",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
             helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sgemm.onnx")
            with open(path, "wb") as f:
                f.write(model.SerializeToString())
            session = onnx_session(path, threads)
        feeds = {"A": a, "B": b}
        gflops = 2 * n**3 / _sgemm_seconds(lambda: session.run(None, feeds), reps) / 1e9  # noqa: B023
        if gflops > result["onnxruntime"]["gflops"]:
            result["onnxruntime"].update(gflops=gflops, size=n)
    candidates = [k for k in ("numpy", "onnxruntime")
                  if k == "onnxruntime" or result[k]["threads_pinned"]]
    best = max(candidates, key=lambda k: result[k]["gflops"])
    result["gflops"] = result[best]["gflops"]
    result["source"] = best
    return result


def _blas_name() -> str:
    with contextlib.suppress(Exception):
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{config['name']} {config.get('version', '')}".strip()
    return "numpy BLAS"


def _merge_peaks(peaks: list[dict]) -> dict:
    """The highest of several measurements (start, between lengths, end): contention on a shared
    machine only ever lowers a measurement, and a higher peak is the stricter denominator."""
    merged = json.loads(json.dumps(peaks[0]))
    for peak in peaks[1:]:
        for key in ("numpy", "onnxruntime"):
            if peak[key]["gflops"] > merged[key]["gflops"]:
                merged[key] = peak[key]
    candidates = [k for k in ("numpy", "onnxruntime")
                  if k == "onnxruntime" or merged[k]["threads_pinned"]]
    merged["source"] = max(candidates, key=lambda k: merged[k]["gflops"])
    merged["gflops"] = merged[merged["source"]]["gflops"]
    merged["measurements"] = len(peaks)
    return merged
