"""Edge variants: float16, dynamic-range int8 and full int8 files, and the calibration data int8 uses.

TFLite variants are converter options (`configure_tflite`, applied by `export.tflite.build_tflite`
through its `configure` hook); ONNX variants rewrite the float32 file tf2onnx wrote
(`quantize_onnx`, called by `export.onnx.build_onnx`). Verification and gates stay in the
pipeline: a variant is published only after its relative L2 error was measured in its runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from export.errors import CalibrationError, ConversionError, SpecError, first_line
from export.publish import sha256_path
from export.spec import ArtifactSpec

log = logging.getLogger("export")

VARIANTS = ("float16", "dynamic-int8", "int8")
QUANTIZED_FORMATS = ("onnx", "tflite")
# A variant's file is at most this fraction of the float32 file of the same configuration.
SIZE_BOUND = {"float16": 0.55, "dynamic-int8": 0.35, "int8": 0.35}
# Seeded calibration inputs when no --calibration file is given. The seed differs from
# reference.VERIFY_SEED (and the seeds after it) and reference.GOLDEN_SEED: a variant is never
# verified on the data it was calibrated on.
CALIBRATION_SEED = 777_000
CALIBRATION_SAMPLES = 64
CALIBRATION_ARRAYS = ("source1", "source2")
# The -1e9 mask bias of export.graph is -inf in float16 (max 65504): (1 - keep) * -inf is NaN
# where keep is 1, and a row of -inf logits has a NaN softmax. Constants are clipped to this value
# instead: padding and causal biases added together (-6e4) still fit in float16 on a runtime that
# has float16 kernels (onnxruntime's x86 CPU provider casts most of these ops to float32 anyway),
# and exp() of a logit this far below the row's maximum is exactly 0 as in float32.
FLOAT16_MASK_BIAS = 3.0e4
# Full int8: masked logits become their row's smallest logit minus this (export.graph's
# `mask_margin`) instead of -1e9, which would stretch the logits' int8 range over 1e9. exp(-8) is
# below half a step of the int8 softmax output (1/256), so a masked key still gets exactly 0.
MASK_MARGIN = 8.0


def graph_options(spec: ArtifactSpec) -> dict:
    """Keyword arguments of `export.graph.build_inference_function` that `spec`'s variant needs."""
    if spec.quantize == "int8" and (spec.query_mask or spec.value_mask or spec.causal):
        return {"mask_margin": MASK_MARGIN}
    return {}


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
        return int(len(self.feeds["source1"]))

    def describe(self) -> dict:
        """The manifest's `quantization.calibration`."""
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
    from export.reference import make_inputs

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
        from export.reference import make_inputs

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


def calibration_for(spec: ArtifactSpec, path: str | None) -> Calibration | None:
    """The calibration a spec needs: None unless it is full int8; a file's if given, else seeded."""
    if spec.quantize != "int8":
        return None
    return load_calibration(path, spec) if path else random_calibration(spec)


def check_variant(fmt: str, spec: ArtifactSpec) -> None:
    """SpecError unless `fmt` can hold `spec`'s variant."""
    if spec.quantize != "none" and fmt not in QUANTIZED_FORMATS:
        raise SpecError(f"{fmt} artifacts are float32 only. Received: quantize={spec.quantize!r}")
    if spec.int8_io and fmt != "tflite":
        raise SpecError(f"int8 inputs and outputs are for TFLite only; {fmt} int8 files take and "
                        "return float32")


def calibrations_for(specs: Mapping[str, ArtifactSpec], path: str | None) -> dict[str, Calibration | None]:
    """format -> the calibration its spec needs (loading and checking `path` once per spec)."""
    if path and not any(s.quantize == "int8" for s in specs.values()):
        modes = ", ".join(sorted({s.quantize for s in specs.values()}))
        raise SpecError(
            f"--calibration applies to --quantize int8 only (dynamic-int8 and float16 need no "
            f"calibration data). Received: --quantize {modes}"
        )
    found = {fmt: calibration_for(spec, path) for fmt, spec in specs.items()}
    for fmt, calibration in found.items():
        if calibration is not None:
            where = (os.path.basename(path) if calibration.source == "file"
                     else f"seeded standard-normal inputs (seed {calibration.seed})")
            log.info("calibrate %-9s int8 on %d rows of %s%s", fmt, calibration.n_samples, where,
                     "".join(f"; {n}" for n in calibration.notes))
    return found


def manifest_entry(spec: ArtifactSpec, calibration: Calibration | None) -> dict:
    """The manifest's `quantization`: {mode, io_dtype, calibration, n_samples}."""
    return {
        "mode": spec.quantize,
        "io_dtype": "int8" if spec.int8_io else "float32",
        "calibration": calibration.describe() if calibration is not None else None,
        "n_samples": calibration.n_samples if calibration is not None else 0,
    }


# -- TFLite ------------------------------------------------------------------------------------


def configure_tflite(spec: ArtifactSpec, calibration: Calibration | None = None) -> Callable | None:
    """A `configure(converter)` for `build_tflite` that sets `spec.quantize`'s converter options."""
    if spec.quantize == "none":
        return None
    if spec.quantize == "int8" and calibration is None:
        calibration = random_calibration(spec)

    def configure(converter) -> None:
        import tensorflow as tf

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if spec.quantize == "float16":
            # float16 weights; the interpreter dequantizes them once and computes in float32
            # on CPUs (XNNPACK), or in float16 on GPUs that have it.
            converter.target_spec.supported_types = [tf.float16]
        elif spec.quantize == "int8":
            order = [i.name for i in spec.inputs()]

            def representative_dataset():
                for chunk in calibration.batches(spec.batch):
                    yield {name: chunk[name] for name in order}

            converter.representative_dataset = representative_dataset
            # Integer kernels only: an op without one fails the conversion instead of silently
            # running in float.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            # Per-tensor weight scales for FULLY_CONNECTED. Per-channel ones cost a float32
            # scale and an int64 zero point per output channel, for the weights and again for
            # the int32 biases: at the defaults 0.33x of the float32 file instead of 0.28x
            # (0.36x instead of 0.31x with masks, over the 0.35x bound), for rel_l2 2.1e-2
            # instead of 2.3e-2.
            converter._experimental_disable_per_channel_quantization_for_dense_layers = True
            if spec.int8_io:
                # Float inputs become int8 (bool masks stay bool); scales and zero points go into
                # the manifest.
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
        # dynamic-int8: optimizations alone, no representative dataset -> int8 weights,
        # activations quantized on the fly per batch.

    return configure


def tflite_io_quantization(path: str) -> dict[str, dict]:
    """{tensor name: {"scale", "zero_point"}} of a TFLite file's integer inputs and outputs."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner("serving_default")
    found = {}
    for details in (runner.get_input_details(), runner.get_output_details()):
        for name, detail in details.items():
            if np.dtype(detail["dtype"]).kind in "iu":
                scale, zero_point = detail["quantization"]
                found[name] = {"scale": float(scale), "zero_point": int(zero_point)}
    return found


def manifest_tensors(spec: ArtifactSpec, path: str, fmt: str) -> tuple[list[dict], list[dict]]:
    """Manifest `inputs`/`outputs` entries: an int8 tensor carries dtype int8 and its quantization."""
    inputs = [i.as_json() for i in spec.inputs()]
    outputs = [o.as_json() for o in spec.outputs()]
    if fmt == "tflite" and spec.int8_io:
        quant = tflite_io_quantization(path)
        for entry in inputs + outputs:
            if entry["name"] in quant:
                entry["dtype"] = "int8"
                entry["quantization"] = quant[entry["name"]]
    return inputs, outputs


# -- ONNX --------------------------------------------------------------------------------------


def quantize_onnx(spec: ArtifactSpec, float_path: str, out_path: str,
                  calibration: Calibration | None = None) -> str:
    """Write `spec.quantize`'s variant of the float32 ONNX file `float_path` to `out_path`."""
    if spec.quantize == "none":
        raise SpecError("quantize_onnx needs a variant; got quantize='none'")
    try:
        with _quiet_onnxruntime_tools():
            _quantize_onnx(spec, float_path, out_path, calibration)
    except (CalibrationError, SpecError):
        raise
    except Exception as e:
        raise ConversionError(f"ONNX {spec.quantize} quantization failed: {first_line(e)}") from e
    return out_path


def _quantize_onnx(spec: ArtifactSpec, float_path: str, out_path: str,
                   calibration: Calibration | None) -> None:
    if spec.quantize == "float16":
        _onnx_float16(float_path, out_path)
    elif spec.quantize == "dynamic-int8":
        _onnx_dynamic_int8(float_path, out_path)
    else:
        _onnx_static_int8(spec, float_path, out_path, calibration or random_calibration(spec))


@contextlib.contextmanager
def _quiet_onnxruntime_tools() -> Iterator[None]:
    """onnxruntime's quantization tools log advice to the root logger ("consider pre-processing");
    a user of `python -m export` can do nothing with it, so it is dropped below ERROR."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)


def _onnx_float16(float_path: str, out_path: str) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(float_path)
    # keep_io_types: the file still takes and returns float32 (Cast nodes at the edges), so the
    # caller's code does not change. onnxruntime runs float16 kernels where its CPU provider has
    # them and inserts casts to float32 around the others.
    model16 = convert_float_to_float16(
        model, keep_io_types=True, max_finite_val=FLOAT16_MASK_BIAS, disable_shape_infer=False,
    )
    # The converter appends its input casts at the end of the node list; onnx.checker (and the
    # ONNX spec) want nodes in topological order.
    _sort_topologically(model16.graph)
    onnx.save(model16, out_path)


def _sort_topologically(graph) -> None:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ConversionError(f"ONNX graph has a cycle or a missing input at {pending[0].name}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [type(n).FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def _onnx_dynamic_int8(float_path: str, out_path: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel weight scales: at the defaults rel_l2 1.2e-2 instead of 1.4e-2 (gate 2.5e-2)
    # for 0.29x instead of 0.28x of the float32 file.
    quantize_dynamic(float_path, out_path, weight_type=QuantType.QInt8, per_channel=True)


class _Reader:
    """onnxruntime CalibrationDataReader over a Calibration's chunks."""

    def __init__(self, calibration: Calibration, batch: int | None):
        self._chunks = list(calibration.batches(batch))
        self._it = iter(self._chunks)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._chunks)


def _onnx_static_int8(spec: ArtifactSpec, float_path: str, out_path: str,
                      calibration: Calibration) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        float_path,
        out_path,
        _Reader(calibration, spec.batch),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        # The matmuls hold every weight and nearly every FLOP (tf2onnx writes Gemm for a
        # matmul and bias at a fixed batch). Quantizing every op type (bias adds, mask
        # arithmetic, softmax) added QDQ pairs, 0.40x of the float32 file instead of 0.34x with
        # masks, and error: rel_l2 2.5e-2 instead of 2.2e-2 at the defaults.
        op_types_to_quantize=["MatMul", "Gemm"],
    )


def scratch_dir(workdir: str, label: str) -> str:
    """A private folder under `workdir` for intermediate files (removed by the caller)."""
    return tempfile.mkdtemp(prefix=f".{label}-", dir=workdir)


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
