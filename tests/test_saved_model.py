"""`--saved-model DIR`: a TensorFlow SavedModel's signature as the reference, and files that keep
state between calls (a converted LSTM) reset by every runner we ship.

The fusionlab fixtures (tests/fixtures/fusionlab) were written by fusionlab-learn 0.3.1 under
TF 2.15: XTFT and HALNet SavedModels, sample inputs, and fusionlab's own outputs for them. Every
published file is rerun here on all their rows and compared with fusionlab's outputs.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, run_module
from layer_zoo import randomize_weights

from export.cli import main
from export.errors import ParityError
from export.formats import FORMAT_NAMES, get_format
from export.runtime import runtimes

FIXTURES = os.path.join(REPO, "tests", "fixtures", "fusionlab")
XTFT = os.path.join(FIXTURES, "xtft_savedmodel")
HALNET = os.path.join(FIXTURES, "halnet_savedmodel")
# fusionlab's outputs are reproduced within this fraction of their scale (max |y|).
FUSIONLAB_GATE = 1e-4


def _npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {k: archive[k] for k in archive.files}


def _manifest(folder, artifact: str) -> dict:
    with open(os.path.join(folder, f"{artifact}.json"), encoding="utf-8") as f:
        return json.load(f)


def _run_published(folder, manifest: dict, feeds: dict) -> dict:
    """A published file run the way export.runtime.verify and export.runtime.serve run it."""
    batch = manifest["inputs"][0]["shape"][0]
    runner = runtimes.load_runner(manifest["format"], os.path.join(folder, manifest["artifact"]),
                                  batch=batch, inputs=manifest["inputs"])
    return runner.run(feeds)


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


# -- SavedModels written here -------------------------------------------------------------------


def _lstm_model(seed: int) -> keras.Model:
    """A Keras 3 forecaster with an LSTM, every weight random and non-zero (biases included)."""
    dynamic = keras.Input((6, 3), name="dynamic")
    static = keras.Input((2,), name="static")
    h = keras.layers.LSTM(8, return_sequences=True, name="lstm")(dynamic)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Concatenate()([h, keras.layers.Dense(4, name="static_proj")(static)])
    out = keras.layers.Dense(5, name="head")(h)
    return randomize_weights(keras.Model([static, dynamic], out), seed)


class _Serving(tf.Module):
    """What fusionlab users write under TF 2.15: the model's variables and one named signature."""

    def __init__(self, model: keras.Model):
        super().__init__()
        self.model = model
        self.weights = list(model.variables)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="static"),
                                  tf.TensorSpec([None, 6, 3], tf.float32, name="dynamic")])
    def serve(self, static, dynamic):
        return {"forecast": self.model([static, dynamic])}


@pytest.fixture(scope="session")
def own_saved_model(tmp_path_factory):
    """(folder, keras model): a tf.Module SavedModel holding a Keras 3 LSTM (a WHILE loop)."""
    root = tmp_path_factory.mktemp("own_sm")
    model = _lstm_model(11)
    module = _Serving(model)
    path = str(root / "lstm_savedmodel")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve,
                                                  "other": module.serve})
    return path, model


@pytest.fixture(scope="session")
def own_exported(own_saved_model, tmp_path_factory):
    """Every default format of the own SavedModel, through the library (`main`)."""
    path, _ = own_saved_model
    out = str(tmp_path_factory.mktemp("own_out"))
    assert main(["--saved-model", path, "--output-dir", out, "--quiet"]) == 0
    return out


def test_own_saved_model_every_format_matches_tensorflow(own_saved_model, own_exported):
    _, model = own_saved_model
    rng = np.random.default_rng(5)
    feeds = {"static": rng.standard_normal((7, 2), dtype=np.float32),
             "dynamic": rng.standard_normal((7, 6, 3), dtype=np.float32)}
    want = np.asarray(model([feeds["static"], feeds["dynamic"]]))
    for fmt in FORMAT_NAMES:
        manifest = _manifest(own_exported, f"lstm{get_format(fmt).suffix}")
        got = _run_published(own_exported, manifest, feeds)["forecast"]
        assert np.abs(got - want).max() < 1e-4, fmt
        assert [t["name"] for t in manifest["inputs"]] == ["dynamic", "static"]
        assert manifest["saved_model"]["signature"] == "serving_default"
        assert manifest["reference"] == "lstm.savedmodel.zip"


def test_tflite_fallback_is_logged_and_recorded(own_exported):
    manifest = _manifest(own_exported, "lstm.tflite")
    assert manifest["inputs"][0]["shape"][0] == 1  # the signature's dynamic batch: batch 1
    options = [f["option"] for f in manifest["converter_fallbacks"]]
    assert options == ["_experimental_default_to_single_batch_in_tensor_list_ops"]
    assert "state" not in manifest  # a WHILE loop: no state between calls
    assert "converter_fallbacks" not in _manifest(own_exported, "lstm.onnx")


def test_export_verify_passes_on_saved_model_artifacts(own_exported):
    done = run_module("export.verify", own_exported)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"{len(FORMAT_NAMES)} passed, 0 failed")


def test_signature_flag_picks_another_signature(own_saved_model, tmp_path):
    path, _ = own_saved_model
    rc = main(["--saved-model", path, "--signature", "other", "--name", "other",
               "--output-dir", str(tmp_path), "--quiet"], formats=("onnx",))
    assert rc == 0
    assert _manifest(tmp_path, "other.onnx")["saved_model"]["signature"] == "other"


def test_model_export_saved_model(tmp_path):
    """A SavedModel from Keras' own `model.export()` (inputs named as Keras names them)."""
    model = _lstm_model(12)
    path = str(tmp_path / "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    rc = main(["--saved-model", path, "--output-dir", str(tmp_path / "o"), "--quiet"],
              formats=("tflite", "onnx"))
    assert rc == 0
    manifest = _manifest(tmp_path / "o", "exported.onnx")
    rng = np.random.default_rng(2)
    feeds = {t["name"]: rng.standard_normal((3, *t["shape"][1:]), dtype=np.float32)
             for t in manifest["inputs"]}
    by_shape = {len(t["shape"]): t["name"] for t in manifest["inputs"]}
    want = np.asarray(model([feeds[by_shape[2]], feeds[by_shape[3]]]))
    for artifact in ("exported.onnx", "exported.tflite"):
        got = _run_published(tmp_path / "o", _manifest(tmp_path / "o", artifact), feeds)
        assert np.abs(next(iter(got.values())) - want).max() < 1e-4, artifact


# -- refusals: one line, a documented exit code, nothing published -------------------------------


@pytest.mark.parametrize(
    "args, code, needles",
    [(["--saved-model", "{sm}", "--model", "m.keras"], 2, ["--model and --saved-model"]),
     (["--saved-model", "{sm}", "--units", "8"], 2, ["--saved-model and --units"]),
     (["--saved-model", "{sm}", "--import", "os"], 2, ["--saved-model and --import"]),
     (["--signature", "x"], 2, ["--signature applies to --saved-model"]),
     (["--saved-model", "{tmp}/nowhere"], 3, ["folder not found"]),
     (["--saved-model", "{tmp}"], 3, ["is not a SavedModel", "saved_model.pb"]),
     (["--saved-model", "{sm}/saved_model.pb"], 3, ["is a file"]),
     (["--saved-model", "{sm}", "--signature", "missing"], 3,
      ["no signature 'missing'", "its signatures: other, serving_default"]),
     (["--saved-model", "{sm}", "--input-shape", "nope=3"], 2, ["nope", "dynamic, static"])],
    ids=["with-model", "with-units", "with-import", "signature-alone", "missing-folder",
         "not-a-savedmodel", "a-file", "missing-signature", "unknown-input-shape"],
)
def test_bad_saved_model_flags_are_one_line(own_saved_model, tmp_path, capsys, args, code, needles):
    path, _ = own_saved_model
    args = [a.format(sm=path, tmp=tmp_path) for a in args]
    out = tmp_path / "o"
    try:
        rc = main([*args, "--output-dir", str(out)], formats=("onnx",))
    except SystemExit as e:  # usage errors exit from the parser
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    lines = _errors(err)
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    assert not out.exists() or not [n for n in os.listdir(out) if not n.startswith(".")]


def test_tflm_refuses_saved_model(own_saved_model, tmp_path):
    path, _ = own_saved_model
    done = run_module("export.tflm", "--saved-model", path, "--output-dir", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr
    lines = _errors(done.stderr)
    assert len(lines) == 1 and "--saved-model cannot build TFLM" in lines[0], done.stderr


def test_unknown_axis_needs_input_shape(tmp_path, capsys):
    module = tf.Module()
    module.w = tf.Variable(np.random.default_rng(0).uniform(0.1, 0.5, (4, 3)).astype(np.float32))
    module.f = tf.function(lambda x: {"y": tf.reduce_sum(tf.matmul(x, module.w), axis=1)},
                           input_signature=[tf.TensorSpec([None, None, 4], tf.float32, name="x")])
    path = str(tmp_path / "free")
    tf.saved_model.save(module, path, signatures={"serving_default": module.f})
    rc = main(["--saved-model", path, "--output-dir", str(tmp_path / "o")], formats=("onnx",))
    err = capsys.readouterr().err
    assert rc == 2 and "'x'" in err and "--input-shape x=D,4" in err, err
    rc = main(["--saved-model", path, "--input-shape", "x=5,4", "--output-dir",
               str(tmp_path / "o"), "--quiet"], formats=("onnx",))
    assert rc == 0
    assert _manifest(tmp_path / "o", "free.onnx")["inputs"][0]["shape"] == [None, 5, 4]


def test_unconvertible_op_exits_4_naming_it(tmp_path):
    module = tf.Module()
    module.w = tf.Variable(np.eye(3, dtype=np.float32) * 2 + 0.1)
    module.f = tf.function(lambda x: {"y": tf.linalg.inv(tf.matmul(x, module.w))},
                           input_signature=[tf.TensorSpec([None, 3, 3], tf.float32, name="x")])
    path = str(tmp_path / "inverse")
    tf.saved_model.save(module, path, signatures={"serving_default": module.f})
    out = tmp_path / "o"
    done = run_module("export.tflite", "--saved-model", path, "--output-dir", str(out))
    assert done.returncode == 4, done.stderr
    lines = _errors(done.stderr)
    assert len(lines) == 1 and "MatrixInverse" in lines[0] and "inverse" in lines[0], done.stderr
    assert not out.exists() or not [n for n in os.listdir(out) if not n.startswith(".")]


# -- state between calls -------------------------------------------------------------------------


def test_keras3_lstm_model_is_stateless_and_checked_in_sequence(tmp_path):
    """`--model` unrolls a Keras 3 LSTM: no state; the sequence check runs and passes."""
    model = _lstm_model(13)
    path = str(tmp_path / "lstm.keras")
    model.save(path)
    rc = main(["--model", path, "--output-dir", str(tmp_path / "o"), "--quiet"],
              formats=("tflite",))
    assert rc == 0
    manifest = _manifest(tmp_path / "o", "lstm.tflite")
    assert "state" not in manifest and manifest["model"]["unrolled"] == ["lstm"]
    rng = np.random.default_rng(4)
    feeds = {"static": rng.standard_normal((5, 2), dtype=np.float32),
             "dynamic": rng.standard_normal((5, 6, 3), dtype=np.float32)}
    got = _run_published(tmp_path / "o", manifest, feeds)["head"]
    want = np.asarray(model([feeds["static"], feeds["dynamic"]]))
    assert np.abs(got - want).max() < 1e-4


# -- fusionlab-learn 0.3.1's own SavedModels (written under TF 2.15) ------------------------------


@pytest.fixture(scope="session")
def xtft_exported(tmp_path_factory):
    """`python -m export --saved-model xtft --sample-inputs s.npz`, as a user types it."""
    out = str(tmp_path_factory.mktemp("xtft"))
    done = run_module("export", "--saved-model", XTFT, "--sample-inputs",
                      os.path.join(FIXTURES, "xtft_inputs.npz"), "--output-dir", out)
    assert done.returncode == 0, done.stderr
    return out, done.stderr


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_xtft_reproduces_fusionlab(xtft_exported, fmt):
    out, _ = xtft_exported
    feeds = _npz(os.path.join(FIXTURES, "xtft_inputs.npz"))
    want = _npz(os.path.join(FIXTURES, "xtft_outputs.npz"))["forecast"]
    manifest = _manifest(out, f"xtft{get_format(fmt).suffix}")
    got = _run_published(out, manifest, feeds)["forecast"]
    assert np.abs(got - want).max() <= FUSIONLAB_GATE * np.abs(want).max(), fmt
    assert manifest["saved_model"]["tensorflow"] == "2.15.0"


def test_xtft_tflite_state_is_recorded_and_reset(xtft_exported):
    out, log = xtft_exported
    manifest = _manifest(out, "xtft.tflite")
    assert manifest["state"] == {
        "stateful": True, "ops": ["UNIDIRECTIONAL_SEQUENCE_LSTM"],
        "reset": "interpreter.reset_all_variables() before each invoke()"}
    assert "state    tflite     keeps state in UNIDIRECTIONAL_SEQUENCE_LSTM" in log
    feeds = _npz(os.path.join(FIXTURES, "xtft_inputs.npz"))
    want = _npz(os.path.join(FIXTURES, "xtft_outputs.npz"))["forecast"]
    # The trap itself: a plain interpreter without the reset drifts after the first call.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.path.join(out, "xtft.tflite"))
    interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner("serving_default")
    plain = np.concatenate([runner(**{k: v[i:i + 1] for k, v in feeds.items()})["forecast"]
                            for i in range(8)])
    assert np.abs(plain[0] - want[0]).max() < 1e-6
    assert np.abs(plain - want[:8]).max() > 1e-3
    # The pipeline's sequence check fails a runner that does not reset it.
    from export import pipeline
    from export.runtime.runtimes import Runner
    from export.saved_model_reference import SavedModelReference, load_signature

    loaded, concrete = load_signature(XTFT, "serving_default")
    ref = SavedModelReference(XTFT, "serving_default", loaded, concrete, feeds)
    spec = type("Spec", (), {"batch": 1, "model_inputs": ()})()
    leaky = Runner(lambda f: runner(**f), 1)
    leaky.state = None
    with pytest.raises(ParityError, match="keeps state between calls"):
        pipeline._check_state(leaky, spec, ref, "xtft.tflite")


def test_xtft_export_verify_and_serve_runner_reset(xtft_exported):
    out, _ = xtft_exported
    done = run_module("export.verify", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"{len(FORMAT_NAMES)} passed, 0 failed")
    # export.runtime.serve's engines (embedded and Ray) load through this function.
    from export.runtime.serve.endpoint import load_runner

    manifest = _manifest(out, "xtft.tflite")
    with open(os.path.join(out, "xtft.tflite"), "rb") as f:
        served = type("Served", (), {"data": f.read(), "manifest": manifest, "format": "tflite",
                                     "artifact": "xtft.tflite"})()
    runner = load_runner(served, 1)
    feeds = _npz(os.path.join(FIXTURES, "xtft_inputs.npz"))
    want = _npz(os.path.join(FIXTURES, "xtft_outputs.npz"))["forecast"]
    rows = [runner.check_feeds({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(6)]
    got = np.concatenate([runner.run_checked(row)["forecast"] for row in rows])
    assert np.abs(got - want[:6]).max() <= FUSIONLAB_GATE * np.abs(want).max()


def test_halnet_tflite_takes_the_fused_mul_fallback(tmp_path):
    rc = main(["--saved-model", HALNET, "--sample-inputs", os.path.join(FIXTURES, "halnet_inputs.npz"),
               "--output-dir", str(tmp_path), "--quiet"], formats=("tflite",))
    assert rc == 0
    manifest = _manifest(tmp_path, "halnet.tflite")
    assert [f["option"] for f in manifest["converter_fallbacks"]] == [
        "_experimental_disable_fuse_mul_and_fc"]
    assert manifest["state"]["stateful"] is True
    feeds = _npz(os.path.join(FIXTURES, "halnet_inputs.npz"))
    want = _npz(os.path.join(FIXTURES, "halnet_outputs.npz"))["forecast"]
    got = _run_published(tmp_path, manifest, feeds)["forecast"]
    assert np.abs(got - want).max() <= FUSIONLAB_GATE * np.abs(want).max()


# -- Keras 3 subclassed models (`--model` + `--import`) -----------------------------------------


@pytest.fixture(scope="session")
def subclassed(tmp_path_factory):
    """(path, model, feeds): tests/subclassed_models.Forecaster, built by a call, saved."""
    from subclassed_models import Forecaster

    rng = np.random.default_rng(8)
    feeds = {"history": rng.standard_normal((5, 6, 5), dtype=np.float32),
             "context": rng.standard_normal((5, 4, 5), dtype=np.float32)}
    model = Forecaster(8, name="forecaster")
    model([feeds["history"], feeds["context"]])
    randomize_weights(model, 9)
    path = str(tmp_path_factory.mktemp("subclassed") / "forecaster.keras")
    model.save(path)
    return path, model, feeds


def test_subclassed_model_exports_folded(subclassed, tmp_path):
    path, model, feeds = subclassed
    rc = main(["--model", path, "--import", "subclassed_models", "--input-shape", "history=6,5",
               "--input-shape", "context=4,5", "--output-dir", str(tmp_path), "--quiet"],
              formats=("tflite", "onnx"))
    assert rc == 0
    want = np.asarray(model([feeds["history"], feeds["context"]]))
    for artifact in ("forecaster.tflite", "forecaster.onnx"):
        manifest = _manifest(tmp_path, artifact)
        folded = {f["layer"]: f["heads"] for f in manifest["model"]["folded"]}
        assert folded == {"first_attention": 2, "second_attention": 4}
        # A layout is recorded only when the folded computation ran in the trace.
        assert all(f["layout"] for f in manifest["model"]["folded"]), manifest["model"]["folded"]
        assert [t["name"] for t in manifest["inputs"]] == ["history", "context"]
        got = _run_published(tmp_path, manifest, feeds)
        assert np.abs(next(iter(got.values())) - want).max() < 1e-4, artifact


def test_subclassed_model_shapes_from_its_build_config(subclassed, tmp_path):
    path, model, feeds = subclassed
    rc = main(["--model", path, "--import", "subclassed_models", "--output-dir", str(tmp_path),
               "--quiet"], formats=("onnx",))
    assert rc == 0
    manifest = _manifest(tmp_path, "forecaster.onnx")
    assert [t["name"] for t in manifest["inputs"]] == ["input_0", "input_1"]
    got = _run_published(tmp_path, manifest, {"input_0": feeds["history"],
                                              "input_1": feeds["context"]})
    want = np.asarray(model([feeds["history"], feeds["context"]]))
    assert np.abs(next(iter(got.values())) - want).max() < 1e-4
    # Without --import the class is unknown: exit 3, pointing at the flag.
    done = run_module("export.onnx", "--model", path, "--output-dir", str(tmp_path / "o"))
    assert done.returncode == 3 and "--import" in done.stderr, done.stderr


def test_parity_script_reports_fusionlab_figures(xtft_exported, tmp_path):
    """The docs' figures: `python -m examples.fusionlab.compare` on the published XTFT files."""
    out, _ = xtft_exported
    done = run_module("examples.fusionlab.compare", out, os.path.join(FIXTURES, "xtft_inputs.npz"),
                      os.path.join(FIXTURES, "xtft_outputs.npz"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("✓")]
    assert len(lines) == len(FORMAT_NAMES), done.stdout
    drift = [line for line in done.stdout.splitlines() if "without" in line]
    assert len(drift) == 1 and float(drift[0].split()[-1]) > 1e-3, done.stdout
    # A wrong expectation fails it.
    wrong = str(tmp_path / "wrong_outputs.npz")
    want = _npz(os.path.join(FIXTURES, "xtft_outputs.npz"))
    np.savez(wrong, forecast=want["forecast"] + 1e-3)
    done = run_module("examples.fusionlab.compare", out, os.path.join(FIXTURES, "xtft_inputs.npz"),
                      wrong)
    assert done.returncode == 1 and "✗" in done.stdout, done.stdout


def test_signed_variant_set_verifies_with_the_key(own_saved_model, tmp_path):
    """Signing and a --quantize variant work as for --model; export.runtime.verify checks the signature."""
    pytest.importorskip("model_signing")
    from test_trust import write_key_pair

    private, public = write_key_pair(tmp_path, "key")
    path, _ = own_saved_model
    out = tmp_path / "signed"
    rc = main(["--saved-model", path, "--quantize", "float16", "--sign-key", private,
               "--output-dir", str(out), "--quiet"], formats=("tflite", "onnx"))
    assert rc == 0
    manifest = _manifest(out, "lstm_fp16.tflite")
    assert manifest["quantization"]["mode"] == "float16" and manifest["parity"]["passed"]
    assert os.path.isfile(out / "lstm_fp16.tflite.sig")
    done = run_module("export.verify", "--public-key", public, str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("[signature ok]") == 2, done.stdout
    # The reference in the signed set is the SavedModel zipped: a changed byte fails it.
    with open(out / "lstm.savedmodel.zip", "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 1]))
    done = run_module("export.verify", "--public-key", public, str(out))
    assert done.returncode == 1, done.stdout + done.stderr


def test_name_with_a_path_is_refused(own_saved_model, tmp_path, capsys):
    path, _ = own_saved_model
    # The name rule is the parser's (export.names): exit 2 before anything is loaded.
    with pytest.raises(SystemExit) as exited:
        main(["--saved-model", path, "--name", "../escaped", "--output-dir", str(tmp_path / "o")],
             formats=("onnx",))
    err = _errors(capsys.readouterr().err)
    assert exited.value.code == 2 and len(err) == 1 and "'../escaped'" in err[0], err
    assert not (tmp_path / "escaped.onnx").exists() and not (tmp_path / "escaped.onnx.json").exists()


def test_js_verifier_reads_the_state_fact(xtft_exported):
    """web/lib/artifacts.mjs hands the manifest's state to the LiteRT.js runner (which compiles
    the model afresh for each call after the first: LiteRT.js has no reset_all_variables)."""
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    out, _ = xtft_exported
    script = ("import { loadArtifact } from './lib/artifacts.mjs';"
              "for (const m of process.argv.slice(1)) {"
              " const a = loadArtifact(m); console.log(a.name, a.stateful); }")
    done = subprocess.run(
        [node, "--input-type=module", "-e", script, os.path.join(out, "xtft.tflite.json"),
         os.path.join(out, "xtft.onnx.json")],
        cwd=os.path.join(REPO, "web"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["xtft.tflite true", "xtft.onnx false"], done.stdout
