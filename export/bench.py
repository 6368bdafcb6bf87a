"""`python -m export.bench`: our artifacts against Keras's own export of the same weights.

Builds our ONNX and TFLite artifacts through `export.pipeline.export_artifacts` (verified, as a
user gets them) and Keras 3's `model.export(format="onnx")` / `format="litert"` of the same
reference model, then times them interleaved in one process, one call at a time the way a Python
user calls them: onnxruntime `session.run(names, feeds)`; LiteRT `set_tensor` per input,
`invoke()`, `get_tensor` per output. Prints a table (median and p90 µs, speedup, GFLOP/s
counting the layer's documented FLOPs, % of this machine's single-thread SGEMM peak measured in
the same run), sizes, parity, and the issue's goals; `--json PATH` writes the same figures.

Each side in its faster form: our ONNX file has a dynamic batch (the default artifact; a fixed
batch measured about 10% slower in onnxruntime, `--onnx-batch fixed` to check), Keras's ONNX
export has the measured batch fixed (a little faster than its dynamic export,
`--keras-onnx-batch dynamic` to check). TFLite files have the measured batch fixed, ours and
Keras's alike.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # The SGEMM peak is measured single-thread (as the goal defines it): pin BLAS before numpy
    # loads. Only when run as a program; importing this module changes no environment.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
_BLAS_PINNED = "numpy" not in sys.modules and os.environ.get("OPENBLAS_NUM_THREADS") == "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

from export.cli import (  # noqa: E402
    SHAPE_DEFAULTS,
    _OneLineParser,
    _positive_float,
    _positive_int,
    configure_logging,
    report_failures,
)
from export.errors import ConversionError, ExportError, SpecError  # noqa: E402
from export.native_output import captured_native_output  # noqa: E402
from export.spec import QUANTIZE_MODES, ArtifactSpec  # noqa: E402

log = logging.getLogger("export")

RUNTIMES = ("onnx", "tflite")
RUNTIME_LABEL = {"onnx": "onnxruntime", "tflite": "LiteRT"}
VARIANT_LABEL = {"none": "float32", "float16": "float16", "dynamic-int8": "dyn-int8", "int8": "int8"}
# The goals, judged at its configuration (units 64, heads 4, lengths 10, features 64,
# one thread): speedup over Keras's export per (runtime, batch), and the rest.
SPEEDUP_GOALS = {("onnx", 1): 2.0, ("onnx", 32): 1.6, ("tflite", 1): 1.4, ("tflite", 32): 1.25}
PEAK_GOAL = 0.60
SIZE_GOAL = 0.90
PARITY_GOAL = 1e-4
STARTUP_GOAL = 1.5
GOAL_CONFIG = {"units": 64, "heads": 4, "query_len": 10, "kv_len": 10,
               "query_features": 64, "kv_features": 64}
PEAK_SIZES = (256, 512, 1024)
PARITY_SEED = 4242


# -- flags --------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [_positive_int(part.strip()) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of positive integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must list at least one positive integer, got {text!r}")
    return list(dict.fromkeys(values))


def _choice_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of {', '.join(choices)}, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m export.bench",
        description=(
            "Time our ONNX and TFLite artifacts against Keras's own model.export() of the same "
            "weights (interleaved, one process), against this machine's single-thread SGEMM "
            "peak measured in the same run; print a table and optionally write --json."
        ),
    )
    shapes = parser.add_argument_group("layer and shapes (as python -m export)")
    for key, default in SHAPE_DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        shapes.add_argument(flag, type=_positive_int, default=default,
                            help=f"{key.replace('_', ' ')} (default {default})")
    shapes.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    sweep = parser.add_argument_group("what to measure")
    sweep.add_argument("--batch", type=_int_list, default=[1, 32], metavar="N[,N...]",
                       help="batch sizes (default 1,32)")
    sweep.add_argument("--lengths", type=_int_list, metavar="L[,L...]",
                       help="sweep sequence length: each L sets --query-len and --kv-len "
                            "(default: the --query-len/--kv-len given)")
    sweep.add_argument("--threads", type=_positive_int, default=1,
                       help="runtime threads (default 1)")
    sweep.add_argument("--runtimes", type=_choice_list(RUNTIMES), default=list(RUNTIMES),
                       metavar="onnx,tflite", help="runtimes to time (default both)")
    sweep.add_argument("--variants", type=_choice_list(QUANTIZE_MODES), default=["none"],
                       metavar="V[,V...]",
                       help=f"our variants: {', '.join(QUANTIZE_MODES)} (default none = float32); "
                            "each is compared with Keras's float32 export")
    sweep.add_argument("--onnx-batch", choices=("dynamic", "fixed"), default="dynamic",
                       help="our ONNX file: one dynamic-batch file (default) or one per batch")
    sweep.add_argument("--keras-onnx-batch", choices=("dynamic", "fixed"), default="fixed",
                       help="Keras's ONNX export: one per batch (default) or one dynamic file")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--iterations", type=_positive_int, default=2000,
                        help="timed calls per artifact and cell, at most (default 2000)")
    timing.add_argument("--warmup", type=_positive_int, default=200,
                        help="untimed calls first (default 200)")
    timing.add_argument("--max-seconds", type=_positive_float, default=3.0,
                        help="time budget per artifact and cell; fewer calls for slow cells "
                             "(default 3)")
    timing.add_argument("--startup", action="store_true",
                        help="also time `python -m export.onnx --units U --heads H` end to end "
                             "against a bare Keras model.export(format='onnx') script")
    timing.add_argument("--startup-runs", type=_positive_int, default=5,
                        help="runs of each with --startup, interleaved (default 5)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    out.add_argument("--keep-dir", metavar="DIR",
                     help="build into DIR and keep the artifacts (default: a temporary folder)")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    talk.add_argument("-q", "--quiet", action="store_true", help="print the table only")
    return parser


# -- FLOPs and the SGEMM peak -------------------------------------------------------------------


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


def measure_peak(threads: int, sizes: tuple[int, ...] = PEAK_SIZES) -> dict:
    """Single-process SGEMM throughput (GFLOP/s, median of several calls, best over sizes).

    Two libraries: numpy's BLAS (OpenBLAS here) and onnxruntime's MLAS MatMul on square
    float32 matrices, each with `threads` threads. The higher is the machine's peak: on a CPU
    OpenBLAS does not recognise it falls back to older kernels (AVX2 on an AVX-512 Zen 5),
    which would flatter every percentage.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.runtimes import onnx_session

    rng = np.random.default_rng(0)
    result = {"numpy": {"gflops": 0.0, "size": None, "library": _blas_name(),
                        "threads_pinned": _BLAS_PINNED and threads == 1},
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


# -- building ------------------------------------------------------------------------------------


@dataclass
class Artifact:
    """One file to time: ours (a variant) or Keras's, in one runtime, for some batch sizes."""

    owner: str  # "ours" | "keras"
    runtime: str  # "onnx" | "tflite"
    variant: str  # QUANTIZE_MODES; Keras's is "none"
    path: str
    batch: int | None  # fixed batch, None for dynamic
    layout: str | None = None
    bytes: int = 0
    manifest_parity: dict | None = None
    error: str | None = None

    def serves(self, batch: int) -> bool:
        return self.batch is None or self.batch == batch


@dataclass
class LengthSet:
    spec: ArtifactSpec
    artifacts: list[Artifact] = field(default_factory=list)
    model: object = None

    def find(self, owner: str, runtime: str, variant: str, batch: int) -> Artifact | None:
        for a in self.artifacts:
            if (a.owner, a.runtime, a.variant) == (owner, runtime, variant) and a.serves(batch):
                return a
        return None


def _quiet_native(enabled: bool):
    """Converters write progress to fd 1/2 from C++; keep it, and show it only if they fail."""
    return captured_native_output((1, 2)) if enabled else contextlib.nullcontext()


def build_length(spec: ArtifactSpec, weights: list, args, workdir: str, quiet: bool) -> LengthSet:
    """Our verified artifacts (each variant) and Keras's exports, for one (Tq, Tkv)."""
    from export.graph import preferred_layout
    from export.pipeline import LAYOUT, ExportRequest, export_artifacts

    out = LengthSet(spec=spec)
    runtimes = args.runtimes
    for variant in args.variants:
        requests = []
        for i, batch in enumerate(args.batch):
            specs = {}
            if "onnx" in runtimes and (args.onnx_batch == "fixed" or i == 0):
                specs["onnx"] = spec.replace(
                    batch=batch if args.onnx_batch == "fixed" else None, quantize=variant)
            if "tflite" in runtimes:
                specs["tflite"] = spec.replace(batch=batch, quantize=variant)
            if specs:
                requests.append((batch, specs))
        for batch, specs in requests:
            folder = os.path.join(workdir, f"ours_q{spec.query_len}_kv{spec.kv_len}_{variant}_b{batch}")
            t0 = time.perf_counter()
            try:
                with _quiet_native(quiet):
                    results = export_artifacts(ExportRequest(
                        specs=specs, output_dir=folder, seed=args.seed, weights=weights,
                        weights_source=f"seed {args.seed}"))
            except ExportError as e:
                if variant == "none":
                    raise
                log.warning("bench    our %s variant failed: %s", variant, e)
                for fmt, s in specs.items():
                    out.artifacts.append(Artifact("ours", fmt, variant, "", s.batch, error=str(e)))
                continue
            for r in results:
                out.artifacts.append(Artifact(
                    "ours", r.format, variant, r.path, r.spec.batch,
                    layout=preferred_layout(r.spec, LAYOUT[r.format]), bytes=r.bytes,
                    manifest_parity=r.parity))
            log.info("bench    built ours %s %s (%.1f s)", VARIANT_LABEL[variant],
                     ", ".join(sorted(specs)), time.perf_counter() - t0)
    out.model = _keras_exports(spec, weights, args, workdir, quiet, out)
    return out


def _keras_exports(spec: ArtifactSpec, weights: list, args, workdir: str, quiet: bool,
                   out: LengthSet):
    """Keras's own `model.export` of the reference model with the same weights."""
    import tensorflow as tf

    from export import reference

    model = reference.build_reference(spec.replace(batch=None), weights)
    # Keras exports only a model that has been called.
    reference.run_reference(model, reference.make_inputs(spec, 1, PARITY_SEED))
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    stem = os.path.join(workdir, f"keras_q{spec.query_len}_kv{spec.kv_len}")
    t0 = time.perf_counter()
    try:
        def signature(batch):
            return [{info.name: tf.TensorSpec(info.shape, tf.as_dtype(info.dtype), name=info.name)
                     for info in spec.replace(batch=batch).inputs()}]

        if "onnx" in args.runtimes:
            batches = args.batch if args.keras_onnx_batch == "fixed" else [None]
            for batch in batches:
                path = f"{stem}_b{batch or 'dynamic'}.onnx"
                kwargs = {} if batch is None else {"input_signature": signature(batch)}
                with _quiet_native(quiet):
                    model.export(path, format="onnx", verbose=False, **kwargs)
                out.artifacts.append(Artifact("keras", "onnx", "none", path, batch,
                                              bytes=os.path.getsize(path)))
        if "tflite" in args.runtimes:
            for batch in args.batch:
                # LiteRT runs one shape: Keras's export at the measured batch, like ours.
                path = f"{stem}_b{batch}.tflite"
                with _quiet_native(quiet):
                    model.export(path, format="litert", verbose=False,
                                 input_signature=signature(batch))
                out.artifacts.append(Artifact("keras", "tflite", "none", path, batch,
                                              bytes=os.path.getsize(path)))
    except Exception as e:
        raise ConversionError(f"Keras's own model.export failed: {e}") from e
    log.info("bench    built Keras's exports (%.1f s)", time.perf_counter() - t0)
    return model


# -- running and timing ----------------------------------------------------------------------------


def make_call(artifact: Artifact, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], list]:
    """One inference as a Python user makes it, outputs fetched."""
    from export.runtimes import onnx_session, tflite_interpreter

    if artifact.runtime == "onnx":
        session = onnx_session(artifact.path, threads)
        names = [o.name for o in session.get_outputs()]
        bound = {i.name: feeds[i.name] for i in session.get_inputs()}

        def run_onnx():
            return session.run(names, bound)

        run_onnx.output_names = names
        return run_onnx
    interpreter = tflite_interpreter(artifact.path, threads)
    runner = interpreter.get_signature_runner("serving_default")
    inputs = [(d["index"], feeds[name].astype(d["dtype"], copy=False))
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
    from export import check, reference

    metrics = check.parity_metrics(reference.run_reference(model, feeds),
                                   dict(zip(call.output_names, call())))
    return {"max_abs": metrics["max_abs"], "rel_l2": metrics["rel_l2"]}


def bench_length(ls: LengthSet, args, peak_gflops: float) -> list[dict]:
    from export import reference
    from export.graph import executed_flops

    rows = []
    for batch in args.batch:
        spec_b = ls.spec.replace(batch=batch)
        feeds = reference.make_inputs(spec_b, batch, PARITY_SEED)
        for runtime in args.runtimes:
            keras = ls.find("keras", runtime, "none", batch)
            ours = {v: ls.find("ours", runtime, v, batch) for v in args.variants}
            calls = {"keras": make_call(keras, feeds, args.threads)}
            for v, a in ours.items():
                if a is not None and a.error is None:
                    calls[v] = make_call(a, feeds, args.threads)
            parity = {k: _parity(ls.model, fn, feeds) for k, fn in calls.items()}
            timings = time_interleaved(calls, iterations=args.iterations, warmup=args.warmup,
                                       max_seconds=args.max_seconds)
            keras_stats = _stats(timings["keras"])
            doc = documented_flops(ls.spec, batch)
            for v, a in ours.items():
                row = {
                    "runtime": RUNTIME_LABEL[runtime], "format": runtime, "variant": v,
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
                )
                rows.append(row)
                log.info("bench    %s %s L=%d/%d b=%d: ours %.1f µs, Keras %.1f µs (%.2fx)",
                         RUNTIME_LABEL[runtime], VARIANT_LABEL[v], ls.spec.query_len,
                         ls.spec.kv_len, batch, stats["median"], keras_stats["median"],
                         row["speedup"])
    return rows


# -- startup --------------------------------------------------------------------------------------

_BARE_SCRIPT = """\
import os, sys, tempfile
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf  # noqa: F401
import keras
from xattn import CrossAttention
s1 = keras.Input(({q}, {fq}), name="source1")
s2 = keras.Input(({kv}, {fkv}), name="source2")
model = keras.Model({{"source1": s1, "source2": s2}}, CrossAttention({u}, {h})([s1, s2]))
model({{"source1": np.zeros((1, {q}, {fq}), "float32"), "source2": np.zeros((1, {kv}, {fkv}), "float32")}})
model.export(os.path.join(sys.argv[1], "model.onnx"), format="onnx", verbose=False)
"""


def measure_startup(args, workdir: str) -> dict:
    """Wall time of `python -m export.onnx --units U --heads H` (convert + verify + publish)
    against a bare script that imports TensorFlow and calls model.export(format="onnx"),
    in alternating fresh processes (like hyperfine), after one untimed run of each."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)  # neither command runs pinned
    script = os.path.join(workdir, "bare_keras_export.py")
    with open(script, "w") as f:
        f.write(_BARE_SCRIPT.format(u=args.units, h=args.heads, q=args.query_len, kv=args.kv_len,
                                    fq=args.query_features, fkv=args.kv_features))
    ours_cmd = [sys.executable, "-m", "export.onnx", "--units", str(args.units), "--heads",
                str(args.heads), "--quiet"]
    commands = {
        "ours": lambda out: ours_cmd + ["--output-dir", out],
        "keras": lambda out: [sys.executable, script, out],
    }
    times: dict[str, list[float]] = {"ours": [], "keras": []}
    for i in range(args.startup_runs + 1):
        for key in (("ours", "keras") if i % 2 == 0 else ("keras", "ours")):
            out = tempfile.mkdtemp(prefix=f"startup-{key}-", dir=workdir)
            t0 = time.perf_counter()
            done = subprocess.run(commands[key](out), cwd=repo, env=env, capture_output=True,
                                  text=True)
            elapsed = time.perf_counter() - t0
            if done.returncode != 0:
                raise ExportError(f"startup run of {key} failed ({done.returncode}): "
                                  f"{done.stderr.strip()[-500:]}")
            if i > 0:  # the first run of each warms the file cache
                times[key].append(elapsed)
    result = {"command": " ".join(["python"] + ours_cmd[1:]),
              "baseline": "python <script>: import tensorflow, build the model, "
                          "model.export(format='onnx')"}
    for key, values in times.items():
        result[key] = {"median_s": statistics.median(values), "mean_s": statistics.fmean(values),
                       "sd_s": statistics.stdev(values) if len(values) > 1 else 0.0,
                       "min_s": min(values), "runs": len(values)}
    result["ratio"] = result["ours"]["median_s"] / result["keras"]["median_s"]
    return result


# -- report ----------------------------------------------------------------------------------------


def machine() -> dict:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(Exception):
        load = os.getloadavg()[0]
        return {"cpu": model, "cores": os.cpu_count(), "system": platform.platform(),
                "load_1min_at_start": load}
    return {"cpu": model, "cores": os.cpu_count(), "system": platform.platform()}


def _fmt_us(stats: dict) -> str:
    return f"{stats['median']:.1f} ({stats['p90']:.1f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def render(report: dict) -> str:
    peak = report["peak"]
    parts = []
    m = report["machine"]
    parts.append(
        f"machine: {m['cpu']}, {m['cores']} cores; threads {report['config']['threads']}; "
        f"units {report['config']['units']}, heads {report['config']['heads']}, features "
        f"{report['config']['query_features']}/{report['config']['kv_features']}")
    parts.append(
        f"SGEMM peak {peak['gflops']:.0f} GFLOP/s ({peak['source']}); numpy {peak['numpy']['library']} "
        f"{peak['numpy']['gflops']:.0f} GFLOP/s (n={peak['numpy']['size']}), onnxruntime MLAS "
        f"{peak['onnxruntime']['gflops']:.0f} GFLOP/s (n={peak['onnxruntime']['size']})")
    header = ["runtime", "variant", "Tq/Tkv", "batch", "ours µs (p90)", "Keras µs (p90)",
              "speedup", "GFLOP/s", "% peak", "exec GFLOP/s", "exec % peak"]
    rows = []
    for r in report["latency"]:
        common = [r["runtime"], VARIANT_LABEL[r["variant"]], f"{r['query_len']}/{r['kv_len']}",
                  str(r["batch"])]
        if "error" in r:
            rows.append(common + ["failed", _fmt_us(r["keras_us"]), "", "", "", "", ""])
            continue
        rows.append(common + [
            _fmt_us(r["ours_us"]), _fmt_us(r["keras_us"]), f"{r['speedup']:.2f}x",
            f"{r['gflops']:.0f}", f"{r['pct_peak']:.0f}%", f"{r['executed_gflops']:.0f}",
            f"{r['executed_pct_peak']:.0f}%",
        ])
    parts.append(_table(header, rows))
    parts.append(
        "GFLOP/s and % peak count the layer's documented FLOPs (50.5 MFLOP at batch 32 and the "
        "defaults); exec counts what our folded graph runs (export.graph.executed_flops).")
    size_rows = [[s["runtime"], VARIANT_LABEL[s["variant"]], f"{s['query_len']}/{s['kv_len']}",
                  str(s["batch"]), f"{s['ours_bytes'] / 1024:.1f} KB",
                  f"{s['keras_bytes'] / 1024:.1f} KB", f"{s['ratio']:.2f}x",
                  f"{s['ours_max_abs']:.1e}", f"{s['ours_rel_l2']:.1e}",
                  f"{s['keras_max_abs']:.1e}", s["layout"]]
                 for s in report["sizes"]]
    parts.append(_table(["artifact", "variant", "Tq/Tkv", "batch", "ours size", "Keras size",
                         "ratio", "ours max|diff|", "ours rel L2", "Keras max|diff|",
                         "our layout"], size_rows))
    if report.get("startup"):
        s = report["startup"]
        parts.append(
            f"startup: `{s['command']}` {s['ours']['median_s']:.2f} s (sd {s['ours']['sd_s']:.2f}) "
            f"vs bare Keras export script {s['keras']['median_s']:.2f} s (sd "
            f"{s['keras']['sd_s']:.2f}): {s['ratio']:.2f}x, {s['ours']['runs']} runs each")
    if report.get("goals"):
        lines = ["goals (issue 4, at units 64, heads 4, lengths 10, features 64, one thread):"]
        for g in report["goals"]:
            mark = "met" if g["met"] else "NOT met"
            lines.append(f"  [{mark}] {g['goal']}: {g['value']}")
        parts.append("\n".join(lines))
    elif report.get("goals_note"):
        parts.append(report["goals_note"])
    return "\n\n".join(parts)


def _sizes(report_rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in report_rows:
        if "error" in r:
            continue
        key = (r["format"], r["variant"], r["query_len"], r["kv_len"],
               r["batch"] if r["format"] == "tflite" else None)
        if key in seen:
            continue
        seen.add(key)
        out.append({"runtime": r["runtime"], "format": r["format"], "variant": r["variant"],
                    "query_len": r["query_len"], "kv_len": r["kv_len"],
                    "batch": r["batch"] if r["format"] == "tflite" else r["ours_onnx_batch"],
                    "ours_bytes": r["ours_bytes"], "keras_bytes": r["keras_bytes"],
                    "ratio": r["ours_bytes"] / r["keras_bytes"], "ours_max_abs": r["ours_max_abs"],
                    "ours_rel_l2": r["ours_rel_l2"], "keras_max_abs": r["keras_max_abs"],
                    "layout": r["ours_layout"]})
    return out


def evaluate_goals(report: dict) -> list[dict] | None:
    cfg = report["config"]
    if cfg["threads"] != 1 or any(cfg[k] != v for k, v in GOAL_CONFIG.items()
                                  if k not in ("query_len", "kv_len")):
        return None
    rows = [r for r in report["latency"] if r["query_len"] == 10 and r["kv_len"] == 10
            and r["variant"] == "none" and "error" not in r]
    if not rows:
        return None
    goals = []
    by = {(r["format"], r["batch"]): r for r in rows}
    for (fmt, batch), need in SPEEDUP_GOALS.items():
        r = by.get((fmt, batch))
        if r:
            goals.append({"goal": f"{RUNTIME_LABEL[fmt]} batch {batch} >= {need}x Keras's export",
                          "value": f"{r['speedup']:.2f}x ({r['ours_us']['median']:.1f} vs "
                                   f"{r['keras_us']['median']:.1f} µs)",
                          "met": r["speedup"] >= need})
    at32 = [r for r in rows if r["batch"] == 32]
    if at32:
        fastest = min(at32, key=lambda r: r["ours_us"]["median"])
        goals.append({
            "goal": f"batch 32 in the faster runtime >= {PEAK_GOAL:.0%} of the SGEMM peak "
                    "(documented FLOPs)",
            "value": f"{fastest['runtime']}: {fastest['gflops']:.0f} GFLOP/s = "
                     f"{fastest['pct_peak']:.0f}% of {report['peak']['gflops']:.0f} (counting the "
                     f"FLOPs our graph runs: {fastest['executed_pct_peak']:.0f}%)",
            "met": fastest["pct_peak"] >= 100 * PEAK_GOAL})
    for s in report["sizes"]:
        if s["variant"] == "none" and s["query_len"] == 10:
            goals.append({"goal": f"{s['runtime']} float32 file (batch {s['batch']}) <= "
                                  f"{SIZE_GOAL}x Keras's",
                          "value": f"{s['ratio']:.2f}x ({s['ours_bytes']} vs {s['keras_bytes']} bytes)",
                          "met": s["ratio"] <= SIZE_GOAL})
    worst = max(max(r["ours_max_abs"], r["manifest_parity"]["max_abs"]) for r in rows)
    goals.append({"goal": f"parity <= {PARITY_GOAL:g} max abs diff vs the Keras layer",
                  "value": f"{worst:.1e} (bench inputs and the manifests' verification)",
                  "met": worst <= PARITY_GOAL})
    if report.get("startup"):
        s = report["startup"]
        goals.append({"goal": f"python -m export.onnx end to end <= {STARTUP_GOAL}x a bare Keras "
                              "export script",
                      "value": f"{s['ratio']:.2f}x ({s['ours']['median_s']:.2f} vs "
                               f"{s['keras']['median_s']:.2f} s)",
                      "met": s["ratio"] <= STARTUP_GOAL})
    return goals


# -- entry point ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Everything `main` does but printing: build, measure, return the report."""
    from export import publish, reference

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
        peaks = [measure_peak(args.threads)]
        log.info("bench    SGEMM peak %.0f GFLOP/s (%s)", peaks[0]["gflops"], peaks[0]["source"])
        rows: list[dict] = []
        for spec in specs:
            ls = build_length(spec, weights, args, workdir, quiet_native)
            rows += bench_length(ls, args, peaks[0]["gflops"])
            peaks.append(measure_peak(args.threads))
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
    goals = evaluate_goals(report)
    if goals is not None:
        report["goals"] = goals
        if args.iterations < 100:
            report["goals_note"] = "(few iterations: a smoke run, not a measurement)"
    else:
        report["goals_note"] = ("goals not judged: the issue states them at units 64, heads 4, "
                                "lengths 10, features 64, one thread")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    prog = parser.prog
    report, code = report_failures(prog, lambda: run(args))
    if code:
        return code
    print(render(report))
    if report.get("goals") and report.get("goals_note"):
        print(report["goals_note"])
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


if __name__ == "__main__":
    sys.exit(main())
