"""The export pipeline as a library call: reference -> convert -> verify -> manifest -> publish.

`export_artifacts` is what every entry point calls; it raises typed errors (export.errors) and
never exits. Nothing reaches `output_dir` until every requested artifact has passed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from export import check, publish, reference
from export.errors import ExportError, SpecError
from export.golden_raw import write_golden_raw
from export.spec import ArtifactSpec

log = logging.getLogger("export")

# Head layout per format (see export.graph), the fallback where the "source" layout does not
# apply (export.graph.preferred_layout).
LAYOUT = {"onnx": "onnx", "savedmodel": "onnx", "tflite": "tflite"}


@dataclass
class ExportRequest:
    """What to build. `specs` maps format -> spec (formats may differ in batch only)."""

    specs: dict[str, ArtifactSpec]
    output_dir: str = "artifacts"
    seed: int = 0
    weights: list | None = None  # 12 arrays in fusionlab order; None -> random from `seed`
    weights_source: str | None = None  # a file path, for the manifest
    atol: float | None = None  # None -> check.DEFAULT_ATOL[format]
    max_rel_error: float | None = None  # None -> check.DEFAULT_MAX_REL[variant]
    opset: int | None = None
    calibration: str | None = None


@dataclass
class ArtifactResult:
    format: str
    spec: ArtifactSpec
    path: str
    manifest_path: str
    bytes: int
    sha256: str
    parity: dict
    manifest: dict


def verification_batches(spec: ArtifactSpec) -> list[int]:
    """Several seeded batches; two different sizes when the batch axis is dynamic."""
    return [spec.batch] * 3 if spec.batch is not None else [1, 5, 8]


def export_artifacts(request: ExportRequest) -> list[ArtifactResult]:
    specs = request.specs
    if not specs:
        raise SpecError("no format requested")
    first = next(iter(specs.values()))
    from export import quantize

    # Formats may differ in batch and variant (savedmodel stays float32 under --quantize).
    same = dict(batch=first.batch, name=first.name, quantize="none", int8_io=False)
    for fmt, spec in specs.items():
        if spec.replace(**same) != first.replace(**same):
            raise SpecError(f"the {fmt} spec differs from the others in more than its batch")
        quantize.check_variant(fmt, spec)
    # A bad calibration file fails here, before anything is built.
    calibrations = quantize.calibrations_for(specs, request.calibration)
    started = time.perf_counter()
    if request.weights is not None:
        weights = [np.asarray(w, dtype=np.float32) for w in request.weights]
        source = request.weights_source or "given weights"
    else:
        weights = reference.random_weights(first, request.seed)
        source = f"seed {request.seed}"
    log.info("build    reference CrossAttention(%d, %d), %s, weights from %s",
             first.units, first.heads, first.describe().split(" batch=")[0], source)
    model = reference.build_reference(first, weights)
    from export.graph import fold_weights

    folded = fold_weights(reference.reference_weights(model), first.heads)
    layer_config = reference.find_cross_attention(model).get_config()

    results: list[ArtifactResult] = []
    with publish.staging(request.output_dir) as stage:
        staged: list[str] = []
        model.save(os.path.join(stage, first.reference_name))
        staged.append(first.reference_name)
        goldens = {}
        golden_raw = {}
        for spec in specs.values():
            if spec.golden_name in goldens:
                continue
            feeds = reference.make_inputs(spec, spec.golden_samples, reference.GOLDEN_SEED)
            outputs = reference.run_reference(model, feeds)
            golden_path = os.path.join(stage, spec.golden_name)
            publish.write_npz(golden_path, {**feeds, **outputs})
            goldens[spec.golden_name] = (feeds, outputs, publish.sha256_path(golden_path))
            staged.append(spec.golden_name)
            # The same arrays for readers without numpy (web/): raw buffers + a JSON index.
            golden_raw[spec.golden_name] = write_golden_raw({**feeds, **outputs}, stage, spec.name)
            staged += [golden_raw[spec.golden_name]["index"], golden_raw[spec.golden_name]["data"]]
        _guard_shared_files(request.output_dir, specs, goldens)
        for fmt, spec in specs.items():
            results.append(
                _build_one(fmt, spec, request, model, folded, layer_config, stage, goldens, source,
                           calibration=calibrations.get(fmt),
                           golden_raw=golden_raw[spec.golden_name])
            )
        manifests = [os.path.basename(r.manifest_path) for r in results]
        artifacts = [os.path.basename(r.path) for r in results]
        log.info("publish  %d artifact(s) into %s", len(results), request.output_dir)
        publish.publish(stage, request.output_dir, staged + artifacts + manifests)
    for r in results:
        r.path = os.path.join(request.output_dir, os.path.basename(r.path))
        r.manifest_path = os.path.join(request.output_dir, os.path.basename(r.manifest_path))
    log.info("done in %.1f s", time.perf_counter() - started)
    return results


def _guard_shared_files(output_dir: str, specs: dict[str, ArtifactSpec], goldens: dict) -> None:
    """Refuse to replace a golden file that artifacts not rebuilt in this run still rely on.

    The reference and golden vectors are shared by every format of one name. Publishing new
    weights under a name whose other artifacts stay would leave those artifacts failing
    `export.verify`; fail before converting anything instead, and say how to avoid it.
    """
    rebuilt = {spec.manifest_name(fmt) for fmt, spec in specs.items()}
    new_golden = {name: sha for name, (_, _, sha) in goldens.items()}
    for entry in sorted(os.listdir(output_dir)):
        if not entry.endswith(".json") or entry in rebuilt:
            continue
        try:
            with open(os.path.join(output_dir, entry), encoding="utf-8") as f:
                manifest = json.load(f)
            golden, golden_sha = manifest.get("golden"), manifest.get("golden_sha256")
        except (OSError, ValueError, AttributeError):
            continue  # not one of ours, or damaged: export.verify reports those
        if golden in new_golden and golden_sha and golden_sha != new_golden[golden]:
            name = golden[: -len(".golden.npz")]
            raise SpecError(
                f"{entry} in {output_dir} was built from other weights under the name {name!r}, "
                f"and this export would replace the golden vectors it is verified with; rebuild "
                f"all its formats in one run (python -m export ...) or pass --name to keep both"
            )


def _build_one(fmt, spec, request, model, folded, layer_config, stage, goldens, source,
               calibration=None, golden_raw=None):
    from export import quantize
    from export.graph import build_inference_function, preferred_layout
    from export.runtimes import load_runner

    t0 = time.perf_counter()
    fn = build_inference_function(spec, folded, layout=preferred_layout(spec, LAYOUT[fmt]),
                                  **quantize.graph_options(spec))
    extra_manifest = {}
    if fmt == "onnx":
        from export.onnx import build_onnx, max_opset

        opset = request.opset if request.opset is not None else max_opset()
        path = build_onnx(spec, fn, stage, opset=opset, calibration=calibration)
        extra_manifest["opset"] = opset
    elif fmt == "tflite":
        from export.tflite import build_tflite

        path = build_tflite(spec, fn, stage, calibration=calibration)
    elif fmt == "savedmodel":
        from export.savedmodel import build_savedmodel

        path = build_savedmodel(spec, fn, stage)
    else:
        raise SpecError(f"unknown format {fmt!r}")
    log.info("convert  %-10s %s (%.1f s)", fmt, os.path.basename(path), time.perf_counter() - t0)

    t0 = time.perf_counter()
    if fmt == "onnx":
        check.check_onnx_graph(
            path,
            fixed_batch=spec.batch is not None,
            input_names=[i.name for i in spec.inputs()],
            output_names=[o.name for o in spec.outputs()],
        )
    elif fmt == "tflite":
        check.check_tflite_graph(path)
    runner = load_runner(fmt, path, batch=spec.batch, inputs=spec.inputs())
    refs, outs = [], []
    batches = verification_batches(spec)
    for i, rows in enumerate(batches):
        feeds = reference.make_inputs(spec, rows, reference.VERIFY_SEED + i)
        refs.append(reference.run_reference(model, feeds))
        outs.append(runner.run(feeds))
    ref_all = {k: np.concatenate([r[k] for r in refs]) for k in refs[0]}
    out_all = {k: np.concatenate([o[k] for o in outs]) for k in refs[0] if k in outs[0]}
    metrics = check.parity_metrics(ref_all, out_all)
    name = os.path.basename(path)
    # float32 gates on the max abs diff; a variant on the relative L2 error (its max abs diff
    # grows with the output's scale, its relative error does not).
    if spec.quantize == "none":
        tolerance = {"atol": request.atol if request.atol is not None else check.DEFAULT_ATOL[fmt]}
    else:
        tolerance = {"max_rel": request.max_rel_error if request.max_rel_error is not None
                     else check.DEFAULT_MAX_REL[spec.quantize]}
    check.gate(metrics, artifact=name, **tolerance)
    # The golden vectors must pass too: that is what `export.verify` will check later.
    golden_feeds, golden_outputs, golden_sha = goldens[spec.golden_name]
    golden_metrics = check.parity_metrics(golden_outputs, runner.run(golden_feeds))
    check.gate(golden_metrics, artifact=f"{name} (golden vectors)", **tolerance)
    parity = {
        "runtime": _runtime_label(fmt),
        "n_samples": int(sum(batches)),
        **metrics,
        **({"atol": tolerance["atol"]} if "atol" in tolerance
           else {"max_rel_error": tolerance["max_rel"]}),
        "passed": True,
    }
    if "atol" in tolerance:
        log.info("verify   %-10s max abs diff %.2e <= %g on %d samples (%.1f s)", fmt,
                 metrics["max_abs"], tolerance["atol"], parity["n_samples"],
                 time.perf_counter() - t0)
    else:
        log.info("verify   %-10s %s rel_l2 %.2e <= %g, cosine %.6f on %d samples (%.1f s)", fmt,
                 spec.quantize, metrics["rel_l2"], tolerance["max_rel"], metrics["cosine"],
                 parity["n_samples"], time.perf_counter() - t0)
    inputs, outputs = quantize.manifest_tensors(spec, path, fmt)

    manifest = {
        "format": fmt,
        "artifact": name,
        "sha256": publish.sha256_path(path),
        "bytes": publish.size_bytes(path),
        "inputs": inputs,
        "outputs": outputs,
        "config": layer_config,
        "shapes": {
            "batch": spec.batch, "query_len": spec.query_len, "kv_len": spec.kv_len,
            "query_features": spec.query_features, "kv_features": spec.kv_features,
        },
        "masks": {"query_mask": spec.query_mask, "value_mask": spec.value_mask,
                  "causal": spec.causal, "scores": spec.scores},
        "reference": spec.reference_name,
        "golden": spec.golden_name,
        "golden_sha256": golden_sha,
        "golden_raw": golden_raw,
        **extra_manifest,
        "quantization": quantize.manifest_entry(spec, calibration),
        "parity": parity,
        "weights": source,
        "versions": publish.versions(),
        "created": publish.utc_now(),
    }
    manifest_path = os.path.join(stage, spec.manifest_name(fmt))
    publish.write_json(manifest_path, manifest)
    return ArtifactResult(
        format=fmt, spec=spec, path=path, manifest_path=manifest_path, bytes=manifest["bytes"],
        sha256=manifest["sha256"], parity=parity, manifest=manifest,
    )


def _runtime_label(fmt: str) -> str:
    from export.runtimes import RUNTIME_NAME

    name = RUNTIME_NAME[fmt]
    return f"{name} {publish.versions().get(name, '?')}"


__all__ = ["ExportRequest", "ArtifactResult", "export_artifacts", "ExportError"]
