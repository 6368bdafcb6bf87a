"""Reproducible artifacts (issue 7): the same flags and weights give the same bytes, run after run.

Two separate processes export the same configuration; every artifact (ONNX, TFLite, every file of
the SavedModel) and the golden file must be byte-identical and the manifests equal but for
`created`. The `.keras` reference is not an artifact and is not compared: Keras stamps the save
time into it (metadata.json `date_saved` and the zip entries' dates).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import onnx
import pytest
from conftest import REPO

from export.onnx.build import _GENERATED_NAME, canonicalize_initializers

FLAGS = ["--units", "8", "--heads", "2", "--query-len", "3", "--kv-len", "4",
         "--query-features", "5", "--kv-features", "6", "--query-mask", "--scores", "--seed", "7"]
NAME = "xattn_u8_h2_q3x5_kv4x6_qmask_scores"
ARTIFACTS = {"onnx": f"{NAME}.onnx", "tflite": f"{NAME}.tflite", "savedmodel": f"{NAME}_savedmodel"}
SMALL = dict(units=32, heads=2, query_len=12, query_features=16, kv_len=5, kv_features=24)


def file_hashes(path: str) -> dict[str, str]:
    """relative path -> sha256 of each file under `path` (or of `path` itself)."""
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, n) for root, _, names in os.walk(path) for n in names
    )
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[os.path.relpath(p, os.path.dirname(path))] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same `python -m export` twice, as two processes (run side by side)."""
    folders = [str(tmp_path_factory.mktemp(f"run{i}")) for i in (1, 2)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "export", *FLAGS, "--output-dir", d, "--quiet"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for d in folders
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return folders


@pytest.mark.parametrize("fmt", list(ARTIFACTS))
def test_artifact_bytes_are_reproducible(two_runs, fmt):
    a, b = (file_hashes(os.path.join(d, ARTIFACTS[fmt])) for d in two_runs)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    assert not differ, f"these files differ between two identical exports: {differ}"
    manifests = []
    for d in two_runs:
        with open(os.path.join(d, ARTIFACTS[fmt] + ".json"), encoding="utf-8") as f:
            manifests.append(json.load(f))
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    for m in manifests:
        m.pop("created")
        # The reference's sha256 holds the `.keras` save time too (flaky across a second).
        m.pop("reference_sha256")
    assert manifests[0] == manifests[1]


@pytest.mark.parametrize("fmt", ["onnx", "ort"])
def test_int8_file_is_reproducible(tmp_path, fmt):
    """Weight-only int8 (issue 13) from two processes run side by side: the same bytes."""
    folders = [str(tmp_path / f"run{i}") for i in (1, 2)]
    procs = [
        subprocess.Popen([sys.executable, "-m", f"export.{fmt}", *FLAGS, "--quantize", "int8",
                          "--output-dir", d, "--quiet"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for d in folders
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a, b = (file_hashes(os.path.join(d, f"{NAME}_int8.{fmt}")) for d in folders)
    assert a == b


def test_golden_file_is_reproducible(two_runs):
    a, b = (file_hashes(os.path.join(d, f"{NAME}.golden.npz")) for d in two_runs)
    assert a == b


def test_onnx_canonical_form_ignores_tf2onnx_numbering(artifact_factory):
    """Shuffled initializers and renumbered `__N` constants canonicalize to the same bytes."""
    _, results = artifact_factory(**SMALL)
    model = onnx.load(results["onnx"].path)
    generated = [t.name for t in model.graph.initializer if _GENERATED_NAME.match(t.name)]
    assert generated, "expected tf2onnx-numbered constants in the graph"
    rng = random.Random(0)
    shuffled = onnx.ModelProto.FromString(model.SerializeToString())
    numbers = rng.sample(range(100, 1000), len(generated))
    renames = {n: f"{n.rsplit('__', 1)[0]}__{k}" for n, k in zip(generated, numbers)}
    for t in shuffled.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in shuffled.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    order = list(shuffled.graph.initializer)
    rng.shuffle(order)
    order = [type(t).FromString(t.SerializeToString()) for t in order]
    del shuffled.graph.initializer[:]
    shuffled.graph.initializer.extend(order)
    assert shuffled.SerializeToString() != model.SerializeToString()
    canonicalize_initializers(shuffled)
    assert shuffled.SerializeToString() == model.SerializeToString()
    onnx.checker.check_model(shuffled, full_check=True)
