"""`python -m export.bench --model PATH`: a user's whole model, ours against Keras's own export.

Ours: the verified artifacts `python -m export --model` publishes (ONNX with a dynamic batch,
TFLite at each measured batch). Keras's: `model.export(format="onnx")` and `format="litert"` of
the same loaded model at each measured batch (the faster form, as for the layer). Both run
interleaved in one process, one call at a time; parity is against the Keras model on the bench
inputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from export import model as user_model
from export import model_load, publish
from export.bench.build import Artifact, _quiet_native
from export.bench.options import PARITY_SEED, variant_label
from export.bench.report import _table, machine
from export.bench.timing import _stats, make_call, time_interleaved
from export.errors import ConversionError
from export.formats import get_format
from export.pipeline import ExportRequest, export_artifacts
from export.runtime.check import parity_metrics

log = logging.getLogger("export")


def _ours(ref, inputs, outputs, stem, args, workdir: str, quiet: bool) -> list[Artifact]:
    found = []
    for variant in args.variants:
        for i, batch in enumerate(args.batch):
            specs = {}
            if "onnx" in args.runtimes and i == 0:
                specs["onnx"] = None
            if "tflite" in args.runtimes:
                specs["tflite"] = batch
            if not specs:
                continue
            specs = {fmt: user_model.ModelSpec(model_inputs=inputs, model_outputs=outputs, stem=stem,
                                               batch=b, quantize=get_format(fmt).variant_for(variant))
                     for fmt, b in specs.items()}
            folder = os.path.join(workdir, f"ours_{variant}_b{batch}")
            with _quiet_native(quiet):
                results = export_artifacts(ExportRequest(specs=specs, output_dir=folder, model=ref))
            for r in results:
                found.append(Artifact("ours", r.format, variant, r.path, r.spec.batch,
                                      layout="folded", bytes=r.bytes, manifest_parity=r.parity))
    return found


def _keras(model, inputs, args, workdir: str, quiet: bool) -> list[Artifact]:
    """Keras's own `model.export` of the same model, at each measured batch."""
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    found = []

    def signature(batch):
        specs = [tf.TensorSpec((batch, *t.shape), tf.as_dtype(t.dtype), name=t.name) for t in inputs]
        return [model_load._structured(model, specs)]

    try:
        for fmt, keras_format in (("onnx", "onnx"), ("tflite", "litert")):
            if fmt not in args.runtimes:
                continue
            for batch in args.batch:
                path = os.path.join(workdir, f"keras_b{batch}.{fmt}")
                with _quiet_native(quiet):
                    model.export(path, format=keras_format, verbose=False,
                                 input_signature=signature(batch))
                found.append(Artifact("keras", fmt, "none", path, batch,
                                      bytes=os.path.getsize(path)))
    except Exception as e:
        raise ConversionError(f"Keras's own model.export failed: {e}") from e
    return found


def run_model(args) -> dict:
    """Build both sides for `args.model`, time them, and return the report."""
    model_load.import_modules(args.imports)
    model = model_load.functional_view(model_load.load_model(args.model), dict(args.input_shapes))
    inputs, outputs = model_load.model_tensors(model, dict(args.input_shapes))
    samples = (model_load.load_sample_inputs(args.sample_inputs, inputs)
               if args.sample_inputs else None)
    ref = user_model.ModelReference(args.model, model, samples, args.sample_inputs)
    stem = model_load.default_stem(args.model)
    report = {
        "machine": machine(), "versions": publish.versions(),
        "config": {"model": os.path.basename(args.model), "parameters": int(model.count_params()),
                   "batch": args.batch, "threads": args.threads, "runtimes": args.runtimes,
                   "variants": args.variants, "iterations": args.iterations},
    }
    context = (contextlib.nullcontext(args.keep_dir) if args.keep_dir
               else tempfile.TemporaryDirectory(prefix="xattn-bench-model-"))
    rows, sizes = [], []
    with context as workdir:
        os.makedirs(workdir, exist_ok=True)
        t0 = time.perf_counter()
        ours = _ours(ref, inputs, outputs, stem, args, workdir, not args.verbose)
        keras = _keras(model, inputs, args, workdir, not args.verbose)
        log.info("bench    built ours and Keras's exports (%.1f s)", time.perf_counter() - t0)
        spec = user_model.ModelSpec(model_inputs=inputs, model_outputs=outputs, stem=stem)
        for batch in args.batch:
            feeds = ref.make_inputs(spec.replace(batch=batch), batch, PARITY_SEED)
            reference = ref.run(spec, feeds)
            for fmt in args.runtimes:
                theirs = next(a for a in keras if a.runtime == fmt and a.batch == batch)
                mine = {a.variant: a for a in ours if a.runtime == fmt and a.batch in (None, batch)}
                calls = {"keras": make_call(theirs, feeds, args.threads)}
                calls.update({v: make_call(a, feeds, args.threads) for v, a in mine.items()})
                parity = {}
                for key, call in calls.items():
                    got = call()
                    want = list(reference.values())
                    metrics = parity_metrics(
                        {str(i): w for i, w in enumerate(want)},
                        {str(i): np.asarray(g).reshape(w.shape) for i, (g, w) in
                         enumerate(zip(got, want))})
                    parity[key] = metrics
                timings = time_interleaved(calls, iterations=args.iterations, warmup=args.warmup,
                                           max_seconds=args.max_seconds)
                keras_stats = _stats(timings["keras"])
                for variant, artifact in mine.items():
                    stats = _stats(timings[variant])
                    rows.append({
                        "runtime": get_format(fmt).runtime_label, "format": fmt, "variant": variant,
                        "batch": batch, "ours_us": stats, "keras_us": keras_stats,
                        "speedup": keras_stats["median"] / stats["median"],
                        "ours_bytes": artifact.bytes, "keras_bytes": theirs.bytes,
                        "ours_max_abs": parity[variant]["max_abs"],
                        "ours_rel_l2": parity[variant]["rel_l2"],
                        "keras_max_abs": parity["keras"]["max_abs"],
                    })
        for a in ours:
            if a.variant == "none":
                theirs = [k for k in keras if k.runtime == a.runtime]
                sizes.append({"format": a.runtime, "batch": a.batch, "ours_bytes": a.bytes,
                              "keras_bytes": min(k.bytes for k in theirs),
                              "ratio": a.bytes / min(k.bytes for k in theirs)})
    report["latency"], report["sizes"] = rows, sizes
    return report


def render_model(report: dict) -> str:
    m, c = report["machine"], report["config"]
    parts = [f"machine: {m['cpu']}, {m['cores']} cores; threads {c['threads']}; model "
             f"{c['model']} ({c['parameters']} parameters)"]
    header = ["runtime", "variant", "batch", "ours µs (p90)", "Keras µs (p90)", "speedup",
              "ours size", "Keras size", "ours max|diff|", "ours rel L2", "Keras max|diff|"]
    rows = [[r["runtime"], variant_label(r["variant"], r["format"]), str(r["batch"]),
             f"{r['ours_us']['median']:.1f} ({r['ours_us']['p90']:.1f})",
             f"{r['keras_us']['median']:.1f} ({r['keras_us']['p90']:.1f})",
             f"{r['speedup']:.2f}x", f"{r['ours_bytes'] / 1024:.1f} KB",
             f"{r['keras_bytes'] / 1024:.1f} KB", f"{r['ours_max_abs']:.1e}",
             f"{r['ours_rel_l2']:.1e}", f"{r['keras_max_abs']:.1e}"]
            for r in report["latency"]]
    parts.append(_table(header, rows))
    return "\n\n".join(parts)
