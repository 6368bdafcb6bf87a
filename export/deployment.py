"""Where a file would run on a device: the `deployment` section of its manifest, measured at export time.

ONNX and ORT: the nodes and partitions that the NNAPI, CoreML NeuralNetwork and CoreML MLProgram
execution providers would take, as `onnxruntime.tools.check_onnx_model_mobile_usability` counts
them, on the fixed-shape graph (a dynamic batch is fixed to 1 first: with a symbolic batch those
providers take nothing). TFLite: the GPU delegate's compatibility verdict
(`tf.lite.experimental.Analyzer`) and the share of nodes XNNPACK, LiteRT's default CPU delegate,
takes. Each format's record names its function (`export.formats.Format.deployment`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import tempfile

import numpy as np

from export.native_output import captured_native_output, quieted_logger
from export.ort.serialize import optimized_onnx

# The execution providers ORT Mobile users pick, and the usability checker's op lists for them.
MOBILE_PROVIDERS = {
    "nnapi": None,  # usability_checker.check_nnapi_partitions
    "coreml_neuralnetwork": "coreml_supported_neuralnetwork_ops.md",
    "coreml_mlprogram": "coreml_supported_mlprogram_ops.md",
}


def onnx_deployment(built, spec) -> dict:
    """The ONNX record's report: mobile execution providers on the file, its batch fixed to 1."""
    return mobile_providers_report(built.path, fixed_batch=spec.batch or 1)


def ort_deployment(built, spec) -> dict:
    """The ORT record's report, read from the ONNX graph the `.ort` file was serialized from
    (`Built.graph_source`): onnx cannot parse the ORT flatbuffer, and the graph is the same."""
    return mobile_providers_report(built.graph_source, fixed_batch=spec.batch or 1, optimize=False)


def mobile_providers_report(path: str, *, fixed_batch: int = 1, optimize: bool = True) -> dict:
    """{"batch": n, provider: {nodes, placed, partitions, unsupported}} for an ONNX file.

    Like `check_onnx_model_mobile_usability`, the graph is first optimized at onnxruntime's
    basic level (what a session does before it hands nodes to a provider; `optimize=False` when
    it already was), then its shapes inferred; a symbolic batch is fixed to `fixed_batch`.
    """
    import onnx  # lazy: the report runs at export time only, never in export.verify
    from onnxruntime.tools.mobile_helpers import usability_checker
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo

    model = onnx.load(path)
    fix_batch(model, fixed_batch)
    with tempfile.TemporaryDirectory(prefix="xattn-deployment-") as tmp:
        fixed = os.path.join(tmp, "fixed.onnx")
        onnx.save(model, fixed)
        if optimize:
            optimized = os.path.join(tmp, "optimized.onnx")
            optimized_onnx(fixed, optimized)
            fixed = optimized
        # The usability checker logs its analysis at INFO; the manifest holds what matters.
        with quieted_logger("usability_checker", logging.WARNING):
            graph = ModelProtoWithShapeInfo(pathlib.Path(fixed)).model_with_shape_info
            report = {"batch": fixed_batch}
            for name, ops_file in MOBILE_PROVIDERS.items():
                if ops_file is None:
                    info = usability_checker.check_nnapi_partitions(graph, True)
                else:
                    info = usability_checker.check_coreml_partitions(graph, True, ops_file)
                report[name] = {
                    "nodes": int(info.num_nodes),
                    "placed": int(info.num_supported_nodes),
                    "partitions": int(info.num_partitions),
                    "unsupported": sorted(
                        {op.split(":")[-1] for op in info.unsupported_ops}
                        | set(info.ops_with_unsupported_rank)
                        | ({"dynamic shapes"} if info.nodes_unsupported_due_to_dynamic_input else set())
                    ),
                }
    return report


def fix_batch(model, batch: int) -> None:
    """Fix every symbolic axis 0 of the graph's inputs to `batch` (make_dynamic_shape_fixed's
    logic), then the outputs' shapes from them."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed  # lazy: as above

    changed = False
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            if dims[0].dim_param:
                make_dim_param_fixed(model.graph, dims[0].dim_param, batch)
            else:
                dims[0].dim_value = batch
            changed = True
    if changed:
        fix_output_shapes(model)


def tflite_deployment(built, spec) -> dict:
    """The TFLite record's report: {"gpu_delegate": {...}, "xnnpack": {...}}."""
    return {"gpu_delegate": gpu_delegate_verdict(built.path), "xnnpack": xnnpack_share(built.path)}


def gpu_delegate_verdict(path: str) -> dict:
    """`tf.lite.experimental.Analyzer.analyze(gpu_compatibility=True)`, parsed:
    {"compatible": bool, "issues": [the analyzer's warning lines]}."""
    import tensorflow as tf  # lazy: the analyzer ships with TensorFlow; only export time needs it

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tf.lite.experimental.Analyzer.analyze(model_path=path, gpu_compatibility=True)
    out = text.getvalue()
    issues = [
        line.strip() for line in out.splitlines()
        if "GPU COMPATIBILITY WARNING" in line or "Not supported op" in line
        or "not supported by" in line.lower()
    ]
    compatible = "looks compatible with GPU delegate" in out and not issues
    return {"compatible": compatible, "issues": issues}


def xnnpack_share(path: str) -> dict:
    """The nodes XNNPACK takes: {"nodes", "delegated", "partitions", "share", "cpu_ops"}.

    The interpreter without default delegates lists the file's nodes; with them, XNNPACK's
    partitions are DELEGATE nodes appended to that list. A node is delegated when a partition's
    outputs depend on it without passing through the partition's inputs.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # lazy: as above

    plain = Interpreter(
        model_path=path,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    nodes = [op for op in plain._get_ops_details() if op["op_name"] != "DELEGATE"]
    with captured_native_output((2,)):
        delegated_interpreter = Interpreter(model_path=path)
        delegated_interpreter.allocate_tensors()
    ops = delegated_interpreter._get_ops_details()
    originals = [op for op in ops if op["op_name"] != "DELEGATE"]
    partitions = [op for op in ops if op["op_name"] == "DELEGATE"]
    producer = {int(t): op["index"] for op in originals for t in op["outputs"]}
    by_index = {op["index"]: op for op in originals}
    taken: set[int] = set()
    for partition in partitions:
        entry = {int(t) for t in np.asarray(partition["inputs"])}
        stack = [int(t) for t in np.asarray(partition["outputs"])]
        while stack:
            tensor = stack.pop()
            if tensor in entry or tensor not in producer or producer[tensor] in taken:
                continue
            taken.add(producer[tensor])
            stack.extend(int(t) for t in by_index[producer[tensor]]["inputs"] if t >= 0)
    cpu_ops = sorted({op["op_name"] for op in originals if op["index"] not in taken})
    total = len(nodes)
    return {
        "nodes": total,
        "delegated": len(taken),
        "partitions": len(partitions),
        "share": round(len(taken) / total, 4) if total else 0.0,
        "cpu_ops": cpu_ops,
    }


def summary(report: dict | None) -> str:
    """A compact cell for the closing table: `nnapi 10/10 nn 10/10 mlp 10/10` (placed/nodes for
    NNAPI, CoreML NeuralNetwork, CoreML MLProgram; `:2p` for two partitions) or
    `gpu ok xnnpack 7/7`, or `arena 9.3 KB flash 37.5 KB` (TFLM)."""
    if not report:
        return "-"
    if "arena_bytes" in report:  # TFLM (export.tflm.build)
        return (f"arena {report['arena_bytes'] / 1024:.1f} KB flash "
                f"{report['flash_bytes'] / 1024:.1f} KB")
    if "xnnpack" in report:
        gpu = "ok" if report["gpu_delegate"]["compatible"] else "no"
        x = report["xnnpack"]
        return f"gpu {gpu} xnnpack {x['delegated']}/{x['nodes']}"
    cells = []
    for name, label in (("nnapi", "nnapi"), ("coreml_neuralnetwork", "nn"),
                        ("coreml_mlprogram", "mlp")):
        r = report[name]
        split = f":{r['partitions']}p" if r["partitions"] > 1 else ""
        cells.append(f"{label} {r['placed']}/{r['nodes']}{split}")
    return " ".join(cells)
