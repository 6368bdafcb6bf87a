"""`python -m export.verify` (issue 7): published artifacts pass; tampering, unsafe paths and broken
manifests fail with one line naming the file; usage errors exit 2; no TensorFlow needed.

Artifacts come from the session `artifact_factory`; every test that changes a file works on its
own copy of the folder.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import REPO
from conftest import read_json as load
from conftest import write_json as save

from export import publish
from export.errors import UsageError
from export.runtime import runtimes, verify
from export.runtime.verify.cli import main as verify_main

FORMATS = ("savedmodel", "tflite", "onnx")
# The configuration test_export.py calls SMALL, and test_masks.py's masks-and-scores one: when the
# suites run together the session factory builds each once.
SMALL = dict(units=32, heads=2, query_len=12, query_features=16, kv_len=5, kv_features=24)
MASKS = dict(units=8, heads=2, query_len=6, kv_len=9, query_features=5, kv_features=7,
             query_mask=True, value_mask=True, causal=True, scores=True)
CONFIGS = {"u32-h2-q12x16-kv5x24": SMALL, "u8-h2-masks-causal-scores": MASKS}
HEAVY = ("tensorflow", "keras", "tf2onnx")


@pytest.fixture()
def small(artifact_factory, tmp_path):
    """A private copy of the SMALL folder: (folder, {fmt: manifest path})."""
    out, results = artifact_factory(**SMALL)
    folder = tmp_path / "out"
    shutil.copytree(out, folder, symlinks=True)
    return str(folder), {
        fmt: os.path.join(folder, os.path.basename(r.manifest_path)) for fmt, r in results.items()
    }


def flip_byte(path: str, offset: int | None = None) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        i = len(data) // 2 if offset is None else offset
        data[i] ^= 0x40
        f.seek(0)
        f.write(data)


def assert_failed(result: verify.VerifyResult, *needles: str) -> None:
    assert result.status == "failed", result
    assert "\n" not in result.reason
    assert not result.reason.startswith("unexpected"), result.reason
    for needle in needles:
        assert needle in result.reason, result.reason


# -- what was published passes ---------------------------------------------------------------------


@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_published_artifacts_pass(artifact_factory, config_id):
    out, results = artifact_factory(**CONFIGS[config_id])
    found = {r.format: r for r in verify.verify_path(out)}
    assert sorted(found) == sorted(FORMATS)
    for fmt, r in found.items():
        assert r.status == "passed", r
        assert r.name == os.path.basename(results[fmt].path)
        assert r.metrics["max_abs"] <= results[fmt].parity["atol"]
        assert r.line().startswith(f"✓ {r.name}  max abs diff ")


def test_cli_lines_summary_and_exit_code(small, capsys):
    folder, manifests = small
    assert verify_main([folder]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    names = sorted(load(m)["artifact"] for m in manifests.values())
    assert sorted(line.split()[1] for line in lines[:3]) == names
    assert all(line.startswith("✓ ") and "max abs diff" in line for line in lines[:3])
    assert lines[3].startswith("3 passed, 0 failed")

    flip_byte(os.path.join(folder, load(manifests["onnx"])["artifact"]))
    assert verify_main([folder]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = [line for line in lines if line.startswith("✗")]
    assert len(bad) == 1 and load(manifests["onnx"])["artifact"] in bad[0]
    assert "sha256 mismatch" in bad[0]
    assert lines[-1].startswith("2 passed, 1 failed")


def test_path_may_be_one_manifest_or_an_artifact(small):
    folder, manifests = small
    for fmt, manifest in manifests.items():
        artifact = os.path.join(folder, load(manifest)["artifact"])
        for path in (manifest, artifact):
            (result,) = verify.verify_path(path)
            assert result.status == "passed" and result.format == fmt


def test_without_tensorflow_keras_tf2onnx(small):
    """The entry point in a process where importing tensorflow, keras or tf2onnx fails."""
    folder, manifests = small
    poison = "; ".join(f"sys.modules[{m!r}] = None" for m in HEAVY)
    code = (
        f"import runpy, sys; {poison}; sys.argv = ['export.verify', {folder!r}]; "
        "runpy.run_module('export.verify', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    saved = load(manifests["savedmodel"])["artifact"]
    assert f"- {saved}  not run: tensorflow is not importable here" in proc.stdout
    assert sum(line.startswith("✓ ") for line in lines) == 2
    assert lines[-1].startswith("2 passed, 0 failed, 1 not run")


def test_missing_runtime_is_not_run_but_sha256_still_counts(small, monkeypatch):
    folder, manifests = small
    available = runtimes.runtime_available
    monkeypatch.setattr(runtimes, "runtime_available", lambda fmt: fmt != "tflite" and available(fmt))
    result = verify.verify_manifest(manifests["tflite"])
    assert result.status == "not run" and "ai-edge-litert is not importable" in result.reason
    assert verify_main([folder]) == 0
    flip_byte(os.path.join(folder, load(manifests["tflite"])["artifact"]))
    assert_failed(verify.verify_manifest(manifests["tflite"]), "sha256 mismatch")


# -- tampering -------------------------------------------------------------------------------------


def _flip_savedmodel_weights(folder, manifest):
    saved = os.path.join(folder, manifest["artifact"], "variables")
    data = [n for n in os.listdir(saved) if n.startswith("variables.data")][0]
    flip_byte(os.path.join(saved, data))


TAMPERING = {
    # id: (format, change(folder, manifest dict) -> manifest dict to save or None, expected reason)
    "onnx-flipped-byte": ("onnx", lambda d, m: flip_byte(os.path.join(d, m["artifact"])),
                          "sha256 mismatch"),
    "tflite-flipped-byte": ("tflite", lambda d, m: flip_byte(os.path.join(d, m["artifact"])),
                            "sha256 mismatch"),
    "savedmodel-flipped-weight": ("savedmodel", _flip_savedmodel_weights, "sha256 mismatch"),
    "tflite-truncated": (
        "tflite", lambda d, m: os.truncate(os.path.join(d, m["artifact"]), 100), "truncated"),
    "artifact-deleted": ("onnx", lambda d, m: os.remove(os.path.join(d, m["artifact"])), "missing"),
    "golden-truncated": (
        "onnx", lambda d, m: os.truncate(os.path.join(d, m["golden"]), 500), "golden file"),
    "manifest-sha256-edited": ("onnx", lambda d, m: {**m, "sha256": "0" * 64}, "sha256 mismatch"),
    "manifest-bytes-edited": ("tflite", lambda d, m: {**m, "bytes": m["bytes"] + 1}, "bytes"),
    "missing-field": ("onnx", lambda d, m: {k: v for k, v in m.items() if k != "sha256"},
                      "lacks the field(s) sha256"),
    "inputs-wrong-type": ("onnx", lambda d, m: {**m, "inputs": "source1"}, "'inputs' must be"),
    "shape-wrong-type": (
        "onnx", lambda d, m: {**m, "inputs": [{**m["inputs"][0], "shape": "big"}, *m["inputs"][1:]]},
        "shape must be"),
    "unknown-format": ("onnx", lambda d, m: {**m, "format": "pickle"}, "format 'pickle'"),
    "no-tolerance": ("onnx", lambda d, m: {**m, "parity": {}}, "no tolerance"),
    "negative-atol": ("onnx", lambda d, m: {**m, "parity": {"atol": -1}}, "positive number"),
    "nan-atol": ("onnx", lambda d, m: {**m, "parity": {"atol": float("nan")}}, "positive number"),
    "atol-too-tight": ("tflite", lambda d, m: {**m, "parity": {"atol": 1e-15}}, "exceeds atol"),
    "max-rel-too-tight": (
        "onnx", lambda d, m: {**m, "parity": {"max_rel_error": 1e-15}}, "exceeds max_rel_error"),
    "output-name-unknown": (
        "onnx", lambda d, m: {**m, "outputs": [{**m["outputs"][0], "name": "logits"}]},
        "no array 'logits'"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_fails_with_a_reason(small, case):
    folder, manifests = small
    fmt, change, needle = TAMPERING[case]
    manifest = load(manifests[fmt])
    changed = change(folder, manifest)
    if changed is not None:
        save(manifests[fmt], changed)
    result = verify.verify_manifest(manifests[fmt])
    assert_failed(result, needle)
    others = [verify.verify_manifest(m) for f, m in manifests.items() if f != fmt]
    if case not in ("golden-truncated",):  # the golden file is shared by every format
        assert all(r.status == "passed" for r in others), others


def test_edited_golden_outputs_fail_parity_without_golden_sha256(small):
    """With golden_sha256 the edit is a sha256 mismatch; without it, parity catches it."""
    folder, manifests = small
    manifest = load(manifests["onnx"])
    golden = os.path.join(folder, manifest["golden"])
    with np.load(golden, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["output"] = arrays["output"] + np.float32(1e-2)
    publish.write_npz(golden, arrays)
    assert_failed(verify.verify_manifest(manifests["onnx"]), "golden file", "sha256 mismatch")
    del manifest["golden_sha256"]
    save(manifests["onnx"], manifest)
    # The raw pair beside it (export.runtime.golden_raw) still holds the published values.
    assert_failed(verify.verify_manifest(manifests["onnx"]),
                  "golden_raw array output holds other values than the golden file's (1536 of 1536 differ)")
    del manifest["golden_raw"]
    save(manifests["onnx"], manifest)
    assert_failed(verify.verify_manifest(manifests["onnx"]), "max abs diff", "exceeds atol")


def test_golden_array_of_wrong_shape_or_object_dtype(small):
    folder, manifests = small
    manifest = load(manifests["onnx"])
    del manifest["golden_sha256"]
    save(manifests["onnx"], manifest)
    golden = os.path.join(folder, manifest["golden"])
    with np.load(golden, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    publish.write_npz(golden, {**arrays, "source1": arrays["source1"][:, :-1]})
    assert_failed(verify.verify_manifest(manifests["onnx"]), "golden array source1.npy", "shape")
    # An object array (a pickle inside the .npy) is refused from its header, never unpickled.
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)
    with zipfile.ZipFile(golden, "w") as zf:
        for name, array in arrays.items():
            if name != "output":
                zf.writestr(f"{name}.npy", _npy_bytes(array))
        zf.writestr("output.npy", buffer.getvalue())
    assert_failed(verify.verify_manifest(manifests["onnx"]), "output.npy has dtype object")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_manifest_not_json_or_not_an_object(small):
    _, manifests = small
    with open(manifests["onnx"], "wb") as f:
        f.write(b"\x00\xffnot json")
    assert_failed(verify.verify_manifest(manifests["onnx"]), "not UTF-8")
    with open(manifests["onnx"], "w") as f:
        f.write('{"format": "onnx", ')
    assert_failed(verify.verify_manifest(manifests["onnx"]), "not JSON")
    with open(manifests["onnx"], "w") as f:
        f.write("[" * 100_000)
    assert_failed(verify.verify_manifest(manifests["onnx"]), "not JSON")
    save(manifests["onnx"], [1, 2])
    assert_failed(verify.verify_manifest(manifests["onnx"]), "JSON list, not an object")


# -- paths that leave the folder -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["artifact", "golden", "reference"])
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink-outside"])
def test_paths_leaving_the_folder_are_refused(small, tmp_path, key, how):
    folder, manifests = small
    manifest = load(manifests["tflite"])
    original = os.path.join(folder, manifest[key])
    # The same bytes outside the folder: only the path can be the reason for refusing.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    copy = outside / manifest[key]
    shutil.copyfile(original, copy)
    if how == "absolute":
        manifest[key] = str(copy)
    elif how == "dotdot":
        manifest[key] = os.path.join("..", "elsewhere", manifest[key])
    else:
        os.remove(original)
        os.symlink(copy, original)
    save(manifests["tflite"], manifest)
    assert_failed(verify.verify_manifest(manifests["tflite"]), f"refusing {key} path")


def test_symlink_inside_a_savedmodel_is_refused(small, tmp_path):
    folder, manifests = small
    manifest = load(manifests["savedmodel"])
    variables = os.path.join(folder, manifest["artifact"], "variables")
    moved = tmp_path / "variables"
    shutil.move(variables, moved)
    os.symlink(moved, variables)
    assert_failed(verify.verify_manifest(manifests["savedmodel"]), "symlink")


def test_symlink_inside_the_folder_is_fine(small):
    folder, manifests = small
    manifest = load(manifests["onnx"])
    os.rename(os.path.join(folder, manifest["artifact"]), os.path.join(folder, "real.onnx"))
    os.symlink("real.onnx", os.path.join(folder, manifest["artifact"]))
    assert verify.verify_manifest(manifests["onnx"]).status == "passed"


# -- usage errors ----------------------------------------------------------------------------------


def test_usage_errors_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "settings.json").write_text("{}")
    (tmp_path / "model.bin").write_bytes(b"x")
    for path, needle in (
        (tmp_path / "nope", "no such file"),
        (tmp_path / "empty", "no manifests"),
        (tmp_path / "other", "no manifests"),
        (tmp_path / "model.bin", "neither a manifest"),
    ):
        with pytest.raises(UsageError, match=needle):
            verify.verify_path(str(path))
        assert verify_main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err
    with pytest.raises(SystemExit) as e:
        verify_main([])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
