"""Both sides of the comparison: our verified artifacts and Keras's own `model.export` of the same weights."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import tensorflow as tf

from export import reference
from export.bench.options import PARITY_SEED, VARIANT_LABEL
from export.errors import ConversionError, ExportError
from export.formats import get_format
from export.graph import preferred_layout
from export.pipeline import ExportRequest, export_artifacts
from export.runtime.native_output import captured_native_output
from export.spec import ArtifactSpec

log = logging.getLogger("export")


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
    out = LengthSet(spec=spec)
    runtimes = args.runtimes
    for variant in args.variants:
        requests = []
        for i, batch in enumerate(args.batch):
            specs = {}
            if "onnx" in runtimes and (args.onnx_batch == "fixed" or i == 0):
                specs["onnx"] = spec.replace(
                    batch=batch if args.onnx_batch == "fixed" else None,
                    quantize=get_format("onnx").variant_for(variant))
            if "tflite" in runtimes:
                specs["tflite"] = spec.replace(batch=batch,
                                               quantize=get_format("tflite").variant_for(variant))
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
                    layout=preferred_layout(r.spec, get_format(r.format).layout), bytes=r.bytes,
                    manifest_parity=r.parity))
            log.info("bench    built ours %s %s (%.1f s)", VARIANT_LABEL[variant],
                     ", ".join(sorted(specs)), time.perf_counter() - t0)
    out.model = _keras_exports(spec, weights, args, workdir, quiet, out)
    return out


def _keras_exports(spec: ArtifactSpec, weights: list, args, workdir: str, quiet: bool,
                   out: LengthSet):
    """Keras's own `model.export` of the reference model with the same weights."""
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
