"""The command line (issue 3): every entry point once through subprocess; flags, usage errors,
`--weights` files and a failed verification through the shared parser and `export.cli.main`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import run_module

from export import FORMATS, flags
from export.cli import build_parser, main

SMALL = dict(units=8, heads=2, query_len=4, kv_len=5, query_features=6, kv_features=7)
SMALL_ARGS = [a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", str(v))]
SMALL_NAME = "xattn_u8_h2_q4x6_kv5x7"
ATOL = {"savedmodel": 1e-5, "onnx": 1e-4, "tflite": 1e-4, "ort": 1e-4}
ENTRY_POINTS = {
    "export": FORMATS,
    "export.onnx": ("onnx",),
    "export.tflite": ("tflite",),
    "export.savedmodel": ("savedmodel",),
    "export.ort": ("ort",),
}
# What each entry point writes for SMALL (plus the reference and golden vectors).
ARTIFACTS = {
    "savedmodel": f"{SMALL_NAME}_savedmodel",
    "tflite": f"{SMALL_NAME}.tflite",
    "onnx": f"{SMALL_NAME}.onnx",
    "ort": f"{SMALL_NAME}.ort",
}
LOG_STEPS = ("build ", "convert ", "verify ", "publish ", "done ")


@pytest.fixture(autouse=True)
def _restore_export_logger():
    """`main()` points the export logger at the test's captured stderr; undo that afterwards."""
    logger = logging.getLogger("export")
    state = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = state[0], state[1], state[2]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def tree_sha256(folder: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def staging_leftovers(folder) -> list[str]:
    return [e for e in os.listdir(folder) if e.startswith((".xattn-staging-", ".xattn-trash-"))]


def assert_one_line_error(rc, err: str, *needles: str, code: int | None = None):
    assert rc != 0
    if code is not None:
        assert rc == code, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -- each entry point once, through subprocess (run together: imports dominate) --------------------


@pytest.fixture(scope="module")
def entry_runs(tmp_path_factory):
    """module -> (output_dir, CompletedProcess) for the small configuration."""
    extra = {
        "export": [],
        "export.onnx": [],
        "export.tflite": ["--quiet"],
        "export.savedmodel": ["--name", "custom_name"],
        "export.ort": [],
    }
    dirs = {m: str(tmp_path_factory.mktemp(m.replace(".", "_"))) for m in ENTRY_POINTS}
    with ThreadPoolExecutor(len(ENTRY_POINTS)) as pool:
        futures = {
            m: pool.submit(run_module, m, *SMALL_ARGS, "--output-dir", dirs[m], *extra[m])
            for m in ENTRY_POINTS
        }
        return {m: (dirs[m], f.result()) for m, f in futures.items()}


@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_entry_point_writes_verified_files(entry_runs, module):
    out, proc = entry_runs[module]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    name = "custom_name" if module == "export.savedmodel" else SMALL_NAME
    expected = {f"{name}.keras", f"{name}.golden.npz", f"{name}.golden.json", f"{name}.golden.bin",
                ".xattn.lock"}
    for fmt in ENTRY_POINTS[module]:
        artifact = ARTIFACTS[fmt].replace(SMALL_NAME, name)
        expected |= {artifact, f"{artifact}.json"}
    assert set(os.listdir(out)) == expected
    for fmt in ENTRY_POINTS[module]:
        artifact = ARTIFACTS[fmt].replace(SMALL_NAME, name)
        with open(os.path.join(out, f"{artifact}.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        assert manifest["format"] == fmt and manifest["artifact"] == artifact
        assert manifest["parity"]["passed"] is True
        assert manifest["config"]["units"] == SMALL["units"]
        assert manifest["config"]["num_heads"] == SMALL["heads"]
        # Not the manifest's word for it: the file, run here, against the published reference.
        got = rerun(fmt, os.path.join(out, artifact), FRESH)
        expected = keras_reference(os.path.join(out, f"{name}.keras"), FRESH)
        assert np.std(expected) > 1e-2
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL[fmt], err_msg=f"{module} {fmt}")


# Fresh inputs for SMALL (not the pipeline's seeds): 2 rows.
_rng = np.random.default_rng(31337)
FRESH = {"source1": _rng.standard_normal((2, 4, 6), dtype=np.float32),
         "source2": _rng.standard_normal((2, 5, 7), dtype=np.float32)}


def keras_reference(path: str, feeds: dict) -> np.ndarray:
    import keras

    import xattn  # noqa: F401  (registers CrossAttention)

    return np.asarray(keras.saving.load_model(path)(feeds, training=False)["output"])


def rerun(fmt: str, path: str, feeds: dict) -> np.ndarray:
    """The file in its own runtime, driven directly; batch-1 files row by row."""
    rows = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(len(feeds["source1"]))]
    if fmt in ("onnx", "ort"):
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(["output"], f)[0] for f in (rows if fmt == "ort" else [feeds])])
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=path).get_signature_runner("serving_default")
        return np.concatenate([runner(**f)["output"] for f in rows])
    import tensorflow as tf

    signature = tf.saved_model.load(path).signatures["serving_default"]
    return signature(**{k: tf.constant(v) for k, v in feeds.items()})["output"].numpy()


def test_log_on_stderr_and_only_the_table_on_stdout(entry_runs):
    out, proc = entry_runs["export"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["artifact", "size", "max", "abs", "diff", "rel", "L2", "placement",
                                "path"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = lines[2:]
    assert [row.split()[0] for row in rows] == list(FORMATS)
    for row, fmt in zip(rows, FORMATS):
        cells = row.split()
        assert cells[-1] == os.path.join(out, ARTIFACTS[fmt])
        assert os.path.exists(cells[-1])
        assert cells[2] in ("KB", "MB")
        assert float(cells[3]) <= ATOL[fmt]
        assert 0 <= float(cells[4]) < 1e-4
    steps = [line.split()[0] for line in proc.stderr.splitlines() if line.strip()]
    for step in LOG_STEPS:
        assert step.strip() in steps, proc.stderr
    for fmt in FORMATS:
        assert any(line.startswith("verify") and fmt in line for line in proc.stderr.splitlines())
    # LiteRT's C++ "Created TensorFlow Lite XNNPACK delegate" line is filtered out.
    assert "XNNPACK" not in proc.stderr


def test_quiet_prints_nothing_on_success(entry_runs):
    out, proc = entry_runs["export.tflite"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""
    assert os.path.isfile(os.path.join(out, ARTIFACTS["tflite"]))


def test_onnx_entry_point_records_default_opset(entry_runs):
    from export.onnx.build import max_opset

    out, proc = entry_runs["export.onnx"]
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(out, f"{ARTIFACTS['onnx']}.json"), encoding="utf-8") as f:
        assert json.load(f)["opset"] == max_opset()


# -- a failed verification --------------------------------------------------------------------------


def test_failed_verification_leaves_earlier_files(entry_runs, tmp_path, capfd):
    earlier, _ = entry_runs["export"]
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before = tree_sha256(str(out))
    capfd.readouterr()
    # The folder's own weights (seed 0): a new seed under the same name is refused earlier.
    rc = main([*SMALL_ARGS, "--output-dir", str(out), "--atol", "1e-15", "--quiet"],
              formats=("onnx",), prog="python -m export.onnx")
    captured = capfd.readouterr()
    assert_one_line_error(rc, captured.err, "max abs diff", "atol=1e-15", code=1)
    assert captured.out == ""
    assert tree_sha256(str(out)) == before
    assert not staging_leftovers(out)


# -- usage errors -----------------------------------------------------------------------------------

USAGE_ERRORS = {
    "units-0": ["--units", "0"],
    "heads-negative": ["--heads", "-1"],
    "units-abc": ["--units", "abc"],
    "batch-0": ["--batch", "0"],
    "batch-word": ["--batch", "many"],
    "query-len-0": ["--query-len", "0"],
    "kv-len-0": ["--kv-len", "0"],
    "query-features-0": ["--query-features", "0"],
    "kv-features-negative": ["--kv-features", "-3"],
    "unknown-flag": ["--bogus"],
    "seed-negative": ["--seed", "-1"],
    "atol-0": ["--atol", "0"],
}


@pytest.mark.parametrize("argv", list(USAGE_ERRORS.values()), ids=list(USAGE_ERRORS))
def test_usage_error_is_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser(FORMATS).parse_args(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(2, captured.err, "error:", argv[0])


def test_usage_error_through_main(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--units", "0"], formats=("onnx",), prog="python -m export.onnx")
    assert exc.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "python -m export.onnx", "--units")


def test_tflite_refuses_dynamic_batch(tmp_path, capfd):
    # The parser refuses it (the registry: tflite has no dynamic batch), before any build.
    with pytest.raises(SystemExit) as exc:
        main([*SMALL_ARGS, "--batch", "dynamic", "--output-dir", str(tmp_path / "out")],
             formats=("tflite",), prog="python -m export.tflite")
    assert_one_line_error(exc.value.code, capfd.readouterr().err, "--batch dynamic", "tflite", code=2)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_parser_defaults():
    args = build_parser(FORMATS).parse_args([])
    assert (args.units, args.heads, args.query_len, args.kv_len, args.query_features,
            args.kv_features) == (None,) * 6  # None: from --weights or the documented defaults
    assert args.seed == 0 and args.output_dir == "artifacts" and args.atol is None
    assert args.batch is flags.FORMAT_BATCH  # each format's own default batch
    # Options a parser does not offer are there too, meaning what their absence means.
    tflm = build_parser(("tflm",)).parse_args([])
    assert (tflm.opset, tflm.lengths, tflm.saved_model) == (None, None, None)
    assert tflm.quantize == "int8"  # its own default, not the absent one
    saved = build_parser(("savedmodel",)).parse_args([])
    assert (saved.quantize, saved.int8_io, saved.calibration, saved.arena_limit) == (
        "none", False, None, None)


@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_help(module, capsys):
    import importlib

    from export.onnx.build import max_opset

    entry = importlib.import_module(f"{module}.__main__").main
    with pytest.raises(SystemExit) as exc:
        entry(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--units", "--heads", "--query-len", "--kv-len", "--query-features",
                 "--kv-features", "--batch", "--weights", "--seed", "--output-dir", "--name",
                 "--atol", "--quiet"):
        assert flag in text, flag
    if {"onnx", "ort"} & set(ENTRY_POINTS[module]):
        assert "--opset" in text
        assert f"default {max_opset()}" in " ".join(text.split())
    else:
        assert "--opset" not in text


# -- --weights ---------------------------------------------------------------------------------------

FILE_LAYER = dict(units=12, heads=3, query_features=6, kv_features=7)


def _random_weights(layer, seed: int) -> list[np.ndarray]:
    """Every weight random and non-zero (biases included), scaled to keep activations O(1)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.choice([-1.0, 1.0], w.shape) * rng.uniform(0.05, 0.4, w.shape)).astype(np.float32)
        for w in layer.get_weights()
    ]


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """A user's .keras: a keras.Model holding a CrossAttention (then a Dense) with random weights."""
    import keras

    from xattn import CrossAttention

    path = str(tmp_path_factory.mktemp("weights") / "user_model.keras")
    a = keras.Input((9, FILE_LAYER["query_features"]), name="a")
    b = keras.Input((2, FILE_LAYER["kv_features"]), name="b")
    layer = CrossAttention(FILE_LAYER["units"], FILE_LAYER["heads"], name="user_attention")
    y = keras.layers.Dense(3, name="head")(layer([a, b]))
    model = keras.Model([a, b], y)
    layer.set_weights(_random_weights(layer, seed=7))
    model.save(path)
    return path, layer


def _feeds(rows: int, query_len: int, kv_len: int, fq: int, fkv: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "source1": rng.standard_normal((rows, query_len, fq), dtype=np.float32),
        "source2": rng.standard_normal((rows, kv_len, fkv), dtype=np.float32),
    }


def test_weights_from_keras_file(keras_file, tmp_path, capfd):
    import onnxruntime as ort

    path, layer = keras_file
    out = tmp_path / "out"
    # Lengths always come from the flags; units, heads and features from the file.
    rc = main(["--weights", path, "--query-len", "4", "--kv-len", "5", "--output-dir", str(out),
               "--quiet"], formats=("onnx",), prog="python -m export.onnx")
    assert rc == 0, capfd.readouterr().err
    name = "xattn_u12_h3_q4x6_kv5x7"
    with open(out / f"{name}.onnx.json", encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["config"]["units"] == 12 and manifest["config"]["num_heads"] == 3
    assert manifest["weights"] == os.path.basename(path)
    feeds = _feeds(3, 4, 5, 6, 7, seed=21)
    expected = np.asarray(layer([feeds["source1"], feeds["source2"]]))
    session = ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["output"], feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL["onnx"])
    assert np.std(expected) > 1e-2


def test_weights_keras_file_agreeing_flags_are_fine_contradicting_flag_is_an_error(
        keras_file, tmp_path, capfd):
    path, _ = keras_file
    rc = main(["--weights", path, "--units", "99", "--heads", "3", "--output-dir", str(tmp_path),
               "--quiet"], formats=("onnx",), prog="python -m export.onnx")
    assert_one_line_error(rc, capfd.readouterr().err, "--units 99", "units=12", path, code=2)
    assert os.listdir(tmp_path) == []


# seed 0 is also the pipeline's default: its weights must not be mistaken for missing ones.
@pytest.mark.parametrize("seed", [31, 0], ids=["seed31-weights", "seed0-weights"])
def test_weights_from_h5(seed, tmp_path, capfd):
    from ai_edge_litert.interpreter import Interpreter

    from export import reference
    from export.spec import ArtifactSpec

    spec = ArtifactSpec(**SMALL)
    model = reference.build_reference(spec, reference.random_weights(spec, seed=seed))
    h5 = str(tmp_path / "user.weights.h5")
    model.save_weights(h5)
    out = tmp_path / "out"
    rc = main(["--weights", h5, *SMALL_ARGS, "--output-dir", str(out), "--quiet"],
              formats=("tflite",), prog="python -m export.tflite")
    assert rc == 0, capfd.readouterr().err
    runner = Interpreter(model_path=str(out / ARTIFACTS["tflite"])).get_signature_runner()
    feeds = _feeds(1, 4, 5, 6, 7, seed=22)
    expected = np.asarray(model(feeds, training=False)["output"])
    np.testing.assert_allclose(runner(**feeds)["output"], expected, rtol=0, atol=ATOL["tflite"])
    if seed != 0:
        # ... and not the seeded weights the pipeline would otherwise use.
        seeded = reference.build_reference(spec, reference.random_weights(spec, seed=0))
        assert np.abs(np.asarray(seeded(feeds)["output"]) - expected).max() > 1e-2


def _bad_weights(kind: str, tmp_path) -> str:
    if kind == "missing":
        return str(tmp_path / "nowhere.keras")
    if kind == "wrong-suffix":
        path = tmp_path / "weights.npz"
        path.write_bytes(b"not weights")
        return str(path)
    if kind == "corrupt-keras":
        path = tmp_path / "corrupt.keras"
        path.write_bytes(os.urandom(512))
        return str(path)
    if kind == "corrupt-h5":
        path = tmp_path / "corrupt.weights.h5"
        path.write_bytes(os.urandom(512))
        return str(path)
    if kind == "h5-wrong-shapes":
        from export import reference
        from export.spec import ArtifactSpec

        spec = ArtifactSpec(**{**SMALL, "units": 16})
        path = str(tmp_path / "other.weights.h5")
        reference.build_reference(spec, reference.random_weights(spec, 1)).save_weights(path)
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["missing", "wrong-suffix", "corrupt-keras", "corrupt-h5", "h5-wrong-shapes"]
)
def test_bad_weights_file_is_one_line_naming_it(kind, tmp_path, capfd):
    path = _bad_weights(kind, tmp_path)
    capfd.readouterr()
    rc = main(["--weights", path, *SMALL_ARGS, "--output-dir", str(tmp_path / "out"), "--quiet"],
              formats=("onnx",), prog="python -m export.onnx")
    # A file of another configuration: the message shows what the file holds (units 16).
    needles = ["(6, 16)"] if kind == "h5-wrong-shapes" else []
    assert_one_line_error(rc, capfd.readouterr().err, path, *needles)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_keras_file_with_lambda_is_refused_unexecuted(tmp_path, capfd):
    import keras

    from xattn import CrossAttention

    marker = tmp_path / "lambda_ran"
    marker_path = str(marker)  # a closure cell: Keras stores it with the lambda's bytecode
    a = keras.Input((4, 6), name="a")
    b = keras.Input((5, 7), name="b")
    touched = keras.layers.Lambda(
        lambda t: (open(marker_path, "w").close(), t)[1], name="touch"
    )(a)
    model = keras.Model([a, b], CrossAttention(8, 2)([touched, b]))
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    # The lambda really runs when a file like this is loaded unsafely...
    marker.unlink(missing_ok=True)
    keras.saving.load_model(path, safe_mode=False)
    assert marker.exists()
    marker.unlink()
    capfd.readouterr()
    rc = main(["--weights", path, "--output-dir", str(tmp_path / "out"), "--quiet"],
              formats=("onnx",), prog="python -m export.onnx")
    assert_one_line_error(rc, capfd.readouterr().err, path, "Lambda")
    # ... and the exporter never ran it.
    assert not marker.exists()


def test_help_reads_tf2onnxs_newest_opset_without_importing_it():
    """--help prints --opset's default from tf2onnx's source (no TensorFlow): the same number the
    builder takes from the imported module."""
    import subprocess
    import sys

    import onnx

    from export.onnx.build import max_opset

    assert min(flags.tf2onnx_newest_opset(), onnx.defs.onnx_opset_version()) == max_opset()
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from export.cli import main\n"
         "try: main(['--help'], formats=('onnx',), prog='p')\nexcept SystemExit: pass\n"
         "print('HEAVY', sorted(m for m in ('tensorflow', 'tf2onnx') if m in sys.modules))"],
        capture_output=True, text=True, timeout=120)
    assert f"default {max_opset()}, the newest" in " ".join(done.stdout.split())
    assert "HEAVY []" in done.stdout, done.stdout[-300:]


def test_a_missing_sign_key_is_refused_before_tensorflow_loads(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import sys; from export.cli import main\n"
         f"code = main(['--sign-key', {str(tmp_path / 'missing.pem')!r}, '--output-dir', "
         f"{str(tmp_path / 'out')!r}], formats=('onnx',), prog='p')\n"
         "print('CODE', code, sorted(m for m in ('tensorflow', 'tf2onnx') if m in sys.modules))"],
        capture_output=True, text=True, timeout=120)
    assert "CODE 2 []" in done.stdout, (done.stdout, done.stderr)
    assert "missing.pem" in done.stderr and not (tmp_path / "out").exists()
