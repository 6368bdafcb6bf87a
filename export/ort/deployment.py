"""The ORT record's `deployment` report: ONNX's (export.onnx.deployment), on the graph the `.ort`
file was serialized from."""

from __future__ import annotations

from export.onnx.deployment import mobile_providers_report


def ort_deployment(built, spec) -> dict:
    """The ORT record's report, read from the ONNX graph the `.ort` file was serialized from
    (`Built.graph_source`): onnx cannot parse the ORT flatbuffer, and the graph is the same."""
    return mobile_providers_report(built.graph_source, fixed_batch=spec.batch or 1, optimize=False)
