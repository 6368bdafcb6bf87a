"""Error paths users meet in `export.runtime.verify` and the manifest reader (issue 17), each with the
reason it prints: a missing or failing runtime, too few outputs, malformed fields, paths, tensors
and golden files. A tiny ONNX + TFLite set is built once (artifact_factory) and copied per test.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile

import numpy as np
import pytest
from conftest import read_json as read
from conftest import write_json as write

from export import publish
from export.errors import ManifestError, UsageError
from export.runtime import manifest as manifests
from export.runtime import runtimes, verify

TINY = dict(units=4, heads=1, query_len=2, kv_len=3, query_features=3, kv_features=2)
FORMATS = ("onnx", "tflite")


def private_copy(artifact_factory, folder: str, **fields) -> tuple[str, dict[str, str]]:
    """(folder, {fmt: manifest path}) of a private copy of a shared build, free to damage."""
    out, results = artifact_factory(formats=FORMATS, **fields)
    shutil.copytree(out, folder)
    return folder, {fmt: os.path.join(folder, os.path.basename(r.manifest_path))
                    for fmt, r in results.items()}


@pytest.fixture()
def tiny(artifact_factory, tmp_path):
    """(folder, {fmt: manifest path}) of a private copy of the tiny set."""
    return private_copy(artifact_factory, str(tmp_path / "set"), **TINY)


def edited(path: str, **changes) -> verify.VerifyResult:
    manifest = read(path)
    for key, value in changes.items():
        if value is KeyError:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    write(path, manifest)
    return verify.verify_manifest(path)


def failed(result: verify.VerifyResult, phrase: str) -> None:
    assert result.status == "failed", (result.status, result.reason)
    assert phrase in result.reason, result.reason
    assert "\n" not in result.reason


def failed_with(result: verify.VerifyResult, reason: str) -> None:
    """The whole one-line reason, as users read it."""
    assert (result.status, result.reason) == ("failed", reason)


def test_the_tiny_set_passes(tiny):
    folder, paths = tiny
    results = verify.verify_path(folder)
    assert [r.status for r in results] == ["passed", "passed"]
    assert {r.format for r in results} == set(FORMATS)
    for r in results:
        assert r.name == read(r.manifest)["artifact"] and r.manifest == paths[r.format]
        assert r.tolerance == {"atol": 1e-4} and r.signatures == []
        assert r.signature == "unsigned"
        assert r.line(verify.ASCII_MARKS).startswith("ok ")
        assert "max abs diff" in r.line() and "(atol 1e-04)" in r.line()


# -- the runtime -------------------------------------------------------------------------------------


def test_runtime_missing_is_not_run(tiny, monkeypatch):
    _, paths = tiny
    monkeypatch.setattr(runtimes, "runtime_available", lambda fmt: False)
    result = verify.verify_manifest(paths["onnx"])
    assert result.status == "not run" and not result.failed
    assert result.reason == "not run: onnxruntime is not importable here (sha256 and golden file ok)"
    assert result.line(verify.ASCII_MARKS).startswith("skip ")


@pytest.mark.parametrize("error,status,phrase", [
    (runtimes.RuntimeMissing("onnxruntime is not installed"), "not run",
     "not run: onnxruntime is not installed"),
    (ImportError("no module named x"), "not run", "onnxruntime cannot be imported (no module named x)"),
    (RuntimeError("bad file\nsecond line"), "failed",
     "onnxruntime cannot load xattn_u4_h1_q2x3_kv3x2.onnx: bad file"),
], ids=["runtime-missing", "import-error", "cannot-load"])
def test_runtime_cannot_load(tiny, monkeypatch, error, status, phrase):
    _, paths = tiny

    def load_runner(*args, **kwargs):
        raise error

    monkeypatch.setattr(runtimes, "load_runner", load_runner)
    result = verify.verify_manifest(paths["onnx"])
    assert result.status == status and phrase in result.reason, result.reason
    assert "second line" not in result.reason


class FakeRunner:
    def __init__(self, run):
        self.run = run


def test_runtime_fails_on_the_golden_inputs(tiny, monkeypatch):
    _, paths = tiny

    def boom(feeds):
        raise RuntimeError("kernel exploded\ndetails")

    monkeypatch.setattr(runtimes, "load_runner", lambda *a, **k: FakeRunner(boom))
    failed(verify.verify_manifest(paths["onnx"]),
           "onnxruntime failed to run the golden inputs: kernel exploded")


def test_runtime_returns_too_few_outputs(tiny, monkeypatch):
    _, paths = tiny
    monkeypatch.setattr(runtimes, "load_runner", lambda *a, **k: FakeRunner(lambda feeds: {"other": 1}))
    failed(verify.verify_manifest(paths["onnx"]),
           "the artifact returned ['other'], not the outputs ['output']")


def test_runtime_returns_other_values(tiny, monkeypatch):
    folder, paths = tiny
    golden = np.load(os.path.join(folder, read(paths["onnx"])["golden"]))
    wrong = {"output": golden["output"] + 1e-3}
    monkeypatch.setattr(runtimes, "load_runner", lambda *a, **k: FakeRunner(lambda feeds: wrong))
    result = verify.verify_manifest(paths["onnx"])
    failed(result, "max abs diff 0.001 exceeds atol=0.0001")
    assert result.reason.startswith("golden vectors: max abs diff"), result.reason


# -- manifest fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,phrase", [
    (dict(sha256="z" * 64), "manifest sha256 'zzzzzzzz"),
    (dict(sha256="ab" * 31), "is not 64 hex digits"),
    (dict(golden_sha256="0" * 63 + "g"), "manifest golden_sha256 '000"),
    (dict(golden_sha256=64), "manifest golden_sha256 64 is not 64 hex digits"),
    (dict(reference_sha256="x"), "manifest reference_sha256 'x' is not 64 hex digits"),
    (dict(bytes="4639"), "manifest field 'bytes' must be an integer, got '4639'"),
    (dict(bytes=True), "manifest field 'bytes' must be an integer, got True"),
    (dict(bytes=1.5), "manifest field 'bytes' must be an integer, got 1.5"),
    (dict(reference=3), "manifest field 'reference' must be a JSON string"),
    (dict(reference_sha256=KeyError), "manifest names a reference but gives no reference_sha256"),
    (dict(format="pytorch"), "manifest format 'pytorch' is not one of savedmodel, tflite, onnx, ort"),
    (dict(format=KeyError, golden=KeyError), "manifest lacks the field(s) format, golden"),
    (dict(inputs={}), "manifest field 'inputs' must be a JSON array, got object"),
    (dict(parity=[]), "manifest field 'parity' must be a JSON object, got array"),
    (dict(artifact=None), "manifest field 'artifact' must be a JSON string, got null"),
    (dict(sha256=7), "manifest field 'sha256' must be a JSON string, got number"),
    (dict(artifact="a\x00b"), "manifest artifact path holds a NUL byte"),
    (dict(artifact=""), "manifest artifact must be a non-empty relative path"),
    (dict(golden="sub/../../x.npz"), "refusing golden path 'sub/../../x.npz': it leaves"),
    (dict(reference="/etc/passwd"), "refusing reference path '/etc/passwd': it leaves"),
    (dict(reference="\\\\server\\x"), "it leaves the manifest's folder"),
    (dict(golden="C:x.npz"), "refusing golden path 'C:x.npz'"),
], ids=["sha-not-hex", "sha-short", "golden-sha-not-hex", "golden-sha-number", "reference-sha-short",
        "bytes-string", "bytes-bool", "bytes-float", "reference-number", "reference-without-sha",
        "unknown-format", "missing-fields", "inputs-object", "parity-array", "artifact-null",
        "sha-number", "nul-path", "empty-path", "climbing-path", "absolute-path", "unc-path",
        "drive-path"])
def test_malformed_fields(tiny, changes, phrase):
    _, paths = tiny
    failed(edited(paths["onnx"], **changes), phrase)


def test_uppercase_hex_sha256_is_fine(tiny):
    _, paths = tiny
    manifest = read(paths["onnx"])
    result = edited(paths["onnx"], sha256=manifest["sha256"].upper())
    assert result.status == "passed", result.reason


def test_symlink_leaving_the_folder(tiny, tmp_path):
    folder, paths = tiny
    outside = tmp_path / "outside.npz"
    shutil.copyfile(os.path.join(folder, read(paths["onnx"])["golden"]), outside)
    os.symlink(outside, os.path.join(folder, "link.npz"))
    failed(edited(paths["onnx"], golden="link.npz"), "refusing golden path 'link.npz': it resolves outside")


@pytest.mark.parametrize("parity,phrase", [
    ({"atol": -1}, "manifest parity.atol must be a positive number, got -1"),
    ({"atol": 0}, "parity.atol must be a positive number, got 0"),
    ({"atol": "1e-4"}, "parity.atol must be a positive number, got '1e-4'"),
    ({"atol": True}, "parity.atol must be a positive number, got True"),
    ({"max_rel_error": float("inf")}, "parity.max_rel_error must be a positive number"),
    ({"atol": None}, "manifest parity gives no tolerance (atol or max_rel_error)"),
    ({}, "manifest parity gives no tolerance"),
], ids=["negative", "zero", "string", "bool", "inf", "null", "none"])
def test_bad_tolerance(tiny, parity, phrase):
    _, paths = tiny
    failed(edited(paths["onnx"], parity=parity), phrase)


def test_both_tolerances_apply(tiny):
    _, paths = tiny
    manifest = read(paths["onnx"])
    result = edited(paths["onnx"], parity={**manifest["parity"], "max_rel_error": 1e-12})
    failed(result, "golden vectors: relative L2 error")
    assert manifests.tolerance_of({"atol": 1, "max_rel_error": 0.5}) == {"atol": 1.0, "max_rel_error": 0.5}


TENSOR_CASES = {
    "empty": ([], "manifest inputs is empty"),
    "null": (None, "manifest field 'inputs' must be a JSON array, got null"),
    "not-an-object": ([1], "manifest inputs entries must be objects with a name"),
    "no-name": ([{"shape": [1]}], "entries must be objects with a name"),
    "empty-name": ([{"name": "", "shape": [1]}], "entries must be objects with a name"),
    "shape-string": ([{"name": "source1", "shape": "1,2"}],
                     "manifest inputs 'source1': shape must be a list of positive ints or null"),
    "shape-zero": ([{"name": "source1", "shape": [0, 2]}], "shape must be a list of positive ints"),
    "shape-bool": ([{"name": "source1", "shape": [True, 2]}], "shape must be a list of positive ints"),
    "shape-huge": ([{"name": "source1", "shape": [1 << 31]}], "shape must be a list of positive ints"),
    "shape-float": ([{"name": "source1", "shape": [1.0]}], "shape must be a list of positive ints"),
    "dtype-object": ([{"name": "source1", "shape": [1], "dtype": "object"}],
                     "manifest inputs 'source1': dtype 'object' is not a number type"),
    "dtype-string": ([{"name": "source1", "shape": [1], "dtype": "str"}], "is not a number type"),
    "dtype-unknown": ([{"name": "source1", "shape": [1], "dtype": "float99"}], "is not a number type"),
    "dtype-number": ([{"name": "source1", "shape": [1], "dtype": 5}], "dtype 5 is not a number type"),
    "twice": ([{"name": "source1", "shape": [1]}, {"name": "source1", "shape": [1]}],
              "manifest inputs names 'source1' twice"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES), ids=list(TENSOR_CASES))
def test_bad_tensor_entries(tiny, case):
    _, paths = tiny
    entries, phrase = TENSOR_CASES[case]
    failed(edited(paths["onnx"], inputs=entries), phrase)


def test_tensors_of_keeps_name_shape_dtype():
    entries = [{"name": "a", "shape": [None, 2], "dtype": "float32", "extra": 1},
               {"name": "b", "shape": [], "dtype": None}]
    assert manifests.tensors_of(entries, "outputs") == [
        {"name": "a", "shape": [None, 2], "dtype": "float32"}, {"name": "b", "shape": [], "dtype": None}]
    assert manifests.tensors_of([{"name": "m", "shape": [1 << 31 - 1], "dtype": "bool"}], "x")


# -- files -------------------------------------------------------------------------------------------


def test_missing_files(tiny):
    folder, paths = tiny
    manifest = read(paths["onnx"])
    os.remove(os.path.join(folder, manifest["reference"]))
    failed(verify.verify_manifest(paths["tflite"]), f"reference {manifest['reference']} is missing")
    os.remove(os.path.join(folder, manifest["golden"]))
    failed(verify.verify_manifest(paths["onnx"]), f"golden file {manifest['golden']} is missing")
    os.remove(os.path.join(folder, manifest["artifact"]))
    failed(verify.verify_manifest(paths["onnx"]), f"artifact {manifest['artifact']} is missing")


def test_artifact_of_the_wrong_kind(tiny):
    folder, paths = tiny
    manifest = read(paths["onnx"])
    artifact = os.path.join(folder, manifest["artifact"])
    os.remove(artifact)
    os.mkdir(artifact)
    failed(verify.verify_manifest(paths["onnx"]), f"artifact {manifest['artifact']} is not a file")
    tflite = read(paths["tflite"])["artifact"]
    failed(edited(paths["tflite"], format="savedmodel"), f"artifact {tflite} should be a folder")


def test_reference_replaced(tiny):
    folder, paths = tiny
    manifest = read(paths["onnx"])
    with open(os.path.join(folder, manifest["reference"]), "ab") as f:
        f.write(b"\0")
    failed(verify.verify_manifest(paths["onnx"]),
           f"reference {manifest['reference']} sha256 mismatch")


def test_artifact_size_and_sha256(tiny):
    folder, paths = tiny
    manifest = read(paths["onnx"])
    failed(edited(paths["onnx"], bytes=manifest["bytes"] + 1),
           f"artifact is {manifest['bytes']} bytes, the manifest says {manifest['bytes'] + 1}")
    failed(edited(paths["onnx"], bytes=manifest["bytes"], sha256="0" * 64),
           f"sha256 mismatch: the file has {manifest['sha256'][:12]}..., the manifest 000000000000...")
    assert edited(paths["onnx"], sha256=manifest["sha256"], bytes=KeyError).status == "passed"


def rewrite_golden(folder: str, path: str, change, *, version=None) -> None:
    """Rewrite the golden .npz of the manifest at `path` with `change(arrays)`, and its sha256."""
    manifest = read(path)
    golden = os.path.join(folder, manifest["golden"])
    with np.load(golden) as f:
        arrays = {k: f[k] for k in f.files}
    arrays = change(arrays)
    with zipfile.ZipFile(golden, "w") as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, version=version, allow_pickle=True)
            zf.writestr(f"{name}.npy", buffer.getvalue())
    manifest["golden_sha256"] = publish.sha256_path(golden)
    write(path, manifest)


def test_golden_npy_version_2_is_read(tiny):
    folder, paths = tiny
    golden = os.path.join(folder, read(paths["onnx"])["golden"])
    with np.load(golden) as f:
        before = {k: f[k] for k in f.files}
    rewrite_golden(folder, paths["onnx"], lambda a: a, version=(2, 0))
    manifest = read(paths["onnx"])
    tensors = manifests.tensors_of(manifest["inputs"] + manifest["outputs"], "tensors")
    arrays = manifests.load_golden(golden, manifest, tensors)
    assert sorted(arrays) == sorted(before)
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, before[name])


def test_golden_npy_version_3_is_refused(tiny):
    folder, paths = tiny
    rewrite_golden(folder, paths["onnx"], lambda a: a, version=(3, 0))
    failed(verify.verify_manifest(paths["onnx"]), "golden array source1.npy: unsupported .npy version (3, 0)")


@pytest.mark.parametrize("change,phrase", [
    (lambda a: {**a, "source2": a["source2"][:-1]}, "arrays disagree on the number of samples"),
    (lambda a: {**a, "output": np.full_like(a["output"], np.nan)},
     "golden array output.npy holds NaN or inf"),
    (lambda a: {**a, "source1": a["source1"].astype(object)}, "golden array source1.npy has dtype object"),
    (lambda a: {**a, "source1": a["source1"][..., :2]}, "golden array source1.npy has shape"),
    (lambda a: {**a, "source1": a["source1"][0]}, "golden array source1.npy has shape"),
    (lambda a: {k: v for k, v in a.items() if k != "output"}, "has no array 'output'"),
    (lambda a: {**a, "source1": np.zeros((0, 2, 3), np.float32), "source2": np.zeros((0, 3, 2), np.float32),
                "output": np.zeros((0, 2, 4), np.float32)}, "disagree on the number of samples ['0']"),
], ids=["samples-disagree", "nan", "object-dtype", "wrong-features", "no-batch-axis", "missing-array",
        "no-samples"])
def test_bad_golden_files(tiny, change, phrase):
    folder, paths = tiny
    rewrite_golden(folder, paths["onnx"], change)
    failed(verify.verify_manifest(paths["onnx"]), phrase)


def test_golden_file_damaged_or_truncated(tiny):
    folder, paths = tiny
    manifest = read(paths["onnx"])
    golden = os.path.join(folder, manifest["golden"])
    with np.load(golden) as f:
        arrays = {k: f[k] for k in f.files}
    with zipfile.ZipFile(golden, "w") as zf:  # a header that promises more data than there is
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array)
            data = buffer.getvalue()
            zf.writestr(f"{name}.npy", data[:-4] if name == "output" else data)
    failed(edited(paths["onnx"], golden_sha256=KeyError), "golden array output.npy is ")
    assert "promises" in verify.verify_manifest(paths["onnx"]).reason
    with open(golden, "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    failed(verify.verify_manifest(paths["onnx"]), f"golden file {manifest['golden']} is damaged")


def test_golden_that_would_inflate_too_far(tiny, monkeypatch):
    _, paths = tiny
    monkeypatch.setattr(manifests, "MAX_GOLDEN_BYTES", 100)
    failed(verify.verify_manifest(paths["onnx"]), "would inflate to")


# -- reading manifests -------------------------------------------------------------------------------


def test_manifest_reading_errors(tiny, tmp_path, monkeypatch):
    _, paths = tiny
    path = paths["onnx"]
    with open(path, "wb") as f:
        f.write(b"\xff\xfe{}")
    failed(verify.verify_manifest(path), "manifest is not UTF-8 text (byte 0)")
    with open(path, "w") as f:
        f.write("{\n  \"a\": }")
    failed(verify.verify_manifest(path), "manifest is not JSON: Expecting value at line 2 column 8")
    with open(path, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    assert verify.verify_manifest(path).status == "failed"
    with open(path, "w") as f:
        f.write("[1, 2]")
    failed(verify.verify_manifest(path), "manifest is a JSON list, not an object")
    monkeypatch.setattr(manifests, "MAX_MANIFEST_BYTES", 3)
    failed(verify.verify_manifest(path), "manifest is 6 bytes; not a manifest")
    failed(verify.verify_manifest(str(tmp_path)), "manifest is not a file")


def test_find_manifests(tiny, tmp_path):
    folder, paths = tiny
    assert verify.find_manifests(folder) == sorted(paths.values())
    artifact = paths["onnx"][: -len(".json")]
    assert verify.find_manifests(artifact) == [paths["onnx"]]
    assert verify.find_manifests(paths["tflite"]) == [paths["tflite"]]
    with pytest.raises(UsageError, match="no such file or folder"):
        verify.find_manifests(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no manifests \(\*_savedmodel.json, \*.tflite.json"):
        verify.find_manifests(str(tmp_path / "empty"))
    (tmp_path / "m_savedmodel").mkdir()
    (tmp_path / "m_savedmodel.json").write_text("{}")
    saved = str(tmp_path / "m_savedmodel")
    assert verify.find_manifests(saved + os.sep) == [saved + ".json"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="is neither a manifest"):
        verify.find_manifests(str(tmp_path / "notes.txt"))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".x.onnx.json").write_text("{}")
    with pytest.raises(UsageError):
        verify.find_manifests(str(hidden))


def test_manifest_error_is_one_line():
    with pytest.raises(ManifestError, match="must be a non-empty relative path"):
        manifests.path_inside("/tmp", None, "golden")


def test_number_formatting():
    assert verify._num(1e-4) == "1e-04"
    assert verify._num(2.5e-2) == "2.5e-02"
    assert verify._num(0.1) == "1e-01"
    text = verify._describe_metrics({"max_abs": 0.5, "rel_l2": 0.25}, {"max_rel_error": 0.05})
    assert text == "max abs diff 5.0e-01  rel L2 2.5e-01  (max_rel_error 5e-02)"
    text = verify._describe_metrics({"max_abs": 0.5, "rel_l2": 0.25}, {"atol": 1e-3, "max_rel_error": 0.05})
    assert text == "max abs diff 5.0e-01  rel L2 2.5e-01  (atol 1e-03, max_rel_error 5e-02)"


def test_result_line_lists_checked_signatures():
    result = verify.VerifyResult("m.json", "m.tflite", "passed", metrics={"max_abs": 1e-5},
                                 tolerance={"atol": 1e-4}, signature="unsigned")
    assert result.line() == "✓ m.tflite  max abs diff 1.0e-05  (atol 1e-04)  [unsigned]"
    result.signatures = ["q10_kv10", "q64_kv64"]
    assert result.line(verify.ASCII_MARKS) == (
        "ok m.tflite  max abs diff 1.0e-05  (atol 1e-04)  [q10_kv10, q64_kv64]  [unsigned]")
    failed = verify.VerifyResult("m.json", "m\x1b[2J.onnx", "failed", reason="bad\tthing")
    assert failed.line() == "✗ " + verify.printable("m\x1b[2J.onnx  bad\tthing")


def test_json_type_names_and_shape_text():
    assert [manifests._json_type(k) for k in (str, list, dict, int, float, bool, type(None), set)] == [
        "string", "array", "object", "number", "number", "boolean", "null", "set"]
    assert manifests._shape_text([None, 2, 3]) == "(B, 2, 3)"
    assert manifests._shape_text([]) == "()"


def test_wrong_golden_shape_names_both_shapes(tiny):
    folder, paths = tiny
    rewrite_golden(folder, paths["onnx"], lambda a: {**a, "source1": a["source1"][..., :2]})
    result = verify.verify_manifest(paths["onnx"])
    assert result.reason.endswith(", 2, 2), the manifest (B, 2, 3)"), result.reason


def test_public_key_is_loaded_once_and_checks_every_set(tiny, monkeypatch):
    from export.runtime import signing

    folder, paths = tiny
    seen = []
    monkeypatch.setattr(signing, "load_verifier", lambda key: seen.append(("load", key)) or "VERIFIER")
    monkeypatch.setattr(signing, "verify_set", lambda verifier, *a: seen.append(("set", verifier)))
    results = verify.verify_path(folder, public_key="key.pem")
    assert seen == [("load", "key.pem"), ("set", "VERIFIER"), ("set", "VERIFIER")]
    assert [r.signature for r in results] == ["signature ok", "signature ok"]
    seen.clear()
    assert [r.signature for r in verify.verify_path(folder)] == ["unsigned", "unsigned"]
    assert seen == []


# -- whole reasons, and what a result names ---------------------------------------------------------


@pytest.mark.parametrize("changes,reason", [
    (dict(reference=3), "manifest field 'reference' must be a JSON string"),
    (dict(reference_sha256=KeyError), "manifest names a reference but gives no reference_sha256"),
    (dict(parity={}), "manifest parity gives no tolerance (atol or max_rel_error)"),
    (dict(outputs=[]), "manifest outputs is empty"),
    (dict(file_metadata="x"), "manifest field 'file_metadata' must be a JSON object"),
    (dict(golden="..\\x.npz"), "refusing golden path '..\\\\x.npz': it leaves the manifest's folder"),
    (dict(golden="C:"), "refusing golden path 'C:': it leaves the manifest's folder"),
], ids=["reference-number", "reference-without-sha", "no-tolerance", "no-outputs", "file-metadata",
        "backslash-climb", "drive-only"])
def test_whole_reasons(tiny, changes, reason):
    _, paths = tiny
    failed_with(edited(paths["onnx"], **changes), reason)


def test_result_names_the_manifest_when_its_artifact_field_is_unusable(tiny):
    _, paths = tiny
    path = paths["onnx"]
    result = edited(path, artifact=5)
    failed_with(result, "manifest field 'artifact' must be a JSON string, got number")
    assert (result.name, result.manifest) == (os.path.basename(path), path)
    result = edited(path, artifact=KeyError)
    failed_with(result, "manifest lacks the field(s) artifact")
    assert result.name == os.path.basename(path)


def test_one_character_file_names(tiny):
    folder, paths = tiny
    golden = read(paths["onnx"])["golden"]
    shutil.copyfile(os.path.join(folder, golden), os.path.join(folder, "g"))
    result = edited(paths["onnx"], golden="g")
    assert result.status == "passed", result.reason


def test_artifact_size_and_unreadable_artifact(tiny, monkeypatch):
    _, paths = tiny
    manifest = read(paths["onnx"])
    size, name = manifest["bytes"], manifest["artifact"]
    failed_with(edited(paths["onnx"], bytes=size - 1),
                f"artifact is {size} bytes, the manifest says {size - 1} (truncated or replaced)")

    def unreadable(path):
        raise OSError("Input/output error\nsecond line")

    monkeypatch.setattr(verify, "sha256_path", unreadable)
    failed_with(edited(paths["onnx"], bytes=size), f"artifact {name} cannot be read: Input/output error")


@pytest.mark.parametrize("error,status,reason", [
    (MemoryError(), "failed", "MemoryError while reading it"),
    (RecursionError("too deep"), "failed", "RecursionError while reading it"),
    (RuntimeError("surprise\n  on two lines"), "failed", "unexpected RuntimeError: surprise on two lines"),
    (KeyError("x"), "failed", "unexpected KeyError: 'x'"),
    (verify.RuntimeNotRun("not run: no runtime"), "not run", "not run: no runtime"),
], ids=["memory", "recursion", "runtime-error", "key-error", "not-run"])
def test_last_resort_failures_are_one_line(tiny, monkeypatch, error, status, reason):
    _, paths = tiny

    def boom(path):
        raise error

    monkeypatch.setattr(manifests, "read_manifest", boom)
    result = verify.verify_manifest(paths["onnx"])
    assert (result.status, result.reason) == (status, reason)
    assert (result.manifest, result.name) == (paths["onnx"], os.path.basename(paths["onnx"]))


def test_the_runtime_gets_the_manifests_batch_and_inputs(tiny, monkeypatch):
    _, paths = tiny
    path = paths["tflite"]
    manifest = read(path)
    # source2's batch axis differs from source1's: the batch is source1's (the first input's).
    manifest["inputs"][1]["shape"][0] = 2
    write(path, manifest)
    calls = []

    def load_runner(fmt, artifact, **kwargs):
        calls.append((fmt, artifact, kwargs))
        raise RuntimeError("stop here")

    monkeypatch.setattr(runtimes, "load_runner", load_runner)
    failed_with(verify.verify_manifest(path),
                f"ai-edge-litert cannot load {manifest['artifact']}: stop here")
    folder = os.path.dirname(path)
    assert calls == [("tflite", os.path.join(folder, manifest["artifact"]),
                      {"batch": 1, "inputs": manifest["inputs"]})]


def test_runtime_chatter_goes_to_stderr(tiny, monkeypatch, capsys):
    _, paths = tiny
    real = runtimes.load_runner

    def chatty(*args, **kwargs):
        print("loading")
        runner = real(*args, **kwargs)

        def run(feeds):
            print("running")
            return runner.run(feeds)
        return FakeRunner(run)

    monkeypatch.setattr(runtimes, "load_runner", chatty)
    assert verify.verify_manifest(paths["onnx"]).status == "passed"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "loading\nrunning\n"


# -- signatures ---------------------------------------------------------------------------------------


def test_signature_present_but_not_checked(tiny):
    folder, paths = tiny
    manifest = read(paths["onnx"])
    open(os.path.join(folder, manifest["artifact"] + ".sig"), "wb").close()
    result = verify.verify_manifest(paths["onnx"])
    assert result.status == "passed", result.reason
    assert result.signature == "signature present, not checked: pass --public-key"
    assert result.line().endswith("  [signature present, not checked: pass --public-key]")


def test_verify_set_gets_the_sets_folder_manifest_name_and_manifest(tiny, monkeypatch):
    from export.runtime import signing

    folder, paths = tiny
    seen = []
    monkeypatch.setattr(signing, "verify_set", lambda *args: seen.append(args))
    result = verify.verify_manifest(paths["onnx"], verifier="VERIFIER")
    assert result.status == "passed" and result.signature == "signature ok"
    assert seen == [("VERIFIER", os.path.abspath(folder), os.path.basename(paths["onnx"]),
                     read(paths["onnx"]))]


# -- SavedModel folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_symlinks_in_an_artifact_folder_are_refused(tiny, tmp_path, kind):
    folder, paths = tiny
    artifact = os.path.join(folder, "m_savedmodel")
    os.makedirs(os.path.join(artifact, "variables"))
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data").write_bytes(b"x")
    os.symlink(target if kind == "folder" else target / "data", os.path.join(artifact, "variables", "link"))
    failed_with(edited(paths["tflite"], format="savedmodel", artifact="m_savedmodel"),
                "refusing artifact m_savedmodel: it holds a symlink (m_savedmodel/variables/link)")
    os.remove(os.path.join(artifact, "variables", "link"))
    (tmp_path / "saved_model.pb").write_bytes(b"graph")
    os.link(tmp_path / "saved_model.pb", os.path.join(artifact, "saved_model.pb"))  # a hard link: a file
    failed(verify.verify_manifest(paths["tflite"]), "artifact is 5 bytes")  # no symlink: measured


def test_a_pipe_in_an_artifact_folder_is_refused_before_it_is_read(tiny):
    """Hashing a named pipe would wait for a writer forever: it is refused by name, as a socket
    or device would be, whatever folder of the artifact holds it."""
    folder, paths = tiny
    artifact = os.path.join(folder, "m_savedmodel")
    os.makedirs(os.path.join(artifact, "variables"))
    with open(os.path.join(artifact, "saved_model.pb"), "wb") as f:
        f.write(b"graph")
    os.mkfifo(os.path.join(artifact, "variables", "pipe"))
    failed_with(edited(paths["tflite"], format="savedmodel", artifact="m_savedmodel"),
                "refusing artifact m_savedmodel: it holds m_savedmodel/variables/pipe, neither a "
                "file nor a folder (a pipe, socket or device)")


# -- several lengths in one file (export.buckets) -----------------------------------------------------


BUCKETED = dict(units=4, heads=1, query_features=3, kv_features=2, lengths=((2, 2), (3, 3)))


@pytest.fixture()
def bucketed(artifact_factory, tmp_path):
    """(folder, {fmt: manifest path}) of a private copy of a tiny set with lengths 2 and 3."""
    return private_copy(artifact_factory, str(tmp_path / "bucketed"), **BUCKETED)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_signature_runs_on_its_own_golden_vectors(bucketed, monkeypatch, fmt):
    folder, paths = bucketed
    manifest = read(paths[fmt])
    real = runtimes.load_runner
    calls = []

    def load_runner(fmt, path, *, batch, inputs, signature=None):
        calls.append((fmt, path, batch, inputs, signature))
        return real(fmt, path, batch=batch, inputs=inputs, signature=signature)

    monkeypatch.setattr(runtimes, "load_runner", load_runner)
    result = verify.verify_manifest(paths[fmt])
    assert result.status == "passed", result.reason
    entries = manifest["signatures"]
    assert result.signatures == [e["key"] for e in entries] and len(entries) >= 3
    artifact = os.path.join(folder, manifest["artifact"])
    batch = manifest["inputs"][0]["shape"][0]
    assert calls == [(fmt, artifact, batch, manifest["inputs"], None)] + [
        (fmt, artifact, batch, e["inputs"], e["signature"]) for e in entries]
    assert [e["signature"] for e in entries] == (
        [None] * len(entries) if fmt == "onnx" else [e["key"] for e in entries])


def test_the_worst_metrics_over_every_signature_are_reported(bucketed, monkeypatch):
    _, paths = bucketed
    # max_abs, mean_abs, rmse, rel_l2, cosine of the file's golden vectors, then each signature's
    values = [(2e-5, 1e-6, 3e-6, 1e-5, 0.99999), (5e-5, 1e-6, 2e-6, 3e-5, 0.9999),
              (1e-5, 4e-6, 1e-6, 2e-5, 0.99995), (3e-5, 2e-6, 5e-6, 1e-5, 0.99998)]
    metrics = iter([dict(zip(("max_abs", "mean_abs", "rmse", "rel_l2", "cosine"), v)) for v in values])
    monkeypatch.setattr(verify, "parity_metrics", lambda expected, got: next(metrics))
    result = verify.verify_manifest(paths["tflite"])
    assert result.status == "passed", result.reason
    assert result.metrics == {"max_abs": 5e-5, "mean_abs": 4e-6, "rmse": 5e-6, "rel_l2": 3e-5,
                              "cosine": 0.9999}
    assert result.line(verify.ASCII_MARKS).endswith(
        "max abs diff 5.0e-05  (atol 1e-04)  [len_2, len_3, serving_default]  [unsigned]")


def edit_signatures(path: str, change) -> verify.VerifyResult:
    manifest = read(path)
    manifest["signatures"] = change(manifest["signatures"])
    write(path, manifest)
    return verify.verify_manifest(path)


def first(**changes):
    return lambda entries: [{**entries[0], **changes}, *entries[1:]]


@pytest.mark.parametrize("fmt,change,reason", [
    ("tflite", lambda e: {"key": "len_2"}, "manifest signatures must be a non-empty list"),
    ("tflite", lambda e: {}, "manifest signatures must be a non-empty list"),
    ("tflite", lambda e: [], "manifest signatures must be a non-empty list"),
    ("tflite", lambda e: [1], "manifest signatures entries must be objects with a key"),
    ("tflite", lambda e: [{**e[0], "key": 3}], "manifest signatures entries must be objects with a key"),
    ("tflite", first(signature=5), "signature 'len_2': TFLite files have no signature 5"),
    ("onnx", first(signature="len_1"), "signature 'len_1': ONNX files have no signature 'len_1'"),
    ("tflite", first(inputs=[]), "signature 'len_2': manifest inputs is empty"),
    ("tflite", first(outputs=[]), "signature 'len_2': manifest outputs is empty"),
    ("tflite", first(golden="../g.npz"),
     "signature 'len_2': refusing golden path '../g.npz': it leaves the manifest's folder"),
    ("tflite", first(golden="nothing.npz"), "signature 'len_2': golden file nothing.npz is missing"),
], ids=["object", "empty-object", "empty-list", "not-an-object", "key-number", "signature-number",
        "onnx-signature", "no-inputs", "no-outputs", "golden-climbs", "golden-missing"])
def test_bad_signature_entries(bucketed, fmt, change, reason):
    _, paths = bucketed
    failed_with(edit_signatures(paths[fmt], change), reason)


def test_a_signature_that_fails_is_named(bucketed, monkeypatch):
    folder, paths = bucketed
    manifest = read(paths["tflite"])
    entry = manifest["signatures"][1]
    with np.load(os.path.join(folder, entry["golden"])) as f:
        expected = f["output"]
    real = runtimes.load_runner
    answers = {}

    def load_runner(fmt, path, *, signature=None, **kwargs):
        if signature in answers:
            return FakeRunner(answers[signature])
        return real(fmt, path, signature=signature, **kwargs)

    def boom(feeds):
        raise RuntimeError("kernel exploded\ndetails")

    monkeypatch.setattr(runtimes, "load_runner", load_runner)
    answers["len_3"] = boom
    failed_with(verify.verify_manifest(paths["tflite"]),
                "signature 'len_3': ai-edge-litert failed to run it: kernel exploded")
    answers["len_3"] = lambda feeds: {"other": expected}
    failed_with(verify.verify_manifest(paths["tflite"]),
                "signature 'len_3': the artifact returned ['other'], not the outputs ['output']")
    answers["len_3"] = lambda feeds: {"output": expected + 1e-3}
    result = verify.verify_manifest(paths["tflite"])
    assert result.reason.startswith(
        "signature 'len_3': golden vectors: max abs diff 0.001 exceeds atol=0.0001 (rel L2 "), result.reason


def test_runtime_chatter_of_every_signature_goes_to_stderr(bucketed, monkeypatch, capsys):
    _, paths = bucketed
    real = runtimes.load_runner

    def chatty(fmt, path, *, signature=None, **kwargs):
        print(f"loading {signature}")
        runner = real(fmt, path, signature=signature, **kwargs)

        def run(feeds):
            print(f"running {signature}")
            return runner.run(feeds)
        return FakeRunner(run)

    monkeypatch.setattr(runtimes, "load_runner", chatty)
    assert verify.verify_manifest(paths["tflite"]).status == "passed"
    captured = capsys.readouterr()
    assert captured.out == ""
    keys = (None, "len_2", "len_3", "serving_default")
    assert captured.err.splitlines() == [f"{step} {key}" for key in keys for step in ("loading", "running")]


# -- the raw golden pair (export.runtime.golden_raw) that JS and C readers use ------------------------


def _raw(path: str) -> tuple[str, dict]:
    return os.path.dirname(path), read(path)["golden_raw"]


def _rewrite_raw_index(folder: str, entry: dict, change) -> dict:
    """Edit the raw index, then re-record its sha256 (a forger who also edits the manifest)."""
    index_path = os.path.join(folder, entry["index"])
    index = read(index_path)
    change(index)
    write(index_path, index)
    return {**entry, "index_sha256": publish.sha256_path(index_path)}


def test_golden_raw_files_must_be_the_manifests(tiny):
    _, paths = tiny
    folder, entry = _raw(paths["onnx"])
    data = os.path.join(folder, entry["data"])
    with open(data, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    now = publish.sha256_path(data)[:12]
    failed_with(verify.verify_manifest(paths["onnx"]),
                f"golden_raw data file {entry['data']} sha256 mismatch: {now}..., the manifest "
                f"{entry['sha256'][:12]}... (replaced or modified)")
    # Its sibling (another format, same golden files) fails too: the pair is shared.
    failed(verify.verify_manifest(paths["tflite"]), "golden_raw data file")


@pytest.mark.parametrize("case, expected", [
    ("missing-index", "golden_raw index file {index} is missing"),
    ("missing-data", "golden_raw data file {data} is missing"),
    ("not-an-object", "manifest golden_raw must be an object, not 'x'"),
    ("bad-digest", "manifest golden_raw sha256 must be 64 hex digits, not 'abc'"),
    ("bad-index-digest", "manifest golden_raw index_sha256 must be 64 hex digits, not None"),
    ("escaping-path", "refusing golden_raw data path '../x.bin': it leaves the manifest's folder"),
])
def test_golden_raw_entry_problems(tiny, case, expected):
    _, paths = tiny
    folder, entry = _raw(paths["onnx"])
    if case == "missing-index":
        os.remove(os.path.join(folder, entry["index"]))
    elif case == "missing-data":
        os.remove(os.path.join(folder, entry["data"]))
    changes = {
        "not-an-object": "x",
        "bad-digest": {**entry, "sha256": "abc"},
        "bad-index-digest": {k: v for k, v in entry.items() if k != "index_sha256"},
        "escaping-path": {**entry, "data": "../x.bin"},
    }
    result = (edited(paths["onnx"], golden_raw=changes[case]) if case in changes
              else verify.verify_manifest(paths["onnx"]))
    failed_with(result, expected.format(**entry))


def test_golden_raw_must_hold_the_golden_files_arrays(tiny):
    _, paths = tiny
    folder, entry = _raw(paths["onnx"])
    renamed = _rewrite_raw_index(
        folder, entry, lambda index: index["arrays"].update(extra=index["arrays"].pop("output")))
    reason = edited(paths["onnx"], golden_raw=renamed).reason
    assert reason == ("golden_raw holds ['extra', 'source1', 'source2'], "
                      "the golden file ['output', 'source1', 'source2']"), reason


def test_golden_raw_array_that_differs_is_named(tiny):
    _, paths = tiny
    folder, entry = _raw(paths["onnx"])

    def as_int32(index):  # same bytes, read as another dtype: the values differ
        index["arrays"]["output"]["dtype"] = "int32"
    failed_with(edited(paths["onnx"], golden_raw=_rewrite_raw_index(folder, entry, as_int32)),
                "golden_raw array output is int32[4, 2, 4], the golden file's float32[4, 2, 4]")


def test_golden_raw_index_that_cannot_be_read(tiny):
    _, paths = tiny
    folder, entry = _raw(paths["onnx"])
    forged = _rewrite_raw_index(folder, entry, lambda index: index.update(format="other"))
    failed_with(edited(paths["onnx"], golden_raw=forged),
                f"golden_raw index {entry['index']} cannot be read: "
                f"{entry['index']} is not a xattn-golden-raw index")


def test_a_manifest_without_golden_raw_still_verifies(tiny):
    _, paths = tiny
    assert edited(paths["onnx"], golden_raw=KeyError).status == "passed"


def test_golden_raw_value_that_differs_is_counted(tiny):
    _, paths = tiny
    folder, entry = _raw(paths["onnx"])
    index = read(os.path.join(folder, entry["index"]))
    data = os.path.join(folder, entry["data"])
    with open(data, "r+b") as f:  # the first float32 of `output`, one more
        f.seek(index["arrays"]["output"]["offset"])
        value = np.frombuffer(f.read(4), "<f4")[0]
        f.seek(index["arrays"]["output"]["offset"])
        f.write(np.array([value + 1], "<f4").tobytes())
    index["sha256"] = publish.sha256_path(data)
    write(os.path.join(folder, entry["index"]), index)
    forged = {**entry, "sha256": index["sha256"],
              "index_sha256": publish.sha256_path(os.path.join(folder, entry["index"]))}
    failed_with(edited(paths["onnx"], golden_raw=forged),
                "golden_raw array output holds other values than the golden file's (1 of 32 differ)")


def test_golden_raw_file_that_cannot_be_read(tiny, monkeypatch):
    _, paths = tiny
    _, entry = _raw(paths["onnx"])
    real = manifests.sha256_path

    def refuse_raw(path):
        if path.endswith(".golden.bin"):
            raise PermissionError(13, "Permission denied")
        return real(path)
    monkeypatch.setattr(manifests, "sha256_path", refuse_raw)
    failed_with(verify.verify_manifest(paths["onnx"]),
                f"golden_raw data file {entry['data']} cannot be read: [Errno 13] Permission denied")


# -- what verify hands on: the outputs' digest, the companions, the ids' ranges, the format's check ---


@pytest.mark.fast
def test_outputs_digest_covers_names_dtypes_shapes_and_every_bit():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)
    digest = verify.outputs_digest({"y": a, "z": b})
    assert len(digest) == 64 and digest == verify.outputs_digest({"z": b.copy(), "y": a.copy()})
    assert digest == verify.outputs_digest({"y": np.asfortranarray(a), "z": b})  # same values, same bits
    nudged = a.copy()
    nudged[1, 2] = np.nextafter(nudged[1, 2], np.float32(np.inf))
    others = [{"y": nudged, "z": b}, {"y": a.astype(np.float64), "z": b}, {"y": a.reshape(3, 2), "z": b},
              {"w": a, "z": b}, {"y": a}]
    digests = {verify.outputs_digest(o) for o in others}
    assert len(digests) == len(others) and digest not in digests


def test_the_result_carries_the_digest_of_the_outputs_run_here(tiny, monkeypatch):
    _, paths = tiny
    real = runtimes.load_runner
    outputs = []

    def load_runner(*args, **kwargs):
        runner = real(*args, **kwargs)
        run = runner.run
        runner.run = lambda feeds: outputs.append(run(feeds)) or outputs[-1]
        return runner

    monkeypatch.setattr(runtimes, "load_runner", load_runner)
    result = verify.verify_manifest(paths["onnx"])
    assert result.status == "passed", result.reason
    assert len(outputs) == 1 and result.outputs_sha256 == verify.outputs_digest(outputs[0])
    assert result.as_json() == {
        "manifest": os.path.basename(paths["onnx"]), "artifact": result.name, "format": "onnx",
        "status": "passed", "reason": "", "metrics": result.metrics, "tolerance": result.tolerance,
        "outputs_sha256": result.outputs_sha256}


def test_companion_files_are_checked_in_the_manifests_folder(tiny):
    folder, paths = tiny
    data = b"const unsigned char g[] = {1, 2, 3};\n"
    with open(os.path.join(folder, "m_model.cc"), "wb") as f:
        f.write(data)
    entry = {"file": "m_model.cc", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert edited(paths["tflite"], files=[entry]).status == "passed"
    with open(os.path.join(folder, "m_model.cc"), "ab") as f:
        f.write(b"// edited\n")
    failed(verify.verify_manifest(paths["tflite"]), "file m_model.cc")


def test_golden_ids_outside_the_manifests_range_are_refused(tiny):
    """A golden file whose integer inputs leave the range the manifest records (the ids an
    Embedding takes) is refused before any runtime sees it."""
    folder, paths = tiny
    manifest = read(paths["onnx"])
    manifest["inputs"][0] |= {"dtype": "int32", "range": [0, 5]}
    del manifest["golden_raw"]  # optional; its float copy would disagree with the ids first
    write(paths["onnx"], manifest)

    def ids(arrays):
        values = np.random.default_rng(3).integers(0, 5, size=arrays["source1"].shape).astype(np.int32)
        values.flat[4] = 5
        return {**arrays, "source1": values}

    rewrite_golden(folder, paths["onnx"], ids)
    failed_with(verify.verify_manifest(paths["onnx"]), "golden input 'source1' holds 5, outside the "
                "manifest's range [0, 5)")


def test_the_formats_own_check_gets_the_artifact_its_manifest_and_folder(tiny, monkeypatch):
    """TFLM's arena and C++ checks (`Format.check_on_device`) see what verify verified."""
    from export.formats import Format

    folder, paths = tiny
    seen = []
    monkeypatch.setattr(Format, "check_on_device",
                        lambda self, path, manifest, where: seen.append((self.name, path, manifest, where)))
    assert verify.verify_manifest(paths["tflite"]).status == "passed"
    manifest = read(paths["tflite"])
    assert seen == [("tflite", os.path.join(folder, manifest["artifact"]), manifest, folder)]
