"""The manifest module on its own (issue 17): the fields `build_manifest` writes and their order,
int8-io tensors, `quantization_entry`, the bytes `write_manifest` writes, and the readers' checks
called directly on small hand-made files (no artifact is built here).
"""

from __future__ import annotations

import io
import os
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from export.errors import ManifestError
from export.formats import Built
from export.runtime import manifest as manifests
from export.spec import ArtifactSpec

SPEC = ArtifactSpec(units=4, heads=1, query_len=2, kv_len=3, query_features=3, kv_features=2, batch=1,
                    quantize="int8", int8_io=True)
IO_QUANT = {"source1": {"scale": 0.5, "zero_point": -3}, "output": {"scale": 0.25, "zero_point": 1}}


def build(**changes) -> dict:
    fields = dict(
        fmt="tflite", spec=SPEC,
        built=Built(path="/stage/m_int8io.tflite", facts={"io_quantization": IO_QUANT, "opset": 13}),
        facts={"config": {"units": 4}, "shapes": {"query_len": 2}}, layout="per-head",
        reference_sha256="r" * 64, golden_sha256="g" * 64, golden_raw={"index": "i"},
        parity={"atol": 1e-4}, quantization={"mode": "int8"}, weights="seed 0",
        versions={"xattn": "0.1"}, created="2026-01-01T00:00:00Z", sha256="s" * 64, size=123,
    )
    fields.update(changes)
    return manifests.build_manifest(**fields)


def test_build_manifest_writes_every_field_in_order():
    manifest = build()
    assert list(manifest) == [
        "format", "artifact", "sha256", "bytes", "inputs", "outputs", "config", "shapes", "layout",
        "reference", "reference_sha256", "golden", "golden_sha256", "golden_raw", "opset",
        "quantization", "parity", "weights", "versions", "created"]
    assert manifest["format"] == "tflite" and manifest["artifact"] == "m_int8io.tflite"
    assert (manifest["sha256"], manifest["bytes"]) == ("s" * 64, 123)
    assert manifest["config"] == {"units": 4} and manifest["shapes"] == {"query_len": 2}
    assert manifest["layout"] == "per-head" and manifest["opset"] == 13
    assert manifest["reference"] == f"{SPEC.name}.keras" and manifest["reference_sha256"] == "r" * 64
    assert manifest["golden"] == f"{SPEC.name}.golden.npz" and manifest["golden_sha256"] == "g" * 64
    assert manifest["golden_raw"] == {"index": "i"} and manifest["parity"] == {"atol": 1e-4}
    assert manifest["quantization"] == {"mode": "int8"} and manifest["weights"] == "seed 0"
    assert manifest["versions"] == {"xattn": "0.1"} and manifest["created"] == "2026-01-01T00:00:00Z"


def test_int8_io_tensors_carry_their_dtype_and_quantization():
    manifest = build()
    assert manifest["inputs"] == [
        {"name": "source1", "shape": [1, 2, 3], "dtype": "int8", "quantization": IO_QUANT["source1"]},
        {"name": "source2", "shape": [1, 3, 2], "dtype": "float32"},
    ]
    assert manifest["outputs"] == [
        {"name": "output", "shape": [1, 2, 4], "dtype": "int8", "quantization": IO_QUANT["output"]}]
    # A float file: its facts go in as they are, and no tensor is int8.
    plain = build(built=Built(path="m.onnx", facts={"opset": 17}))
    assert plain["opset"] == 17 and "io_quantization" not in plain
    assert [t["dtype"] for t in plain["inputs"] + plain["outputs"]] == ["float32"] * 3
    assert not any("quantization" in t for t in plain["inputs"] + plain["outputs"])


def test_optional_fields_appear_only_when_given():
    companions = [{"file": "m.cc", "sha256": "c" * 64, "bytes": 7}]
    manifest = build(golden_name="m.len_3.golden.npz", signatures=[{"key": "len_3"}],
                     file_metadata={"format": "tflite"}, deployment={"ops": 1}, files=companions)
    assert manifest["files"] == companions  # TFLM's generated C++, after the file's own bytes
    assert list(manifest).index("files") == list(manifest).index("bytes") + 1
    assert manifest["golden"] == "m.len_3.golden.npz"
    assert manifest["signatures"] == [{"key": "len_3"}]
    assert manifest["file_metadata"] == {"format": "tflite"} and manifest["deployment"] == {"ops": 1}
    assert list(manifest).index("signatures") == list(manifest).index("golden_raw") + 1
    assert list(manifest).index("file_metadata") == list(manifest).index("quantization") + 1
    assert list(manifest).index("deployment") == list(manifest).index("parity") + 1
    for absent in (build(signatures=[], file_metadata=None, deployment=None, files=[]), build()):
        assert not {"signatures", "file_metadata", "deployment", "files"} & set(absent)
    assert "file_metadata" in build(file_metadata={}) and "deployment" in build(deployment={})


def test_quantization_entry():
    calibration = SimpleNamespace(describe=lambda: {"source": "rows.npz"}, n_samples=64)
    assert manifests.quantization_entry(SPEC, calibration) == {
        "mode": "int8", "scheme": "full-integer", "weights": "int8", "activations": "int8, calibrated",
        "io_dtype": "int8", "calibration": {"source": "rows.npz"}, "n_samples": 64}
    assert manifests.quantization_entry(SPEC.replace(int8_io=False), None, "weight-only") == {
        "mode": "int8", "scheme": "weight-only", "weights": "int8 symmetric, per output channel",
        "activations": "float32", "io_dtype": "float32", "calibration": None, "n_samples": 0}
    plain = ArtifactSpec(units=4, heads=1, quantize="dynamic-int8")
    assert manifests.quantization_entry(plain, None) == {
        "mode": "dynamic-int8", "scheme": "dynamic-range", "io_dtype": "float32",
        "calibration": None, "n_samples": 0}
    half = ArtifactSpec(units=4, heads=1, quantize="float16")
    assert manifests.quantization_entry(half, None)["scheme"] == "float16"
    assert manifests.quantization_entry(ArtifactSpec(units=4, heads=1), None)["scheme"] == "float32"
    # int8-cpu (ONNX/ORT): int8 but for the attention core, calibrated, its io float32.
    cpu = ArtifactSpec(units=4, heads=1, quantize="int8-cpu")
    assert manifests.quantization_entry(cpu, calibration, "full-integer") == {
        "mode": "int8-cpu", "scheme": "selective-integer", "weights": "int8",
        "activations": "int8, calibrated; attention core (BATCH_MATMULs, softmax) float32",
        "io_dtype": "float32", "calibration": {"source": "rows.npz"}, "n_samples": 64}


def test_write_manifest_bytes(tmp_path):
    path = tmp_path / "m.json"
    manifests.write_manifest(str(path), {"z": 1, "a": ["é", None]})
    assert path.read_bytes() == b'{\n  "z": 1,\n  "a": [\n    "\\u00e9",\n    null\n  ]\n}\n'
    assert manifests.read_manifest(str(path)) == {"z": 1, "a": ["é", None]}


# -- reading -------------------------------------------------------------------------------------


def reading_error(path) -> str:
    with pytest.raises(ManifestError) as e:
        manifests.read_manifest(str(path))
    return str(e.value)


def test_read_manifest_refusals(tmp_path, monkeypatch):
    assert reading_error(tmp_path) == "manifest is not a file"
    path = tmp_path / "m.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert reading_error(path) == "manifest is not JSON: nested too deeply"
    path.write_text('{"n": ' + "1" * 5000 + "}")  # int() refuses more than 4300 digits
    assert reading_error(path).startswith(
        "manifest cannot be read: Exceeds the limit (4300 digits) for integer string conversion")
    path.write_text("[1, 2]")
    monkeypatch.setattr(manifests, "MAX_MANIFEST_BYTES", 6)  # the limit itself is allowed
    assert reading_error(path) == "manifest is a JSON list, not an object"
    monkeypatch.setattr(manifests, "MAX_MANIFEST_BYTES", 5)
    assert reading_error(path) == "manifest is 6 bytes; not a manifest"


def fields_error(**changes) -> str:
    manifest = {"format": "onnx", "artifact": "a.onnx", "sha256": "ab" * 32, "inputs": [], "outputs": [],
                "golden": "g.npz", "parity": {}, **changes}
    with pytest.raises(ManifestError) as e:
        manifests.check_fields(manifest)
    return str(e.value)


def test_check_fields_messages():
    assert fields_error(reference=3) == "manifest field 'reference' must be a JSON string"
    assert fields_error(reference="r.keras") == "manifest names a reference but gives no reference_sha256"
    assert fields_error(sha256="xyz") == "manifest sha256 'xyz' is not 64 hex digits"
    short = fields_error(sha256="a" * 63)
    assert short.startswith("manifest sha256 'aaaa") and short.endswith("...' is not 64 hex digits")
    assert fields_error(golden_sha256=["a"]) == "manifest golden_sha256 ['a'] is not 64 hex digits"
    manifests.check_fields({"format": "onnx", "artifact": "a", "sha256": "aB" * 32, "inputs": [],
                            "outputs": [], "golden": "g", "parity": {}, "golden_sha256": "0" * 64})


def test_tolerance_and_dtype_messages():
    with pytest.raises(ManifestError) as e:
        manifests.tolerance_of({"rtol": 1})
    assert str(e.value) == "manifest parity gives no tolerance (atol or max_rel_error)"
    assert [manifests._is_number_dtype(d) for d in ("bool", "int8", "uint16", "float32")] == [True] * 4
    assert [manifests._is_number_dtype(d) for d in ("complex64", "str", "float99", 5, None)] == [False] * 5


def test_paths_inside_the_folder(tmp_path):
    folder = str(tmp_path)
    for relative in ("/etc/passwd", "\\\\server\\share", "..\\x.npz", "sub\\..\\..\\x.npz", "C:", "C:x"):
        with pytest.raises(ManifestError) as e:
            manifests.path_inside(folder, relative, "golden")
        assert str(e.value) == (f"refusing golden path {relative!r}: it leaves the manifest's folder")
    assert manifests.path_inside(folder, "g", "golden") == os.path.join(os.path.realpath(folder), "g")
    assert manifests.path_inside(folder, "a\\b", "golden").endswith("a\\b")  # a name on POSIX


def test_check_reference(tmp_path, monkeypatch):
    folder = str(tmp_path)
    (tmp_path / "r.keras").write_bytes(b"reference")
    digest = manifests.sha256_path(str(tmp_path / "r.keras"))
    manifests.check_reference(folder, {"reference": "r.keras", "reference_sha256": digest.upper()})
    manifests.check_reference(folder, {})  # no reference named: nothing to check

    def reference_error(manifest) -> str:
        with pytest.raises(ManifestError) as e:
            manifests.check_reference(folder, manifest)
        return str(e.value)

    assert reference_error({"reference": "../r.keras", "reference_sha256": digest}) == (
        "refusing reference path '../r.keras': it leaves the manifest's folder")
    assert reference_error({"reference": "r.keras", "reference_sha256": "0" * 64}) == (
        f"reference r.keras sha256 mismatch: {digest[:12]}..., the manifest 000000000000... "
        "(replaced or modified)")

    def unreadable(path):
        raise OSError("Input/output error\nsecond line")

    monkeypatch.setattr(manifests, "sha256_path", unreadable)
    assert reference_error({"reference": "r.keras", "reference_sha256": digest}) == (
        "reference r.keras cannot be read: Input/output error")


# -- golden files ----------------------------------------------------------------------------------


def write_npz(path, arrays: dict, *, truncate: str | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            data = buffer.getvalue()
            zf.writestr(f"{name}.npy", data[:-4] if name == truncate else data)


def golden_error(path, tensors, **manifest) -> str:
    with pytest.raises(ManifestError) as e:
        manifests.load_golden(str(path), {"golden": "g.npz", **manifest}, tensors)
    return str(e.value)


def tensor(name="a", shape=(None, 3), dtype="float32") -> dict:
    return {"name": name, "shape": list(shape), "dtype": dtype}


def test_golden_sha256(tmp_path, monkeypatch):
    path = tmp_path / "g.npz"
    write_npz(path, {"a": np.zeros((2, 3), np.float32)})
    digest = manifests.sha256_path(str(path))
    assert manifests.load_golden(str(path), {"golden": "g.npz", "golden_sha256": digest.upper()},
                                 [tensor()])["a"].shape == (2, 3)
    assert golden_error(path, [tensor()], golden_sha256="f" * 64) == (
        f"golden file g.npz sha256 mismatch: {digest[:12]}..., the manifest ffffffffffff... "
        "(modified or corrupted)")

    def unreadable(path):
        raise OSError("Input/output error\nsecond line")

    monkeypatch.setattr(manifests, "sha256_path", unreadable)
    assert golden_error(path, [tensor()], golden_sha256=digest) == (
        "golden file g.npz cannot be read: Input/output error")


def test_golden_arrays_against_the_manifest(tmp_path, monkeypatch):
    path = tmp_path / "g.npz"

    def check(arrays, tensors, **kwargs):
        write_npz(path, arrays, **kwargs)
        return golden_error(path, tensors)

    assert check({"a": np.zeros((2, 3))}, [tensor(), tensor("b")]) == "golden file g.npz has no array 'b'"
    assert check({"a": np.array(["abc"] * 2)}, [tensor(shape=[None])]) == (
        "golden array a.npy has dtype <U3, not numbers")
    assert check({"a": np.zeros((2, 4))}, [tensor()]) == (
        "golden array a.npy has shape (2, 4), the manifest (B, 3)")
    assert check({"a": np.zeros((2, 1, 3))}, [tensor(shape=[None, 2, 3])]) == (
        "golden array a.npy has shape (2, 1, 3), the manifest (B, 2, 3)")
    # A fixed batch: the rows are a positive multiple of it.
    assert check({"a": np.zeros((3, 3))}, [tensor(shape=[2, 3])]) == (
        "golden array a.npy has shape (3, 3), the manifest (2, 3)")
    assert check({"a": np.zeros((0, 3))}, [tensor(shape=[2, 3])]) == (
        "golden array a.npy has shape (0, 3), the manifest (2, 3)")
    for rows, batch in ((4, 2), (1, 1), (2, 1)):
        write_npz(path, {"a": np.zeros((rows, 3))})
        assert manifests.load_golden(str(path), {"golden": "g.npz"},
                                     [tensor(shape=[batch, 3], dtype=None)])["a"].shape == (rows, 3)
    # A scalar has no samples axis.
    assert check({"a": np.float32(1)}, [tensor(shape=[])]) == (
        "golden file g.npz: arrays disagree on the number of samples ['None']")
    assert check({"a": np.zeros((2, 3), np.float32)}, [tensor()], truncate="a") == (
        "golden array a.npy is 20 bytes of data, its header promises 24 (truncated or edited)")
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert golden_error(path, [tensor()]) == "golden file g.npz is damaged: File is not a zip file"


def test_golden_size_limit_is_inclusive(tmp_path, monkeypatch):
    path = tmp_path / "g.npz"
    write_npz(path, {"a": np.zeros((2, 3), np.float32)})
    with zipfile.ZipFile(path) as zf:
        total = sum(i.file_size for i in zf.infolist())
    monkeypatch.setattr(manifests, "MAX_GOLDEN_BYTES", total)
    assert manifests.load_golden(str(path), {"golden": "g.npz"}, [tensor()])["a"].shape == (2, 3)
    monkeypatch.setattr(manifests, "MAX_GOLDEN_BYTES", total - 1)
    assert golden_error(path, [tensor()]) == f"golden file g.npz would inflate to {total} bytes; refusing"



# -- the pure checks export.runtime.verify applies: companions, tensors and their id ranges -----------


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_check_files_accepts_companions_with_their_sha256_and_names_each_failure(tmp_path):
    from export.errors import ManifestError
    from export.runtime.manifest import check_files

    (tmp_path / "m.cc").write_bytes(b"const unsigned char g[] = {1};\n")
    (tmp_path / "m.h").write_bytes(b"#pragma once\n")
    good = {"files": [{"file": "m.cc", "sha256": _sha(b"const unsigned char g[] = {1};\n")},
                      {"file": "m.h", "sha256": _sha(b"#pragma once\n")}]}
    check_files(str(tmp_path), good)
    check_files(str(tmp_path), {})  # no companions: nothing to check
    check_files(str(tmp_path), {"files": []})
    cases = [
        ({"files": {"file": "m.cc"}}, r"^manifest files must be a list, not \{'file': 'm\.cc'\}$"),
        ({"files": ["m.cc"]}, r"^manifest files entries must be \{file, sha256\}, not 'm.cc'"),
        ({"files": [{"file": "m.cc", "sha256": "0" * 63}]}, r"entries must be \{file, sha256\}"),
        ({"files": [{"file": "m.cc"}]}, r"entries must be \{file, sha256\}"),
        ({"files": [{"file": "../m.cc", "sha256": "0" * 64}]}, r"refusing files path '\.\./m\.cc'"),
        ({"files": [{"file": "gone.cc", "sha256": "0" * 64}]}, r"gone\.cc"),
        ({"files": [good["files"][0], {"file": "m.h", "sha256": "0" * 64}]}, r"file m\.h"),
    ]
    for manifest, message in cases:
        with pytest.raises(ManifestError, match=message):
            check_files(str(tmp_path), manifest)


def test_tensors_of_validates_names_shapes_dtypes_and_ranges():
    from export.errors import ManifestError
    from export.runtime.manifest import tensors_of

    ok = tensors_of([{"name": "ids", "shape": [None, 8], "dtype": "int32", "range": [0, 20]},
                     {"name": "x", "shape": [1, 8, 4], "dtype": "float32"}], "inputs")
    assert ok == [{"name": "ids", "shape": [None, 8], "dtype": "int32", "range": (0, 20)},
                  {"name": "x", "shape": [1, 8, 4], "dtype": "float32"}]
    assert tensors_of([{"name": "y", "shape": [1 << 31 - 1]}], "outputs")[0]["dtype"] is None
    cases = [
        ([], r"^manifest inputs is empty$"),
        ([{"shape": [1]}], r"^manifest inputs entries must be objects with a name$"),
        ([{"name": "", "shape": [1]}], r"objects with a name"),
        (["x"], r"objects with a name"),
        ([{"name": "x", "shape": "1,2"}], r"^manifest inputs 'x': shape must be a list of positive"),
        ([{"name": "x", "shape": [0]}], r"shape must be a list of positive ints or null"),
        ([{"name": "x", "shape": [True]}], r"shape must be"),
        ([{"name": "x", "shape": [1 << 31]}], r"shape must be"),
        ([{"name": "x", "shape": [1], "dtype": "str"}], r"^manifest inputs 'x': dtype 'str' is not"),
        ([{"name": "x", "shape": [1]}, {"name": "x", "shape": [1]}], r"^manifest inputs names 'x' twice$"),
        ([{"name": "i", "shape": [1], "dtype": "int32", "range": [5, 5]}],
         r"^manifest inputs 'i': range must be \[low, high\] integers with low < high, not \[5, 5\]"),
        ([{"name": "i", "shape": [1], "dtype": "int32", "range": [0, 1, 2]}], r"range must be"),
        ([{"name": "i", "shape": [1], "dtype": "int32", "range": [0.0, 3]}], r"range must be"),
        ([{"name": "i", "shape": [1], "dtype": "int32", "range": [False, 3]}], r"range must be"),
        ([{"name": "i", "shape": [1], "dtype": "int32", "range": "0,3"}], r"range must be"),
        ([{"name": "f", "shape": [1], "dtype": "float32", "range": [0, 3]}],
         r"^manifest inputs 'f': a range needs an integer dtype, not 'float32'$"),
        ([{"name": "f", "shape": [1], "range": [0, 3]}], r"a range needs an integer dtype, not None"),
    ]
    for entries, message in cases:
        with pytest.raises(ManifestError, match=message):
            tensors_of(entries, "inputs")
    # uint8 ids take a range too
    assert tensors_of([{"name": "u", "shape": [2], "dtype": "uint8", "range": [0, 9]}],
                      "inputs")[0]["range"] == (0, 9)


def test_check_golden_ranges_refuses_ids_outside_the_range_at_both_ends():
    from export.errors import ManifestError
    from export.runtime.manifest import check_golden_ranges

    # x, listed first, has no range: the ranged ids after it are still checked.
    inputs = [{"name": "x"}, {"name": "ids", "range": (0, 20)}]
    golden = {"ids": np.array([[0, 19, 7]], np.int32), "x": np.full((1, 3), 1e9, np.float32)}
    check_golden_ranges(golden, inputs)  # 0 and 19 are inside; x has no range
    for bad, value in ((20, "20"), (-1, "-1")):
        ids = golden["ids"].copy()
        ids[0, 1] = bad
        with pytest.raises(ManifestError,
                           match=rf"^golden input 'ids' holds {value}, outside the manifest's "
                                 r"range \[0, 20\)$"):
            check_golden_ranges({**golden, "ids": ids}, inputs)
