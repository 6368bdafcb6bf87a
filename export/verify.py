"""`python -m export.verify PATH`: prove that published artifacts are the ones that were verified.

For each manifest: its sha256, then the golden inputs through the artifact's own runtime, compared
with the golden outputs within the manifest's tolerance. numpy plus onnxruntime and/or
ai-edge-litert only: this module never imports TensorFlow, Keras or tf2onnx (SavedModel runs only
where TensorFlow happens to be importable). Every problem with a file's content is a failed line
with its reason, never a traceback: a verifier fails closed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass, field

import numpy as np

from export.check import parity_metrics
from export.cli import _OneLineParser
from export.errors import ManifestError, ParityError, UsageError, first_line
from export.publish import sha256_path
from export.runtimes import RUNTIME_NAME

FORMATS = ("onnx", "tflite", "savedmodel")
# Manifest names as the pipeline writes them: `<artifact>.json` (see export.spec.FILE_EXTENSION).
MANIFEST_SUFFIXES = (".onnx.json", ".tflite.json", "_savedmodel.json")
REQUIRED_FIELDS = {
    "format": str, "artifact": str, "sha256": str, "inputs": list, "outputs": list,
    "golden": str, "parity": dict,
}
PATH_FIELDS = ("artifact", "golden", "reference")
# A manifest is a few KB; anything this large is not one, and is not read into memory.
MAX_MANIFEST_BYTES = 16 << 20
# Golden files hold a few samples; refuse to inflate more than this (a zip can lie about sizes).
MAX_GOLDEN_BYTES = 2 << 30
class RuntimeNotRun(Exception):
    """The format's runtime is not importable here: reported as not run, not as a failure."""


@dataclass
class VerifyResult:
    """The outcome for one manifest. `status` is "passed", "failed" or "not run"."""

    manifest: str
    name: str
    status: str
    reason: str = ""
    format: str | None = None
    metrics: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def line(self, marks: dict[str, str] | None = None) -> str:
        marks = marks or MARKS
        if self.status == "passed":
            return f"{marks['passed']} {self.name}  {_describe_metrics(self.metrics, self.tolerance)}"
        return f"{marks[self.status]} {self.name}  {self.reason}"


MARKS = {"passed": "✓", "failed": "✗", "not run": "-"}
ASCII_MARKS = {"passed": "ok", "failed": "FAIL", "not run": "skip"}


def _describe_metrics(metrics: dict, tolerance: dict) -> str:
    text = f"max abs diff {metrics['max_abs']:.1e}"
    gates = []
    if tolerance.get("atol") is not None:
        gates.append(f"atol {_num(tolerance['atol'])}")
    if tolerance.get("max_rel_error") is not None:
        text += f"  rel L2 {metrics['rel_l2']:.1e}"
        gates.append(f"max_rel_error {_num(tolerance['max_rel_error'])}")
    return f"{text}  ({', '.join(gates)})"


# -- the library ---------------------------------------------------------------------------------


def find_manifests(path: str) -> list[str]:
    """PATH (a folder, a manifest, or an artifact with its manifest beside it) -> manifest paths.

    Raises UsageError when there is nothing to verify.
    """
    if not os.path.lexists(path):
        raise UsageError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        manifests = sorted(
            os.path.join(path, n) for n in os.listdir(path)
            if n.endswith(MANIFEST_SUFFIXES) and not n.startswith(".")
        )
        if manifests:
            return manifests
        if os.path.isfile(path.rstrip(os.sep) + ".json"):  # a SavedModel folder
            return [path.rstrip(os.sep) + ".json"]
        raise UsageError(
            f"no manifests ({', '.join('*' + s for s in MANIFEST_SUFFIXES)}) in {path}"
        )
    if path.endswith(".json"):
        return [path]
    if os.path.isfile(path + ".json"):  # an artifact: its manifest sits beside it
        return [path + ".json"]
    raise UsageError(f"{path} is neither a manifest (.json) nor a folder of them")


def verify_path(path: str) -> list[VerifyResult]:
    """Verify every manifest under PATH. Raises UsageError only; file problems are results."""
    return [verify_manifest(p) for p in find_manifests(path)]


def verify_manifest(path: str) -> VerifyResult:
    """Check one manifest, its artifact and its golden vectors. Never raises for file content."""
    result = VerifyResult(manifest=path, name=os.path.basename(path), status="failed")
    try:
        _verify(path, result)
    except RuntimeNotRun as e:
        result.status, result.reason = "not run", str(e)
    except (ManifestError, ParityError) as e:
        result.status, result.reason = "failed", _one_line(str(e))
    except (MemoryError, RecursionError) as e:
        result.status, result.reason = "failed", f"{type(e).__name__} while reading it"
    except Exception as e:  # noqa: BLE001 - fail closed on anything unforeseen, still one line
        result.status = "failed"
        result.reason = _one_line(f"unexpected {type(e).__name__}: {e}")
    return result


def _verify(path: str, result: VerifyResult) -> None:
    manifest = _read_manifest(path)
    folder = os.path.dirname(os.path.abspath(path))
    if isinstance(manifest.get("artifact"), str) and manifest["artifact"]:
        result.name = manifest["artifact"]
    _check_fields(manifest)
    fmt = manifest["format"]
    result.format = fmt
    for key in PATH_FIELDS:
        if key in manifest:
            _inside(folder, manifest[key], key)
    tolerance = _tolerance(manifest["parity"])
    result.tolerance = tolerance
    inputs = _tensors(manifest["inputs"], "inputs")
    outputs = _tensors(manifest["outputs"], "outputs")

    artifact = os.path.join(folder, manifest["artifact"])
    _check_artifact(artifact, fmt, manifest)
    golden_path = os.path.join(folder, manifest["golden"])
    golden = _load_golden(golden_path, manifest, inputs + outputs)

    # Integrity is settled before this point: a runtime never sees bytes whose sha256 is wrong.
    from export import runtimes

    if not runtimes.runtime_available(fmt):
        raise RuntimeNotRun(
            f"not run: {RUNTIME_NAME[fmt]} is not importable here (sha256 and golden file ok)"
        )
    batch = inputs[0]["shape"][0] if inputs and inputs[0]["shape"] else None
    # Runtimes print to stdout (onnxruntime's "EP Error" banner on a file it cannot parse);
    # stdout carries one line per artifact, so their chatter goes to stderr.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            runner = runtimes.load_runner(fmt, artifact, batch=batch, inputs=manifest["inputs"])
    except runtimes.RuntimeMissing as e:
        raise RuntimeNotRun(f"not run: {e}") from e
    except ImportError as e:
        raise RuntimeNotRun(f"not run: {RUNTIME_NAME[fmt]} cannot be imported ({e})") from e
    except Exception as e:
        raise ManifestError(
            f"{RUNTIME_NAME[fmt]} cannot load {manifest['artifact']}: {_first_line(e)}"
        ) from e
    feeds = {t["name"]: golden[t["name"]] for t in inputs}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            got = runner.run(feeds)
    except Exception as e:
        raise ManifestError(
            f"{RUNTIME_NAME[fmt]} failed to run the golden inputs: {_first_line(e)}"
        ) from e
    expected = {t["name"]: golden[t["name"]] for t in outputs}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ManifestError(f"the artifact returned {sorted(got)}, not the outputs {missing}")
    metrics = parity_metrics(expected, {k: got[k] for k in expected})
    result.metrics = metrics
    atol, max_rel = tolerance.get("atol"), tolerance.get("max_rel_error")
    if atol is not None and not metrics["max_abs"] <= atol:
        raise ParityError(
            f"max abs diff {metrics['max_abs']:.3g} exceeds atol {atol:g} on the golden vectors"
        )
    if max_rel is not None and not metrics["rel_l2"] <= max_rel:
        raise ParityError(
            f"relative L2 error {metrics['rel_l2']:.3g} exceeds max_rel_error {max_rel:g} "
            "on the golden vectors"
        )
    result.status = "passed"


def _read_manifest(path: str) -> dict:
    try:
        if not os.path.isfile(path):
            raise ManifestError("manifest is not a file")
        size = os.path.getsize(path)
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {size} bytes; not a manifest")
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
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
        raise ManifestError(f"manifest cannot be read: {_first_line(e)}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest is a JSON {type(manifest).__name__}, not an object")
    return manifest


def _check_fields(manifest: dict) -> None:
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise ManifestError(f"manifest lacks the field(s) {', '.join(missing)}")
    for key, kind in REQUIRED_FIELDS.items():
        if not isinstance(manifest[key], kind):
            raise ManifestError(
                f"manifest field {key!r} must be a JSON {_json_type(kind)}, "
                f"got {_json_type(type(manifest[key]))}"
            )
    if manifest["format"] not in FORMATS:
        raise ManifestError(
            f"manifest format {_short(manifest['format'])} is not one of {', '.join(FORMATS)}"
        )
    sha = manifest["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
        raise ManifestError(f"manifest sha256 {_short(sha)} is not 64 hex digits")
    for key in ("golden_sha256",):
        value = manifest.get(key)
        if value is not None and (
            not isinstance(value, str) or len(value) != 64
            or any(c not in "0123456789abcdef" for c in value.lower())
        ):
            raise ManifestError(f"manifest {key} {_short(value)} is not 64 hex digits")
    if "bytes" in manifest and (
        isinstance(manifest["bytes"], bool) or not isinstance(manifest["bytes"], int)
    ):
        raise ManifestError(f"manifest field 'bytes' must be an integer, got {_short(manifest['bytes'])}")
    if "reference" in manifest and not isinstance(manifest["reference"], str):
        raise ManifestError("manifest field 'reference' must be a JSON string")


def _inside(folder: str, relative: object, key: str) -> str:
    """`relative` as a path inside `folder`; ManifestError if it is absolute, climbs or escapes."""
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"manifest {key} must be a non-empty relative path")
    if "\x00" in relative:
        raise ManifestError(f"manifest {key} path holds a NUL byte")
    parts = relative.replace("\\", "/").split("/")
    if (
        os.path.isabs(relative) or relative.startswith(("/", "\\"))
        or (len(relative) > 1 and relative[1] == ":")  # C:\..., refused on any system
        or ".." in parts
    ):
        raise ManifestError(f"refusing {key} path {_short(relative)}: it leaves the manifest's folder")
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(folder, relative))
    if os.path.commonpath([root, target]) != root:
        raise ManifestError(
            f"refusing {key} path {_short(relative)}: it resolves outside the manifest's folder"
        )
    return target


def _tolerance(parity: dict) -> dict:
    tolerance = {}
    for key in ("atol", "max_rel_error"):
        value = parity.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0
        ):
            raise ManifestError(f"manifest parity.{key} must be a positive number, got {_short(value)}")
        tolerance[key] = float(value)
    if not tolerance:
        raise ManifestError("manifest parity gives no tolerance (atol or max_rel_error)")
    return tolerance


def _tensors(entries: list, key: str) -> list[dict]:
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
                f"manifest {key} {_short(name)}: shape must be a list of positive ints or null"
            )
        dtype = entry.get("dtype")
        if dtype is not None:
            try:
                ok = isinstance(dtype, str) and np.dtype(dtype).kind in "biuf"
            except TypeError:
                ok = False
            if not ok:
                raise ManifestError(
                    f"manifest {key} {_short(name)}: dtype {_short(dtype)} is not a number type"
                )
        if name in seen:
            raise ManifestError(f"manifest {key} names {_short(name)} twice")
        seen.add(name)
        tensors.append({"name": name, "shape": shape, "dtype": dtype})
    return tensors


def _check_artifact(path: str, fmt: str, manifest: dict) -> None:
    name = manifest["artifact"]
    if not os.path.lexists(path):
        raise ManifestError(f"artifact {name} is missing")
    if fmt == "savedmodel":
        if not os.path.isdir(path):
            raise ManifestError(f"artifact {name} should be a SavedModel folder")
        _no_symlinks(path, os.path.dirname(path), name)
    elif not os.path.isfile(path):
        raise ManifestError(f"artifact {name} is not a file")
    try:
        from export.publish import size_bytes

        size = size_bytes(path)
        if "bytes" in manifest and size != manifest["bytes"]:
            raise ManifestError(
                f"artifact is {size} bytes, the manifest says {manifest['bytes']} "
                "(truncated or replaced)"
            )
        digest = sha256_path(path)
    except OSError as e:
        raise ManifestError(f"artifact {name} cannot be read: {_first_line(e)}") from e
    if digest != manifest["sha256"].lower():
        raise ManifestError(
            f"sha256 mismatch: the file has {digest[:12]}..., the manifest "
            f"{manifest['sha256'][:12]}... (modified or corrupted)"
        )


def _no_symlinks(folder: str, root: str, name: str) -> None:
    """A SavedModel folder holding symlinks: the sha256 would not cover what TensorFlow loads."""
    for base, dirs, files in os.walk(folder):
        for entry in dirs + files:
            full = os.path.join(base, entry)
            if os.path.islink(full):
                raise ManifestError(
                    f"refusing artifact {name}: it holds a symlink "
                    f"({os.path.relpath(full, root)})"
                )


def _load_golden(path: str, manifest: dict, tensors: list[dict]) -> dict[str, np.ndarray]:
    """The golden arrays the manifest names, read without unpickling and checked against it."""
    name = manifest["golden"]
    if not os.path.isfile(path):
        raise ManifestError(f"golden file {name} is missing")
    expected_sha = manifest.get("golden_sha256")
    if expected_sha is not None:
        try:
            digest = sha256_path(path)
        except OSError as e:
            raise ManifestError(f"golden file {name} cannot be read: {_first_line(e)}") from e
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
        raise ManifestError(f"golden file {name} is damaged: {_first_line(e)}") from e
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
        raise ManifestError(f"golden file {golden} has no array {_short(tensor['name'])}") from None
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
    if dtype.hasobject or dtype.kind not in "biuf":
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
    array = np.lib.format.read_array(io.BytesIO(zf.read(info)), allow_pickle=False)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ManifestError(f"golden array {member} holds NaN or inf")
    return array


# -- small text helpers --------------------------------------------------------------------------


def _num(x: float) -> str:
    """1e-04, 2.5e-02: a tolerance as people write it."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def _first_line(e: BaseException) -> str:
    return _one_line(first_line(e))


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _json_type(kind: type) -> str:
    return {str: "string", list: "array", dict: "object", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(kind, kind.__name__)


def _shape_text(shape: list) -> str:
    return "(" + ", ".join("B" if d is None else str(d) for d in shape) + ")"


# -- the command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m export.verify",
        description=(
            "Check published artifacts against their manifests: sha256, then the golden inputs "
            "run in the artifact's own runtime and compared with the golden outputs within the "
            "manifest's tolerance. Needs numpy and onnxruntime and/or ai-edge-litert only; "
            "SavedModel runs where TensorFlow is importable."
        ),
        epilog="exit codes: 0 every artifact passed (or was not run for want of its runtime); "
               "1 any artifact failed; 2 usage error (no such path, no manifests)",
    )
    parser.add_argument("path", metavar="PATH",
                        help="an output folder (every *.onnx.json, *.tflite.json, "
                             "*_savedmodel.json in it) or one manifest")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print failures and the summary only")
    return parser


def _marks() -> dict[str, str]:
    encoding = getattr(sys.stdout, "encoding", None)
    if not encoding:  # an in-memory text stream holds any character
        return MARKS
    try:
        "".join(MARKS.values()).encode(encoding)
    except (LookupError, UnicodeEncodeError):
        return ASCII_MARKS
    return MARKS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = verify_path(args.path)
    except UsageError as e:
        print(f"python -m export.verify: error: {e}", file=sys.stderr)
        return e.exit_code
    marks = _marks()
    for r in results:
        if not args.quiet or r.failed:
            print(r.line(marks))
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "not run")}
    summary = f"{counts['passed']} passed, {counts['failed']} failed"
    if counts["not run"]:
        summary += f", {counts['not run']} not run"
    print(f"{summary} ({len(results)} manifest{'s' if len(results) != 1 else ''} in {args.path})")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
