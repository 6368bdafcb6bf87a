"""The floor of a cell: the runtime's call overhead plus the executed FLOPs at the SGEMM peak.

Each cell of `python -m export.bench` times, interleaved with the artifacts, a one-op graph in
the same runtime with the same inputs and outputs (what a call costs before any arithmetic:
feeding the inputs, dispatching, fetching the outputs) and one SGEMM (the peak of this moment,
which a shared machine moves). The distance to the floor is then

    time / (call overhead + executed FLOPs / SGEMM peak)

1.0 is a file that spends nothing beyond the call and its matmuls at the peak; an int8 file may
go under 1 (its matmuls are not float SGEMMs).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from export.runtime.runtimes import onnx_session

# The in-cell SGEMM: onnxruntime's MLAS MatMul on n x n float32 (measured here: 256 reaches the
# single-thread peak, 248 GFLOP/s vs 244 at 512, at a tenth of a millisecond, so the cell's
# interleaved rounds keep their number of calls).
CELL_SGEMM_SIZE = 256


def floor_distance(time_us: float, overhead_us: float, executed_flops: float,
                   peak_gflops: float) -> dict:
    """{floor_us, matmul_floor_us, floor_distance}: the floor of one cell and how far `time_us`
    is from it (time / floor)."""
    if time_us <= 0 or overhead_us < 0 or executed_flops < 0 or peak_gflops <= 0:
        raise ValueError(
            "floor_distance needs a positive time and peak and non-negative overhead and FLOPs. "
            f"Received: time_us={time_us!r}, overhead_us={overhead_us!r}, "
            f"executed_flops={executed_flops!r}, peak_gflops={peak_gflops!r}")
    matmul_us = executed_flops / (peak_gflops * 1e3)
    floor = overhead_us + matmul_us
    return {"floor_us": floor, "matmul_floor_us": matmul_us, "floor_distance": time_us / floor}


def sgemm_gflops(median_us: float, n: int = CELL_SGEMM_SIZE) -> float:
    """GFLOP/s of one n x n x n SGEMM that took `median_us`."""
    return 2 * n**3 / (median_us * 1e3)


def sgemm_call(workdir: str, threads: int, n: int = CELL_SGEMM_SIZE) -> Callable[[], object]:
    """One n x n SGEMM in onnxruntime (MLAS), to time among a cell's calls."""
    from onnx import TensorProto, helper  # lazy: as the one-op graphs below

    path = os.path.join(workdir, f"sgemm_{n}.onnx")
    if not os.path.isfile(path):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["A", "B"], ["C"])], "sgemm",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
             helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                  ir_version=8)
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    session = onnx_session(path, threads)
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((n, n), dtype=np.float32) for k in ("A", "B")}
    return lambda: session.run(None, feeds)


def one_op_graph(runtime: str, spec, workdir: str) -> str:
    """A file for `runtime` ("onnx" or "tflite") with `spec`'s inputs and outputs (names, static
    shapes at `spec.batch`, dtypes) whose outputs each come from one op on `source1`: ADD of a
    constant where the shapes agree, else SLICE or PAD of its feature axis."""
    folder = os.path.join(workdir, f"overhead_{runtime}_q{spec.query_len}_kv{spec.kv_len}_b{spec.batch}")
    os.makedirs(folder, exist_ok=True)
    if runtime == "onnx":
        return _onnx_one_op(spec, folder)
    return _tflite_one_op(spec, folder)


def _feature_change(spec, output) -> tuple[str, int]:
    features = spec.query_features
    if spec.batch is None or output.shape[:2] != (spec.batch, spec.query_len) or len(output.shape) != 3:
        raise ValueError(f"the one-op graph covers (batch, Tq, units) outputs; got {output.name} "
                         f"{output.shape}")
    units = output.shape[2]
    return ("add" if units == features else "slice" if units < features else "pad"), units


def _onnx_one_op(spec, folder: str) -> str:
    # lazy: each runtime's graph with its own library, only for the runtimes a bench times
    import onnx
    from onnx import helper, numpy_helper

    nodes, inits, outputs = [], [], []
    for i, out in enumerate(spec.outputs()):
        kind, units = _feature_change(spec, out)
        if kind == "add":
            inits.append(numpy_helper.from_array(np.ones((1, 1, units), np.float32), f"c{i}"))
            nodes.append(helper.make_node("Add", ["source1", f"c{i}"], [out.name]))
        elif kind == "slice":
            for name, values in (("starts", [0]), ("ends", [units]), ("axes", [2])):
                inits.append(numpy_helper.from_array(np.asarray(values, np.int64), f"{name}{i}"))
            nodes.append(helper.make_node("Slice", ["source1", f"starts{i}", f"ends{i}", f"axes{i}"],
                                          [out.name]))
        else:
            pads = [0, 0, 0, 0, 0, units - spec.query_features]
            inits.append(numpy_helper.from_array(np.asarray(pads, np.int64), f"pads{i}"))
            nodes.append(helper.make_node("Pad", ["source1", f"pads{i}"], [out.name]))
        outputs.append(helper.make_tensor_value_info(out.name, onnx.TensorProto.FLOAT, list(out.shape)))
    inputs = [helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)),
                                            list(t.shape)) for t in spec.inputs()]
    model = helper.make_model(helper.make_graph(nodes, "overhead", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = os.path.join(folder, "overhead.onnx")
    onnx.save(model, path)
    return path


def _tflite_one_op(spec, folder: str) -> str:
    # lazy: TensorFlow and the TFLite builder, only when the bench times LiteRT
    import tensorflow as tf

    from export.tflite.build import build_tflite

    changes = [(out.name, *_feature_change(spec, out)) for out in spec.outputs()]

    def call(*tensors):
        source1 = tensors[0]
        result = {}
        for name, kind, units in changes:
            if kind == "add":
                y = source1 + tf.constant(np.ones((1, 1, units), np.float32))
            elif kind == "slice":
                y = tf.slice(source1, [0, 0, 0], [spec.batch, spec.query_len, units])
            else:
                y = tf.pad(source1, [[0, 0], [0, 0], [0, units - spec.query_features]])
            result[name] = tf.identity(y, name=name)
        return result

    signature = [tf.TensorSpec(t.shape, tf.as_dtype(t.dtype), name=t.name) for t in spec.inputs()]
    fn = tf.function(call, input_signature=signature, autograph=False)
    return build_tflite(spec.replace(quantize="none", name="overhead"), fn, folder).path
