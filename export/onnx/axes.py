"""One name per symbolic axis of an ONNX file: `batch`, `query_len`, `kv_len`.

tf2onnx names every unknown dimension on its own (`unk__36`, `unk__37`, ...), so a tool that fixes
a dimension by name (`python -m onnxruntime.tools.make_dynamic_shape_fixed --dim_param batch`)
fixes one input only, and nothing says that the inputs' batch axes are one axis. onnx only.
"""

from __future__ import annotations

# tensor name -> {axis: name} of its length axes; axis 0 is `batch` for every tensor.
LENGTH_AXES = {
    "source1": {1: "query_len"},
    "source2": {1: "kv_len"},
    "query_mask": {1: "query_len"},
    "value_mask": {1: "kv_len"},
    "output": {1: "query_len"},
    "attention_scores": {2: "query_len", 3: "kv_len"},
}


def axis_name(tensor: str, axis: int) -> str | None:
    """The shared name of a symbolic axis, or None where it has none (a model's own axes)."""
    if axis == 0:
        return "batch"
    return LENGTH_AXES.get(tensor, {}).get(axis)


def name_symbolic_axes(model, tensors: dict[str, tuple]) -> None:
    """Name the symbolic axes of the graph's inputs and outputs; `tensors` maps name -> shape
    (None: symbolic). Every other unknown dimension the converter named is renamed to match,
    so shapes inside the graph agree with its inputs."""
    renames: dict[str, str] = {}
    for value in list(model.graph.input) + list(model.graph.output):
        shape = tensors.get(value.name)
        if shape is None:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis >= len(shape) or shape[axis] is not None:
                continue
            name = axis_name(value.name, axis)
            if name is None:
                continue
            if dim.HasField("dim_param") and dim.dim_param != name:
                renames.setdefault(dim.dim_param, name)
            dim.dim_param = name
    for value in model.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
