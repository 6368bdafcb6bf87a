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
               and "call µs" in line and "x floor" in line for line in header), done.stdout
    assert "SGEMM peak" in done.stdout and "verdicts not judged" in done.stdout

    report = json.loads(out.read_text())
    assert {"machine", "versions", "config", "method", "peak", "latency", "sizes"} <= set(report)
    assert report["peak"]["gflops"] > 0
    assert {"numpy", "onnxruntime", "source"} <= set(report["peak"])
    rows = report["latency"]
    assert sorted((r["format"], r["batch"]) for r in rows) == [
        ("onnx", 1), ("onnx", 2), ("tflite", 1), ("tflite", 2)]
    for row in rows:
        # The floor: the one-op graph's call and the cell's own SGEMM peak, then time / floor.
        assert row["overhead_us"]["median"] > 0 and row["cell_peak_gflops"] > 0
        assert row["floor_us"] == pytest.approx(
            row["overhead_us"]["median"] + row["executed_mflop"] * 1e6 / (row["cell_peak_gflops"] * 1e3))
        assert row["floor_distance"] == pytest.approx(row["ours_us"]["median"] / row["floor_us"])
    for row in rows:
        assert {"ours_us", "keras_us", "speedup", "gflops", "pct_peak", "executed_gflops",
                "documented_mflop", "ours_bytes", "keras_bytes", "ours_max_abs",
                "keras_max_abs", "ours_layout"} <= set(row), row
        assert {"median", "p90", "n"} <= set(row["ours_us"])
        assert row["ours_max_abs"] <= 1e-4 and row["manifest_parity"]["passed"]
    assert {s["format"] for s in report["sizes"]} == {"onnx", "tflite"}
    assert "verdicts" not in report  # not the configuration


def test_bench_times_int8_cpu_beside_float32(tmp_path):
    """The default layer (int8 needs more than a tiny one to pass its gate): our int8-cpu TFLite
    file and, for ONNX, its int8 file, each with its floor (no timing asserted)."""
    out = tmp_path / "bench.json"
    done = run_module("export.bench", "--batch", "1", "--variants", "none,int8-cpu",
                      "--iterations", "3", "--warmup", "1", "--max-seconds", "0.05", "--quiet",
                      "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line.split() for line in done.stdout.splitlines()]
    assert ["LiteRT", "int8-cpu", "10/10", "1"] in [row[:4] for row in table], done.stdout
    assert ["onnxruntime", "int8-cpu=int8", "10/10", "1"] in [row[:4] for row in table]
    rows = {(r["format"], r["variant"]): r for r in json.loads(out.read_text())["latency"]}
    assert set(rows) == {(f, v) for f in ("onnx", "tflite") for v in ("none", "int8-cpu")}
    for (_, variant), row in rows.items():
        assert "error" not in row, row
        assert row["floor_distance"] > 0 and row["overhead_us"]["median"] > 0
        if variant == "int8-cpu":
            assert 1e-4 < row["ours_rel_l2"] <= 5e-2 and row["manifest_parity"]["passed"]
    # The ONNX row times the int8 (weight-only) file: the same bytes as --variants int8 builds.
    assert rows[("onnx", "int8-cpu")]["ours_bytes"] < 0.35 * rows[("onnx", "none")]["ours_bytes"]


# -- the floor column: pure arithmetic, then the one-op graphs it times ----------------------------


def test_floor_distance_is_time_over_call_plus_matmuls_at_the_peak():
    from export.bench.floor import floor_distance, sgemm_gflops

    # 3 MFLOP at 150 GFLOP/s is 20 µs of matmuls; with a 5 µs call the floor is 25 µs.
    got = floor_distance(20.0, 5.0, 3e6, 150.0)
    assert got == pytest.approx({"floor_us": 25.0, "matmul_floor_us": 20.0, "floor_distance": 0.8})
    assert floor_distance(50.0, 5.0, 3e6, 150.0)["floor_distance"] == pytest.approx(2.0)
    # No FLOPs: the call alone is the floor.
    assert floor_distance(7.0, 3.5, 0, 100.0)["floor_distance"] == pytest.approx(2.0)
    assert sgemm_gflops(133.0, 256) == pytest.approx(2 * 256**3 / 133e3)
    for bad in [(0, 5.0, 3e6, 150.0), (20.0, -1.0, 3e6, 150.0), (20.0, 5.0, 3e6, 0)]:
        with pytest.raises(ValueError, match="Received: time_us="):
            floor_distance(*bad)


@pytest.mark.parametrize("units", [6, 4, 8], ids=["add", "slice", "pad"])
@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_one_op_graph_has_the_artifacts_inputs_and_outputs(tmp_path, runtime, units):
    from export.bench.build import Artifact
    from export.bench.floor import one_op_graph
    from export.bench.timing import make_call

    spec = ArtifactSpec(**{**TINY, "units": units}, query_len=4, kv_len=5, batch=3)
    path = one_op_graph(runtime, spec, str(tmp_path))
    feeds = reference.make_inputs(spec, 3, 1)
    call = make_call(Artifact("floor", runtime, "none", path, 3), feeds, 1)
    (out,) = call()
    assert call.output_names == ["output"] and out.shape == (3, 4, units)
    if runtime == "onnx":
        import onnx

        graph = onnx.load(path).graph
        assert len(graph.node) == 1
        assert [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input] \
            == [("source1", [3, 4, 6]), ("source2", [3, 5, 5])]
    else:
        from export.runtime.runtimes import tflite_interpreter
        from export.tflite.check import tflite_op_names

        assert len(tflite_op_names(path)) == 1  # before XNNPACK takes it
        interpreter = tflite_interpreter(path, 1)
        details = interpreter.get_signature_runner("serving_default").get_input_details()
        assert {k: list(d["shape"]) for k, d in details.items()} == {
            "source1": [3, 4, 6], "source2": [3, 5, 5]}
    first = min(units, 6)
    expected = feeds["source1"][..., :first] + (1.0 if units == 6 else 0.0)
    np.testing.assert_allclose(out[..., :first], expected, rtol=0, atol=1e-6)


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


@pytest.mark.parametrize("case_id", list(LAYOUT_CASES))
def test_late_softmax_matches_keras(reference_cases, case_id):
    """The "source" layout with the row sums divided after the values' matmul (TFLite's float
    graphs): the layer's numbers, masks and all-masked rows included; scores stay normalized."""
    from export.graph import build_inference_function, fold_weights

    spec, weights, feeds, expected = reference_cases[case_id]
    fn = build_inference_function(spec, fold_weights(weights, spec.heads), layout="source",
                                  late_softmax=True)
    got = {k: v.numpy() for k, v in fn(*[feeds[i.name] for i in spec.inputs()]).items()}
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)


def test_late_softmax_tflite_is_one_xnnpack_partition_without_softmax(tmp_path):
    """What the TFLite converter keeps of the late softmax: REDUCE_MAX/SUB/EXP/SUM/DIV, not a
    SOFTMAX (it fuses `e / sum(e)` before the matmul back into one), all in one XNNPACK node."""
    from ai_edge_litert.interpreter import Interpreter

    from export.graph import build_inference_function, fold_weights
    from export.tflite.build import build_tflite
    from export.tflite.check import tflite_op_names

    spec = ArtifactSpec(batch=2, name="late")
    folded = fold_weights(reference.random_weights(spec, 0), spec.heads)
    path = build_tflite(spec, build_inference_function(spec, folded, layout="source",
                                                       late_softmax=True), str(tmp_path)).path
    ops = tflite_op_names(path)
    assert "SOFTMAX" not in ops and {"REDUCE_MAX", "EXP", "SUM", "DIV"} <= set(ops)
    interpreter = Interpreter(model_path=path, num_threads=1)
    interpreter.allocate_tensors()
    assert [op["op_name"] for op in interpreter._get_ops_details()][len(ops):] == ["DELEGATE"]


def test_breakdown_parts_are_differences_of_the_stages():
    from export.bench.breakdown import part_flops, parts
    from export.graph import executed_flops

    spec = ArtifactSpec()
    flops = part_flops(spec, 32)
    assert sum(flops.values()) == executed_flops(spec, "source", batch=32)
    medians = {"overhead": 2.0, "no-core": 7.0, "no-normalization": 9.0, "softmax": 12.0,
               "late": 10.0}
    got = {r["part"]: r for r in parts(medians, {"projections": 4e6, "core matmuls": 1e6}, 200.0)}
    assert {k: r["us"] for k, r in got.items()} == pytest.approx(
        {"call overhead": 2.0, "projections": 5.0, "core matmuls": 2.0, "SOFTMAX op": 3.0,
         "late softmax": 1.0})
    assert got["projections"]["floor_us"] == pytest.approx(20.0)  # 4 MFLOP at 200 GFLOP/s
    assert got["core matmuls"]["floor_us"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="Missing: \\['late'\\]"):
        parts({k: v for k, v in medians.items() if k != "late"}, flops, 200.0)


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
