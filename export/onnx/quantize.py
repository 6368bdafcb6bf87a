"""ONNX variants: float16, dynamic-range int8 and weight-only int8 rewrites of the float32 file."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.errors import ConversionError, SpecError, first_line
from export.runtime.native_output import quieted_logger
from export.spec import ArtifactSpec
from xattn.layer import MASK_BIAS_FLOAT16

# Symmetric int8 weights: q in [-127, 127] and zero point 0 (as onnxruntime's quantizer writes
# symmetric weights), so that w ~ q * scale with one scale per output channel.
INT8_MAX = 127


def quantize_onnx(spec: ArtifactSpec, float_path: str, out_path: str) -> str:
    """Write `spec.quantize`'s variant of the float32 ONNX file `float_path` to `out_path`."""
    if spec.quantize == "none":
        raise SpecError("quantize_onnx needs a variant; got quantize='none'")
    try:
        # onnxruntime's quantization tools log advice to the root logger ("consider
        # pre-processing"): nothing a user of `python -m export` can act on.
        with quieted_logger(None, logging.ERROR):
            _quantize_onnx(spec, float_path, out_path)
    except SpecError:
        raise
    except Exception as e:
        raise ConversionError(f"ONNX {spec.quantize} quantization failed: {first_line(e)}") from e
    return out_path


def _quantize_onnx(spec: ArtifactSpec, float_path: str, out_path: str) -> None:
    if spec.quantize == "float16":
        _onnx_float16(float_path, out_path)
    elif spec.quantize == "dynamic-int8":
        _onnx_dynamic_int8(float_path, out_path)
    else:
        model = onnx.load(float_path)
        quantize_weights_int8(model.graph)
        onnx.save(model, out_path)


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


def weight_axes(graph) -> dict[str, int]:
    """Initializer name -> output-channel axis, for the weights of the graph's MatMul and Gemm nodes.

    A weight is a float32 initializer of rank >= 2 that is the B operand of a MatMul (axis: its
    last, the output features, also for a stack of matrices) or of a Gemm (axis 1, or 0 with
    transB) while A is not a constant, and is used nowhere else (subgraphs included). A constant
    of one repeated value is no weight (the masks' `keep @ ones` counts visible keys): it stays
    float, as do biases.
    """
    initializers = {t.name: t for t in graph.initializer}
    overridable = {i.name for i in graph.input}
    axes: dict[str, int] = {}
    other_uses: set[str] = set(_subgraph_inputs(graph))
    for node in graph.node:
        for position, name in enumerate(node.input):
            tensor = initializers.get(name)
            weight = (position == 1 and node.op_type in ("MatMul", "Gemm")
                      and tensor is not None and name not in overridable
                      and node.input[0] not in initializers
                      and tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) >= 2)
            if not weight:
                other_uses.add(name)
                continue
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                axis = 0 if trans_b else 1
            else:
                axis = len(tensor.dims) - 1
            if axes.setdefault(name, axis) != axis:
                other_uses.add(name)  # two layouts of one array: left float
    kept = {}
    for name, axis in axes.items():
        if name in other_uses:
            continue
        values = numpy_helper.to_array(initializers[name])
        if values.size and np.all(values == values.flat[0]):
            continue
        kept[name] = axis
    return kept


def _subgraph_inputs(graph):
    """Every name the nodes of `graph`'s subgraphs (If, Loop, Scan bodies) read, recursively."""
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == attribute.GRAPH else
                        attribute.graphs if attribute.type == attribute.GRAPHS else []):
                for inner in sub.node:
                    yield from inner.input
                yield from _subgraph_inputs(sub)


def quantize_int8_per_channel(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: (q int8, scale float32 per channel), w ~ q * scale.

    scale = max |w| over the channel / 127 (1 for an all-zero channel); q = round(w / scale)
    (half to even), within [-127, 127].
    """
    weights = np.asarray(weights, dtype=np.float32)
    others = tuple(i for i in range(weights.ndim) if i != axis)
    peak = np.abs(weights).max(axis=others)
    scale = np.where(peak > 0, peak / np.float32(INT8_MAX), np.float32(1)).astype(np.float32)
    shape = [1] * weights.ndim
    shape[axis] = -1
    q = np.clip(np.rint(weights / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def quantize_weights_int8(graph) -> list[str]:
    """Weight-only int8, in place: each weight of `weight_axes` becomes int8 per output channel
    behind a DequantizeLinear; every activation stays float32. Returns the weights' names.

    At the defaults (golden vectors, onnxruntime): rel L2 7.8e-3 at 0.29x of the float32 file,
    where static QDQ (onnxruntime's quantize_static, calibrated uint8 activations of the weight
    matmuls) gave 1.9e-2: the activations' rounding was the error; with them in float the weights
    set it (the folded query x key matrix quantizes worse than a plain Dense kernel). onnxruntime's
    CPU provider fuses DequantizeLinear -> MatMul/Gemm into MatMulNBits (8 bits, accuracy level 4:
    the input is quantized per block at run time; 6.1e-3 without the fusion, as in the `.ort`
    file). Names follow onnxruntime's quantizer: `<w>_quantized`, `<w>_scale`, `<w>_zero_point`,
    node `<w>_DequantizeLinear` with output `<w>_DequantizeLinear_Output`.
    """
    axes = weight_axes(graph)
    if not axes:
        return []
    replaced = []
    initializers = []
    for tensor in graph.initializer:
        if tensor.name not in axes:
            initializers.append(type(tensor).FromString(tensor.SerializeToString()))
            continue
        name = tensor.name
        q, scale = quantize_int8_per_channel(numpy_helper.to_array(tensor), axes[name])
        initializers += [
            numpy_helper.from_array(q, f"{name}_quantized"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point"),
        ]
        replaced.append(name)
    dequantize = [
        onnx.helper.make_node(
            "DequantizeLinear", [f"{n}_quantized", f"{n}_scale", f"{n}_zero_point"],
            [f"{n}_DequantizeLinear_Output"], name=f"{n}_DequantizeLinear", axis=axes[n])
        for n in replaced
    ]
    renames = {n: f"{n}_DequantizeLinear_Output" for n in replaced}
    nodes = [type(n).FromString(n.SerializeToString()) for n in graph.node]
    for node in nodes:
        node.input[:] = [renames.get(i, i) for i in node.input]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.node[:]
    graph.node.extend(dequantize + nodes)
    kept_info = [type(v).FromString(v.SerializeToString()) for v in graph.value_info
                 if v.name not in renames]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return replaced
