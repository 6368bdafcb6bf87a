"""The manifest: the one definition of its fields, its writer, its validator, and the safe
reader of the golden vectors it names.

The pipeline writes a manifest beside each artifact with `build_manifest`; `export.runtime.verify` reads
it back with `read_manifest` / `check_fields` / `load_golden`. numpy only (no TensorFlow): this
module runs on the device too. Every problem with a file's content raises ManifestError with a
one-line reason.
"""

from __future__ import annotations

import io
import json
import math
import os
import string
import zipfile

import numpy as np

from export.errors import ManifestError, first_line, one_line, short
from export.formats import REGISTRY
from export.publish import sha256_path
from export.runtime.golden_raw import read_golden_raw

# name -> the JSON type a manifest must hold there (None: any), for the fields `export.runtime.verify`
# relies on. The writer below writes every one of them; the validator checks them.
FIELDS: dict[str, type | tuple | None] = {
    "format": str,  # a name in export.formats.REGISTRY
    "artifact": str,  # the artifact's file (or folder) name, beside the manifest
    "sha256": str,  # of the artifact's bytes (a folder: its files in sorted path order)
    "bytes": int,
    "inputs": list,  # [{name, shape (null: dynamic), dtype[, quantization]}]
    "outputs": list,
    "golden": str,  # the golden vectors' .npz, beside the manifest
    "golden_sha256": str,
    "reference_sha256": str,  # of the reference .keras as published; required with `reference`
    "parity": dict,  # metrics on the verification batches, and the gate: atol or max_rel_error
}
REQUIRED_FIELDS = ("format", "artifact", "sha256", "inputs", "outputs", "golden", "parity")
# Fields that name files: they must stay inside the manifest's folder.
PATH_FIELDS = ("artifact", "golden", "reference")
# A manifest is a few KB; anything this large is not one, and is not read into memory.
MAX_MANIFEST_BYTES = 16 << 20
# Golden files hold a few samples; refuse to inflate more than this (a zip can lie about sizes).
MAX_GOLDEN_BYTES = 2 << 30
# numpy dtype kinds a tensor may have: booleans, signed and unsigned integers, floats.
NUMBER_KINDS = "biuf"


# -- writing -------------------------------------------------------------------------------------


def build_manifest(*, fmt: str, spec, built, facts: dict, layout, reference_sha256: str,
                   golden_sha256: str, golden_raw: dict, parity: dict, quantization: dict,
                   weights: str, versions: dict, created: str, sha256: str, size: int,
                   deployment: dict | None = None, file_metadata: dict | None = None,
                   golden_name: str | None = None, signatures: list | None = None,
                   files: list | None = None) -> dict:
    """The manifest of one published artifact, fields in a fixed order.

    Args:
        fmt: the format's name.
        spec: its `ArtifactSpec` or `ModelSpec`.
        built: the builder's `Built` (path and format facts: `opset`, `io_quantization`).
        facts: what the reference says of itself (the layer: `config`, `shapes`, `masks`; a
            model: `model`).
        layout: the head layout of its graph (a model: per folded layer).
        reference_sha256: of the reference `.keras` as published.
        golden_sha256: of the golden file.
        golden_raw: the same vectors as raw buffers and a JSON index (export.runtime.golden_raw).
        parity: the metrics and gate it passed.
        quantization: `quantization_entry(...)`.
        weights: where the weights came from.
        versions: converters and runtimes.
        created: a UTC timestamp.
        sha256: of the artifact.
        size: of the artifact, in bytes.
        deployment: where the file will run (each format's export.<fmt>.deployment), when measured.
        file_metadata: the facts written inside the file (export.runtime.metadata), when any.
        golden_name: the golden file when it is not the spec's own (a file with several
            lengths: that of `serving_default` or the largest length).
        signatures: a file with several lengths (export.buckets): one entry per signature or
            checked length, `{key, signature (null: the file's only graph), inputs, outputs,
            golden, golden_sha256, parity}`; the top-level inputs, outputs and golden are
            `serving_default`'s.
        files: the artifact's companions (TFLM's generated C++), [{file, sha256, bytes}].
    """
    io_quant = built.facts.get("io_quantization", {})
    inputs = [_tensor_entry(i.as_json(), io_quant) for i in spec.inputs()]
    outputs = [_tensor_entry(o.as_json(), io_quant) for o in spec.outputs()]
    format_facts = {k: v for k, v in built.facts.items() if k != "io_quantization"}
    return {
        "format": fmt,
        "artifact": os.path.basename(built.path),
        "sha256": sha256,
        "bytes": size,
        **({"files": files} if files else {}),
        "inputs": inputs,
        "outputs": outputs,
        **facts,
        "layout": layout,
        "reference": spec.reference_name,
        "reference_sha256": reference_sha256,
        "golden": golden_name or spec.golden_name,
        "golden_sha256": golden_sha256,
        "golden_raw": golden_raw,
        **({"signatures": signatures} if signatures else {}),
        **format_facts,
        "quantization": quantization,
        **({"file_metadata": file_metadata} if file_metadata is not None else {}),
        "parity": parity,
        **({"deployment": deployment} if deployment is not None else {}),
        "weights": weights,
        "versions": versions,
        "created": created,
    }


def _tensor_entry(entry: dict, io_quant: dict) -> dict:
    """An int8-io tensor carries dtype int8 and its scale and zero point."""
    if entry["name"] in io_quant:
        entry["dtype"] = "int8"
        entry["quantization"] = io_quant[entry["name"]]
    return entry


# What each variant stores and computes in; int8 depends on the format (Format.int8_scheme).
QUANTIZATION_SCHEMES = {"none": "float32", "float16": "float16", "dynamic-int8": "dynamic-range"}
INT8_SCHEMES = {
    # Every activation in float32; each weight matrix of a MatMul/Gemm in int8, one scale per
    # output channel (export.onnx.quantize.quantize_weights_int8).
    "weight-only": {"weights": "int8 symmetric, per output channel", "activations": "float32"},
    # TFLite's converter: int8 weights and int8 activations with calibrated ranges.
    "full-integer": {"weights": "int8", "activations": "int8, calibrated"},
}
# int8-cpu in a full-integer format (TFLite): int8 projections, the attention core in float32
# (export.tflite.quantize.attention_core_nodes: the late softmax too), for CPU kernels (XNNPACK)
# that have no int8 core.
CPU_INT8_SCHEME = {
    "scheme": "selective-integer", "weights": "int8",
    "activations": "int8, calibrated; attention core (BATCH_MATMULs, softmax) float32"}


def quantization_entry(spec, calibration, int8_scheme: str = "full-integer") -> dict:
    """The manifest's `quantization`: {mode, scheme[, weights, activations], io_dtype,
    calibration, n_samples}; `int8_scheme` is the format's (`Format.int8_scheme`).

    `calibration` is None for a file that was not calibrated (every variant but a full-integer
    int8 one): a weight-only int8 file records `calibration: null` although `--calibration` may
    have been given for a TFLite file of the same run.
    """
    entry = {"mode": spec.quantize}
    if spec.quantize == "int8-cpu":
        entry |= CPU_INT8_SCHEME
    elif spec.quantize == "int8":
        entry |= {"scheme": int8_scheme, **INT8_SCHEMES[int8_scheme]}
    else:
        entry["scheme"] = QUANTIZATION_SCHEMES[spec.quantize]
    return entry | {
        "io_dtype": "int8" if spec.int8_io else "float32",
        "calibration": calibration.describe() if calibration is not None else None,
        "n_samples": calibration.n_samples if calibration is not None else 0,
    }


def write_manifest(path: str, manifest: dict) -> None:
    """Indented JSON, the fields in the order given; ASCII (json escapes the rest)."""
    with open(path, "wb") as f:
        f.write(json.dumps(manifest, indent=2).encode() + b"\n")


# -- reading and validating ----------------------------------------------------------------------


def read_manifest(path: str) -> dict:
    try:
        if not os.path.isfile(path):
            raise ManifestError("manifest is not a file")
        size = os.path.getsize(path)
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {size} bytes; not a manifest")
        with open(path, "rb") as f:
            text = f.read().decode()  # UTF-8, strict
        manifest = json.loads(text)
    except ManifestError:
        raise
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest is not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except RecursionError as e:
        raise ManifestError("manifest is not JSON: nested too deeply") from e
    except (OSError, ValueError) as e:
        raise ManifestError(f"manifest cannot be read: {one_line(first_line(e))}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest is a JSON {type(manifest).__name__}, not an object")
    return manifest


def check_fields(manifest: dict) -> None:
    """The fields export.runtime.verify relies on are there, of their types, and well formed."""
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise ManifestError(f"manifest lacks the field(s) {', '.join(missing)}")
    for key in REQUIRED_FIELDS:
        kind = FIELDS[key]
        if not isinstance(manifest[key], kind):
            raise ManifestError(
                f"manifest field {key!r} must be a JSON {_json_type(kind)}, "
                f"got {_json_type(type(manifest[key]))}"
            )
    if manifest["format"] not in REGISTRY:
        raise ManifestError(
            f"manifest format {short(manifest['format'])} is not one of {', '.join(REGISTRY)}"
        )
    for key in ("sha256", "golden_sha256", "reference_sha256"):
        value = manifest.get(key)
        if value is not None and not _is_sha256(value):
            raise ManifestError(f"manifest {key} {short(value)} is not 64 hex digits")
    if "bytes" in manifest and (
        isinstance(manifest["bytes"], bool) or not isinstance(manifest["bytes"], int)
    ):
        raise ManifestError(f"manifest field 'bytes' must be an integer, got {short(manifest['bytes'])}")
    if "reference" in manifest and not isinstance(manifest["reference"], str):
        raise ManifestError("manifest field 'reference' must be a JSON string")
    if "reference" in manifest and "reference_sha256" not in manifest:
        raise ManifestError("manifest names a reference but gives no reference_sha256")


def check_reference(folder: str, manifest: dict) -> None:
    """The reference `.keras` the manifest names is there and is the one it was verified against."""
    if "reference" not in manifest:
        return
    name = manifest["reference"]
    path = path_inside(folder, name, "reference")
    _check_file_sha256(path, f"reference {name}", manifest["reference_sha256"])


def _check_file_sha256(path: str, label: str, expected: str) -> None:
    """The file at `path` (named `label` in messages) is there, readable, and has sha256 `expected`."""
    if not os.path.isfile(path):
        raise ManifestError(f"{label} is missing")
    try:
        digest = sha256_path(path)
    except OSError as e:
        raise ManifestError(f"{label} cannot be read: {one_line(first_line(e))}") from e
    expected = expected.lower()
    if digest != expected:
        raise ManifestError(
            f"{label} sha256 mismatch: {digest[:12]}..., the manifest {expected[:12]}... "
            "(replaced or modified)"
        )


def check_files(folder: str, manifest: dict) -> None:
    """The artifact's companions (`files`: TFLM's generated C++) are there, inside the folder,
    each with the manifest's sha256."""
    entries = manifest.get("files", [])
    if not isinstance(entries, list):
        raise ManifestError(f"manifest files must be a list, not {short(entries)}")
    for entry in entries:
        if not isinstance(entry, dict) or not _is_sha256(entry.get("sha256")):
            raise ManifestError(f"manifest files entries must be {{file, sha256}}, not {short(entry)}")
        path = path_inside(folder, entry.get("file"), "files")
        _check_file_sha256(path, f"file {entry['file']}", entry["sha256"])


def check_golden_raw(folder: str, manifest: dict, golden: dict[str, np.ndarray]) -> None:
    """The raw golden pair JS and C readers use (export.runtime.golden_raw), when the manifest lists one:
    both files inside the folder, each with the manifest's sha256, holding exactly the golden
    file's arrays (names, dtypes, shapes, values)."""
    if "golden_raw" not in manifest:
        return
    entry = manifest["golden_raw"]
    if not isinstance(entry, dict):
        raise ManifestError(f"manifest golden_raw must be an object, not {short(entry)}")
    for name_key, digest_key in (("index", "index_sha256"), ("data", "sha256")):
        path = path_inside(folder, entry.get(name_key), f"golden_raw {name_key}")
        name, expected = entry[name_key], entry.get(digest_key)
        if not _is_sha256(expected):
            raise ManifestError(f"manifest golden_raw {digest_key} must be 64 hex digits, "
                                f"not {short(expected)}")
        _check_file_sha256(path, f"golden_raw {name_key} file {name}", expected)
    try:
        raw = read_golden_raw(folder, os.path.basename(entry["index"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"golden_raw index {entry['index']} cannot be read: "
                            f"{one_line(first_line(e))}") from e
    if sorted(raw) != sorted(golden):
        raise ManifestError(f"golden_raw holds {sorted(raw)}, the golden file {sorted(golden)}")
    for key in sorted(golden):
        a, b = golden[key], raw[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            raise ManifestError(f"golden_raw array {key} is {b.dtype}{list(b.shape)}, the golden "
                                f"file's {a.dtype}{list(a.shape)}")
        if not np.array_equal(a, b):
            raise ManifestError(f"golden_raw array {key} holds other values than the golden file's "
                                f"({int(np.sum(a != b))} of {a.size} differ)")


def path_inside(folder: str, relative: object, key: str) -> str:
    """`relative` as a path inside `folder`; ManifestError if it is absolute, climbs or escapes."""
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"manifest {key} must be a non-empty relative path")
    if "\x00" in relative:
        raise ManifestError(f"manifest {key} path holds a NUL byte")
    parts = relative.replace("\\", "/").split("/")
    if (
        relative.startswith(("/", "\\"))  # absolute, or rooted / UNC on Windows
        or (len(relative) > 1 and relative[1] == ":")  # C:\..., refused on any system
        or ".." in parts
    ):
        raise ManifestError(f"refusing {key} path {short(relative)}: it leaves the manifest's folder")
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(folder, relative))
    if os.path.commonpath([root, target]) != root:
        raise ManifestError(
            f"refusing {key} path {short(relative)}: it resolves outside the manifest's folder"
        )
    return target


def tolerance_of(parity: dict) -> dict:
    tolerance = {}
    for key in ("atol", "max_rel_error"):
        value = parity.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0
        ):
            raise ManifestError(f"manifest parity.{key} must be a positive number, got {short(value)}")
        tolerance[key] = float(value)
    if not tolerance:
        raise ManifestError("manifest parity gives no tolerance (atol or max_rel_error)")
    return tolerance


def tensors_of(entries: list, key: str) -> list[dict]:
    """Validate `[{name, shape, dtype}]`; shapes are lists of positive ints or null."""
    if not entries:
        raise ManifestError(f"manifest {key} is empty")
    seen = set()
    tensors = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ManifestError(f"manifest {key} entries must be objects with a name")
        name = entry["name"]
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            d is None or (isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 31)
            for d in shape
        ):
            raise ManifestError(
                f"manifest {key} {short(name)}: shape must be a list of positive ints or null"
            )
        dtype = entry.get("dtype")
        if dtype is not None and not _is_number_dtype(dtype):
            raise ManifestError(
                f"manifest {key} {short(name)}: dtype {short(dtype)} is not a number type"
            )
        if name in seen:
            raise ManifestError(f"manifest {key} names {short(name)} twice")
        seen.add(name)
        tensor = {"name": name, "shape": shape, "dtype": dtype}
        if "range" in entry:
            tensor["range"] = _range_of(entry["range"], dtype, f"manifest {key} {short(name)}")
        tensors.append(tensor)
    return tensors


def _range_of(bounds, dtype, what: str) -> tuple[int, int]:
    """A tensor's `range` [low, high): two integers, low < high, on an integer input."""
    fits = (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
            and bounds[0] < bounds[1])
    if not fits:
        raise ManifestError(f"{what}: range must be [low, high] integers with low < high, "
                            f"not {short(bounds)}")
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer):
        raise ManifestError(f"{what}: a range needs an integer dtype, not {short(dtype)}")
    return bounds[0], bounds[1]


def check_golden_ranges(golden: dict[str, np.ndarray], inputs: list[dict]) -> None:
    """ManifestError when a golden input holds a value outside its tensor's `range`."""
    for tensor in inputs:
        if "range" not in tensor:
            continue
        low, high = tensor["range"]
        array = golden[tensor["name"]]
        outside = (array < low) | (array >= high)
        if outside.any():
            raise ManifestError(f"golden input {short(tensor['name'])} holds "
                                f"{array[outside].flat[0]}, outside the manifest's range "
                                f"[{low}, {high})")


def load_golden(path: str, manifest: dict, tensors: list[dict]) -> dict[str, np.ndarray]:
    """The golden arrays the manifest names, read without unpickling and checked against it."""
    name = manifest["golden"]
    if not os.path.isfile(path):
        raise ManifestError(f"golden file {name} is missing")
    expected_sha = manifest.get("golden_sha256")
    if expected_sha is not None:
        try:
            digest = sha256_path(path)
        except OSError as e:
            raise ManifestError(f"golden file {name} cannot be read: {one_line(first_line(e))}") from e
        if digest != expected_sha.lower():
            raise ManifestError(
                f"golden file {name} sha256 mismatch: {digest[:12]}..., the manifest "
                f"{expected_sha[:12]}... (modified or corrupted)"
            )
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(i.file_size for i in zf.infolist())
            if total > MAX_GOLDEN_BYTES:
                raise ManifestError(f"golden file {name} would inflate to {total} bytes; refusing")
            for tensor in tensors:
                arrays[tensor["name"]] = _read_npy(zf, name, tensor)
    except ManifestError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as e:
        # zipfile raises all of these on damaged archives (NotImplementedError: an unknown
        # compression method; RuntimeError: an encrypted member).
        raise ManifestError(f"golden file {name} is damaged: {one_line(first_line(e))}") from e
    rows = {arrays[t["name"]].shape[0] if arrays[t["name"]].ndim else None for t in tensors}
    if len(rows) != 1 or None in rows or 0 in rows:
        raise ManifestError(
            f"golden file {name}: arrays disagree on the number of samples {sorted(map(str, rows))}"
        )
    return arrays


def _read_npy(zf: zipfile.ZipFile, golden: str, tensor: dict) -> np.ndarray:
    member = f"{tensor['name']}.npy"
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise ManifestError(f"golden file {golden} has no array {short(tensor['name'])}") from None
    # Check the header against the manifest before reading any data: never allocate what the
    # manifest does not describe.
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ManifestError(f"golden array {member}: unsupported .npy version {version}")
        header = f.tell()
    if dtype.hasobject or dtype.kind not in NUMBER_KINDS:
        raise ManifestError(f"golden array {member} has dtype {dtype}, not numbers")
    want = tensor["shape"]
    fits = len(shape) == len(want) and all(
        w is None or s == w for i, (s, w) in enumerate(zip(shape, want)) if i > 0
    ) and (not want or want[0] is None or (shape[0] > 0 and shape[0] % want[0] == 0))
    if not fits:
        raise ManifestError(
            f"golden array {member} has shape {tuple(shape)}, the manifest {_shape_text(want)}"
        )
    data_bytes = math.prod(shape) * dtype.itemsize
    if header + data_bytes != info.file_size:
        raise ManifestError(
            f"golden array {member} is {info.file_size - header} bytes of data, its header "
            f"promises {data_bytes} (truncated or edited)"
        )
    # zf.read checks the member's CRC; then parse from memory without pickle.
    # (allow_pickle=False is a second lock: a dtype holding objects was refused above.)
    array = np.lib.format.read_array(io.BytesIO(zf.read(info)), allow_pickle=False)  # pragma: no mutate
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ManifestError(f"golden array {member} holds NaN or inf")
    return array


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in string.hexdigits for c in value)


def _is_number_dtype(dtype: object) -> bool:
    """A dtype name numpy knows, of booleans, integers or floats."""
    try:
        return isinstance(dtype, str) and np.dtype(dtype).kind in NUMBER_KINDS
    except TypeError:  # a name numpy does not know
        return False


def _json_type(kind: type) -> str:
    return {str: "string", list: "array", dict: "object", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(kind, kind.__name__)


def _shape_text(shape: list) -> str:
    return "(" + ", ".join("B" if d is None else str(d) for d in shape) + ")"
