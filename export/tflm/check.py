"""The TFLM graph check: every op has a TFLM kernel, one subgraph, every buffer 16-byte aligned.

numpy and tflite-micro only (no TensorFlow).
"""

from __future__ import annotations

from export.errors import ConversionError, GraphCheckError
from export.tflm.ops import missing_ops, read_model, schema


def check_tflm_ops(data: bytes, name: str) -> list[str]:
    """The file's ops; ConversionError (exit 4) naming every op TFLM has no kernel for."""
    facts = read_model(data)
    missing = missing_ops(facts)
    if missing:
        raise ConversionError(
            f"{name} cannot run on TFLM: no TFLM kernel for op(s) {', '.join(missing)} "
            f"(the file uses {', '.join(facts.ops + facts.custom)})")
    return list(facts.ops)


def check_tflm_file(path: str, spec=None) -> None:
    """The registry's graph check (the rules do not depend on the spec).

    Raises:
        ConversionError: an op without a TFLM kernel. GraphCheckError: several subgraphs (TFLM
        runs subgraph 0 only), or a constant buffer TFLM would read misaligned.
    """
    with open(path, "rb") as f:
        data = f.read()
    check_tflm_ops(data, path)
    facts = read_model(data)
    if facts.subgraphs != 1:
        raise GraphCheckError(f"{path}: {facts.subgraphs} subgraphs; TFLM files have one")
    misaligned = misaligned_buffers(data)
    if misaligned:
        raise GraphCheckError(f"{path}: constant buffers {misaligned[:5]} are not 16-byte aligned")


def misaligned_buffers(data: bytes) -> list[int]:
    """Indices of the non-empty buffers whose data does not start on a 16-byte boundary (TFLM
    reads weights and biases in place; an int32 bias off its alignment faults on Cortex-M0)."""
    model = schema().Model.GetRootAsModel(data, 0)
    bad = []
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        if buffer.DataLength() and buffer._tab.Vector(buffer._tab.Offset(4)) % 16:
            bad.append(i)
    return bad
