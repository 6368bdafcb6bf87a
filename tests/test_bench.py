"""The benchmark entry point (a smoke run, no timing asserted) and the graph layouts it chose."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_module

from export import reference
from export.spec import ArtifactSpec

TINY = dict(units=8, heads=2, query_features=6, kv_features=5)


def test_bench_smoke_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = run_module(
        "export.bench", "--units", "8", "--heads", "2", "--query-features", "6",
        "--kv-features", "5", "--lengths", "4", "--batch", "1,2", "--iterations", "3",
        "--warmup", "1", "--max-seconds", "0.05", "--quiet", "--json", str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = done.stdout.splitlines()
    assert any(line.startswith("runtime") and "Keras µs" in line and "% peak" in line
               for line in header), done.stdout
    assert "SGEMM peak" in done.stdout and "verdicts not judged" in done.stdout

    report = json.loads(out.read_text())
    assert {"machine", "versions", "config", "method", "peak", "latency", "sizes"} <= set(report)
    assert report["peak"]["gflops"] > 0
    assert {"numpy", "onnxruntime", "source"} <= set(report["peak"])
    rows = report["latency"]
    assert sorted((r["format"], r["batch"]) for r in rows) == [
        ("onnx", 1), ("onnx", 2), ("tflite", 1), ("tflite", 2)]
    for row in rows:
        assert {"ours_us", "keras_us", "speedup", "gflops", "pct_peak", "executed_gflops",
                "documented_mflop", "ours_bytes", "keras_bytes", "ours_max_abs",
                "keras_max_abs", "ours_layout"} <= set(row), row
        assert {"median", "p90", "n"} <= set(row["ours_us"])
        assert row["ours_max_abs"] <= 1e-4 and row["manifest_parity"]["passed"]
    assert {s["format"] for s in report["sizes"]} == {"onnx", "tflite"}
    assert "verdicts" not in report  # not the configuration


# -- the graph layouts the benchmark compares -----------------------------------------------------

LAYOUT_CASES = {
    "plain": {},
    "qmask-vmask": dict(query_mask=True, value_mask=True),
    "causal-scores": dict(causal=True, scores=True),
    "all": dict(query_mask=True, value_mask=True, causal=True, scores=True),
}


@pytest.fixture(scope="module")
def reference_cases():
    cases = {}
    for case_id, flags in LAYOUT_CASES.items():
        spec = ArtifactSpec(**TINY, query_len=4, kv_len=5, **flags)
        weights = reference.random_weights(spec, 3)
        model = reference.build_reference(spec, weights)
        feeds = reference.make_inputs(spec, 6, 11)
        cases[case_id] = (spec, weights, feeds, reference.run_reference(model, feeds))
    return cases


@pytest.mark.parametrize("layout", ["batched-heads", "per-head", "source"])
@pytest.mark.parametrize("case_id", list(LAYOUT_CASES))
def test_layout_matches_keras(reference_cases, case_id, layout):
    """Every layout computes the layer, masks, all-masked rows and scores included."""
    from export.graph import build_inference_function, fold_weights

    spec, weights, feeds, expected = reference_cases[case_id]
    fn = build_inference_function(spec, fold_weights(weights, spec.heads), layout=layout)
    got = {k: v.numpy() for k, v in fn(*[feeds[i.name] for i in spec.inputs()]).items()}
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "shape, runtime_layout, expected",
    [(dict(), "batched-heads", "source"), (dict(), "per-head", "source"),
     (dict(units=8, kv_features=64), "batched-heads", "batched-heads"),
     (dict(units=8, kv_features=64), "per-head", "per-head")],
    ids=["defaults-batched-heads", "defaults-per-head", "wide-source2-batched-heads",
         "wide-source2-per-head"],
)
def test_preferred_layout(shape, runtime_layout, expected):
    from export.bench.peak import documented_flops
    from export.graph import executed_flops, preferred_layout

    spec = ArtifactSpec(**shape)
    assert preferred_layout(spec, runtime_layout) == expected
    if not shape:
        assert documented_flops(spec, 32) == 50_462_720  # the "about 50.5 MFLOP"
        assert executed_flops(spec, "source", batch=32) < executed_flops(spec, "batched-heads", batch=32)
