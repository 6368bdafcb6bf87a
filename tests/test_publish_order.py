"""Files go before the manifests that describe them, then the folder is fsynced (issue 17).

The renames into the output folder are recorded (and the folder checked after each one, as if
the process died there); the unit tests drive `export.publish.publish` on a staged folder.
"""

from __future__ import annotations

import json
import os

import pytest

from export import publish
from export.pipeline import ExportRequest, export_artifacts
from export.runtime import verify
from export.spec import ArtifactSpec

TINY = dict(units=4, heads=1, query_len=2, kv_len=3, query_features=3, kv_features=2)


def fd_path(fd: int) -> str:
    return os.path.realpath(f"/proc/self/fd/{fd}")


@pytest.fixture()
def recorder(monkeypatch):
    """Every os.replace and os.fsync, in order: ("replace", src, dst) / ("fsync", path)."""
    calls = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        calls.append(("replace", os.fspath(src), os.fspath(dst)))

    def fsync(fd):
        real_fsync(fd)
        calls.append(("fsync", fd_path(fd)))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def names_of(manifest: dict) -> list[str]:
    """Every file a manifest names in its folder."""
    names = [manifest["artifact"], manifest["golden"], manifest["reference"]]
    raw = manifest.get("golden_raw") or {}
    names += [raw[k] for k in ("index", "data") if k in raw]
    return names


# -- publish() itself --------------------------------------------------------------------------------


def test_publish_renames_in_order_then_fsyncs_the_folder(tmp_path, recorder):
    stage, out = tmp_path / "stage", tmp_path / "out"
    stage.mkdir()
    out.mkdir()
    (stage / "m.onnx").write_bytes(b"new model")
    (stage / "m_savedmodel").mkdir()
    (stage / "m_savedmodel" / "saved_model.pb").write_bytes(b"new graph")
    (stage / "m.onnx.json").write_text("{}")
    (out / "m.onnx").write_bytes(b"old model")
    (out / "m_savedmodel").mkdir()
    (out / "m_savedmodel" / "old.pb").write_bytes(b"old graph")
    names = ["m.onnx", "m_savedmodel", "m.onnx.json"]

    published = publish.publish(str(stage), str(out), names)

    assert published == [str(out / n) for n in names]
    into_out = [os.path.basename(c[2]) for c in recorder
                if c[0] == "replace" and os.path.dirname(c[2]) == str(out)]
    assert into_out == names
    # The old folder went aside into a trash folder first, and the trash is gone.
    aside = [c for c in recorder if c[0] == "replace" and c[1] == str(out / "m_savedmodel")]
    assert len(aside) == 1 and os.path.basename(os.path.dirname(aside[0][2])).startswith(publish.TRASH_PREFIX)
    assert recorder[-1] == ("fsync", os.path.realpath(out))
    assert (out / "m.onnx").read_bytes() == b"new model"
    assert os.listdir(out / "m_savedmodel") == ["saved_model.pb"]
    assert sorted(os.listdir(out)) == sorted(names)
    assert os.listdir(stage) == []


def test_publish_folder_into_an_empty_place(tmp_path, recorder):
    stage, out = tmp_path / "stage", tmp_path / "out"
    (stage / "m_savedmodel").mkdir(parents=True)
    (stage / "m_savedmodel" / "saved_model.pb").write_bytes(b"graph")
    out.mkdir()
    publish.publish(str(stage), str(out), ["m_savedmodel"])
    assert [c[0] for c in recorder] == ["replace", "fsync"]  # no trash folder when nothing is there
    assert os.listdir(out) == ["m_savedmodel"]


def test_fsync_dir_errors_are_ignored(tmp_path, monkeypatch):
    """Some file systems refuse to fsync a folder: the rename is still done."""
    def refuse(fd):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    publish._fsync_dir(str(tmp_path))
    publish._fsync_dir(str(tmp_path / "missing"))


# -- the pipeline's order ----------------------------------------------------------------------------


def test_export_publishes_files_before_manifests_and_no_manifest_dangles(tmp_path, recorder, monkeypatch):
    """An export over an earlier one (other weights): after every single rename into the folder
    (where a killed process would leave it), each manifest names files that exist, and each
    manifest this export has published already describes the files beside it byte for byte."""
    out = tmp_path / "out"
    specs = {"onnx": ArtifactSpec(**TINY), "tflite": ArtifactSpec(**TINY, batch=1)}
    export_artifacts(ExportRequest(specs=specs, output_dir=str(out), seed=0))
    del recorder[:]
    states = []
    real_replace = os.replace

    def replace_and_look(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.dirname(os.fspath(dst)) == str(out):
            states.append((os.path.basename(dst), folder_state(str(out))))

    monkeypatch.setattr(publish.os, "replace", replace_and_look)
    # The recorder's wrapper stays in place for fsync; renames are looked at here.
    results = export_artifacts(ExportRequest(specs=specs, output_dir=str(out), seed=1))

    new_manifests = {os.path.basename(r.manifest_path): r.manifest for r in results}
    renamed = [name for name, _ in states]
    assert set(new_manifests) <= set(renamed)
    for manifest_name, manifest in new_manifests.items():
        for name in names_of(manifest):
            assert renamed.index(name) < renamed.index(manifest_name), (name, manifest_name, renamed)
    for step, (name, state) in enumerate(states):
        for manifest_name, (manifest, present) in state.items():
            missing = [n for n in names_of(manifest) if n not in present]
            assert not missing, f"after {name} (step {step}): {manifest_name} names missing {missing}"
            if manifest_name in new_manifests and manifest_name in renamed[:step + 1]:
                assert present[manifest["artifact"]] == manifest["sha256"], (name, manifest_name)
                assert present[manifest["golden"]] == manifest["golden_sha256"], (name, manifest_name)
                assert present[manifest["reference"]] == manifest["reference_sha256"], (name, manifest_name)
    # The folder is fsynced once everything is in place.
    last_rename = max(i for i, c in enumerate(recorder)
                      if c[0] == "replace" and os.path.dirname(c[2]) == str(out))
    assert ("fsync", os.path.realpath(out)) in recorder[last_rename + 1:], recorder[last_rename:]
    # What was published, manifests written in this very process included, verifies.
    results = verify.verify_path(str(out))
    assert [r.status for r in results] == ["passed", "passed"], [r.reason for r in results]
    for manifest in new_manifests.values():
        assert {"format", "artifact", "sha256", "bytes", "inputs", "outputs", "layout", "reference",
                "reference_sha256", "golden", "golden_sha256", "golden_raw", "quantization",
                "file_metadata", "parity", "weights", "versions", "created"} <= set(manifest)
        assert manifest["weights"] == "seed 1" and manifest["quantization"]["mode"] == "none"
        assert manifest["inputs"][0]["name"] == "source1" and manifest["outputs"][0]["name"] == "output"
        assert ("deployment" in manifest) and "signatures" not in manifest


def folder_state(folder: str) -> dict[str, tuple[dict, dict[str, str]]]:
    """manifest name -> (its content, {name it gives: sha256 of that file or folder if present})."""
    state = {}
    for entry in os.listdir(folder):
        if not entry.endswith(".json") or entry.startswith(".") or entry.endswith(".golden.json"):
            continue
        with open(os.path.join(folder, entry), encoding="utf-8") as f:
            manifest = json.load(f)
        present = {n: publish.sha256_path(os.path.join(folder, n)) for n in names_of(manifest)
                   if os.path.exists(os.path.join(folder, n))}
        state[entry] = (manifest, present)
    return state
