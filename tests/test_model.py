"""Whole models (`--model`): a trained Keras model holding CrossAttention, exported, folded, verified.

Every artifact is rerun here in its own runtime against the Keras model itself (not against the
manifest the pipeline wrote), on inputs the pipeline never saw.
"""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import onnx
import pytest
from conftest import run_module
from layer_zoo import randomize_weights

import xattn
from export.cli import main
from export.formats import FORMAT_NAMES, get_format
from export.runtime import runtimes

FORMATS = ("savedmodel", "tflite", "onnx")
TQ, TKV = 6, 7


def _masked_model() -> keras.Model:
    """Queries attend to a padded context (query_mask and value_mask from inputs), then a causal
    self-block with an attention_mask input: two CrossAttention layers, every kind of mask
    reaching them from the model's inputs."""
    x = keras.Input((TQ, 5), name="x")
    x_mask = keras.Input((TQ,), dtype="bool", name="x_mask")
    ctx = keras.Input((TKV, 4), name="ctx")
    ctx_mask = keras.Input((TKV,), dtype="bool", name="ctx_mask")
    pairs = keras.Input((TQ, TQ), dtype="bool", name="pairs")
    q = keras.layers.Dense(8, activation="relu", name="embed")(x)
    a = xattn.CrossAttention(8, 2, name="to_context")([q, ctx], query_mask=x_mask,
                                                      value_mask=ctx_mask)
    h = keras.layers.Add(name="residual")([q, a])
    h = keras.layers.LayerNormalization(name="norm")(h)
    s = xattn.CrossAttention(8, 2, name="self_causal")([h, h], attention_mask=pairs,
                                                       use_causal_mask=True)
    out = keras.layers.Dense(3, name="head")(s)
    model = keras.Model({"x": x, "x_mask": x_mask, "ctx": ctx, "ctx_mask": ctx_mask,
                         "pairs": pairs}, {"y": out}, name="masked")
    return randomize_weights(model, 11)


def _scaled_model() -> keras.Model:
    """A forecaster-like model whose outputs are far from N(0, 1) (a single unnamed output)."""
    past = keras.Input((TKV, 3), name="past")
    future = keras.Input((TQ, 2), name="future")
    enc = keras.layers.Conv1D(8, 3, padding="causal", name="conv")(past)
    q = keras.layers.Dense(8, name="query")(future)
    a = xattn.CrossAttention(8, 4, name="cross_attention")([q, enc])
    y = keras.layers.Dense(1)(a)
    model = keras.Model([past, future], keras.layers.Rescaling(300.0, offset=400.0)(y))
    return randomize_weights(model, 12)


def _inputs(model: keras.Model, rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in model.inputs:
        shape = (rows, *t.shape[1:])
        if t.dtype == "bool":
            lengths = rng.integers(1, shape[-1] + 1, size=(*shape[:-1], 1))
            feeds[t.name] = np.arange(shape[-1]) < lengths
        else:
            feeds[t.name] = rng.standard_normal(shape).astype("float32")
    return feeds


def _keras_outputs(model: keras.Model, feeds: dict) -> list[np.ndarray]:
    struct = model._inputs_struct
    args = {k: feeds[v.name] for k, v in struct.items()} if isinstance(struct, dict) else \
        [feeds[t.name] for t in model.inputs]
    out = model(args, training=False)
    if isinstance(out, dict):
        return [np.asarray(out[k]) for k in out]
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """{model id: (keras model, model path, output dir, {fmt: manifest})} built with the CLI's
    library path (`main`), every format in one run."""
    root = tmp_path_factory.mktemp("models")
    built = {}
    for key, factory in (("masked", _masked_model), ("scaled", _scaled_model)):
        model = factory()
        path = str(root / f"{key}.keras")
        model.save(path)
        out = str(root / f"out_{key}")
        assert main(["--model", path, "--output-dir", out, "--quiet"]) == 0
        manifests = {}
        for fmt in FORMATS:
            name = f"{key}{get_format(fmt).suffix}.json"
            with open(os.path.join(out, name)) as f:
                manifests[fmt] = json.load(f)
        built[key] = (model, path, out, manifests)
    return built


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", ["masked", "scaled"])
def test_model_artifact_matches_keras_in_its_runtime(exported, key, fmt):
    model, _, out, manifests = exported[key]
    manifest = manifests[fmt]
    runner = runtimes.load_runner(fmt, os.path.join(out, manifest["artifact"]),
                                  batch=manifest["inputs"][0]["shape"][0], inputs=manifest["inputs"])
    rows = 1 if fmt == "tflite" else 3
    for seed in (5, 6):
        feeds = _inputs(model, rows, seed)
        expected = _keras_outputs(model, feeds)
        got = runner.run(feeds)
        names = [o["name"] for o in manifest["outputs"]]
        assert len(names) == len(expected)
        for name, want in zip(names, expected):
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got[name], want.reshape(got[name].shape),
                                       atol=1e-4 * scale, rtol=0)


def test_every_cross_attention_is_folded(exported):
    model, _, out, manifests = exported["masked"]
    folded = manifests["onnx"]["model"]["folded"]
    assert [f["layer"] for f in folded] == ["to_context", "self_causal"]
    assert set(manifests["onnx"]["layout"]) == {"to_context", "self_causal"}
    graph = onnx.load(os.path.join(out, manifests["onnx"]["artifact"])).graph
    ops = {n.op_type for n in graph.node}
    # Keras's own CrossAttention computes with einsum; the folded one with plain matmuls.
    assert "Einsum" not in ops and "MatMul" in ops


def test_names_come_from_the_model(exported):
    model, _, _, masked = exported["masked"]
    # Keras orders a dict of inputs by key; the artifact keeps the model's order.
    assert [i["name"] for i in masked["onnx"]["inputs"]] == [t.name for t in model.inputs]
    assert [i["name"] for i in masked["onnx"]["inputs"]] == ["ctx", "ctx_mask", "pairs", "x",
                                                               "x_mask"]
    assert [i["dtype"] for i in masked["onnx"]["inputs"]] == ["float32", "bool", "bool",
                                                               "float32", "bool"]
    assert [o["name"] for o in masked["onnx"]["outputs"]] == ["y"]
    _, _, _, scaled = exported["scaled"]
    assert [o["name"] for o in scaled["tflite"]["outputs"]] == ["output"]  # single unnamed output
    assert scaled["tflite"]["inputs"][0]["shape"] == [1, TKV, 3]
    assert scaled["onnx"]["inputs"][0]["shape"] == [None, TKV, 3]


def test_reference_is_the_users_model_with_its_sha256(exported):
    _, path, out, manifests = exported["scaled"]
    with open(path, "rb") as f, open(os.path.join(out, "scaled.keras"), "rb") as g:
        assert f.read() == g.read()
    import hashlib

    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert {m["reference_sha256"] for m in manifests.values()} == {digest}
    assert manifests["onnx"]["model"]["sha256"] == digest


def test_gate_scales_with_the_outputs(exported):
    _, _, out, manifests = exported["scaled"]
    golden = np.load(os.path.join(out, manifests["onnx"]["golden"]))
    assert np.abs(golden["output"]).max() > 50  # a forecaster's scale, not N(0, 1)
    atol = manifests["onnx"]["parity"]["atol"]
    assert atol > 1e-4 * 50  # 1e-4 relative to the outputs' scale


def test_export_verify_passes_on_model_artifacts(exported):
    _, _, out, _ = exported["masked"]
    done = run_module("export.verify", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"{len(FORMAT_NAMES)} passed, 0 failed")


def test_sample_inputs_are_the_golden_vectors_and_the_calibration(exported, tmp_path):
    model, path, _, _ = exported["scaled"]
    samples = _inputs(model, 64, 99)
    np.savez(tmp_path / "samples.npz", **samples)
    out = tmp_path / "out"
    rc = main(["--model", path, "--sample-inputs", str(tmp_path / "samples.npz"), "--quantize",
               "int8", "--output-dir", str(out), "--quiet"], formats=("tflite", "onnx"))
    assert rc == 0
    manifest = json.load(open(out / "scaled_int8.tflite.json"))
    assert manifest["quantization"]["calibration"]["source"] == "sample-inputs"
    assert manifest["quantization"]["n_samples"] == 64
    # ONNX int8 is weight-only: the Dense kernels int8 behind DequantizeLinear, the Conv1D kernel
    # (not a matmul) and every activation float32, nothing calibrated.
    onnx_manifest = json.load(open(out / "scaled_int8.onnx.json"))
    assert onnx_manifest["quantization"]["scheme"] == "weight-only"
    assert onnx_manifest["quantization"]["calibration"] is None
    graph = onnx.load(str(out / "scaled_int8.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    weight_matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")
                      and n.input[1] in dequantized]
    assert len(weight_matmuls) == len(dequantized) == 4  # query Dense, 2 folded, output Dense
    assert not any(n.op_type == "QuantizeLinear" for n in graph.node)
    golden = np.load(out / "scaled.golden.npz")
    np.testing.assert_array_equal(golden["past"], samples["past"][:4])
    runner = runtimes.load_runner("tflite", str(out / "scaled_int8.tflite"), batch=1,
                                  inputs=manifest["inputs"])
    feeds = _inputs(model, 4, 7)
    want = _keras_outputs(model, feeds)[0]
    got = runner.run(feeds)["output"]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-2


# -- refusals ----------------------------------------------------------------------------------


def _one_line(capsys_or_text: str) -> list[str]:
    return [line for line in capsys_or_text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "extra, needles",
    [(["--units", "8"], ["--model", "--units"]),
     (["--weights", "w.keras"], ["--model", "--weights"]),
     (["--query-mask"], ["--model", "--query-mask"]),
     (["--calibration", "c.npz"], ["--model", "--calibration", "--sample-inputs"])],
    ids=["units", "weights", "query-mask", "calibration"],
)
def test_model_with_layer_flags_is_a_usage_error(exported, extra, needles, capsys, tmp_path):
    _, path, _, _ = exported["scaled"]
    with pytest.raises(SystemExit) as exc:
        main(["--model", path, *extra, "--output-dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert not (tmp_path / "o").exists()


def test_model_flags_without_model_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--import", "os"])
    assert exc.value.code == 2
    assert "--import applies to --model only" in capsys.readouterr().err


def _save(model: keras.Model, folder, name: str) -> str:
    path = os.path.join(folder, f"{name}.keras")
    model.save(path)
    return path


def test_unknown_axis_needs_input_shape(tmp_path, capsys):
    x = keras.Input((None, 4), name="series")
    c = keras.Input((5, 4), name="context")
    y = xattn.CrossAttention(4, 2)([keras.layers.Dense(4)(x), c])
    path = _save(randomize_weights(keras.Model([x, c], y), 3), tmp_path, "free")
    rc = main(["--model", path, "--output-dir", str(tmp_path / "o")], formats=("onnx",))
    err = capsys.readouterr().err
    assert rc == 2 and "'series'" in err and "--input-shape series=D,4" in err, err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
    rc = main(["--model", path, "--input-shape", "series=9,4", "--output-dir",
               str(tmp_path / "o"), "--quiet"], formats=("onnx",))
    assert rc == 0
    manifest = json.load(open(tmp_path / "o" / "free.onnx.json"))
    assert manifest["inputs"][0]["shape"] == [None, 9, 4]


def test_integer_inputs_need_sample_inputs(tmp_path, capsys):
    ids = keras.Input((6,), dtype="int32", name="ids")
    ctx = keras.Input((5, 4), name="ctx")
    e = keras.layers.Embedding(20, 4, name="embedding")(ids)
    y = xattn.CrossAttention(4, 2)([e, ctx])
    model = randomize_weights(keras.Model([ids, ctx], y), 4)
    path = _save(model, tmp_path, "tokens")
    rc = main(["--model", path, "--output-dir", str(tmp_path / "o")], formats=("onnx",))
    err = _one_line(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and "'ids'" in err[0] and "--sample-inputs" in err[0], err
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", ids=rng.integers(0, 20, (4, 6)).astype("int32"),
             ctx=rng.standard_normal((4, 5, 4)).astype("float32"))
    rc = main(["--model", path, "--sample-inputs", str(tmp_path / "s.npz"), "--output-dir",
               str(tmp_path / "o"), "--quiet"], formats=("onnx", "tflite"))
    assert rc == 0


def test_lambda_model_is_refused_as_unsafe(tmp_path):
    x = keras.Input((4, 3), name="x")
    model = keras.Model(x, keras.layers.Lambda(lambda t: t * 2.0)(x))
    path = _save(model, tmp_path, "lam")
    done = run_module("export.onnx", "--model", path, "--output-dir", str(tmp_path / "o"))
    lines = _one_line(done.stderr)
    assert done.returncode == 3 and len(lines) == 1, done.stderr
    assert "Lambda" in lines[0] and "safe_mode" in lines[0]
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


LAYERS_MODULE = '''
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="xattn_tests")
class GramInverse(keras.layers.Layer):
    """x times the inverse of its Gram matrix: MatrixInverse is no TFLite builtin."""

    def call(self, x):
        gram = ops.matmul(ops.transpose(x, (0, 2, 1)), x) + ops.eye(x.shape[-1])
        return ops.matmul(x, ops.linalg.inv(gram))
'''


def test_non_builtin_op_names_the_keras_layer_exit_4(tmp_path):
    (tmp_path / "xattn_test_layers.py").write_text(LAYERS_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import xattn_test_layers

        x = keras.Input((5, 3), name="x")
        h = keras.layers.Dense(3, name="dense")(x)
        y = xattn_test_layers.GramInverse(name="gram_inverse")(h)
        path = _save(randomize_weights(keras.Model(x, y), 5), tmp_path, "inv")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("xattn_test_layers", None)
    out = tmp_path / "o"
    # Without --import the custom layer cannot load: exit 3, and the hint names the flag.
    done = run_module("export.tflite", "--model", path, "--output-dir", str(out))
    assert done.returncode == 3 and "--import" in done.stderr, done.stderr
    done = run_module("export.tflite", "--model", path, "--import", "xattn_test_layers",
                      "--output-dir", str(out), env={"PYTHONPATH": str(tmp_path)})
    lines = _one_line(done.stderr)
    assert done.returncode == 4, done.stderr
    error = [line for line in lines if "error:" in line]
    assert len(error) == 1 and "'gram_inverse'" in error[0] and "MatrixInverse" in error[0], lines
    assert "TF Select ops" not in done.stderr  # the converter's own op list stays in -v
    assert not os.path.exists(out) or not [n for n in os.listdir(out) if not n.startswith(".")]


def test_recurrent_layers_are_unrolled_into_builtin_ops(tmp_path):
    x = keras.Input((5, 3), name="x")
    c = keras.Input((4, 3), name="c")
    h = keras.layers.LSTM(6, return_sequences=True, name="lstm")(x)
    y = xattn.CrossAttention(6, 2, name="cross_attention")([h, c])
    path = _save(randomize_weights(keras.Model([x, c], y), 6), tmp_path, "rnn")
    rc = main(["--model", path, "--output-dir", str(tmp_path / "o"), "--quiet"],
              formats=("tflite", "onnx"))
    assert rc == 0
    manifest = json.load(open(tmp_path / "o" / "rnn.tflite.json"))
    assert manifest["model"]["unrolled"] == ["lstm"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "o" / "rnn.onnx")).graph.node}
    assert "Loop" not in ops and "Scan" not in ops


def test_sequential_model_has_named_tensors(tmp_path):
    """Keras 3's Sequential has no `output_names`: its output is named from its last layer
    (a generated name gives `output`), as for a functional model."""
    from export import model_load

    model = keras.Sequential([keras.Input((4, 3), name="x"), keras.layers.Dense(2)])
    path = str(tmp_path / "seq.keras")
    randomize_weights(model, 3).save(path)
    inputs, outputs = model_load.model_tensors(model_load.load_model(path), {})
    assert [(t.name, t.shape) for t in inputs] == [("x", (4, 3))]
    assert [(t.name, t.shape) for t in outputs] == [("output", (4, 2))]
