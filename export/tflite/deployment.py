"""The TFLite record's `deployment` report, measured at export time: the GPU delegate's
compatibility verdict (`tf.lite.experimental.Analyzer`) and the share of nodes XNNPACK, LiteRT's
default CPU delegate, takes."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from export.runtime.native_output import captured_native_output


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
