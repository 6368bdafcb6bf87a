"""Parity metrics against the reference, and the graph checks each runtime's file must pass.

numpy, onnx and ai-edge-litert only (no TensorFlow), so `export.verify` shares these.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from export.errors import GraphCheckError, ParityError

# Default parity tolerances (max abs diff) per format, float32.
DEFAULT_ATOL = {"savedmodel": 1e-5, "onnx": 1e-4, "tflite": 1e-4}
# Default relative L2 gates per quantization variant.
DEFAULT_MAX_REL = {"float16": 1e-3, "dynamic-int8": 2.5e-2, "int8": 5e-2}

# Run-time shape arithmetic and control flow: never in a fixed-batch ONNX graph.
ONNX_SHAPE_OPS = frozenset(
    {"Shape", "ConstantOfShape", "Range", "ReduceProd", "Size", "Loop", "If", "Scan", "NonZero"}
)
# What a static, builtin-only TFLite file must not hold.
TFLITE_FORBIDDEN_OPS = frozenset(
    {"SHAPE", "REDUCE_PROD", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE",
     "WHILE", "IF", "CUSTOM", "DELEGATE", "FLEX"}
)


def parity_metrics(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict:
    """max_abs, mean_abs, rmse, rel_l2 (||y - y^|| / ||y||) and cosine over every output."""
    missing = sorted(set(reference) - set(outputs))
    if missing:
        raise ParityError(f"outputs {missing} missing; the artifact returned {sorted(outputs)}")
    refs, gots = [], []
    for name in sorted(reference):
        ref = np.asarray(reference[name], dtype=np.float64)
        got = np.asarray(outputs[name], dtype=np.float64)
        if ref.shape != got.shape:
            raise ParityError(
                f"output {name!r} has shape {got.shape}, the reference {ref.shape}"
            )
        refs.append(ref.ravel())
        gots.append(got.ravel())
    y, y_hat = np.concatenate(refs), np.concatenate(gots)
    n_bad = int(np.count_nonzero(~np.isfinite(y_hat)))
    if n_bad:
        raise ParityError(f"the artifact returned {n_bad} NaN/inf values (of {y_hat.size})")
    diff = y - y_hat
    norm_y, norm_hat = float(np.linalg.norm(y)), float(np.linalg.norm(y_hat))
    return {
        "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "mean_abs": float(np.mean(np.abs(diff))) if diff.size else 0.0,
        "rmse": float(np.sqrt(np.mean(diff * diff))) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(diff) / norm_y) if norm_y else float(np.linalg.norm(diff)),
        "cosine": float(y @ y_hat / (norm_y * norm_hat)) if norm_y and norm_hat else 1.0,
    }


def gate(metrics: dict, *, artifact: str, atol: float | None = None,
         max_rel: float | None = None) -> None:
    """Raise ParityError when `max_abs > atol` or `rel_l2 > max_rel` (whichever is set)."""
    if atol is not None and not metrics["max_abs"] <= atol:
        raise ParityError(
            f"{artifact}: max abs diff {metrics['max_abs']:.3g} exceeds the tolerance "
            f"atol={atol:g} (rel_l2 {metrics['rel_l2']:.3g})"
        )
    if max_rel is not None and not metrics["rel_l2"] <= max_rel:
        raise ParityError(
            f"{artifact}: relative L2 error {metrics['rel_l2']:.3g} exceeds the gate "
            f"max_rel_error={max_rel:g} (max abs diff {metrics['max_abs']:.3g})"
        )


# -- graph checks -------------------------------------------------------------------------------


def onnx_op_types(path: str) -> list[str]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    for fn in model.functions:
        ops.extend(n.op_type for n in fn.node)
    return ops


def check_onnx_graph(path: str, *, fixed_batch: bool, input_names: list[str],
                     output_names: list[str]) -> None:
    """Checker with full_check; names; at a fixed batch no shape arithmetic and static inputs."""
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise GraphCheckError(f"{path}: onnx.checker rejects the model: {e}") from e
    model = onnx.load(path, load_external_data=False)
    got_inputs = [i.name for i in model.graph.input]
    got_outputs = [o.name for o in model.graph.output]
    if got_inputs != input_names or got_outputs != output_names:
        raise GraphCheckError(
            f"{path}: inputs {got_inputs} / outputs {got_outputs}, expected "
            f"{input_names} / {output_names}"
        )
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        symbolic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        allowed = [] if fixed_batch else [0]
        if symbolic != allowed:
            raise GraphCheckError(
                f"{path}: {value.name} has symbolic axes {symbolic}, expected {allowed}"
            )
    if fixed_batch:
        bad = sorted(set(onnx_op_types(path)) & ONNX_SHAPE_OPS)
        if bad:
            raise GraphCheckError(f"{path}: run-time shape ops in a fixed-batch graph: {bad}")


def tflite_op_names(path: str) -> list[str]:
    """Op names before any delegate takes them (builtin resolver without default delegates)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=path,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    return [op["op_name"] for op in interpreter._get_ops_details()]


def check_tflite_graph(path: str) -> None:
    """Builtin ops only, no shape/variable ops, every tensor static."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        ops = tflite_op_names(path)
    except Exception as e:
        raise GraphCheckError(f"{path}: LiteRT cannot load it with builtin ops only: {e}") from e
    bad = sorted({op for op in ops if op in TFLITE_FORBIDDEN_OPS or op.startswith("Flex")})
    if bad:
        raise GraphCheckError(f"{path}: non-builtin or dynamic ops {bad}")
    interpreter = Interpreter(model_path=path)
    dynamic = [
        t["name"] for t in interpreter.get_tensor_details()
        if len(t.get("shape_signature", [])) and (np.asarray(t["shape_signature"]) < 0).any()
    ]
    if dynamic:
        raise GraphCheckError(f"{path}: tensors with a dynamic shape: {dynamic[:5]}")
