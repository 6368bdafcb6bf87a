"""The export pipeline as a library call: reference -> convert -> verify -> manifest -> publish.

`export_artifacts` is what every entry point calls; it raises typed errors (export.errors) and
never exits. Nothing reaches `output_dir` until every requested artifact has passed. One pass:
each manifest is written once, after every report on its file (deployment, ARM) is in, then
signed and published as written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from export import buckets, publish, reference, sets
from export.calibration import (
    Calibration,
    calibrations_for,
    check_variant,
    graph_options,
    reference_calibration,
)
from export.deployment import summary as deployment_summary
from export.errors import ConversionError, ExportError, GraphCheckError, ParityError, SpecError
from export.formats import get_format
from export.model import ModelSpec
from export.runtime import check, runtimes
from export.runtime.golden_raw import write_golden_raw
from export.runtime.manifest import build_manifest, quantization_entry
from export.runtime.metadata import file_metadata
from export.spec import ArtifactSpec, ExportRequest
from xattn import __version__ as xattn_version

log = logging.getLogger("export")

# The key of the one point a file of a single length (or a model) is verified at: never a
# bucket's (`len_16`, `serving_default`), and never written (such a file has no `signatures`).
ONE_POINT = "file"


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
    companions: tuple[str, ...] = ()  # files published with the artifact (export.formats.Built)


@dataclass(frozen=True)
class _StagedSet:
    """One artifact verified in the staging folder, its manifest complete but not yet written."""

    format: str
    spec: ArtifactSpec | ModelSpec
    path: str
    companions: tuple[str, ...]
    manifest_name: str
    parity: dict
    manifest: dict  # export.arm adds deployment.arm, export.sets a kept reference's sha256

    def published(self, output_dir: str) -> ArtifactResult:
        """What it is once published into `output_dir`."""
        def there(path: str) -> str:
            return os.path.join(output_dir, os.path.basename(path))

        return ArtifactResult(
            format=self.format, spec=self.spec, path=there(self.path),
            manifest_path=os.path.join(output_dir, self.manifest_name), bytes=self.manifest["bytes"],
            sha256=self.manifest["sha256"], parity=self.parity, manifest=self.manifest,
            companions=tuple(there(p) for p in self.companions))


@dataclass(frozen=True)
class _Golden:
    """The golden vectors of one name: inputs, reference outputs, the .npz's sha256, raw files."""

    feeds: dict
    outputs: dict
    sha256: str
    raw: dict  # export.runtime.golden_raw's manifest entry


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
    _guard_replaced_artifacts(request.output_dir, specs)
    started = time.perf_counter()
    if request.model is not None:
        ref = request.model
        calibrations = {fmt: reference_calibration(ref, spec, fmt) for fmt, spec in specs.items()}
    else:
        # A bad calibration file fails here, before anything is built.
        calibrations = calibrations_for(specs, request.calibration)
        if request.weights is not None:
            weights = [np.asarray(w, dtype=np.float32) for w in request.weights]
            source = request.weights_source or "given weights"
        else:
            weights = reference.random_weights(first, request.seed)
            source = f"seed {request.seed}"
        ref = reference.LayerReference(first, weights, source)
    log.info("build    reference %s", ref.describe())

    with publish.staging(request.output_dir) as stage:
        staged: list[str] = []
        references = {}  # name -> sha256, hashed once as written (Keras stamps the save time)
        for spec in specs.values():
            if spec.reference_name not in references:
                ref.save(os.path.join(stage, spec.reference_name))
                staged.append(spec.reference_name)
                references[spec.reference_name] = publish.sha256_path(
                    os.path.join(stage, spec.reference_name))
        goldens = {}
        for fmt, spec in specs.items():
            # A file with several lengths has golden vectors per signature (or checked length).
            for point in _points(fmt, spec):
                if point.golden_name in goldens:
                    continue
                at, golden_name = point.spec, point.golden_name
                feeds = ref.make_inputs(at, at.golden_samples, reference.GOLDEN_SEED)
                outputs = ref.run(at, feeds)
                golden_path = os.path.join(stage, golden_name)
                publish.write_npz(golden_path, {**feeds, **outputs})
                # The same arrays for readers without numpy (web/): raw buffers + a JSON index.
                raw = write_golden_raw({**feeds, **outputs}, stage, golden_name[:-len(".golden.npz")])
                goldens[golden_name] = _Golden(feeds, outputs, publish.sha256_path(golden_path), raw)
                staged += [golden_name, raw["index"], raw["data"]]
        _guard_shared_files(request.output_dir, specs, goldens)
        sets_built = [_build_one(fmt, spec, request, ref, stage, goldens, calibrations.get(fmt),
                                 references[spec.reference_name]) for fmt, spec in specs.items()]
        # Every report goes into the manifests before any is written: the ARM runs read the
        # staged files (export.arm.measure), then each manifest is written once, under the lock.
        manifests = {s.manifest_name: s.manifest for s in sets_built}
        if request.arm:
            from export import arm  # lazy: qemu and the arm64 root file system, on request only

            t0 = time.perf_counter()
            measured = arm.measure(stage, manifests)
            for name, entry in measured.items():
                manifests[name]["deployment"]["arm"] = entry
            log.info("arm      %s (%.1f s)", " | ".join(
                _arm_summary(s.format, measured[s.manifest_name]) for s in sets_built
                if s.manifest_name in measured), time.perf_counter() - t0)
        # An artifact's companions (TFLM's C++) go with it, before the manifests.
        artifacts = [os.path.basename(p) for s in sets_built for p in (s.path, *s.companions)]
        log.info("publish  %d artifact(s) into %s", len(sets_built), request.output_dir)
        # One critical section (an OS lock on the folder): the guard again, then the manifests
        # are written (final: the reference kept if shared), signed and published.
        with publish.folder_lock(request.output_dir):
            _guard_replaced_artifacts(request.output_dir, specs)
            _guard_shared_files(request.output_dir, specs, goldens)
            signatures = sets.seal(stage, request.output_dir, manifests, sign_key=request.sign_key)
            publish.publish(stage, request.output_dir, staged + artifacts + signatures + list(manifests))
    results = [s.published(request.output_dir) for s in sets_built]
    log.info("done in %.1f s", time.perf_counter() - started)
    return results


def _arm_summary(fmt: str, entry: dict) -> str:
    beyond = [cpu for cpu, c in entry["cpus"].items() if not c["within_gate"]]
    return f"{fmt}: " + (f"beyond gate on {', '.join(beyond)}" if beyond else "within gate")


def _guard_replaced_artifacts(output_dir: str, specs: dict) -> None:
    """Refuse to replace an artifact that another configuration published under the same file.

    `--name a_int8` (float32) and `--name a --quantize int8` both write `a_int8.onnx`: the second
    replaced the first without a word. A published artifact is replaced only by the same
    configuration: the same base name (its reference file), format, quantization mode and io
    dtype; re-exporting that replaces it, by design.
    """
    for fmt, spec in specs.items():
        path = os.path.join(output_dir, spec.manifest_name(fmt))
        try:
            with open(path, encoding="utf-8") as f:
                existing = json.load(f)
            quantization = existing.get("quantization") or {}
            was = {"reference": existing.get("reference"), "format": existing.get("format"),
                   "quantize": quantization.get("mode"), "io": quantization.get("io_dtype")}
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # none there, not one of ours, or damaged: export.runtime.verify reports those
        now = {"reference": spec.reference_name, "format": fmt, "quantize": spec.quantize,
               "io": "int8" if spec.int8_io else "float32"}
        differs = [k for k in now if was[k] is not None and was[k] != now[k]]
        if differs:
            def describe(c):
                name = c["reference"][:-len(".keras")] if str(c["reference"]).endswith(".keras") \
                    else c["reference"]
                return (f"--name {name} {c['format']} quantize={c['quantize']}"
                        + (" int8-io" if c["io"] == "int8" else ""))
            raise SpecError(
                f"{spec.artifact_name(fmt)} in {output_dir} was published by another "
                f"configuration ({describe(was)}), and this export ({describe(now)}) would "
                f"replace it under the same file name; pass another --name or remove it first")


def _guard_shared_files(output_dir: str, specs: dict[str, ArtifactSpec], goldens: dict) -> None:
    """Refuse to replace a golden file that artifacts not rebuilt in this run still rely on.

    The reference and golden vectors are shared by every format of one name. Publishing new
    weights under a name whose other artifacts stay would leave those artifacts failing
    `export.runtime.verify`; fail before converting anything instead, and say how to avoid it.
    """
    rebuilt = {spec.manifest_name(fmt) for fmt, spec in specs.items()}
    new_golden = {name: golden.sha256 for name, golden in goldens.items()}
    for entry in sorted(os.listdir(output_dir)):
        if not entry.endswith(".json") or entry in rebuilt:
            continue
        try:
            with open(os.path.join(output_dir, entry), encoding="utf-8") as f:
                manifest = json.load(f)
            # A file with several lengths relies on one golden file per signature too
            # (`NAME.len_8.golden.npz`, also the golden file of a set named `NAME.len_8`).
            entries = [manifest, *(manifest.get("signatures") or [])]
            relied = [(e.get("golden"), e.get("golden_sha256")) for e in entries]
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # not one of ours, or damaged: export.runtime.verify reports those
        for golden, golden_sha in relied:
            if not (isinstance(golden, str) and golden in new_golden and golden_sha
                    and golden_sha != new_golden[golden]):
                continue
            name = golden[: -len(".golden.npz")]
            # A whole model's golden inputs are its --sample-inputs rows (or seeded ones without).
            inputs = " or other --sample-inputs" if any(
                not isinstance(spec, ArtifactSpec) for spec in specs.values()) else ""
            raise SpecError(
                f"{entry} in {output_dir} was built from other weights under the name {name!r}"
                f"{inputs}, and this export would replace the golden vectors it is verified with; "
                f"rebuild all its formats in one run (python -m export ...) or pass --name to keep both"
            )


def _points(fmt: str, spec) -> list[buckets.Point]:
    """Where an artifact is verified (export.buckets): a file with several lengths at each
    signature or checked length; one of a single length (or a model) at its one graph."""
    found = buckets.points(spec, signatures=get_format(fmt).signatures) \
        if isinstance(spec, ArtifactSpec) else []
    return found or [buckets.Point(key=ONE_POINT, signature=None, spec=spec,
                                   golden_name=spec.golden_name)]


def _several(points: list[buckets.Point]) -> bool:
    """A file verified at several lengths or signatures (its manifest lists them)."""
    return points[0].key != ONE_POINT


def _build_one(fmt: str, spec, request: ExportRequest, ref, stage: str, goldens: dict,
               calibration: Calibration | None, reference_sha: str) -> _StagedSet:
    """Convert, check, verify and describe one artifact in the staging folder.

    Returns the staged set with its manifest as a dict: nothing is written for it yet (the ARM
    report may still go in; export.sets writes it once)."""
    record = get_format(fmt)
    points = _points(fmt, spec)
    several = _several(points)
    buckets_given = getattr(spec, "lengths", ())
    if several:
        # Buckets: one signature each, or symbolic lengths in a format without signatures.
        spec = buckets.file_spec(spec, signatures=record.signatures)
    t0 = time.perf_counter()
    fn, layout = ref.inference_function(spec, fallback_layout=record.layout, options=graph_options(spec, fmt))
    # The golden vectors are written before conversion: their sha256 goes inside the file too
    # (those of `serving_default`, or the largest length, in a file with several).
    golden = goldens[points[-1].golden_name]
    facts = ref.manifest_facts(spec)
    if buckets_given:  # a dynamic-length ONNX file too: the buckets it was verified at
        facts["shapes"]["lengths"] = [list(p) for p in buckets_given]
    quantization = quantization_entry(spec, calibration, record.int8_scheme)
    versions = {"xattn": xattn_version, **publish.versions()}
    metadata = file_metadata({
        "format": fmt, **facts, "versions": versions,
        "inputs": [i.as_json() for i in spec.inputs()],
        "outputs": [o.as_json() for o in spec.outputs()],
        "quantization": quantization, "golden_sha256": golden.sha256,
    })
    try:
        built = record.build(spec, fn, stage, opset=request.opset, calibration=calibration,
                             metadata=metadata, arena_limit=request.arena_limit)
        record.check_graph(built.path, spec)
    except (ConversionError, GraphCheckError) as e:
        raise ref.explain(e) from e
    name = os.path.basename(built.path)
    log.info("convert  %-10s %s (%.1f s)", fmt, name, time.perf_counter() - t0)

    t0 = time.perf_counter()
    tolerance = check.tolerance(fmt, spec.quantize, atol=request.atol,
                                max_rel=request.max_rel_error)
    entries, metrics, n_samples, tolerance, state = _verify_points(
        fmt, built.path, spec, points, ref, tolerance, name, goldens)
    if state is not None:
        facts = {**facts, "state": state}
        log.info("state    %-10s keeps state in %s: every runner resets it (%s)", fmt,
                 ", ".join(state["ops"]), state["reset"])
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
        fmt=fmt, spec=spec, built=built, facts=facts, layout=layout,
        reference_sha256=reference_sha, golden_sha256=golden.sha256, golden_raw=golden.raw,
        parity=parity, quantization=quantization, weights=ref.source,
        versions=versions, created=publish.utc_now(),
        sha256=publish.sha256_path(built.path), size=publish.size_bytes(built.path),
        deployment=deployment, file_metadata=metadata,
        golden_name=points[-1].golden_name, signatures=entries if several else None,
        files=[{"file": os.path.basename(p), "sha256": publish.sha256_path(p),
                "bytes": publish.size_bytes(p)} for p in built.companions],
    )
    return _StagedSet(format=fmt, spec=spec, path=built.path, companions=built.companions,
                      manifest_name=spec.manifest_name(fmt), parity=parity, manifest=manifest)


def _verify_points(fmt: str, path: str, spec, points: list, ref, tolerance: dict, name: str,
                   goldens: dict) -> tuple[list[dict], dict, int, dict, dict | None]:
    """Verify a file at each of its points (export.buckets): seeded batches against the
    reference, its golden vectors, and that it keeps no state between calls.

    Returns the manifest's `signatures` entries (one per point), the worst metrics over all of
    them, the number of samples, the gate as applied, and the runners' `state` (what they reset
    between calls, for the manifest) or None for a stateless file.
    """
    record = get_format(fmt)
    several = _several(points)
    entries, every = [], []
    n_total = 0
    state = None
    for point in points:
        t0 = time.perf_counter()
        label = f"{name} [{point.key}]" if several else name
        runner = runtimes.load_runner(fmt, path, batch=spec.batch, inputs=point.spec.inputs(),
                                      signature=point.signature)
        metrics, n_samples, applied = _verify_artifact(runner, point.spec, ref, tolerance, label)
        state = _check_state(runner, point.spec, ref, label) or state
        # The golden vectors must pass too: that is what `export.runtime.verify` will check later.
        golden = goldens[point.golden_name]
        check.gate(check.parity_metrics(golden.outputs, runner.run(golden.feeds)),
                   artifact=f"{label} (golden vectors)", **applied)
        if several:
            log.info("verify   %-10s %-16s max abs diff %.2e, rel L2 %.1e on %d samples (%.1f s)",
                     fmt, point.key, metrics["max_abs"], metrics["rel_l2"], n_samples,
                     time.perf_counter() - t0)
        n_total += n_samples
        every.append(metrics)
        entries.append({
            "key": point.key,
            "signature": point.signature,
            "inputs": [i.as_json() for i in point.spec.inputs()],
            "outputs": [o.as_json() for o in point.spec.outputs()],
            "golden": point.golden_name,
            "golden_sha256": golden.sha256,
            "parity": {"runtime": f"{record.runtime} {publish.versions().get(record.runtime, '?')}",
                       "n_samples": n_samples, **metrics, **applied, "passed": True},
        })
        tolerance = applied
    worst = {k: (min if k == "cosine" else max)(m[k] for m in every) for k in every[0]}
    return entries, worst, n_total, tolerance, state


def _check_state(runner, spec, ref, name: str) -> dict | None:
    """Run the same rows twice in sequence on one runner: a file whose outputs depend on earlier
    calls (a converted LSTM keeping its state) fails here unless its runner resets it.

    Returns the runner's `state` (what it resets, for the manifest), or None for a stateless file.
    """
    step = spec.batch or 1
    feeds = ref.make_inputs(spec, 2 * step, reference.VERIFY_SEED + 100)
    first, again = runner.run(feeds), runner.run(feeds)
    diff = max(float(np.max(np.abs(first[k] - again[k]))) for k in first)
    if diff > 0:
        raise ParityError(f"{name}: the same rows run twice give outputs {diff:.3g} apart: the file "
                          "keeps state between calls that its runner does not reset")
    return getattr(runner, "state", None)


def _verify_artifact(runner, spec, ref, tolerance: dict, name: str) -> tuple[dict, int, dict]:
    """Run the artifact in its runtime on seeded batches against the reference, and gate it.

    Returns the metrics, the number of samples, and the gate as applied (a model's float32 gate
    scales with its outputs: `ModelReference.scale_tolerance`).
    """
    refs, outs = [], []
    batches = verification_batches(spec)
    for i, rows in enumerate(batches):
        feeds = ref.make_inputs(spec, rows, reference.VERIFY_SEED + i)
        refs.append(ref.run(spec, feeds))
        outs.append(runner.run(feeds))
    ref_all = {k: np.concatenate([r[k] for r in refs]) for k in refs[0]}
    out_all = {k: np.concatenate([o[k] for o in outs]) for k in refs[0] if k in outs[0]}
    metrics = check.parity_metrics(ref_all, out_all)
    tolerance = ref.scale_tolerance(tolerance, ref_all)
    check.gate(metrics, artifact=name, **tolerance)
    return metrics, int(sum(batches)), tolerance


__all__ = ["ExportRequest", "ArtifactResult", "export_artifacts", "ExportError"]
