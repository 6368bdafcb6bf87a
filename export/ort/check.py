"""The ORT graph check: onnxruntime loads the file with the spec's names and static shapes.

onnxruntime and numpy only (no TensorFlow).
"""

from __future__ import annotations

from export.errors import GraphCheckError
from export.spec import ArtifactSpec

ORT_IDENTIFIER = b"ORTM"  # the flatbuffer file identifier at bytes 4..8


def check_ort_file(path: str, spec: ArtifactSpec) -> None:
    """Raise GraphCheckError unless `path` is an ORT-format file with the spec's inputs and outputs."""
    import onnxruntime as ort  # lazy: the registry imports checks by name; only ORT needs it

    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] != ORT_IDENTIFIER:
        raise GraphCheckError(f"{path}: not an ORT-format file (identifier {head[4:8]!r})")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for kind, got, want in (("inputs", session.get_inputs(), spec.inputs()),
                            ("outputs", session.get_outputs(), spec.outputs())):
        got_named = [(v.name, [d if isinstance(d, int) else None for d in v.shape]) for v in got]
        want_named = [(t.name, list(t.shape)) for t in want]
        if got_named != want_named:
            raise GraphCheckError(f"{path}: {kind} {got_named}, expected {want_named}")
