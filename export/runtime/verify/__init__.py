"""`python -m export.verify PATH`: prove that published artifacts are the ones that were verified.

For each manifest: its sha256, then the golden inputs through the artifact's own runtime, compared
with the golden outputs by the same gate the pipeline applied (`export.runtime.check.gate`). numpy plus
onnxruntime and/or ai-edge-litert only: this package never imports TensorFlow, Keras or tf2onnx
(SavedModel runs only where TensorFlow happens to be importable). Every problem with a file's
content is a failed line with its reason, never a traceback: a verifier fails closed. The command
line is `__main__`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from export.errors import ManifestError, ParityError, UsageError, first_line, one_line, printable, short
from export.formats import REGISTRY, Format
from export.publish import sha256_path, size_bytes
from export.runtime import manifest as manifests
from export.runtime import runtimes, signing
from export.runtime.check import gate, parity_metrics
from export.runtime.metadata import check_file_metadata
from export.runtime.schema import check_manifest_schema

MANIFEST_SUFFIXES = tuple(f.manifest_suffix for f in REGISTRY.values())


class RuntimeNotRun(Exception):
    """The format's runtime is not importable here: reported as not run, not as a failure."""


@dataclass
class VerifyResult:
    """The outcome for one manifest. `status` is "passed", "failed" or "not run"."""

    manifest: str
    name: str
    status: str = "failed"  # fails closed: "passed" only once every check has passed
    reason: str = ""
    format: str | None = None
    metrics: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=dict)
    signature: str = ""  # "signature ok", "signature present, not checked", "unsigned"
    signatures: list = field(default_factory=list)  # keys checked in a file with several lengths
    outputs_sha256: str = ""  # of the golden inputs' outputs as run here: same kernels, same bits

    def as_json(self) -> dict:
        """The result as `--json` writes it (export.arm compares these across machines)."""
        return {"manifest": os.path.basename(self.manifest), "artifact": self.name,
                "format": self.format, "status": self.status, "reason": self.reason,
                "metrics": self.metrics, "tolerance": self.tolerance,
                "outputs_sha256": self.outputs_sha256}

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def line(self, marks: dict[str, str] | None = None) -> str:
        """One terminal line; the name and reason come from files, so they are escaped."""
        marks = marks or MARKS
        if self.status == "passed":
            checked = f"  [{', '.join(self.signatures)}]" if self.signatures else ""
            text = f"{self.name}  {_describe_metrics(self.metrics, self.tolerance)}{checked}"
        else:
            text = f"{self.name}  {self.reason}"
        if self.signature:
            text += f"  [{self.signature}]"
        return f"{marks[self.status]} {printable(text)}"


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


def _num(x: float) -> str:
    """1e-04, 2.5e-02: a tolerance as people write it."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{float(mantissa):g}e{exponent}"


def find_manifests(path: str) -> list[str]:
    """PATH (a folder, a manifest, or an artifact with its manifest beside it) -> manifest paths.

    Raises:
        UsageError: there is nothing to verify at PATH.
    """
    if not os.path.lexists(path):
        raise UsageError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        found = sorted(
            os.path.join(path, n) for n in os.listdir(path)
            if n.endswith(MANIFEST_SUFFIXES) and not n.startswith(".")
        )
        if found:
            return found
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


def verify_path(path: str, *, public_key: str | None = None) -> list[VerifyResult]:
    """Verify every manifest under PATH (a folder, a manifest, or an artifact).

    Args:
        path: a folder, a manifest, or an artifact with its manifest beside it.
        public_key: an elliptic-curve public key (PEM); every set must carry a signature made
            with its private key, checked before anything else. None: signatures are reported
            as present or absent, not checked.

    Returns:
        One VerifyResult per manifest, in file name order.

    Raises:
        UsageError: only when there is nothing to verify; a file's problems are results.
        SigningError: `public_key` is not a usable key, or model-signing is not installed.
    """
    manifests_found = find_manifests(path)
    verifier = signing.load_verifier(public_key) if public_key else None
    return [verify_manifest(p, verifier=verifier) for p in manifests_found]


def verify_manifest(path: str, *, verifier=None) -> VerifyResult:
    """Check one manifest, its artifact and its golden vectors. Never raises for file content."""
    result = VerifyResult(manifest=path, name=os.path.basename(path))  # "failed" until passed
    try:
        _verify(path, result, verifier)
    except RuntimeNotRun as e:
        result.status, result.reason = "not run", str(e)
    except (ManifestError, ParityError) as e:
        result.reason = one_line(str(e))
    except (MemoryError, RecursionError) as e:
        result.reason = f"{type(e).__name__} while reading it"
    except Exception as e:  # noqa: BLE001 - fail closed on anything unforeseen, still one line
        result.reason = one_line(f"unexpected {type(e).__name__}: {e}")
    return result


def _verify(path: str, result: VerifyResult, verifier=None) -> None:
    manifest = manifests.read_manifest(path)
    folder = os.path.dirname(os.path.abspath(path))
    if isinstance(manifest.get("artifact"), str) and manifest["artifact"]:
        result.name = manifest["artifact"]
    manifests.check_fields(manifest)
    fmt = REGISTRY[manifest["format"]]
    result.format = fmt.name
    for key in manifests.PATH_FIELDS:
        if key in manifest:
            manifests.path_inside(folder, manifest[key], key)
    # The signature first: with a key, nothing a set's files say is trusted before it checks.
    if verifier is not None:
        signing.verify_set(verifier, folder, os.path.basename(path), manifest)
        result.signature = "signature ok"
    elif signing.signature_present(folder, manifest):
        result.signature = "signature present, not checked: pass --public-key"
    else:
        result.signature = "unsigned"
    tolerance = manifests.tolerance_of(manifest["parity"])
    result.tolerance = tolerance
    inputs = manifests.tensors_of(manifest["inputs"], "inputs")
    outputs = manifests.tensors_of(manifest["outputs"], "outputs")

    artifact = os.path.join(folder, manifest["artifact"])
    _check_artifact(artifact, fmt, manifest)
    manifests.check_files(folder, manifest)
    golden_path = os.path.join(folder, manifest["golden"])
    golden = manifests.load_golden(golden_path, manifest, inputs + outputs)
    manifests.check_golden_raw(folder, manifest, golden)
    manifests.check_golden_ranges(golden, inputs)
    manifests.check_reference(folder, manifest)
    # Whatever else the schema (the one the JavaScript verifier reads) asks of a manifest.
    check_manifest_schema(manifest)

    # Integrity is settled before this point: a runtime never sees bytes whose sha256 is wrong.
    if not runtimes.runtime_available(fmt.name):
        raise RuntimeNotRun(
            f"not run: {fmt.runtime} is not importable here (sha256 and golden file ok)"
        )
    batch = inputs[0]["shape"][0]  # load_golden refused tensors without a batch axis
    # Runtimes print to stdout (onnxruntime's "EP Error" banner on a file it cannot parse);
    # stdout carries one line per artifact, so their chatter goes to stderr.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            runner = runtimes.load_runner(fmt.name, artifact, batch=batch, inputs=manifest["inputs"])
    except runtimes.RuntimeMissing as e:
        raise RuntimeNotRun(f"not run: {e}") from e
    except ImportError as e:
        raise RuntimeNotRun(f"not run: {fmt.runtime} cannot be imported ({e})") from e
    except Exception as e:
        raise ManifestError(
            f"{fmt.runtime} cannot load {manifest['artifact']}: {one_line(first_line(e))}"
        ) from e
    feeds = {t["name"]: golden[t["name"]] for t in inputs}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            got = runner.run(feeds)
    except Exception as e:
        raise ManifestError(
            f"{fmt.runtime} failed to run the golden inputs: {one_line(first_line(e))}"
        ) from e
    result.outputs_sha256 = outputs_digest(got)
    _golden_parity(got, golden, outputs, tolerance, record=result)
    if "signatures" in manifest:
        _verify_signatures(manifest, folder, fmt, artifact, batch, tolerance, result)
    # What the file says of itself must be what its manifest says (export.runtime.metadata).
    check_file_metadata(fmt.name, artifact, manifest)
    fmt.check_on_device(artifact, manifest, folder)  # TFLM: its arena and its C++
    result.status = "passed"


def outputs_digest(outputs: dict) -> str:
    """sha256 over the outputs' names, dtypes, shapes and bytes, in name order: two runs agree
    bit for bit exactly when their digests do."""
    digest = hashlib.sha256()
    for name in sorted(outputs):
        array = np.ascontiguousarray(outputs[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _golden_parity(got: dict, golden: dict, outputs: list[dict], tolerance: dict, *,
                   prefix: str = "", record: VerifyResult | None = None) -> dict:
    """The artifact's outputs against the golden ones, through the one gate; the metrics.

    `prefix` names what ran (a signature) in the messages; `record` gets the metrics before the
    gate is applied.
    """
    expected = {t["name"]: golden[t["name"]] for t in outputs}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ManifestError(f"{prefix}the artifact returned {sorted(got)}, not the outputs {missing}")
    metrics = parity_metrics(expected, {k: got[k] for k in expected})
    if record is not None:
        record.metrics = metrics
    gate(metrics, artifact=f"{prefix}golden vectors", **tolerance)
    return metrics


def _verify_signatures(manifest: dict, folder: str, fmt: Format, artifact: str, batch,
                       tolerance: dict, result: VerifyResult) -> None:
    """A file with several lengths (export.buckets): every signature, or every checked length of
    a dynamic-length file, on its own golden vectors; a failure names the signature."""
    entries = manifest["signatures"]
    if not isinstance(entries, list) or not entries:
        raise ManifestError("manifest signatures must be a non-empty list")
    worst = dict(result.metrics)
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise ManifestError("manifest signatures entries must be objects with a key")
        key = entry["key"]
        label = f"signature {short(key)}"  # the key is the manifest's: quoted, cut, as read
        signature = entry.get("signature")
        if signature is not None and not (isinstance(signature, str) and fmt.signatures):
            raise ManifestError(f"{label}: {fmt.title} files have no signature "
                                f"{short(signature)}")
        try:
            inputs = manifests.tensors_of(entry.get("inputs"), "inputs")
            outputs = manifests.tensors_of(entry.get("outputs"), "outputs")
            manifests.path_inside(folder, entry.get("golden"), "golden")
            golden = manifests.load_golden(os.path.join(folder, entry["golden"]), entry,
                                           inputs + outputs)
        except ManifestError as e:
            raise ManifestError(f"{label}: {e}") from e
        try:
            with contextlib.redirect_stdout(sys.stderr):
                runner = runtimes.load_runner(fmt.name, artifact, batch=batch,
                                              inputs=entry["inputs"], signature=signature)
                got = runner.run({t["name"]: golden[t["name"]] for t in inputs})
        except Exception as e:
            raise ManifestError(
                f"{label}: {fmt.runtime} failed to run it: {one_line(first_line(e))}"
            ) from e
        metrics = _golden_parity(got, golden, outputs, tolerance, prefix=f"{label}: ")
        worst = {k: min(worst[k], v) if k == "cosine" else max(worst[k], v)
                 for k, v in metrics.items()}
        result.signatures.append(key)
    result.metrics = worst


def _check_artifact(path: str, fmt: Format, manifest: dict) -> None:
    name = manifest["artifact"]
    if not os.path.lexists(path):
        raise ManifestError(f"artifact {name} is missing")
    if fmt.is_folder:
        if not os.path.isdir(path):
            raise ManifestError(f"artifact {name} should be a folder")
        _no_symlinks(path, os.path.dirname(path), name)
    elif not os.path.isfile(path):
        raise ManifestError(f"artifact {name} is not a file")
    try:
        size = size_bytes(path)
        if "bytes" in manifest and size != manifest["bytes"]:
            raise ManifestError(
                f"artifact is {size} bytes, the manifest says {manifest['bytes']} "
                "(truncated or replaced)"
            )
        digest = sha256_path(path)
    except OSError as e:
        raise ManifestError(f"artifact {name} cannot be read: {one_line(first_line(e))}") from e
    if digest != manifest["sha256"].lower():
        raise ManifestError(
            f"sha256 mismatch: the file has {digest[:12]}..., the manifest "
            f"{manifest['sha256'][:12]}... (modified or corrupted)"
        )


def _no_symlinks(folder: str, root: str, name: str) -> None:
    """A SavedModel folder holding symlinks: the sha256 would not cover what TensorFlow loads.
    Nor anything but files and folders: hashing a named pipe waited for a writer forever."""
    for base, dirs, files in os.walk(folder):
        for entry in dirs + files:
            full = os.path.join(base, entry)
            if os.path.islink(full):
                raise ManifestError(
                    f"refusing artifact {name}: it holds a symlink "
                    f"({os.path.relpath(full, root)})"
                )
            if not (os.path.isdir(full) or os.path.isfile(full)):
                raise ManifestError(
                    f"refusing artifact {name}: it holds {os.path.relpath(full, root)}, neither "
                    "a file nor a folder (a pipe, socket or device)"
                )
