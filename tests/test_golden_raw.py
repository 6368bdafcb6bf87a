"""export.runtime.golden_raw: the raw golden vectors a JS client reads, vs the .npz Python reads."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from export import publish
from export.runtime.golden_raw import ALIGN, read_golden_raw, write_golden_raw


def sample_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "source1": rng.standard_normal((3, 5, 7)).astype(np.float32),
        "source2": rng.standard_normal((3, 9, 4)).astype(np.float32),
        "query_mask": rng.random((3, 5)) > 0.3,  # bool, 15 bytes: the next array is padded
        "output": rng.standard_normal((3, 5, 8)).astype(np.float32),
        "half": rng.standard_normal((2, 3)).astype(np.float16),
        "ids": np.arange(6, dtype=">i8").reshape(2, 3),  # big-endian in, little-endian out
    }


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_round_trip_matches_the_npz(tmp_path):
    arrays = sample_arrays()
    publish.write_npz(str(tmp_path / "g.golden.npz"), arrays)
    entry = write_golden_raw(arrays, str(tmp_path), "g")
    assert entry == {
        "index": "g.golden.json", "data": "g.golden.bin",
        "sha256": sha256(tmp_path / "g.golden.bin"),
        "index_sha256": sha256(tmp_path / "g.golden.json"),
    }
    raw = read_golden_raw(str(tmp_path), entry["index"])
    with np.load(tmp_path / "g.golden.npz", allow_pickle=False) as npz:
        assert sorted(raw) == sorted(npz.files)
        for name in npz.files:
            assert raw[name].dtype == npz[name].dtype.newbyteorder("="), name
            assert raw[name].shape == npz[name].shape, name
            np.testing.assert_array_equal(raw[name], npz[name])


def test_index_layout(tmp_path):
    arrays = sample_arrays()
    write_golden_raw(arrays, str(tmp_path), "g")
    index = json.loads((tmp_path / "g.golden.json").read_text())
    data = (tmp_path / "g.golden.bin").read_bytes()
    assert index["byte_order"] == "little" and index["data"] == "g.golden.bin"
    assert index["bytes"] == len(data) and index["sha256"] == hashlib.sha256(data).hexdigest()
    assert list(index["arrays"]) == sorted(arrays)
    for name, e in index["arrays"].items():
        assert e["offset"] % ALIGN == 0, name
        assert e["bytes"] == arrays[name].nbytes, name
    mask = index["arrays"]["query_mask"]
    assert mask["dtype"] == "bool"
    assert data[mask["offset"]:mask["offset"] + mask["bytes"]] == (
        arrays["query_mask"].astype(np.uint8).tobytes())
    ids = index["arrays"]["ids"]
    assert ids["dtype"] == "int64"
    assert data[ids["offset"]:ids["offset"] + 8] == (0).to_bytes(8, "little")
    assert data[ids["offset"] + 8:ids["offset"] + 16] == (1).to_bytes(8, "little")


def test_deterministic_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    arrays = sample_arrays()
    first = write_golden_raw(arrays, str(a), "g")
    # Insertion order does not matter; only names and values do.
    second = write_golden_raw(dict(reversed(list(arrays.items()))), str(b), "g")
    assert first == second
    for name in ("g.golden.bin", "g.golden.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    changed = write_golden_raw(sample_arrays(seed=1), str(b), "g")
    assert changed["sha256"] != first["sha256"]


def test_refuses_arrays_js_cannot_view(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_golden_raw({"text": np.array(["a", "b"])}, str(tmp_path), "g")
    with pytest.raises(ValueError, match="dtype"):
        write_golden_raw({"c": np.ones(2, np.complex64)}, str(tmp_path), "g")


def test_tampered_data_is_refused(tmp_path):
    entry = write_golden_raw(sample_arrays(), str(tmp_path), "g")
    path = tmp_path / entry["data"]
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        read_golden_raw(str(tmp_path), entry["index"])
    assert not os.path.exists(tmp_path / "g.golden.npz")


def test_pipeline_publishes_raw_goldens_in_the_manifest(artifact_factory):
    """Every manifest names the raw pair beside its .npz, with the sha256 of both files."""
    fields = dict(units=8, heads=2, query_len=4, query_features=5, kv_len=6, kv_features=3,
                  query_mask=True, value_mask=True)
    out, results = artifact_factory(formats=("tflite", "onnx"), **fields)
    for result in results.values():
        entry = result.manifest["golden_raw"]
        name = result.spec.name
        assert entry["index"] == f"{name}.golden.json" and entry["data"] == f"{name}.golden.bin"
        assert entry["sha256"] == sha256(os.path.join(out, entry["data"]))
        assert entry["index_sha256"] == sha256(os.path.join(out, entry["index"]))
        raw = read_golden_raw(out, entry["index"])
        with np.load(os.path.join(out, result.manifest["golden"]), allow_pickle=False) as npz:
            assert sorted(raw) == sorted(npz.files)
            for key in npz.files:
                np.testing.assert_array_equal(raw[key], npz[key])
        assert raw["query_mask"].dtype == np.bool_
