"""The ONNX graph check: what a file must hold before onnxruntime users see it.

onnx and numpy only (no TensorFlow).
"""

from __future__ import annotations

import re

import onnx

from export.errors import GraphCheckError
from export.spec import ArtifactSpec

# Run-time shape arithmetic and control flow: never in a fixed-batch ONNX graph.
ONNX_SHAPE_OPS = frozenset(
    {"Shape", "ConstantOfShape", "Range", "ReduceProd", "Size", "Loop", "If", "Scan", "NonZero"}
)


def _graph(path: str) -> onnx.ModelProto:
    """The model without its external data: the rules read the graph, never the weights."""
    return onnx.load(path, load_external_data=False)


def onnx_op_types(path: str) -> list[str]:
    model = _graph(path)
    ops = [n.op_type for n in model.graph.node]
    for fn in model.functions:
        ops.extend(n.op_type for n in fn.node)
    return ops


def check_onnx_file(path: str, spec: ArtifactSpec) -> None:
    """The registry's graph check: `check_onnx_graph` with the spec's batch and names."""
    tensors = spec.inputs() + spec.outputs()
    check_onnx_graph(
        path,
        fixed_batch=spec.batch is not None,
        input_names=[i.name for i in spec.inputs()],
        output_names=[o.name for o in spec.outputs()],
        symbolic_axes={t.name: [i for i, d in enumerate(t.shape) if d is None] for t in tensors},
        # A user's own graph (`--saved-model`) may loop and read shapes: it is theirs.
        shape_ops_allowed=spec.user_graph,
    )


def check_onnx_graph(path: str, *, fixed_batch: bool, input_names: list[str],
                     output_names: list[str], symbolic_axes: dict | None = None,
                     shape_ops_allowed: bool = False) -> None:
    """Checker with full_check; names; at a fixed batch no shape arithmetic and static inputs.

    Raises:
        GraphCheckError: naming the rule broken and what the file holds.
    """
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        reason = str(e)
        unknown = re.search(r"No Op registered for (\w+)", reason)
        if unknown:  # an op tf2onnx passed through: name the nodes (their names hold the scope)
            nodes = [n.name for n in _graph(path).graph.node if n.op_type == unknown.group(1)]
            reason = f"op {unknown.group(1)} is not an ONNX op (nodes {nodes[:3]})"
        raise GraphCheckError(f"{path}: onnx.checker rejects the model: {reason}") from e
    model = _graph(path)
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
        if symbolic_axes is not None:
            allowed = symbolic_axes.get(value.name, allowed)
        if symbolic != allowed:
            raise GraphCheckError(
                f"{path}: {value.name} has symbolic axes {symbolic}, expected {allowed}"
            )
    dynamic = any(symbolic_axes.values()) if symbolic_axes is not None else not fixed_batch
    if not dynamic and not shape_ops_allowed:
        bad = sorted(set(onnx_op_types(path)) & ONNX_SHAPE_OPS)
        if bad:
            raise GraphCheckError(f"{path}: run-time shape ops in a fixed-batch graph: {bad}")
