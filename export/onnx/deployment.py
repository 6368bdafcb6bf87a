"""The ONNX record's `deployment` report, measured at export time: the nodes and partitions that
the NNAPI, CoreML NeuralNetwork and CoreML MLProgram execution providers would take, as
`onnxruntime.tools.check_onnx_model_mobile_usability` counts them, on the fixed-shape graph (a
dynamic batch is fixed to 1 first: with a symbolic batch those providers take nothing). The ORT
record reports the same on the graph its `.ort` file was serialized from (export.ort.deployment).
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile

from export.runtime.native_output import quieted_logger

# The execution providers ORT Mobile users pick, and the usability checker's op lists for them.
MOBILE_PROVIDERS = {
    "nnapi": None,  # usability_checker.check_nnapi_partitions
    "coreml_neuralnetwork": "coreml_supported_neuralnetwork_ops.md",
    "coreml_mlprogram": "coreml_supported_mlprogram_ops.md",
}


def onnx_deployment(built, spec) -> dict:
    """The ONNX record's report: mobile execution providers on the file, its batch fixed to 1."""
    return mobile_providers_report(built.path, fixed_batch=spec.batch or 1)


def mobile_providers_report(path: str, *, fixed_batch: int = 1, optimize: bool = True) -> dict:
    """{"batch": n, provider: {nodes, placed, partitions, unsupported}} for an ONNX file.

    Like `check_onnx_model_mobile_usability`, the graph is first optimized at onnxruntime's
    basic level (what a session does before it hands nodes to a provider; `optimize=False` when
    it already was), then its shapes inferred; a symbolic batch is fixed to `fixed_batch`.
    """
    import onnx  # lazy: the report runs at export time only, never in export.runtime.verify
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


def optimized_onnx(src: str, dst: str) -> None:
    """The same graph as ONNX (what the `.ort` file holds), for tools that read ONNX only."""
    import onnxruntime as ort  # lazy: export time only

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    options.log_severity_level = 3
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
