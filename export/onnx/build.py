"""The ONNX builder: tf2onnx conversion of the inference function, named inputs and outputs."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import onnx
import tf2onnx
from tf2onnx import constants

from export.errors import ConversionError, SpecError, first_line
from export.formats import Built
from export.onnx.axes import name_symbolic_axes
from export.onnx.quantize import quantize_onnx
from export.runtime.metadata import onnx_metadata_props
from export.spec import ArtifactSpec
from xattn import __version__ as xattn_version


def max_opset() -> int:
    """The newest opset tf2onnx writes that the installed onnx (and so onnxruntime) knows."""
    return min(max(constants.OPSET_TO_IR_VERSION), onnx.defs.onnx_opset_version())


MIN_OPSET = 13


def build_onnx(spec: ArtifactSpec, fn, workdir: str, *, opset: int | None = None,
               metadata: dict[str, str] | None = None) -> Built:
    """Convert `fn` with tf2onnx into a `.onnx` file under `workdir`.

    Args:
        spec: the artifact's shapes, names and variant.
        fn: the inference function (`export.graph.build_inference_function`).
        workdir: the folder the file is written into.
        opset: the ONNX opset; None takes the newest tf2onnx writes and onnxruntime runs.
        metadata: {key: text} written into `metadata_props` as `xattn.<key>`
            (`export.runtime.metadata.file_metadata`).

    Returns:
        `Built(path, {"opset": n})`. A variant (`spec.quantize`) is made from the float32 file
        after conversion (`export.onnx.quantize.quantize_onnx`).

    Raises:
        SpecError: an opset out of range. ConversionError: tf2onnx or the quantizer failed.
    """
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
        raise ConversionError(f"ONNX conversion (tf2onnx) failed: {first_line(e)}") from e
    _rename_io(model, [i.name for i in spec.inputs()], [o.name for o in spec.outputs()])
    name_symbolic_axes(model, {t.name: tuple(t.shape) for t in spec.inputs() + spec.outputs()})
    canonicalize_initializers(model)
    canonicalize_node_names(model)
    # tf2onnx writes the traced function's name here, `__inference_call_<n>` with a per-process
    # counter: `python -m export` and `python -m export.onnx` would differ in this string only.
    model.graph.doc_string = "converted by tf2onnx from the xattn inference function"
    if spec.quantize == "none":
        describe_model(model, spec, metadata)
        onnx.save(model, path)
        return Built(path, {"opset": opset})
    scratch = tempfile.mkdtemp(prefix=".onnx-float32-", dir=workdir)
    try:
        float_path = os.path.join(scratch, spec.replace(quantize="none", int8_io=False).artifact_name("onnx"))
        onnx.save(model, float_path)
        quantize_onnx(spec, float_path, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # The quantizers keep some of these fields and not others: set them on what they wrote.
    quantized = onnx.load(path)
    describe_model(quantized, spec, metadata)
    onnx.save(quantized, path)
    return Built(path, {"opset": opset})


def describe_model(model, spec: ArtifactSpec, metadata: dict[str, str] | None) -> None:
    """Producer, doc string and `xattn.*` metadata; the unused `ai.onnx.ml` opset dropped.

    The producer is this project at its version (tf2onnx's stays in the manifest's `versions`).
    """
    model.producer_name = "xattn"
    model.producer_version = xattn_version
    model.doc_string = f"xattn: {spec.describe()}"
    used = {n.domain for n in model.graph.node} | {
        n.domain for f in model.functions for n in f.node}
    # Copies: protobuf repeated fields alias their elements.
    kept = [type(o).FromString(o.SerializeToString()) for o in model.opset_import
            if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    del model.metadata_props[:]
    for key, value in onnx_metadata_props(metadata or {}):
        model.metadata_props.add(key=key, value=value)


# tf2onnx numbers the constants its optimizers create (`const_fold_opt__29`, `const_axes__18`)
# while iterating over sets of Python objects, so the numbers and the initializer order change from
# one process to the next although the graph is the same.
_GENERATED_NAME = re.compile(r"^(?P<stem>.+?)__\d+$")


def canonicalize_initializers(model) -> None:
    """Rename tf2onnx's numbered constants by first use and order initializers that way.

    Same graph, same bytes: the node order and every other name are already deterministic, so
    this makes the file reproducible (`python -m export.onnx` twice gives one sha256).
    """
    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return  # subgraphs may reference these names; not something our graphs hold
    first_use: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            first_use.setdefault(name, len(first_use))
    unused = len(first_use)
    initializers = sorted(graph.initializer, key=lambda t: (first_use.get(t.name, unused), t.name))
    taken = {t.name for t in graph.initializer if not _GENERATED_NAME.match(t.name)}
    io_names = {v.name for v in list(graph.input) + list(graph.output)}
    taken |= {n for node in graph.node for n in node.output} | io_names
    renames: dict[str, str] = {}
    for tensor in initializers:
        match = _GENERATED_NAME.match(tensor.name)
        if not match or tensor.name in io_names:
            continue
        k = len(renames)
        new = f"{match['stem']}__{k}"
        while new in taken:
            k += 1
            new = f"{match['stem']}__c{k}"
        renames[tensor.name] = new
        taken.add(new)
    ordered = [type(t).FromString(t.SerializeToString()) for t in initializers]
    for tensor in ordered:
        tensor.name = renames.get(tensor.name, tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(ordered)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    for value in graph.value_info:
        value.name = renames.get(value.name, value.name)


_GENERATED_VALUE = re.compile(r"^(?P<stem>.+?)__\d+(?P<port>:\d+)?$")


def canonicalize_node_names(model) -> None:
    """Renumber tf2onnx's numbered node names and node outputs (`MatMul_Gemm__6:0`) in node order.

    tf2onnx takes the numbers from a counter that lives as long as the process: a second
    conversion in one process (`python -m export` builds ONNX, then ORT from ONNX again) would
    name the same graph otherwise.
    """
    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return
    io_names = {v.name for v in list(graph.input) + list(graph.output)}
    initializers = {t.name for t in graph.initializer}
    taken = set(io_names) | initializers
    taken |= {o for n in graph.node for o in n.output if not _GENERATED_VALUE.match(o)}
    renames: dict[str, str] = {}
    counter = 0

    def fresh(stem: str, port: str) -> str:
        nonlocal counter
        while True:
            name = f"{stem}__n{counter}{port}"
            counter += 1
            if name not in taken:
                taken.add(name)
                return name

    for node in graph.node:
        for out in node.output:
            match = _GENERATED_VALUE.match(out)
            if match and out not in io_names and out not in initializers and out not in renames:
                renames[out] = fresh(match["stem"], match["port"] or "")
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in graph.value_info:
        value.name = renames.get(value.name, value.name)
    names = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):
        match = _GENERATED_VALUE.match(node.name)
        if match and not match["port"]:
            new = f"{match['stem']}__n{i}"
            if new not in names:
                names.discard(node.name)
                node.name = new
                names.add(new)


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
