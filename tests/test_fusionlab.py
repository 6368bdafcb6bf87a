"""fusionlab-learn's own files (issue 28): Keras 2 models saved by fusionlab-learn 0.3.1 itself.

The fixtures (tests/fixtures/fusionlab, `make fusionlab-fixtures`) were written in fusionlab's
own environment (TF 2.15, Keras 2.15, numpy < 2), with fusionlab's outputs for their sample
inputs: every published file is compared with those, not with our own reading of the model.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import keras
import numpy as np
import pytest
from conftest import REPO, read_json, run_module
from doc_pages import block

import xattn
from export import keras2, model_load
from export.errors import WeightsError
from export.formats import get_format
from export.runtime import runtimes

FIXTURES = os.path.join(REPO, "tests", "fixtures", "fusionlab")
FORMATS = ("savedmodel", "tflite", "onnx", "ort")
# The float32 gate against fusionlab's own outputs: atol 1e-4 of their scale.
ATOL = 1e-4


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def fusionlab_outputs(stem: str) -> tuple[dict, dict]:
    with np.load(fixture(f"{stem}_inputs.npz")) as x, np.load(fixture(f"{stem}_outputs.npz")) as y:
        return {k: x[k] for k in x.files}, {k: y[k] for k in y.files}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def fusionlab_exports(tmp_path_factory):
    """{suffix: output dir}: `python -m export --model FILE --sample-inputs s.npz` and nothing
    else, run from an empty folder (artifacts/ is the default output), on the .keras and the
    .h5 file fusionlab-learn wrote."""
    built = {}
    for suffix in ("keras", "h5"):
        cwd = tmp_path_factory.mktemp(f"fusionlab_{suffix}")
        done = run_module("export", "--model", fixture(f"forecaster.{suffix}"),
                          "--sample-inputs", fixture("forecaster_inputs.npz"), cwd=str(cwd))
        assert done.returncode == 0, done.stderr
        built[suffix] = (str(cwd / "artifacts"), done)
    return built


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_one_command_publishes_every_format(fusionlab_exports, suffix):
    out, done = fusionlab_exports[suffix]
    for fmt in FORMATS:
        assert os.path.exists(os.path.join(out, f"forecaster{get_format(fmt).suffix}.json")), fmt
    assert "publish  4 artifact(s)" in done.stderr + done.stdout


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_published_file_reproduces_fusionlab_outputs(fusionlab_exports, suffix, fmt):
    out, _ = fusionlab_exports[suffix]
    manifest = read_json(os.path.join(out, f"forecaster{get_format(fmt).suffix}.json"))
    runner = runtimes.load_runner(fmt, os.path.join(out, manifest["artifact"]),
                                  batch=manifest["inputs"][0]["shape"][0], inputs=manifest["inputs"])
    feeds, expected = fusionlab_outputs("forecaster")
    got = runner.run(feeds)["forecast"]
    want = expected["forecast"]
    assert got.shape == want.shape == (64, 4, 1)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=ATOL * scale, rtol=0)
    # The outputs differ row to row: a file that ignored an input would not pass by chance.
    assert float(np.std(want)) > 1e-2


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_manifest_says_what_the_file_was(fusionlab_exports, suffix):
    out, _ = fusionlab_exports[suffix]
    model = read_json(os.path.join(out, "forecaster.onnx.json"))["model"]
    assert model["source"] == f"forecaster.{suffix}"
    assert model["keras2"] == {
        "saved_by": "Keras 2.15.0",
        "format": suffix,
        "fusionlab_layers": [
            {"layer": "cross_attention", "class": "fusionlab.nn.components.CrossAttention",
             "units": 16, "heads": 2},
            {"layer": "cross_attention_1", "class": "fusionlab.nn.components.CrossAttention",
             "units": 16, "heads": 4},
        ],
    }
    # Both fusionlab layers run the folded computation, with the heads their weights gave.
    assert [(f["layer"], f["heads"]) for f in model["folded"]] == [
        ("cross_attention", 2), ("cross_attention_1", 4)]
    assert model["unrolled"] == ["encoder"]


def test_published_reference_is_a_keras3_file_of_the_same_model(fusionlab_exports):
    """Keras 3 cannot reload the Keras 2 file: the reference published beside the artifacts is
    the model as it was read, and reproduces fusionlab's outputs with xattn alone."""
    out, _ = fusionlab_exports["h5"]
    path = os.path.join(out, "forecaster.keras")
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("metadata.json"))["keras_version"].startswith("3.")
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    feeds, expected = fusionlab_outputs("forecaster")
    got = np.asarray(model(feeds, training=False))
    np.testing.assert_allclose(got, expected["forecast"], atol=1e-5, rtol=0)
    assert sum(isinstance(layer, xattn.CrossAttention) for layer in model.layers) == 2


def test_the_pages_compare_command_passes_on_the_h5_export(fusionlab_exports):
    """docs/fusionlab.md's block: its first command is fusionlab_exports' .h5 run (the same
    command, from an empty folder); its second, `python -m examples.fusionlab.compare artifacts/
    ...`, runs here on what that published: every format within the gate of fusionlab's outputs."""
    out, _ = fusionlab_exports["h5"]
    done = run_module("examples.fusionlab.compare", "artifacts/", fixture("forecaster_inputs.npz"),
                      fixture("forecaster_outputs.npz"), cwd=os.path.dirname(out),
                      env={"PYTHONPATH": REPO})  # `examples` is the checkout's, not installed
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("✓")]
    assert sorted(passed) == sorted(f"forecaster{get_format(f).suffix}" for f in FORMATS), done.stdout


def test_export_verify_passes(fusionlab_exports):
    out, _ = fusionlab_exports["keras"]
    done = run_module("export.verify", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed, 0 failed" in done.stdout


# -- reading Keras 2 files (library) ------------------------------------------------------------


@pytest.mark.parametrize("name", ["forecaster.keras", "forecaster.h5", "sequential.keras",
                                  "sequential.h5", "tf_ops.keras", "tf_ops.h5",
                                  "many_layers.keras", "many_layers.h5"])
def test_keras2_file_loads_as_fusionlab_ran_it(name):
    model, origin = model_load.load_model_file(fixture(name))
    assert origin is not None and origin.keras_version == "2.15.0"
    stem = name.split(".")[0]
    feeds, expected = fusionlab_outputs(stem)
    (want,) = expected.values()
    inputs = feeds if len(feeds) > 1 else next(iter(feeds.values()))
    got = np.asarray(model(inputs, training=False))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert float(np.std(want)) > 1e-2


def test_tf_functions_on_keras2_tensors_export(tmp_path):
    """x + y, x * 0.5, tf.nn.relu, tf.concat, x[:, -2:], tf.reduce_mean, tf.expand_dims,
    tf.reshape on Keras 2 tensors, a Bidirectional LSTM and a TimeDistributed Dense: every
    published file reproduces fusionlab's outputs, and the reference reloads in Keras 3."""
    from examples.fusionlab.compare import compare
    from export.cli import main

    out = str(tmp_path / "out")
    assert main(["--model", fixture("tf_ops.h5"), "--sample-inputs", fixture("tf_ops_inputs.npz"),
                 "--output-dir", out, "--quiet"]) == 0
    results = compare(out, fixture("tf_ops_inputs.npz"), fixture("tf_ops_outputs.npz"))
    assert sorted(r["format"] for r in results) == sorted(FORMATS)
    assert all(r["ok"] and r["rows"] == 64 for r in results), results
    manifest = read_json(os.path.join(out, "tf_ops.onnx.json"))["model"]
    # The Bidirectional's two LSTMs (Keras 3 names them), unrolled.
    assert len(manifest["unrolled"]) == 2 and all("lstm" in n for n in manifest["unrolled"])
    assert [(f["layer"], f["heads"]) for f in manifest["keras2"]["fusionlab_layers"]] == [
        ("cross_attention_3", 4)]
    reference = keras.saving.load_model(os.path.join(out, "tf_ops.keras"), safe_mode=True)
    feeds, expected = fusionlab_outputs("tf_ops")
    np.testing.assert_allclose(np.asarray(reference(feeds)), expected["forecast"], atol=1e-5, rtol=0)


def test_many_keras2_layers_export(tmp_path):
    """SeparableConv1D, Conv1DTranspose, SpatialDropout1D, Attention, AdditiveAttention,
    SimpleRNN, a Bidirectional GRU (reset_after=False), PReLU, ... from a Keras 2 .h5 file:
    ONNX and TFLite reproduce fusionlab's environment's outputs."""
    from examples.fusionlab.compare import compare
    from export.cli import main

    out = str(tmp_path / "out")
    assert main(["--model", fixture("many_layers.h5"), "--sample-inputs",
                 fixture("many_layers_inputs.npz"), "--output-dir", out, "--quiet"],
                formats=("onnx", "tflite")) == 0
    results = compare(out, fixture("many_layers_inputs.npz"), fixture("many_layers_outputs.npz"))
    assert sorted(r["format"] for r in results) == ["onnx", "tflite"]
    assert all(r["ok"] for r in results), results


def test_only_inert_keras2_keys_are_dropped():
    """A key Keras 3 does not take is dropped only when it changes nothing at inference."""
    cfg = {"filters": 3, "kernel_size": [2], "groups": 1, "kernel_initializer": {}, "time_skew": 1}
    keras2._drop_inert_keys("Conv1DTranspose", cfg)
    assert cfg == {"filters": 3, "kernel_size": [2], "kernel_initializer": {}, "time_skew": 1}
    cfg = {"rate": 0.1, "trainable": True, "noise_shape": None, "seed": None}
    keras2._drop_inert_keys("SpatialDropout1D", cfg)
    assert cfg == {"rate": 0.1, "seed": None}
    cfg = {"filters": 3, "groups": 2}  # a real grouping Keras 3 cannot do: left for Keras to refuse
    keras2._drop_inert_keys("Conv1DTranspose", cfg)
    assert cfg == {"filters": 3, "groups": 2}


def test_unmapped_tf_function_is_named(tmp_path):
    def edit(config):
        layer = next(x for x in config["config"]["layers"] if x["config"]["name"] == "tf.nn.relu")
        layer["config"]["function"] = "signal.rfft"

    with pytest.raises(WeightsError) as info:
        model_load.load_model_file(_edited(fixture("tf_ops.keras"), tmp_path / "fft.keras", edit))
    text = str(info.value)
    assert "layer 'tf.nn.relu'" in text and "tf.signal.rfft" in text and "--saved-model" in text


def test_keras2_lambda_is_refused_as_unsafe(tmp_path):
    """A Keras 2 Lambda (marshalled Python bytecode in the config) is refused before anything
    reads it, naming the layer."""
    def edit(config):
        layer = next(x for x in config["config"]["layers"] if x["config"]["name"] == "tf.nn.relu")
        layer.update(class_name="Lambda", module="keras.layers", registered_name=None)
        layer["config"] = {"name": "scale", "function": ["4wEAAAAAAAAA", None, None],
                           "function_type": "lambda", "module": "__main__", "arguments": {}}

    with pytest.raises(WeightsError) as info:
        model_load.load_model_file(_edited(fixture("tf_ops.keras"), tmp_path / "lam.keras", edit))
    text = str(info.value)
    assert "layer 'scale', a Lambda layer" in text and "safe_mode" in text


def test_keras2_nodes_keep_a_tf_functions_structure():
    """Keras 2 writes a TensorFlow function's one-tensor call as the entry itself and a list
    argument (tf.concat) as a list; a layer's one-tensor list is the tensor."""
    single = keras2._translate_node(["a", 0, 0, {"y": ["b", 0, 0], "name": None}], True)
    assert single["args"][0]["config"]["keras_history"] == ["a", 0, 0]
    assert single["kwargs"]["y"]["config"]["keras_history"] == ["b", 0, 0]
    assert "name" not in single["kwargs"]
    listed = keras2._translate_node([["a", 0, 0, {"axis": -1}], ["b", 0, 1, {"axis": -1}]], True)
    assert [t["config"]["keras_history"] for t in listed["args"][0]] == [["a", 0, 0], ["b", 0, 1]]
    assert listed["kwargs"] == {"axis": -1}
    layer = keras2._translate_node([["a", 0, 0, {}]])
    assert layer["args"][0]["config"]["keras_history"] == ["a", 0, 0]


def test_keras2_sequential_keeps_its_class_and_exports(tmp_path):
    from examples.fusionlab.compare import compare
    from export.cli import main

    model, origin = model_load.load_model_file(fixture("sequential.h5"))
    assert isinstance(model, keras.Sequential)
    assert [t.name for t in model.inputs] == ["history"]
    assert origin.fusionlab_layers == []
    out = str(tmp_path / "out")
    assert main(["--model", fixture("sequential.keras"), "--sample-inputs",
                 fixture("sequential_inputs.npz"), "--output-dir", out, "--quiet"],
                formats=("onnx",)) == 0
    (result,) = compare(out, fixture("sequential_inputs.npz"), fixture("sequential_outputs.npz"))
    assert result["ok"] and result["format"] == "onnx", result


def test_multi_head_attention_config_is_translated():
    """Keras 2 keeps MultiHeadAttention's input shapes in its config and calls it with a
    keyword `value` tensor; Keras 3 takes the shapes as a build config and a tensor reference."""
    with zipfile.ZipFile(fixture("forecaster.keras")) as archive:
        raw = json.loads(archive.read("config.json"))
    config, found = keras2.translate_config(raw, {"cross_attention": 2, "cross_attention_1": 4},
                                            "f.keras")
    layers = {layer["config"]["name"]: layer for layer in config["config"]["layers"]}
    mha = layers["self_attention"]
    assert not {"query_shape", "key_shape", "value_shape"} & set(mha["config"])
    assert mha["build_config"]["shapes_dict"]["query_shape"] == [None, 4, 16]
    value = mha["inbound_nodes"][0]["kwargs"]["value"]
    assert value["class_name"] == "__keras_tensor__"
    assert value["config"]["keras_history"] == ["attn_norm", 0, 0]
    assert layers["cross_attention_1"]["config"]["num_heads"] == 4
    assert layers["cross_attention_1"]["registered_name"] == "xattn>CrossAttention"
    assert [f["heads"] for f in found] == [2, 4]
    # The file's own config is left as it was.
    assert "query_shape" in json.dumps(raw)


def test_moved_weights_reproduce_fusionlab_layer():
    """A fusionlab layer's get_weights() (.npz) or a Keras 2 save_weights file, in xattn's layer."""
    feeds, expected = fusionlab_outputs("cross_attention")
    source1 = keras.Input((4, 16), name="source1")
    source2 = keras.Input((9, 16), name="source2")
    layer = xattn.CrossAttention(16, 4, name="cross_attention")
    model = keras.Model([source1, source2], layer([source1, source2]))
    with np.load(fixture("cross_attention_weights.npz")) as w:
        layer.set_weights([w[f"arr_{i}"] for i in range(12)])
    got = np.asarray(model([feeds["source1"], feeds["source2"]]))
    np.testing.assert_allclose(got, expected["output"], atol=1e-5, rtol=0)
    fresh = xattn.CrossAttention(16, 4, name="cross_attention")
    model = keras.Model([source1, source2], fresh([source1, source2]))
    model.load_weights(fixture("cross_attention.weights.h5"))
    got = np.asarray(model([feeds["source1"], feeds["source2"]]))
    np.testing.assert_allclose(got, expected["output"], atol=1e-5, rtol=0)


# -- errors keep their reason -------------------------------------------------------------------


def test_subclassed_fusionlab_model_points_to_saved_model(tmp_path):
    done = run_module("export.onnx", "--model", fixture("xtft.keras"),
                      "--output-dir", str(tmp_path / "o"))
    lines = _lines(done.stderr)
    assert done.returncode == 3 and len(lines) == 1, done.stderr
    assert "fusionlab.nn.hybrid._xtft.XTFT" in lines[0]
    assert "--saved-model" in lines[0] and "Keras 2" in lines[0]
    assert "{" not in lines[0] and len(lines[0]) < 400
    assert not (tmp_path / "o").exists()


def _edited(src: str, dst, edit) -> str:
    """A copy of the .keras archive `src` with its config.json changed by `edit`."""
    with zipfile.ZipFile(src) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    edit(config)
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return str(dst)


def test_unknown_keras2_layer_is_named(tmp_path):
    """A fusionlab layer other than CrossAttention (VariableSelectionNetwork) in a Keras 2
    file: the layer and its class are named, and --saved-model is the way."""
    def edit(config):
        layer = config["config"]["layers"][7]
        layer["module"] = "fusionlab.nn.components"
        layer["class_name"] = "VariableSelectionNetwork"
        layer["registered_name"] = "fusionlab.nn.components>VariableSelectionNetwork"

    with pytest.raises(WeightsError) as info:
        model_load.load_model_file(_edited(fixture("forecaster.keras"), tmp_path / "vsn.keras", edit))
    text = str(info.value)
    assert "'cross_attention'" in text and "fusionlab.nn.components.VariableSelectionNetwork" in text
    assert "--saved-model" in text and "\n" not in text


def test_heads_mismatch_keeps_the_cause(tmp_path):
    """A file whose layer config disagrees with its weights (what a wrongly guessed `num_heads`
    gives): Keras says "A total of 4 objects could not be loaded. Example error message ..."
    then lists the objects; the one line keeps which objects and the first one's cause."""
    x = keras.Input((4, 16), name="x")
    kv = keras.Input((9, 16), name="kv")
    model = keras.Model([x, kv], xattn.CrossAttention(16, 4, name="ca")([x, kv]))
    path = str(tmp_path / "m.keras")
    model.save(path)

    def edit(config):
        config["config"]["layers"][2]["config"]["num_heads"] = 2

    bad = _edited(path, tmp_path / "bad.keras", edit)
    done = run_module("export.onnx", "--model", bad, "--output-dir", str(tmp_path / "o"))
    lines = _lines(done.stderr)
    assert done.returncode == 3 and len(lines) == 1, done.stderr
    assert "4 objects do not fit the model's weights (key, attention_output, query, value)" \
        in lines[0]
    assert "the first: Layer 'key' expected 2 variables, but received 0" in lines[0]
    assert "List of objects" not in lines[0] and len(lines[0]) < 400


def test_shape_mismatch_names_the_variable_and_both_shapes():
    """Keras' message for a value of the wrong shape prints the variable's values after the
    two shapes that say what is wrong: the reason keeps the path and the shapes only."""
    error = ValueError(
        "A total of 4 objects could not be loaded. Example error message for object <EinsumDense "
        "name=key, built=True>:\n\nThe shape of the target variable and the shape of the target "
        "value in `variable.assign(value)` must match. variable.shape=(16, 2, 16), Received: "
        "value.shape=(16, 4, 16). Target variable: <Variable path=ca/cross_attention/key/kernel, "
        "shape=(16, 2, 16), dtype=float32, value=[[[-0.06 -0.27]\n  [0.1 0.2]]]>\n\n"
        "List of objects that could not be loaded:\n[<EinsumDense name=key, built=True>, "
        "<EinsumDense name=query, built=True>]")
    assert model_load.load_failure_reason(error) == (
        "4 objects do not fit the model's weights (key, query); the first: variable "
        "ca/cross_attention/key/kernel: the file holds shape (16, 4, 16) where the model has "
        "(16, 2, 16)")


def test_weights_only_h5_is_sent_to_weights():
    with pytest.raises(WeightsError, match="save_weights, go to --weights"):
        model_load.load_model_file(fixture("cross_attention.weights.h5"))


def test_reason_drops_the_config_and_keeps_the_cause():
    error = TypeError(
        "<class 'Functional'> could not be deserialized properly.\n\nconfig={'a': 1}.\n\n"
        "Exception encountered: Could not locate class 'Gizmo'. Make sure custom classes are "
        "decorated. Full object config: {'module': 'x', 'class_name': 'Gizmo'}")
    reason = model_load.load_failure_reason(error)
    assert reason == "Could not locate class 'Gizmo'. Make sure custom classes are decorated."


def test_h5_model_file_names_the_artifacts(tmp_path):
    """The stem of a .h5 model file is its name without the suffix."""
    shutil.copy(fixture("sequential.h5"), tmp_path / "my model.h5")
    assert model_load.default_stem(str(tmp_path / "my model.h5")) == "my_model"


# -- the docs page (docs/fusionlab.md) ---------------------------------------------------------


def test_docs_saved_model_snippet_is_the_fixture_scripts():
    """The SavedModel code the page tells fusionlab users to run is the code that wrote the
    XTFT and HALNet fixtures the tests export."""
    code = block("python", "def serving_module(")
    start = code.index("def serving_module(")
    snippet = code[start:code.index("    return module, serve\n", start) + len("    return module, serve\n")]
    with open(fixture("make_fixtures.py"), encoding="utf-8") as f:
        assert snippet in f.read()
    assert 'tf.saved_model.save(module, "xtft_savedmodel", signatures={"serving_default": serve})' \
        in code


def test_docs_weights_example_runs(monkeypatch):
    """The page's weights example, run as written from the repository's root: both ways give
    the fusionlab layer's outputs."""
    monkeypatch.chdir(REPO)
    code = block("python", "cross_attention_weights.npz")
    scope: dict = {}
    exec(compile(code, "docs/fusionlab.md (weights example)", "exec"), scope)
    feeds, expected = fusionlab_outputs("cross_attention")
    model = scope["model"]
    got = np.asarray(model([feeds["source1"], feeds["source2"]]))
    np.testing.assert_allclose(got, expected["output"], atol=1e-5, rtol=0)
    # The .weights.h5 line replaced what set_weights loaded: both are the same weights.
    with np.load(fixture("cross_attention_weights.npz")) as w:
        for i, loaded in enumerate(scope["layer"].get_weights()):
            np.testing.assert_array_equal(loaded, w[f"arr_{i}"])
