"""The TFLM graph check: every op has a TFLM kernel, one subgraph, every buffer 16-byte aligned.

numpy and tflite-micro only (no TensorFlow).
"""

from __future__ import annotations

import os

from export.errors import ConversionError, GraphCheckError, ManifestError, short
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


def check_published_set(path: str, manifest: dict, folder: str) -> None:
    """`export.runtime.verify`'s TFLM check, after the golden vectors passed: the file runs in the
    manifest's `deployment.arena_bytes` on this TFLM (the number an engineer copies into the
    firmware), and the generated `_model_data.cc` holds the file's bytes.

    Raises:
        ManifestError: a missing or bad arena entry, an arena that does not run the file, a
        `.cc` whose array is not the file.
    """
    from export.tflm.cpp import read_model_data  # lazy: text parsing, verify only
    from export.tflm.runtime import TflmModel  # lazy: the registry imports checks by name

    report = manifest.get("deployment")
    arena = report.get("arena_bytes") if isinstance(report, dict) else None
    if isinstance(arena, bool) or not isinstance(arena, int) or arena <= 0:
        raise ManifestError(f"manifest deployment.arena_bytes must be a positive integer, not {short(arena)}")
    with open(path, "rb") as f:
        data = f.read()
    if not TflmModel.read(data).runs_in(arena):
        raise ManifestError(f"TFLM cannot run the file in the manifest's {arena:,}-byte tensor arena")
    cc = report.get("files", {}).get("model_data_cc") if isinstance(report.get("files"), dict) else None
    if cc is None:
        return
    names = [e.get("file") for e in manifest.get("files", []) if isinstance(e, dict)]
    if cc not in names:  # only files whose sha256 the manifest lists (manifest.check_files) are read
        raise ManifestError(f"manifest deployment names {short(cc)}, which its files do not list")
    with open(os.path.join(folder, cc), encoding="ascii", errors="replace") as f:
        text = f.read()
    try:
        held = read_model_data(text)
    except ValueError as e:
        raise ManifestError(f"{cc}: {e}") from e
    if held != data:
        raise ManifestError(f"{cc} holds {len(held):,} bytes that are not the artifact's {len(data):,}")
