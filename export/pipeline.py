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

from export import check, publish, reference, runtimes
from export.calibration import Calibration, calibrations_for, check_variant, graph_options
from export.deployment import summary as deployment_summary
from export.errors import ExportError, SpecError
from export.formats import get_format
from export.graph import FoldedWeights, build_inference_function, fold_weights, preferred_layout
from export.manifest import build_manifest, quantization_entry, spec_facts, write_manifest
from export.metadata import file_metadata
from export.spec import ArtifactSpec
from xattn import __version__ as xattn_version

log = logging.getLogger("export")


@dataclass
class ExportRequest:
    """What to build, where, and from which weights.

    Attributes:
        specs: format name -> ArtifactSpec; formats may differ in batch and variant only.
        output_dir: where the artifacts are published.
        seed: seed of the random weights when `weights` is None.
        weights: the layer's 12 arrays in fusionlab order; None draws them from `seed`.
        weights_source: where `weights` came from (a file name), for the manifest.
        atol: the float32 gate; None takes each format's default (export.formats).
        max_rel_error: a variant's relative L2 gate; None takes the variant's default.
        opset: the ONNX opset; None the newest tf2onnx writes that onnxruntime runs.
        calibration: an .npz of calibration inputs for int8 variants; None draws them.
    """

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
    """One published artifact: where it is, its manifest, and the parity it passed."""

    format: str
    spec: ArtifactSpec
    path: str
    manifest_path: str
    bytes: int
    sha256: str
    parity: dict
    manifest: dict


@dataclass(frozen=True)
class _Reference:
    """The Keras side every artifact of one request is built from and verified against."""

    model: object  # keras.Model
    folded: FoldedWeights
    layer_config: dict
    source: str  # where the weights came from


def verification_batches(spec: ArtifactSpec) -> list[int]:
    """Several seeded batches; two different sizes when the batch axis is dynamic."""
    return [spec.batch] * 3 if spec.batch is not None else [1, 5, 8]


def export_artifacts(request: ExportRequest) -> list[ArtifactResult]:
    """Build, verify and publish the artifacts `request` asks for.

    Args:
        request: the specs per format, the output folder, the weights and the gates.

    Returns:
        One ArtifactResult per format, in the request's order, with published paths.

    Raises:
        SpecError: contradictory specs or flags. WeightsError: weights that do not fit.
        CalibrationError: a bad calibration file. ConversionError: a converter failed.
        GraphCheckError, ParityError: an artifact failed its checks; nothing was published.
    """
    specs = request.specs
    if not specs:
        raise SpecError("no format requested")
    first = next(iter(specs.values()))
    # Formats may differ in batch and variant (savedmodel stays float32 under --quantize).
    same = dict(batch=first.batch, name=first.name, quantize="none", int8_io=False)
    for fmt, spec in specs.items():
        if spec.replace(**same) != first.replace(**same):
            raise SpecError(f"the {fmt} spec differs from the others in more than its batch")
        check_variant(fmt, spec)
    # A bad calibration file fails here, before anything is built.
    calibrations = calibrations_for(specs, request.calibration)
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
    ref = _Reference(
        model=model,
        folded=fold_weights(reference.reference_weights(model), first.heads),
        layer_config=reference.find_cross_attention(model).get_config(),
        source=source,
    )

    results: list[ArtifactResult] = []
    with publish.staging(request.output_dir) as stage:
        staged: list[str] = []
        model.save(os.path.join(stage, first.reference_name))
        staged.append(first.reference_name)
        goldens = {}
        for spec in specs.values():
            if spec.golden_name in goldens:
                continue
            feeds = reference.make_inputs(spec, spec.golden_samples, reference.GOLDEN_SEED)
            outputs = reference.run_reference(model, feeds)
            golden_path = os.path.join(stage, spec.golden_name)
            publish.write_npz(golden_path, {**feeds, **outputs})
            goldens[spec.golden_name] = (feeds, outputs, publish.sha256_path(golden_path))
            staged.append(spec.golden_name)
        _guard_shared_files(request.output_dir, specs, goldens)
        for fmt, spec in specs.items():
            results.append(_build_one(fmt, spec, request, ref, stage, goldens, calibrations.get(fmt)))
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


def _build_one(fmt: str, spec: ArtifactSpec, request: ExportRequest, ref: _Reference,
               stage: str, goldens: dict, calibration: Calibration | None) -> ArtifactResult:
    """Convert, check, verify and describe one artifact in the staging folder."""
    record = get_format(fmt)
    layout = preferred_layout(spec, record.layout)
    t0 = time.perf_counter()
    fn = build_inference_function(spec, ref.folded, layout=layout, **graph_options(spec))
    # The golden vectors are written before conversion: their sha256 goes inside the file too.
    golden_sha = goldens[spec.golden_name][2]
    quantization = quantization_entry(spec, calibration)
    versions = {"xattn": xattn_version, **publish.versions()}
    metadata = file_metadata({
        "format": fmt, "config": ref.layer_config, **spec_facts(spec), "versions": versions,
        "inputs": [i.as_json() for i in spec.inputs()],
        "outputs": [o.as_json() for o in spec.outputs()],
        "quantization": quantization, "golden_sha256": golden_sha,
    })
    built = record.build(spec, fn, stage, opset=request.opset, calibration=calibration,
                         metadata=metadata)
    name = os.path.basename(built.path)
    log.info("convert  %-10s %s (%.1f s)", fmt, name, time.perf_counter() - t0)

    t0 = time.perf_counter()
    record.check_graph(built.path, spec)
    tolerance = check.tolerance(fmt, spec.quantize, atol=request.atol,
                                max_rel=request.max_rel_error)
    runner = runtimes.load_runner(fmt, built.path, batch=spec.batch, inputs=spec.inputs())
    metrics, n_samples = _verify_artifact(runner, spec, ref.model, tolerance, name)
    # The golden vectors must pass too: that is what `export.verify` will check later.
    golden_feeds, golden_outputs, _ = goldens[spec.golden_name]
    check.gate(check.parity_metrics(golden_outputs, runner.run(golden_feeds)),
               artifact=f"{name} (golden vectors)", **tolerance)
    parity = {"runtime": f"{record.runtime} {publish.versions().get(record.runtime, '?')}",
              "n_samples": n_samples, **metrics, **tolerance, "passed": True}
    if "atol" in tolerance:
        log.info("verify   %-10s max abs diff %.2e <= %g on %d samples (%.1f s)", fmt,
                 metrics["max_abs"], tolerance["atol"], n_samples, time.perf_counter() - t0)
    else:
        log.info("verify   %-10s %s rel_l2 %.2e <= %g, cosine %.6f on %d samples (%.1f s)", fmt,
                 spec.quantize, metrics["rel_l2"], tolerance["max_rel_error"], metrics["cosine"],
                 n_samples, time.perf_counter() - t0)

    t0 = time.perf_counter()
    deployment = record.deployment_report(built, spec)
    if deployment is not None:
        log.info("deploy   %-10s %s (%.1f s)", fmt, deployment_summary(deployment),
                 time.perf_counter() - t0)
    manifest = build_manifest(
        fmt=fmt, spec=spec, built=built, layer_config=ref.layer_config, layout=layout,
        golden_sha256=golden_sha, parity=parity, quantization=quantization, weights=ref.source,
        versions=versions, created=publish.utc_now(),
        sha256=publish.sha256_path(built.path), size=publish.size_bytes(built.path),
        deployment=deployment, file_metadata=metadata,
    )
    manifest_path = os.path.join(stage, spec.manifest_name(fmt))
    write_manifest(manifest_path, manifest)
    return ArtifactResult(
        format=fmt, spec=spec, path=built.path, manifest_path=manifest_path,
        bytes=manifest["bytes"], sha256=manifest["sha256"], parity=parity, manifest=manifest,
    )


def _verify_artifact(runner, spec: ArtifactSpec, model, tolerance: dict,
                     name: str) -> tuple[dict, int]:
    """Run the artifact in its runtime on seeded batches against the reference, and gate it."""
    refs, outs = [], []
    batches = verification_batches(spec)
    for i, rows in enumerate(batches):
        feeds = reference.make_inputs(spec, rows, reference.VERIFY_SEED + i)
        refs.append(reference.run_reference(model, feeds))
        outs.append(runner.run(feeds))
    ref_all = {k: np.concatenate([r[k] for r in refs]) for k in refs[0]}
    out_all = {k: np.concatenate([o[k] for o in outs]) for k in refs[0] if k in outs[0]}
    metrics = check.parity_metrics(ref_all, out_all)
    check.gate(metrics, artifact=name, **tolerance)
    return metrics, int(sum(batches))


__all__ = ["ExportRequest", "ArtifactResult", "export_artifacts", "ExportError"]
