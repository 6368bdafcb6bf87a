"""The `deployment` section of a manifest, in one cell of the closing table.

Each format measures its own report at export time (the registry's `Format.deployment`:
export.onnx.deployment, export.ort.deployment, export.tflite.deployment; TFLM's builder
measures its arena); this module only summarizes whichever report a manifest holds.
"""

from __future__ import annotations


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
