"""The ORT builder: the ONNX builder's file, serialized by onnxruntime into the `.ort` format."""

from __future__ import annotations

import os
import re
import tempfile

from export.errors import ConversionError, first_line
from export.formats import Built
from export.onnx.build import build_onnx
from export.onnx.deployment import optimized_onnx
from export.ort.serialize import serialize_ort
from export.spec import ArtifactSpec


def build_ort(spec: ArtifactSpec, fn, workdir: str, *, opset: int | None = None,
              metadata: dict[str, str] | None = None) -> Built:
    """Convert `fn` into a `.ort` file under `workdir`.

    The ONNX file (variant, metadata and all: `export.onnx.build.build_onnx`) is built in a
    scratch folder, then serialized by onnxruntime in a child process (`export.ort.serialize`:
    the same bytes on every run). `metadata_props`, producer and opsets carry over.

    Returns:
        `Built(path, {"opset": n, "optimization": "basic"}, graph_source=...)`: the graph source
        is the basic-optimized ONNX equivalent of the file, in the scratch folder.

    Raises:
        SpecError, ConversionError: as build_onnx; ConversionError if onnxruntime cannot write it.
    """
    scratch = tempfile.mkdtemp(prefix=".ort-src-", dir=workdir)
    onnx_spec = spec  # same name and variant; only the suffix differs
    built = build_onnx(onnx_spec, fn, scratch, opset=opset, metadata=metadata)
    path = os.path.join(workdir, spec.artifact_name("ort"))
    done = serialize_ort(built.path, path, scratch)
    if done.returncode != 0 or not os.path.isfile(path):
        raise ConversionError(f"ORT serialization (onnxruntime) failed: {child_reason(done.stderr)}")
    graph_source = os.path.join(scratch, "optimized.onnx")
    try:
        optimized_onnx(built.path, graph_source)
    except Exception as e:
        raise ConversionError(f"onnxruntime could not optimize the ONNX graph: {first_line(e)}") from e
    return Built(path, {"opset": built.facts["opset"], "optimization": "basic"},
                 graph_source=graph_source)


def child_reason(stderr: str) -> str:
    """The serializing child's failure in one line: the exception that ended it (the last line of
    its traceback, without the module path of its type), an op onnxruntime does not know named
    as the ONNX graph check names it, so a `--model` error can name the Keras layer."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "no output"
    last = lines[-1]
    if lines[0].startswith("Traceback"):
        last = re.sub(r"^[\w.]+\.(\w+): ", r"\1: ", last)
    unknown = re.search(r"No Op registered for (\w+)", stderr)
    if unknown:
        nodes = re.findall(r'In Node, \("([^"]+)", ' + unknown.group(1), stderr)
        return f"op {unknown.group(1)} is not an ONNX op (nodes {nodes[:3]})"
    return last
