"""ONNX artifact: tf2onnx conversion of the inference function, named inputs and outputs."""

from __future__ import annotations

import os
import sys

from export.errors import ConversionError, SpecError
from export.spec import ArtifactSpec


def max_opset() -> int:
    """The newest opset tf2onnx writes that the installed onnx (and so onnxruntime) knows."""
    import onnx
    from tf2onnx import constants

    return min(max(constants.OPSET_TO_IR_VERSION), onnx.defs.onnx_opset_version())


MIN_OPSET = 13


def build_onnx(spec: ArtifactSpec, fn, workdir: str, *, opset: int | None = None) -> str:
    """Convert `fn` with tf2onnx into a `.onnx` file under `workdir`; return its path."""
    import onnx
    import tf2onnx

    newest = max_opset()
    opset = newest if opset is None else opset
    if not MIN_OPSET <= opset <= newest:
        raise SpecError(
            f"`--opset` must be between {MIN_OPSET} and {newest} (tf2onnx {tf2onnx.__version__}). "
            f"Received: opset={opset}"
        )
    path = os.path.join(workdir, spec.artifact_name("onnx"))
    try:
        model, _ = tf2onnx.convert.from_function(
            fn, input_signature=fn.input_signature, opset=opset
        )
    except Exception as e:
        raise ConversionError(f"ONNX conversion (tf2onnx) failed: {e}") from e
    _rename_io(model, [i.name for i in spec.inputs()], [o.name for o in spec.outputs()])
    model.producer_name = "xattn"
    model.doc_string = f"xattn CrossAttention ({spec.describe()})"
    onnx.save(model, path)
    return path


def _rename_io(model, input_names: list[str], output_names: list[str]) -> None:
    """Strip tf2onnx's ':0' suffixes and put the outputs in the artifact's order."""
    renames = {}
    for value in list(model.graph.input) + list(model.graph.output):
        base = value.name.split(":")[0]
        if base in input_names or base in output_names:
            renames[value.name] = base
    for value in list(model.graph.input) + list(model.graph.output):
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    by_name = {o.name: o for o in model.graph.output}
    if sorted(by_name) != sorted(output_names):
        raise ConversionError(f"tf2onnx produced outputs {sorted(by_name)}, expected {output_names}")
    ordered = [by_name[n] for n in output_names]
    # Copy first: protobuf repeated fields alias their elements.
    ordered = [type(o).FromString(o.SerializeToString()) for o in ordered]
    del model.graph.output[:]
    model.graph.output.extend(ordered)


def main(argv: list[str] | None = None) -> int:
    from export.cli import main as cli_main

    return cli_main(argv, formats=("onnx",), prog="python -m export.onnx")


if __name__ == "__main__":
    sys.exit(main())
