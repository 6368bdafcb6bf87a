"""Several lengths in one artifact (issue 12): signatures per bucket, dynamic-length ONNX, named
axes, verification per signature, quantized buckets, the bucketed runner, the CLI's refusals."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from conftest import run_module

from export.buckets import parse_lengths
from export.errors import SpecError

SMALL = dict(units=8, heads=2, query_features=6, kv_features=7)
LENGTHS = parse_lengths("4,8")
STEM = "xattn_u8_h2_len4-8_f6x7"


@pytest.fixture(scope="session")
def bucketed(artifact_factory):
    return artifact_factory(lengths=LENGTHS, **SMALL)


def test_parse_lengths():
    assert parse_lengths("16,64,256") == ((16, 16), (64, 64), (256, 256))
    assert parse_lengths("64x128, 16x32") == ((16, 32), (64, 128))
    for bad in ("", "0", "4,a", "4x", "4x8x9", "-3"):
        with pytest.raises(SpecError, match="--lengths"):
            parse_lengths(bad)


def test_tflite_signatures_as_litert_reports_them(bucketed):
    from ai_edge_litert.interpreter import Interpreter

    out, results = bucketed
    interpreter = Interpreter(model_path=results["tflite"].path)
    signatures = interpreter.get_signature_list()
    assert sorted(signatures) == ["len_4", "len_8", "serving_default"]
    assert signatures["len_4"]["inputs"] == ["query_mask", "source1", "source2", "value_mask"]
    for key, length in (("len_4", 4), ("len_8", 8), ("serving_default", 8)):
        details = interpreter.get_signature_runner(key).get_input_details()
        assert list(details["source1"]["shape"]) == [1, length, 6]
        assert list(details["value_mask"]["shape"]) == [1, length]


def test_manifest_lists_every_signature(bucketed):
    out, results = bucketed
    for fmt, keys in (("tflite", ["len_4", "len_8", "serving_default"]),
                      ("savedmodel", ["len_4", "len_8", "serving_default"]),
                      ("onnx", ["len_1", "len_4", "len_8"])):
        manifest = results[fmt].manifest
        assert [s["key"] for s in manifest["signatures"]] == keys
        assert manifest["shapes"]["lengths"] == [[4, 4], [8, 8]]
        for entry in manifest["signatures"]:
            assert entry["parity"]["passed"] and entry["parity"]["max_abs"] <= entry["parity"]["atol"]
            assert os.path.isfile(os.path.join(out, entry["golden"]))
            length = 8 if entry["key"] == "serving_default" else int(entry["key"].split("_")[1])
            assert entry["inputs"][0]["shape"][1] == length
        assert manifest["golden"] == manifest["signatures"][-1]["golden"]
    assert results["onnx"].manifest["inputs"][0]["shape"] == [None, None, 6]
    assert results["tflite"].manifest["signatures"][0]["signature"] == "len_4"
    assert results["onnx"].manifest["signatures"][0]["signature"] is None


def test_onnx_axes_share_one_name(bucketed, tmp_path):
    import onnxruntime as ort

    _, results = bucketed
    session = ort.InferenceSession(results["onnx"].path, providers=["CPUExecutionProvider"])
    dims = {i.name: i.shape for i in session.get_inputs() + session.get_outputs()}
    assert dims == {
        "source1": ["batch", "query_len", 6], "source2": ["batch", "kv_len", 7],
        "query_mask": ["batch", "query_len"], "value_mask": ["batch", "kv_len"],
        "output": ["batch", "query_len", 8],
    }
    fixed = tmp_path / "fixed.onnx"
    done = run_module("onnxruntime.tools.make_dynamic_shape_fixed", "--dim_param", "batch",
                      "--dim_value", "1", results["onnx"].path, str(fixed))
    assert done.returncode == 0, done.stderr
    session = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    assert all(i.shape[0] == 1 for i in session.get_inputs() + session.get_outputs())


def test_dynamic_onnx_names_scores_axes(artifact_factory):
    import onnxruntime as ort

    out, results = artifact_factory(formats=("onnx",), query_len=None, kv_len=None, causal=True,
                                    scores=True, **SMALL)
    session = ort.InferenceSession(results["onnx"].path, providers=["CPUExecutionProvider"])
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert outputs["attention_scores"] == ["batch", 2, "query_len", "kv_len"]
    assert [s["key"] for s in results["onnx"].manifest["signatures"]] == ["len_1", "len_7", "len_32"]


def test_verify_checks_every_signature_and_names_a_failing_one(bucketed, tmp_path):
    from export.runtime.verify import verify_path

    out, _ = bucketed
    passed = {r.name: r for r in verify_path(out)}
    assert passed[f"{STEM}.tflite"].signatures == ["len_4", "len_8", "serving_default"]
    assert all(r.status == "passed" for r in passed.values())
    # A wrong golden output for one signature only: that signature is named.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    golden = copy / f"{STEM}.len_4.golden.npz"
    arrays = dict(np.load(golden))
    arrays["output"] = arrays["output"] + 1e-2
    np.savez(golden, **arrays)
    digest = hashlib.sha256(golden.read_bytes()).hexdigest()
    manifest_path = copy / f"{STEM}.tflite.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["signatures"]:
        if entry["golden"] == golden.name:
            entry["golden_sha256"] = digest
    manifest_path.write_text(json.dumps(manifest))
    result = verify_path(str(manifest_path))[0]
    assert result.status == "failed" and "signature 'len_4'" in result.reason, result.reason


def test_tflite_three_buckets_store_the_weights_once(tmp_path):
    from export.reference import LayerReference, random_weights
    from export.savedmodel.build import build_savedmodel
    from export.spec import ArtifactSpec
    from export.tflite.build import build_tflite

    sizes = {}
    for tag, spec in (("one", ArtifactSpec(batch=1, query_len=256, kv_len=256, query_mask=True,
                                           value_mask=True)),
                      ("three", ArtifactSpec(batch=1, lengths=parse_lengths("16,64,256")))):
        ref = LayerReference(spec, random_weights(spec, 0), "seed 0")
        fn, _ = ref.inference_function(spec, fallback_layout="per-head")
        folder = tmp_path / tag
        folder.mkdir()
        sizes[tag, "tflite"] = os.path.getsize(build_tflite(spec, fn, str(folder)).path)
        saved = build_savedmodel(spec, fn, str(folder)).path
        sizes[tag, "savedmodel"] = sum(os.path.getsize(os.path.join(b, f))
                                       for b, _, fs in os.walk(saved) for f in fs)
    assert sizes["three", "tflite"] <= 1.1 * sizes["one", "tflite"], sizes
    # SavedModel: the weights live once in the checkpoint; each signature's graph is small.
    assert sizes["three", "savedmodel"] <= 1.35 * sizes["one", "savedmodel"], sizes


@pytest.mark.parametrize("quantize", ["dynamic-int8", "int8"])
def test_quantized_buckets_quantize_every_signature(artifact_factory, quantize):
    from tensorflow.lite.tools import flatbuffer_utils

    # Large enough for the converter to quantize (it leaves weights under 1024 values float).
    _, results = artifact_factory(formats=("tflite", "onnx"), lengths=LENGTHS, units=32, heads=2,
                                  query_features=16, kv_features=16, quantize=quantize)
    for fmt in ("tflite", "onnx"):
        entries = results[fmt].manifest["signatures"]
        assert all("max_rel_error" in e["parity"] and e["parity"]["passed"] for e in entries)
    model = flatbuffer_utils.read_model(results["tflite"].path)
    int8 = 9  # tflite schema TensorType.INT8
    assert len(model.subgraphs) == 2  # len_4, len_8 (= serving_default)
    for graph in model.subgraphs:
        assert any(t.type == int8 for t in graph.tensors)


def test_bucketed_runner_matches_the_layer(bucketed):
    import keras

    from export.bucketed import BucketedRunner
    from export.errors import InputError

    out, results = bucketed
    model = keras.saving.load_model(os.path.join(out, f"{STEM}.keras"))
    rng = np.random.default_rng(3)
    queries = [rng.standard_normal((n, 6), dtype=np.float32) for n in (3, 8, 1)]
    memories = [rng.standard_normal((n, 7), dtype=np.float32) for n in (2, 8, 5)]
    expected = [np.asarray(model({"source1": q[None], "source2": m[None],
                                  "query_mask": np.ones((1, len(q)), bool),
                                  "value_mask": np.ones((1, len(m)), bool)})["output"][0])
                for q, m in zip(queries, memories)]
    for fmt in ("tflite", "onnx"):
        runner = BucketedRunner(results[fmt].path)
        got = runner.run(queries, memories)
        for g, e in zip(got, expected):
            assert g["output"].shape == e.shape
            np.testing.assert_allclose(g["output"], e, atol=1e-4)
    runner = BucketedRunner(results["tflite"].path)
    assert runner.buckets == ((4, 4), (8, 8)) and runner.bucket_for(3, 5) == (8, 8)
    with pytest.raises(InputError, match="fits no bucket"):
        runner.run([np.zeros((9, 6))], [np.zeros((2, 7))])


def test_docs_bucketed_runner_example_runs(bucketed):
    """The docs' BucketedRunner example as written, on the small bucketed file (lengths 4, 8)."""
    from doc_pages import block

    from export.bucketed import BucketedRunner

    out, results = bucketed
    code = block("python", "BucketedRunner(")
    path = re.search(r'BucketedRunner\("(artifacts/[^"]+)"', code).group(1)
    rng = np.random.default_rng(5)
    scope = {"query_a": rng.standard_normal((3, 6), dtype=np.float32),
             "query_b": rng.standard_normal((8, 6), dtype=np.float32),
             "memory_a": rng.standard_normal((2, 7), dtype=np.float32),
             "memory_b": rng.standard_normal((5, 7), dtype=np.float32)}
    exec(compile(code.replace(path, results["tflite"].path), "docs (BucketedRunner)", "exec"), scope)
    outputs = scope["outputs"]
    assert [o["output"].shape for o in outputs] == [(3, 8), (8, 8)]
    want = BucketedRunner(results["onnx"].path).run([scope["query_a"], scope["query_b"]],
                                                    [scope["memory_a"], scope["memory_b"]])
    for got, expected in zip(outputs, want):
        np.testing.assert_allclose(got["output"], expected["output"], atol=1e-4)


def test_bucketed_runner_imports_no_tensorflow():
    import subprocess

    code = ("import sys, export.bucketed, export.runtime.runtimes; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args, message", [
    (["--lengths", "4,8", "--query-len", "4"], "--lengths replaces --query-len"),
    (["--query-len", "dynamic"], "use --lengths"),
    (["--lengths", "4,8", "--model", "m.keras"], "--lengths is for the lone layer"),
    (["--lengths", "4,x"], "--lengths"),
], ids=["lengths-and-query-len", "tflite-dynamic", "model", "bad-lengths"])
def test_cli_refuses_in_one_line(args, message):
    done = run_module("export.tflite", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_cli_lengths_end_to_end(tmp_path):
    done = run_module("export", "--lengths", "4,8", "--output-dir", str(tmp_path), "-q",
                      *[a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", str(v))])
    assert done.returncode == 0, done.stderr
    verified = run_module("export.verify", str(tmp_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "[len_4, len_8, serving_default]" in verified.stdout
    assert "[len_1, len_4, len_8]" in verified.stdout
