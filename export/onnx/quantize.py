"""ONNX variants: float16, dynamic-range int8 and full int8 (QDQ) rewrites of the float32 file."""

from __future__ import annotations

import logging

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.calibration import Calibration, random_calibration
from export.errors import CalibrationError, ConversionError, SpecError, first_line
from export.native_output import quieted_logger
from export.spec import ArtifactSpec
from xattn.layer import MASK_BIAS_FLOAT16


def quantize_onnx(spec: ArtifactSpec, float_path: str, out_path: str,
                  calibration: Calibration | None = None) -> str:
    """Write `spec.quantize`'s variant of the float32 ONNX file `float_path` to `out_path`."""
    if spec.quantize == "none":
        raise SpecError("quantize_onnx needs a variant; got quantize='none'")
    try:
        # onnxruntime's quantization tools log advice to the root logger ("consider
        # pre-processing"): nothing a user of `python -m export` can act on.
        with quieted_logger(None, logging.ERROR):
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


def _onnx_float16(float_path: str, out_path: str) -> None:
    model = onnx.load(float_path)
    # keep_io_types: the file still takes and returns float32 (Cast nodes at the edges), so the
    # caller's code does not change. onnxruntime runs float16 kernels where its CPU provider has
    # them and inserts casts to float32 around the others.
    # The float32 mask bias (-1e9) is -inf in float16: (1 - keep) * -inf is NaN where keep is 1,
    # and a row of -inf logits has a NaN softmax. Constants are clipped to the layer's float16
    # mask bias instead (padding and causal added together still fit in float16; onnxruntime's x86
    # CPU provider casts most of these ops to float32 anyway).
    model16 = convert_float_to_float16(
        model, keep_io_types=True, max_finite_val=-MASK_BIAS_FLOAT16, disable_shape_infer=False,
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


def weight_matmuls_only(model) -> list[str]:
    """Names of the MatMul/Gemm nodes that multiply two activations (no constant operand).

    In attention these are the logits (queries x keys) and probabilities x values: an int8
    softmax input rounds the logits' differences, and int8 probabilities lose the small weights
    (quantization guides for attention leave this path in float). Excluded, rel L2 on the
    golden vectors is 1.9e-2 instead of 2.3e-2 at the defaults, and batch 1 runs in 31 instead of
    43 µs (onnxruntime, one thread); they hold no weights, so the file stays as small (0.30x).
    The rest is the uint8 activations of the two weight matmuls' inputs: either one alone costs
    1e-2 (uint16 activations: 1.2e-2).
    """
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and not any(i in constants for i in n.input[:2])
    ]


def _onnx_static_int8(spec: ArtifactSpec, float_path: str, out_path: str,
                      calibration: Calibration) -> None:
    excluded = weight_matmuls_only(onnx.load(float_path))
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
        nodes_to_exclude=excluded,
    )
