"""Calibration data for full-int8 variants, and the graph options a variant needs.

A full-integer int8 file (TFLite: int8 activations too) is calibrated on these inputs: a user's
`--calibration` .npz (checked against the artifact's shapes, read without unpickling) or seeded
standard-normal inputs. A weight-only int8 file (ONNX, ORT: float32 activations) has no ranges to
calibrate and is made from the float32 graph (`export.formats.Format.int8_scheme`). The
converters' options live with their formats (`export.tflite.quantize`, `export.onnx.quantize`).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from export.errors import CalibrationError, SpecError, first_line
from export.formats import get_format
from export.graph import GraphOptions
from export.publish import sha256_path
from export.reference import make_inputs
from export.spec import CALIBRATED_MODES, ArtifactSpec

log = logging.getLogger("export")

# Seeded calibration inputs when no --calibration file is given. The seed differs from
# reference.VERIFY_SEED (and the seeds after it) and reference.GOLDEN_SEED: a variant is never
# verified on the data it was calibrated on.
CALIBRATION_SEED = 777_000
CALIBRATION_SAMPLES = 64
CALIBRATION_ARRAYS = ("source1", "source2")
# Full int8: masked logits become their row's smallest logit minus this (export.graph's
# `mask_margin`) instead of -1e9, which would stretch the logits' int8 range over 1e9. exp(-8) is
# below half a step of the int8 softmax output (1/256), so a masked key still gets exactly 0.
MASK_MARGIN = 8.0


def calibrated(fmt: str, spec) -> bool:
    """Whether `fmt`'s file of `spec` quantizes activations (full-integer int8, calibrated)."""
    return spec.quantize in CALIBRATED_MODES and get_format(fmt).int8_scheme == "full-integer"


def graph_options(spec, fmt: str) -> GraphOptions:
    """The graph options (the inference function's) that `spec`'s variant in `fmt` needs.

    Only int8 activations need the mask margin: a weight-only int8 file computes the logits in
    float32, where the -1e9 bias is exact, so it is made from the float32 graph. A model's masks
    are whatever reaches its CrossAttention layers: its full-int8 graphs always get the margin (it
    changes nothing where no mask is applied).

    Float activations in a format whose record asks for it get `late_softmax` (XNNPACK); so does
    int8-cpu, whose attention core, the late softmax included, stays float32
    (export.tflite.quantize.attention_core_nodes).
    """
    masked = not isinstance(spec, ArtifactSpec) or spec.query_mask or spec.value_mask or spec.causal
    float_core = not calibrated(fmt, spec) or spec.quantize == "int8-cpu"
    return GraphOptions(
        mask_margin=MASK_MARGIN if calibrated(fmt, spec) and masked else None,
        late_softmax=bool(float_core and get_format(fmt).late_softmax),
    )


def reference_calibration(ref, spec, fmt: str) -> Calibration | None:
    """A `--model` export's int8 calibration: its sample inputs if given, else seeded inputs."""
    if not calibrated(fmt, spec):
        return None
    samples = getattr(ref, "sample_inputs", None)
    if samples is not None:
        rows = len(next(iter(samples.values())))
        rows -= rows % (spec.batch or 1)
        if rows == 0:
            raise CalibrationError(f"--sample-inputs has fewer rows than the batch {spec.batch}")
        return Calibration(feeds={k: v[:rows] for k, v in samples.items()}, source="sample-inputs",
                           path=ref.sample_path, sha256=sha256_path(ref.sample_path))
    rows = _round_up(CALIBRATION_SAMPLES, spec.batch)
    return Calibration(feeds=ref.make_inputs(spec, rows, CALIBRATION_SEED), source="random",
                       seed=CALIBRATION_SEED)


# -- calibration data --------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Inputs a full-int8 variant is calibrated on (rows on axis 0), and where they came from."""

    feeds: dict[str, np.ndarray]
    source: str  # "file" or "random"
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return int(len(next(iter(self.feeds.values()))))

    def describe(self) -> dict:
        """The manifest's `quantization.calibration`."""
        if self.source == "sample-inputs":
            return {"source": "sample-inputs", "file": os.path.basename(self.path or ""),
                    "sha256": self.sha256}
        if self.source == "file":
            entry = {"source": "file", "file": os.path.basename(self.path or ""), "sha256": self.sha256}
            if self.notes:
                entry["notes"] = list(self.notes)
            return entry
        return {"source": "random", "distribution": "standard normal", "seed": self.seed}

    def batches(self, batch: int | None, *, dynamic_chunk: int = 16) -> Iterator[dict[str, np.ndarray]]:
        """Chunks at the artifact's fixed batch (rows that do not fill one are left out)."""
        step = batch or dynamic_chunk
        n = self.n_samples
        stop = n - n % step if batch else n
        for start in range(0, stop, step):
            yield {k: np.ascontiguousarray(v[start:start + step]) for k, v in self.feeds.items()}


def random_calibration(spec: ArtifactSpec, rows: int = CALIBRATION_SAMPLES,
                       seed: int = CALIBRATION_SEED) -> Calibration:
    """Seeded standard-normal inputs of the artifact's shapes (and padding masks if it has them)."""
    rows = _round_up(rows, spec.batch)
    return Calibration(feeds=make_inputs(spec, rows, seed), source="random", seed=seed)


def load_calibration(path: str, spec: ArtifactSpec) -> Calibration:
    """Read a `--calibration` .npz (allow_pickle=False) and check it against the artifact's shapes.

    It must hold float arrays `source1` (N, Tq, Fq) and `source2` (N, Tkv, Fkv), finite, with the
    same N >= 1 (>= the batch of a fixed-batch artifact). Optional bool `query_mask` (N, Tq) and
    `value_mask` (N, Tkv) are used when the artifact has those inputs; otherwise seeded padding
    masks are drawn. Every problem raises CalibrationError with a one-line message.
    """
    label = f"--calibration file {path}"
    if not os.path.exists(path):
        raise CalibrationError(f"{label} not found")
    if not os.path.isfile(path):
        raise CalibrationError(f"{label} is a folder, not an .npz file")
    if not zipfile.is_zipfile(path):
        raise CalibrationError(f"{label} is not an .npz archive (not a zip file)")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CalibrationError(f"{label} cannot be read as .npz: {first_line(e)}") from e
    with archive:
        names = sorted(archive.files)
        missing = [n for n in CALIBRATION_ARRAYS if n not in archive.files]
        if missing:
            raise CalibrationError(
                f"{label} has no array {', '.join(repr(m) for m in missing)} "
                f"(found: {', '.join(names) or 'nothing'}); expected source1 and source2"
            )
        wanted = list(CALIBRATION_ARRAYS) + [
            m for m, on in (("query_mask", spec.query_mask), ("value_mask", spec.value_mask))
            if on and m in archive.files
        ]
        arrays = {}
        for name in wanted:
            try:
                arrays[name] = archive[name]
            except ValueError as e:  # object arrays: numpy refuses to unpickle them
                raise CalibrationError(
                    f"{label}: array {name!r} holds Python objects (pickled data), refused "
                    "(loaded with allow_pickle=False); save plain float32 arrays"
                ) from e
            except Exception as e:
                raise CalibrationError(f"{label}: array {name!r} cannot be read: {first_line(e)}") from e
    expected = {
        "source1": (spec.query_len, spec.query_features),
        "source2": (spec.kv_len, spec.kv_features),
        "query_mask": (spec.query_len,),
        "value_mask": (spec.kv_len,),
    }
    for name, array in arrays.items():
        is_mask = name.endswith("_mask")
        want_kind = "b" if is_mask else "f"
        if array.dtype.kind != want_kind or array.dtype.itemsize > 8:
            want = "bool" if is_mask else "float32 (or another float type)"
            raise CalibrationError(f"{label}: {name} has dtype {array.dtype}, expected {want}")
        if array.ndim != len(expected[name]) + 1 or tuple(array.shape[1:]) != expected[name]:
            want = "(N, " + ", ".join(str(d) for d in expected[name]) + ")"
            raise CalibrationError(
                f"{label}: {name} has shape {tuple(array.shape)}, expected {want} for "
                f"{spec.describe()}"
            )
    rows = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(rows.values())) != 1:
        raise CalibrationError(
            f"{label}: arrays have different numbers of rows: "
            + ", ".join(f"{k} {v}" for k, v in rows.items())
        )
    n = rows["source1"]
    need = spec.batch or 1
    if n < need:
        raise CalibrationError(f"{label} has {n} rows; at least {need} needed (the artifact's batch)")
    feeds: dict[str, np.ndarray] = {}
    for name in CALIBRATION_ARRAYS:
        array = arrays[name].astype(np.float32)
        if not np.isfinite(array).all():
            raise CalibrationError(f"{label}: {name} holds NaN or inf values")
        feeds[name] = array
    notes = []
    if spec.query_mask or spec.value_mask:
        drawn = make_inputs(spec, n, CALIBRATION_SEED)
        for name, on in (("query_mask", spec.query_mask), ("value_mask", spec.value_mask)):
            if not on:
                continue
            if name in arrays:
                feeds[name] = arrays[name].astype(bool)
            else:
                feeds[name] = drawn[name]
                notes.append(f"{name} drawn at random (seed {CALIBRATION_SEED})")
    return Calibration(feeds=feeds, source="file", path=path, sha256=sha256_path(path), notes=notes)


def _round_up(rows: int, batch: int | None) -> int:
    return rows if not batch else -(-rows // batch) * batch


def calibration_for(spec: ArtifactSpec, path: str | None, fmt: str) -> Calibration | None:
    """The calibration `fmt`'s file of `spec` needs: None unless it is full-integer int8; a
    file's if given, else seeded."""
    if not calibrated(fmt, spec):
        return None
    return load_calibration(path, spec) if path else random_calibration(spec)


def check_variant(fmt: str, spec: ArtifactSpec) -> None:
    """SpecError unless `fmt` can hold `spec`'s variant."""
    record = get_format(fmt)
    if spec.quantize != "none" and not record.quantizable:
        raise SpecError(f"{fmt} artifacts are float32 only. Received: quantize={spec.quantize!r}")
    built_as = dict(record.same_variant).get(spec.quantize)
    if built_as is not None:
        # The command line asks for it by the other name (Format.variant_for); a library caller
        # names the file it gets.
        raise SpecError(f"{record.title} builds its {built_as} file for {spec.quantize} (float32 "
                        f"activations already): pass quantize={built_as!r}. "
                        f"Received: quantize={spec.quantize!r}")
    if record.variants is not None and spec.quantize not in record.variants:
        raise SpecError(f"{record.title} artifacts are {' or '.join(record.variants)} only. "
                        f"Received: quantize={spec.quantize!r}")
    if spec.int8_io and not get_format(fmt).int8_io:
        raise SpecError(f"int8 inputs and outputs are for TFLite only; {fmt} int8 files take and "
                        "return float32")


def calibrations_for(specs: Mapping[str, ArtifactSpec], path: str | None) -> dict[str, Calibration | None]:
    """format -> the calibration its spec needs (loading and checking `path` once per spec)."""
    if path and not any(s.quantize in CALIBRATED_MODES for s in specs.values()):
        modes = ", ".join(sorted({s.quantize for s in specs.values()}))
        raise SpecError(
            f"--calibration applies to --quantize int8 and int8-cpu only (dynamic-int8 and "
            f"float16 need no calibration data). Received: --quantize {modes}"
        )
    found = {fmt: calibration_for(spec, path, fmt) for fmt, spec in specs.items()}
    weight_only = [get_format(f).title for f, s in specs.items()
                   if s.quantize == "int8" and found[f] is None]
    if path and weight_only:
        # A note, not an error: these command lines calibrated ONNX int8 files before those
        # became weight-only, and the file stays valid for TFLite int8.
        log.log(logging.WARNING if all(c is None for c in found.values()) else logging.INFO,
                "note: --calibration %s not used by %s int8 (weights only, float32 activations: "
                "nothing to calibrate); it calibrates TFLite int8", os.path.basename(path),
                " and ".join(weight_only))
    for fmt, calibration in found.items():
        if calibration is not None:
            where = (os.path.basename(path) if calibration.source == "file"
                     else f"seeded standard-normal inputs (seed {calibration.seed})")
            log.info("calibrate %-9s int8 on %d rows of %s%s", fmt, calibration.n_samples, where,
                     "".join(f"; {n}" for n in calibration.notes))
    return found


