"""Variable-length sequences on static-shape artifacts (issue 6): masks, causal mask and scores.

Every format and every graph layout: outputs and scores match the layer called with the same
masks; padded-and-masked sequences give the unpadded layer's rows; padded keys get zero scores;
the graphs stay static and builtin-only; wrong mask inputs are refused by name.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import shutil

import numpy as np
import pytest
from conftest import REPO, run_module

from export.errors import InputError
from export.reference import make_inputs
from export.spec import ArtifactSpec

FORMATS = ("savedmodel", "tflite", "onnx")
# Parity tolerances (max abs diff) against the Keras layer, float32.
ATOL = {"savedmodel": 1e-5, "tflite": 1e-4, "onnx": 1e-4}
ZERO_ATOL = 1e-6  # scores on masked keys: exactly 0 by construction, allow float dust

# Small, unequal lengths (Tq != Tkv) and feature sizes, so a swapped axis cannot pass.
SHAPES = dict(units=8, heads=2, query_len=6, kv_len=9, query_features=5, kv_features=7)
CONFIGS = {
    "qmask-vmask-causal-scores": dict(query_mask=True, value_mask=True, causal=True, scores=True),
    "vmask": dict(value_mask=True),
}
README_EXAMPLE = os.path.join(REPO, "docs", "examples", "tflite_padded_batch.py")


# The layer on a single real key warns that its softmax is over one element: intended here.
pytestmark = pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1:UserWarning")


@pytest.fixture(scope="module")
def built(artifact_factory):
    """config id -> (output_dir, {fmt: ArtifactResult}), built through the pipeline once."""
    return {cid: artifact_factory(**SHAPES, **flags) for cid, flags in CONFIGS.items()}


@functools.cache
def reference_layer(keras_path: str):
    """The CrossAttention in a published `.keras` reference (the pipeline's own)."""
    import keras

    import xattn  # noqa: F401  (registers CrossAttention)
    from export.reference import find_cross_attention

    model = keras.saving.load_model(keras_path, compile=False, safe_mode=True)
    return find_cross_attention(model)


def layer_call(layer, spec, feeds: dict) -> dict[str, np.ndarray]:
    """The layer on `feeds` with the spec's masks and causal flag; always with scores."""
    output, scores = layer(
        [feeds["source1"], feeds["source2"]],
        query_mask=feeds.get("query_mask"),
        value_mask=feeds.get("value_mask"),
        use_causal_mask=spec.causal,
        return_attention_scores=True,
    )
    return {"output": np.asarray(output), "attention_scores": np.asarray(scores)}


def edge_case_feeds(spec, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Random padding masks plus the corners: a row with no real query, one with no real key."""
    feeds = make_inputs(spec, rows, seed)
    if spec.query_mask:
        feeds["query_mask"][0] = False
    if spec.value_mask:
        feeds["value_mask"][1] = False
    return feeds


def padded_feeds(spec, lengths, seed: int):
    """Sequences of the given (nq, nk) lengths, padded with finite junk and masked."""
    rng = np.random.default_rng(seed)
    rows = len(lengths)
    # Junk, not zeros, in the pad: a pad that leaks into a valid row must show.
    s1 = rng.normal(3.0, 10.0, (rows, spec.query_len, spec.query_features)).astype(np.float32)
    s2 = rng.normal(-3.0, 10.0, (rows, spec.kv_len, spec.kv_features)).astype(np.float32)
    valid = []
    for i, (nq, nk) in enumerate(lengths):
        q = rng.standard_normal((nq, spec.query_features), dtype=np.float32)
        kv = rng.standard_normal((nk, spec.kv_features), dtype=np.float32)
        s1[i, :nq], s2[i, :nk] = q, kv
        valid.append((q, kv))
    feeds = {"source1": s1, "source2": s2}
    nqs = np.array([nq for nq, _ in lengths])
    nks = np.array([nk for _, nk in lengths])
    if spec.query_mask:
        feeds["query_mask"] = np.arange(spec.query_len)[None, :] < nqs[:, None]
    if spec.value_mask:
        feeds["value_mask"] = np.arange(spec.kv_len)[None, :] < nks[:, None]
    return feeds, valid


def invariance_lengths(spec) -> list[tuple[int, int]]:
    nqs = sorted({1, spec.query_len // 2, spec.query_len})
    # Without a value mask every key is real: only the full key length can be tested.
    nks = sorted({1, 3, spec.kv_len}) if spec.value_mask else [spec.kv_len]
    lengths = [(nq, nk) for nq in nqs for nk in nks]
    # A fixed batch runs whole batches only: repeat the first pair up to a multiple of it.
    while spec.batch and len(lengths) % spec.batch:
        lengths.append(lengths[0])
    return lengths


def assert_padding_invariance(run, layer, spec, atol: float) -> None:
    """`run(feeds) -> outputs` on padded, masked rows == the layer on the unpadded sequences."""
    lengths = invariance_lengths(spec)
    feeds, valid = padded_feeds(spec, lengths, seed=11)
    got = run(feeds)
    for i, ((nq, nk), (q, kv)) in enumerate(zip(lengths, valid)):
        want = layer_call(layer, spec, {"source1": q[None], "source2": kv[None]})
        where = f"row {i} (nq={nq}, nk={nk})"
        np.testing.assert_allclose(got["output"][i, :nq], want["output"][0], rtol=0, atol=atol,
                                   err_msg=f"output, {where}")
        if spec.scores:
            scores = got["attention_scores"][i]  # (H, Tq, Tkv)
            np.testing.assert_allclose(scores[:, :nq, :nk], want["attention_scores"][0], rtol=0,
                                       atol=atol, err_msg=f"scores, {where}")
            assert np.abs(scores[:, :, nk:]).max(initial=0.0) <= ZERO_ATOL, (
                f"non-zero scores on padded keys, {where}")
            if spec.query_mask:
                assert np.abs(scores[:, nq:, :]).max(initial=0.0) <= ZERO_ATOL, (
                    f"non-zero scores on padded queries, {where}")


def assert_matches_layer(got: dict, want: dict, spec, atol: float) -> None:
    np.testing.assert_allclose(got["output"], want["output"], rtol=0, atol=atol)
    if spec.scores:
        np.testing.assert_allclose(got["attention_scores"], want["attention_scores"], rtol=0,
                                   atol=atol)
    else:
        assert set(got) == {"output"}


def runner_for(result, **kwargs):
    from export.runtime.runtimes import load_runner

    return load_runner(result.format, result.path, batch=result.spec.batch, **kwargs)


# -- every format, through the pipeline ---------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMATS)
def test_masked_outputs_match_layer(built, fmt, config):
    out, results = built[config]
    result = results[fmt]
    spec = result.spec
    layer = reference_layer(os.path.join(out, spec.reference_name))
    feeds = edge_case_feeds(spec, rows=6, seed=7)
    got = runner_for(result).run(feeds)
    assert_matches_layer(got, layer_call(layer, spec, feeds), spec, ATOL[fmt])


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMATS)
def test_padding_invariance(built, fmt, config):
    out, results = built[config]
    result = results[fmt]
    layer = reference_layer(os.path.join(out, result.spec.reference_name))
    assert_padding_invariance(runner_for(result).run, layer, result.spec, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMATS)
def test_manifest_and_golden_include_masks(built, fmt):
    out, results = built["qmask-vmask-causal-scores"]
    spec = results[fmt].spec
    b = spec.batch
    with open(results[fmt].manifest_path) as f:
        manifest = json.load(f)
    assert manifest["inputs"] == [
        {"name": "source1", "shape": [b, 6, 5], "dtype": "float32"},
        {"name": "source2", "shape": [b, 9, 7], "dtype": "float32"},
        {"name": "query_mask", "shape": [b, 6], "dtype": "bool"},
        {"name": "value_mask", "shape": [b, 9], "dtype": "bool"},
    ]
    assert manifest["outputs"] == [
        {"name": "output", "shape": [b, 6, 8], "dtype": "float32"},
        {"name": "attention_scores", "shape": [b, 2, 6, 9], "dtype": "float32"},
    ]
    assert manifest["masks"] == {"query_mask": True, "value_mask": True, "causal": True,
                                 "scores": True}
    golden = np.load(os.path.join(out, manifest["golden"]))
    assert set(golden.files) == {"source1", "source2", "query_mask", "value_mask", "output",
                                 "attention_scores"}
    for name, length in (("query_mask", 6), ("value_mask", 9)):
        mask = golden[name]
        assert mask.dtype == np.bool_ and mask.shape == (spec.golden_samples, length)
        assert mask.any(axis=1).all(), f"{name}: a golden row without a real position"
    # The runtime sees the same: bool masks, the same names, the extra output.
    runner = runner_for(results[fmt])
    reported = {i.name: (i.dtype, i.shape[1:]) for i in runner.runtime_inputs}
    assert reported == {"source1": ("float32", (6, 5)), "source2": ("float32", (9, 7)),
                        "query_mask": ("bool", (6,)), "value_mask": ("bool", (9,))}
    golden_out = runner.run({k: golden[k] for k in reported})
    assert_matches_layer(golden_out, {k: golden[k] for k in golden_out}, spec, ATOL[fmt])


def test_tflite_with_masks_is_static_and_builtin(built):
    from export.tflite.check import check_tflite_graph

    for config in CONFIGS:
        check_tflite_graph(built[config][1]["tflite"].path)


def test_fixed_batch_onnx_with_masks_has_no_shape_arithmetic(artifact_factory):
    from export.onnx.check import check_onnx_graph

    flags = CONFIGS["qmask-vmask-causal-scores"]
    out, results = artifact_factory(formats=("onnx",), batch=2, **SHAPES, **flags)
    result = results["onnx"]
    spec = result.spec
    check_onnx_graph(result.path, fixed_batch=True,
                     input_names=[i.name for i in spec.inputs()],
                     output_names=[o.name for o in spec.outputs()])
    layer = reference_layer(os.path.join(out, spec.reference_name))
    feeds = edge_case_feeds(spec, rows=4, seed=8)
    assert_matches_layer(runner_for(result).run(feeds), layer_call(layer, spec, feeds), spec,
                         ATOL["onnx"])


# -- wrong inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMATS)
def test_wrong_mask_inputs_rejected(built, fmt):
    result = built["qmask-vmask-causal-scores"][1][fmt]
    spec = result.spec
    feeds = make_inputs(spec, 2, seed=3)
    with open(result.manifest_path) as f:
        declared = json.load(f)["inputs"]
    # Expectations read from the runtime itself, and given by the caller (the manifest's).
    for runner in (runner_for(result), runner_for(result, inputs=declared)):
        with pytest.raises(InputError, match=r"`value_mask` must be bool of shape \(B, 9\)\. "
                                             r"Received: value_mask of shape \(2, 8\)"):
            runner.run({**feeds, "value_mask": feeds["value_mask"][:, :8]})
        with pytest.raises(InputError, match=r"`query_mask` must be bool of shape \(B, 6\)\. "
                                             r"Received: query_mask of shape \(2, 6, 1\)"):
            runner.run({**feeds, "query_mask": feeds["query_mask"][..., None]})
        with pytest.raises(InputError, match=r"`query_mask` must be bool .* dtype float32"):
            runner.run({**feeds, "query_mask": feeds["query_mask"].astype(np.float32)})
        with pytest.raises(InputError, match=r"missing input\(s\) `value_mask`"):
            runner.run({k: v for k, v in feeds.items() if k != "value_mask"})
        with pytest.raises(InputError, match=r"unexpected input\(s\) `mask`"):
            runner.run({**feeds, "mask": feeds["value_mask"]})
        with pytest.raises(InputError, match="same batch size"):
            runner.run({**feeds, "value_mask": feeds["value_mask"][:1]})


def test_layer_rejects_wrong_mask_shape():
    from xattn import CrossAttention

    layer = CrossAttention(8, 2)
    s1, s2 = np.zeros((2, 6, 5), np.float32), np.zeros((2, 9, 7), np.float32)
    with pytest.raises(ValueError, match=r"`value_mask` must have shape \(B=2, 9\).*\(2, 6\)"):
        layer([s1, s2], value_mask=np.ones((2, 6), bool))


# -- both graph layouts -------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_graph_layouts_match_layer(config):
    """The traced inference function, each layout, against the layer (TensorFlow, no converter)."""
    from export import reference
    from export.graph import LAYOUTS, build_inference_function, fold_weights

    spec = ArtifactSpec(**SHAPES, **CONFIGS[config])
    model = reference.build_reference(spec, reference.random_weights(spec, 5))
    layer = reference.find_cross_attention(model)
    folded = fold_weights(reference.reference_weights(model), spec.heads)
    names = [i.name for i in spec.inputs()]
    for layout in LAYOUTS:
        fn = build_inference_function(spec, folded, layout=layout)

        def run(feeds, fn=fn):
            return {k: v.numpy() for k, v in fn(*[feeds[n] for n in names]).items()}

        feeds = edge_case_feeds(spec, rows=4, seed=9)
        assert_matches_layer(run(feeds), layer_call(layer, spec, feeds), spec, 1e-5)
        assert_padding_invariance(run, layer, spec, atol=1e-5)


@pytest.fixture(scope="module")
def every_layout(built, tmp_path_factory):
    """TFLite and fixed-batch ONNX files of every graph layout, whichever the pipeline picks."""
    from export.graph import LAYOUTS, build_inference_function, fold_weights
    from export.onnx.build import build_onnx
    from export.onnx.check import check_onnx_graph
    from export.tflite.build import build_tflite
    from export.tflite.check import check_tflite_graph

    out, results = built["qmask-vmask-causal-scores"]
    layer = reference_layer(os.path.join(out, results["tflite"].spec.reference_name))
    spec = results["tflite"].spec.replace(batch=2)
    folded = fold_weights([np.asarray(w) for w in layer.get_weights()], spec.heads)
    workdir = str(tmp_path_factory.mktemp("layouts"))
    files = {}
    for fmt, build in (("tflite", build_tflite), ("onnx", build_onnx)):
        for layout in LAYOUTS:
            folder = os.path.join(workdir, f"{fmt}-{layout}")
            os.makedirs(folder)
            path = build(spec, build_inference_function(spec, folded, layout=layout), folder).path
            if fmt == "tflite":
                check_tflite_graph(path)
            else:
                check_onnx_graph(path, fixed_batch=True,
                                 input_names=[i.name for i in spec.inputs()],
                                 output_names=[o.name for o in spec.outputs()])
            files[(fmt, layout)] = path
    return spec, layer, files


def test_every_layout_in_every_runtime(every_layout):
    from export.runtime.runtimes import load_runner

    spec, layer, files = every_layout
    for (fmt, layout), path in files.items():
        runner = load_runner(fmt, path, batch=spec.batch)
        feeds = edge_case_feeds(spec, rows=4, seed=10)
        try:
            assert_matches_layer(runner.run(feeds), layer_call(layer, spec, feeds), spec,
                                 ATOL[fmt])
            assert_padding_invariance(runner.run, layer, spec, atol=1e-4)
        except AssertionError as e:
            raise AssertionError(f"{fmt} file of the {layout!r} layout: {e}") from e


# -- entry point and README example -------------------------------------------------------------


def test_tflite_cli_with_masks_causal_scores(tmp_path):
    args = ["--query-mask", "--value-mask", "--causal", "--scores", "--units", "8", "--heads",
            "2", "--query-len", "6", "--kv-len", "9", "--query-features", "5",
            "--kv-features", "7", "--output-dir", str(tmp_path), "-q"]
    proc = run_module("export.tflite", *args)
    assert proc.returncode == 0, proc.stderr
    name = "xattn_u8_h2_q6x5_kv9x7_qmask_vmask_causal_scores"
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"{name}.tflite", f"{name}.tflite.json", f"{name}.golden.npz", f"{name}.keras",
         f"{name}.golden.json", f"{name}.golden.bin", ".xattn.lock"]
    )
    with open(tmp_path / f"{name}.tflite.json") as f:
        manifest = json.load(f)
    assert [i["name"] for i in manifest["inputs"]] == [
        "source1", "source2", "query_mask", "value_mask"]
    assert [o["name"] for o in manifest["outputs"]] == ["output", "attention_scores"]


def test_readme_example_runs(artifact_factory, tmp_path, monkeypatch):
    """The README's padded-batch example, run exactly as written against the file it names."""
    flags = dict(batch=2, query_mask=True, value_mask=True)  # python -m export.tflite --batch 2 ...
    spec = ArtifactSpec(**flags)
    with open(README_EXAMPLE) as f:
        assert f'"artifacts/{spec.artifact_name("tflite")}"' in f.read()
    out, results = artifact_factory(formats=("tflite",), **flags)
    os.makedirs(tmp_path / "artifacts")
    shutil.copy(results["tflite"].path, tmp_path / "artifacts")
    monkeypatch.chdir(tmp_path)
    example = runpy.run_path(README_EXAMPLE, run_name="__main__")

    layer = reference_layer(os.path.join(out, spec.reference_name))
    assert [o.shape for o in example["outputs"]] == [(4, 64), (10, 64)]
    for q, kv, got in zip(example["queries"], example["values"], example["outputs"]):
        want = layer([q[None].astype(np.float32), kv[None].astype(np.float32)])
        np.testing.assert_allclose(got, np.asarray(want)[0], rtol=0, atol=1e-4)
