"""Metadata inside the files: what an artifact is, written into it and checked against its manifest.

The facts of a manifest that do not depend on the file's own bytes (format, layer config, shapes,
masks, input and output names, quantization, the project's version, the golden file's sha256) go
into the ONNX (and ORT) file's `metadata_props` as `xattn.<key>` entries, and into a TFLite file
as a metadata buffer named `xattn` holding the same facts as one JSON object. Deterministic: no
dates. numpy and the runtimes only (`export.runtime.verify` reads it on the device).
"""

from __future__ import annotations

import json

import numpy as np

from export.errors import ManifestError, one_line, short
from export.formats import REGISTRY

# The TFLite metadata buffer's name and the ONNX keys' prefix.
METADATA_NAME = "xattn"
KEYS = ("format", "version", "config", "shapes", "masks", "model", "inputs", "outputs",
        "quantization", "golden_sha256")


def file_metadata(facts: dict) -> dict[str, str]:
    """The metadata of an artifact from its manifest (or the same fields before the manifest
    exists): {key: text}, structured values as compact JSON with sorted keys.

    `facts` holds the manifest's format, config, shapes, masks, inputs, outputs, quantization,
    golden_sha256 and versions (`versions["xattn"]` is the project's version).
    """
    values = {
        "format": facts["format"],
        "version": (facts["versions"].get("xattn", "") if isinstance(facts.get("versions"), dict)
                    else ""),
        "config": facts.get("config"),
        "shapes": facts.get("shapes"),
        "masks": facts.get("masks"),
        # A whole model's facts (file, sha256, folded layers) in place of the layer's three above.
        "model": facts.get("model"),
        # Names and shapes only: an int8-io file's dtypes and scales are known after conversion.
        "inputs": [{"name": t["name"], "shape": t["shape"]} for t in facts["inputs"]],
        "outputs": [{"name": t["name"], "shape": t["shape"]} for t in facts["outputs"]],
        "quantization": facts.get("quantization"),
        "golden_sha256": facts.get("golden_sha256") or "",
    }
    return {key: _text(values[key]) for key in KEYS}


def _text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def onnx_metadata_props(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """(key, value) pairs for an ONNX model's `metadata_props`, in a fixed order."""
    return [(f"{METADATA_NAME}.{key}", metadata[key]) for key in KEYS if key in metadata]


def tflite_metadata_bytes(metadata: dict[str, str]) -> bytes:
    """The TFLite metadata buffer: one JSON object, structured values as JSON."""
    decoded = {key: value if key in ("format", "version", "golden_sha256") else json.loads(value)
               for key, value in metadata.items()}
    return json.dumps(decoded, sort_keys=True, separators=(",", ":")).encode("utf-8")


# -- writing (export time) -------------------------------------------------------------------


def add_tflite_metadata(flatbuffer: bytes, metadata: dict[str, str]) -> bytes:
    """`flatbuffer` with a metadata buffer `xattn` added (replaced if there is one).

    Re-packed with the LiteRT schema's object API; constant buffers stay 16-byte aligned, as the
    converter writes them.
    """
    from ai_edge_litert import schema_py_generated as schema  # lazy: export time only

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(flatbuffer, 0))
    if any(b.offset for b in model.buffers or []):
        raise ValueError("TFLite files with buffers outside the flatbuffer are not supported")
    entries = [m for m in (model.metadata or []) if _name(m.name) != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(tflite_metadata_bytes(metadata), dtype=np.uint8)
    model.buffers = list(model.buffers or []) + [buffer]
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = entries + [entry]
    builder = _aligned_builder(len(flatbuffer) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _aligned_builder(size: int):
    """A flatbuffers Builder whose byte vectors (constant buffers) are 16-byte aligned, as the
    converter aligns them."""
    import flatbuffers  # lazy: export time only

    class AlignedBuilder(flatbuffers.Builder):
        def CreateNumpyVector(self, x):  # noqa: N802 - flatbuffers' name
            if x.dtype != np.uint8:
                return super().CreateNumpyVector(x)
            self.StartVector(1, x.size, 16)
            payload = x.tobytes(order="C")
            self.head = self.head - len(payload)
            self.Bytes[self.head:self.head + len(payload)] = payload
            self.vectorNumElems = x.size
            return self.EndVector()

    return AlignedBuilder(size)


# -- reading (export.runtime.verify) -----------------------------------------------------------------


def read_tflite_metadata(path: str, schema=None) -> dict[str, str] | None:
    """The `xattn` metadata buffer of a TFLite file as {key: text}, read with the flatbuffer
    schema LiteRT ships (`ai_edge_litert.schema_py_generated`) or `schema`; None if it has none."""
    if schema is None:
        from ai_edge_litert import schema_py_generated as schema  # lazy: a server may have onnxruntime only

    with open(path, "rb") as f:
        data = f.read()
    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if _name(entry.Name()) != METADATA_NAME:
            continue
        buffer = model.Buffers(entry.Buffer())
        if buffer.Offset():  # stored after the flatbuffer (files over 2 GB)
            raw = data[buffer.Offset():buffer.Offset() + buffer.Size()]
        else:
            raw = buffer.DataAsNumpy().tobytes()
        decoded = json.loads(raw.decode("utf-8"))
        if not isinstance(decoded, dict):
            raise ManifestError("the file's xattn metadata is not a JSON object")
        return {key: _text(value) for key, value in decoded.items()}
    return None


def read_onnx_metadata(path: str) -> dict[str, str] | None:
    """The `xattn.*` entries of an ONNX or ORT file's metadata, as onnxruntime reports them
    (`session.get_modelmeta().custom_metadata_map`); None if it has none."""
    import onnxruntime as ort  # lazy: a device may have LiteRT only

    options = ort.SessionOptions()
    options.log_severity_level = 3
    meta = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).get_modelmeta()
    prefix = f"{METADATA_NAME}."
    found = {k[len(prefix):]: v for k, v in meta.custom_metadata_map.items() if k.startswith(prefix)}
    if not found:
        return None
    found["producer"] = f"{meta.producer_name} {found.get('version', '')}".strip()
    return found


def read_file_metadata(fmt: str, path: str) -> dict[str, str] | None:
    """The facts inside a file of format `fmt`, read by the format's own reader (the registry's
    `metadata_reader`); None for formats whose files hold none."""
    return REGISTRY[fmt].read_metadata(path) if fmt in REGISTRY else None


def check_file_metadata(fmt: str, path: str, manifest: dict) -> None:
    """ManifestError unless the metadata inside the file agrees with its manifest.

    A manifest without `file_metadata` (written before files carried metadata) is not checked.
    """
    expected = manifest.get("file_metadata")
    if expected is None or REGISTRY.get(fmt) is None or REGISTRY[fmt].metadata_reader is None:
        return
    if not isinstance(expected, dict):
        raise ManifestError("manifest field 'file_metadata' must be a JSON object")
    # The manifest's own facts must say the same as its copy of the metadata...
    derived = file_metadata(manifest)
    # (a field the manifest lacks is not compared here; the file is still compared below)
    present = {k for k in KEYS if manifest.get(k if k != "version" else "versions") is not None}
    differs = sorted(k for k in present if expected.get(k) != derived.get(k))
    if differs:
        raise ManifestError(f"manifest file_metadata disagrees with its own fields: {', '.join(differs)}")
    # ... and the file the same as the manifest.
    try:
        found = read_file_metadata(fmt, path)
    except Exception as e:  # noqa: BLE001 - a damaged flatbuffer or protobuf: one line, failed
        raise ManifestError(f"the file's metadata cannot be read: {type(e).__name__}: "
                            f"{one_line(str(e), 120)}") from e
    if found is None:
        raise ManifestError("the file carries no xattn metadata; its manifest says it should")
    differs = sorted(k for k in KEYS if found.get(k) != expected.get(k))
    if differs:
        key = differs[0]
        raise ManifestError(
            f"the file's metadata disagrees with its manifest on {', '.join(differs)} "
            f"({key}: file {short(found.get(key))}, manifest {short(expected.get(key))})"
        )


def _name(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value or "")
