"""A Triton Inference Server model repository from verified ONNX artifacts.

Per artifact: `DIR/<name>/config.pbtxt` (Triton's `ModelConfig` in protobuf text format: inputs,
outputs, `max_batch_size`, dynamic batching, CPU instances) and `DIR/<name>/1/model.onnx`, the
verified bytes. Written by hand, not through protobuf, so writing needs no Triton package; the
tests parse it with the `ModelConfig` schema that `tritonclient` ships.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from export.errors import UsageError
from export.formats import get_format
from export.runtime.serve.protocol import TensorSpec

# V2 datatype -> Triton's DataType enum (model_config.proto).
# Triton's platform -> the backend that runs it (Triton's own table, not one of our formats').
BACKENDS = {"onnxruntime_onnx": "onnxruntime"}
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
}


def _quoted(text: str) -> str:
    """`text` as a protobuf text-format string literal: its UTF-8 bytes, each one outside
    printable ASCII (and `"`, `\\`) as an octal escape. Tensor names come from the manifest (a
    model's input names): a quote in one wrote config outside its string (`instance_group`)."""
    return '"' + "".join(
        chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\{b:03o}"
        for b in str(text).encode("utf-8")
    ) + '"'


def model_config(model, *, max_batch: int = 32, batch_wait_ms: float = 2.0, instances: int = 1,
                 threads: int = 1, platform: str = "onnxruntime_onnx") -> str:
    """config.pbtxt text for one `ServedModel` whose format Triton's `platform` runs.

    A dynamic batch axis becomes `max_batch_size` (dims without it) with dynamic batching; a
    fixed batch stays in the dims with `max_batch_size: 0` (Triton batches nothing then).
    """
    manifest = model.manifest
    dynamic = manifest["inputs"][0]["shape"][0] is None
    lines = [
        f"name: {_quoted(model.name)}",
        f"platform: {_quoted(platform)}",
        f"backend: {_quoted(BACKENDS[platform])}",
        f"max_batch_size: {max_batch if dynamic else 0}",
    ]
    for key, entries in (("input", manifest["inputs"]), ("output", manifest["outputs"])):
        blocks = []
        for entry in entries:
            spec = TensorSpec.from_manifest(entry, batch_axis_variable=False)
            dims = spec.shape[1:] if dynamic else spec.shape
            blocks.append(
                "  {\n"
                f"    name: {_quoted(spec.name)}\n"
                f"    data_type: {TRITON_TYPES[spec.datatype]}\n"
                f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
                "  }"
            )
        lines.append(f"{key} [\n" + ",\n".join(blocks) + "\n]")
    if dynamic:
        lines.append(
            "dynamic_batching {\n"
            f"  max_queue_delay_microseconds: {int(round(batch_wait_ms * 1000))}\n"
            "}"
        )
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]")
    params = {
        "intra_op_thread_count": str(threads), "inter_op_thread_count": "1",
        "xattn_artifact": manifest["artifact"], "xattn_sha256": manifest["sha256"],
    }
    for key, value in params.items():
        lines.append(
            f"parameters {{\n  key: {_quoted(key)}\n  value {{ string_value: {_quoted(value)} }}\n}}"
        )
    return "\n".join(lines) + "\n"


def write_repository(models, directory: str, **config) -> tuple[list[str], list[str]]:
    """Write DIR/<name>/config.pbtxt and DIR/<name>/1/model.onnx per ONNX model.

    Returns (written model folders, notes on what is skipped). An existing DIR/<name> is
    replaced whole, through a staged folder and a rename.
    """
    # What Triton's standard backends run: the served platforms BACKENDS knows.
    onnx_models = [m for m in models if get_format(m.format).serve_platform in BACKENDS]
    notes = [
        f"- {m.artifact}  not in the Triton repository: Triton's standard backends do not run "
        f"{m.format}" for m in models if get_format(m.format).serve_platform not in BACKENDS
    ]
    if not onnx_models:
        raise UsageError("no ONNX artifact to put in a Triton model repository")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"--triton-repository {directory} exists and is not a folder")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:  # a file on the way (DIR under a file), no permission, read-only
        raise UsageError(f"--triton-repository {directory} cannot be created: "
                         f"{e.strerror or e}") from None
    for model in onnx_models:
        final = os.path.join(directory, model.name)
        if os.path.islink(final) or (os.path.lexists(final) and not os.path.isdir(final)):
            raise UsageError(f"--triton-repository {directory}: {final} exists and is not a model "
                             "folder (a file or a link); move it away or pick another folder")
    written = []
    for model in onnx_models:
        final = os.path.join(directory, model.name)
        staging = tempfile.mkdtemp(prefix=f".{model.name}.", dir=directory)
        try:
            os.makedirs(os.path.join(staging, "1"))
            fmt = get_format(model.format)
            with open(os.path.join(staging, "1", f"model{fmt.suffix}"), "wb") as f:
                f.write(model.data)
            with open(os.path.join(staging, "config.pbtxt"), "w", encoding="utf-8") as f:
                f.write(model_config(model, platform=fmt.serve_platform, **config))
            os.chmod(staging, 0o755)
            if os.path.isdir(final):
                # The old folder goes into a trash folder this run created, then that goes:
                # nothing is removed by a name built from the model's (no `<name>.old`).
                trash = tempfile.mkdtemp(prefix=f".{model.name}.old.", dir=directory)
                os.rename(final, os.path.join(trash, "model"))
                os.rename(staging, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        written.append(final)
    return written, notes
