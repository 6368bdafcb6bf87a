"""Error paths users meet that no other test ran (issue 17): calibration files, --int8-io usage,
a converter failure (exit 4), and `--weights` .keras files that are odd but real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from layer_zoo import randomize_weights

import xattn
from export import calibration
from export.cli import main
from export.errors import CalibrationError
from export.spec import ArtifactSpec

SMALL = dict(units=8, heads=2, query_len=4, kv_len=5, query_features=6, kv_features=7)
SMALL_ARGS = [a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _err_line(text: str) -> str:
    """The one error line; the progress log (stderr too) may precede it, nothing may follow."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and "error:" in lines[-1], text
    assert sum("error:" in line for line in lines) == 1, text
    return lines[-1]


@pytest.mark.parametrize("case", ["missing", "folder", "unreadable", "fewer-rows-than-batch"])
def test_calibration_file_problems_are_one_line(tmp_path, case):
    spec = ArtifactSpec(**SMALL, quantize="int8", batch=4)
    rng = np.random.default_rng(0)
    good = {"source1": rng.standard_normal((2, 4, 6)).astype("float32"),
            "source2": rng.standard_normal((2, 5, 7)).astype("float32")}
    path = tmp_path / "calib.npz"
    if case == "folder":
        path.mkdir()
    elif case == "unreadable":
        np.savez(path, **good)
        data = bytearray(path.read_bytes())
        data[60:120] = b"\x00" * 60  # a zip whose member is damaged (root could read a chmod 0)
        path.write_bytes(bytes(data))
    elif case == "fewer-rows-than-batch":
        np.savez(path, **good)
    needle = {"missing": "not found", "folder": "is a folder", "unreadable": "cannot be read",
              "fewer-rows-than-batch": "has 2 rows; at least 4 needed"}[case]
    with pytest.raises(CalibrationError, match=needle) as info:
        calibration.load_calibration(str(path), spec)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_int8_io_usage_errors(capsys):
    for argv, formats, needle in (
        ([*SMALL_ARGS, "--int8-io"], ("tflite",), "--int8-io needs --quantize int8"),
        ([*SMALL_ARGS, "--quantize", "int8", "--int8-io"], ("onnx",),
         "--int8-io applies to TFLite only"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv, formats=formats)
        assert exc.value.code == 2
        assert needle in _err_line(capsys.readouterr().err)


def test_converter_failure_is_exit_4_and_publishes_nothing(tmp_path, monkeypatch, capfd):
    import tf2onnx

    def broken(*args, **kwargs):
        raise RuntimeError("simulated tf2onnx failure\nwith a second line")

    monkeypatch.setattr(tf2onnx.convert, "from_function", broken)
    out = tmp_path / "out"
    rc = main([*SMALL_ARGS, "--output-dir", str(out)], formats=("onnx",))
    line = _err_line(capfd.readouterr().err)
    assert rc == 4 and "ONNX conversion (tf2onnx) failed: simulated tf2onnx failure" in line
    assert not out.exists() or not [n for n in os.listdir(out) if not n.startswith(".")]


def _save(model, folder, name):
    path = os.path.join(folder, f"{name}.keras")
    model.save(path)
    return path


def test_weights_keras_without_bias_exports_with_zero_biases(tmp_path, capfd):
    s1 = keras.Input((4, 6), name="source1")
    s2 = keras.Input((5, 7), name="source2")
    layer = xattn.CrossAttention(8, 2, use_bias=False, name="cross_attention")
    model = randomize_weights(keras.Model({"source1": s1, "source2": s2}, layer([s1, s2])), 3)
    path = _save(model, tmp_path, "nobias")
    out = tmp_path / "out"
    rc = main(["--weights", path, "--query-len", "4", "--kv-len", "5", "--output-dir", str(out),
               "--quiet"], formats=("onnx",))
    assert rc == 0, capfd.readouterr().err
    import onnxruntime as ort

    rng = np.random.default_rng(9)
    feeds = {"source1": rng.standard_normal((2, 4, 6)).astype("float32"),
             "source2": rng.standard_normal((2, 5, 7)).astype("float32")}
    session = ort.InferenceSession(str(out / "xattn_u8_h2_q4x6_kv5x7.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["output"], feeds)[0]
    want = np.asarray(layer([feeds["source1"], feeds["source2"]]))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["no-cross-attention", "never-built"])
def test_weights_keras_without_usable_layer_is_exit_3(tmp_path, capfd, case):
    if case == "no-cross-attention":
        x = keras.Input((4, 6), name="x")
        model = keras.Model(x, keras.layers.Dense(3)(x))
        needle = "holds no xattn CrossAttention layer"
    else:
        model = keras.Sequential([xattn.CrossAttention(8, 2)])
        needle = "never built"
    path = _save(model, tmp_path, case)
    out = tmp_path / "out"
    rc = main(["--weights", path, "--output-dir", str(out)], formats=("onnx",))
    line = _err_line(capfd.readouterr().err)
    assert rc == 3 and needle in line and path in line, line
    assert not out.exists() or not [n for n in os.listdir(out) if not n.startswith(".")]


def _run_to_a_closed_pipe(*args: str) -> tuple[int, str]:
    """`python -m ... | head -0`: the reader is gone before the first line is printed."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=300), err


@pytest.mark.parametrize("tampered", [False, True], ids=["passing", "failing"])
def test_verify_to_a_reader_that_left_keeps_its_verdict_and_prints_no_traceback(
        artifact_factory, tmp_path, tampered):
    out, _ = artifact_factory(formats=("onnx",))
    folder = shutil.copytree(out, tmp_path / "copy")
    if tampered:
        onnx_file = next(folder.glob("*.onnx"))
        onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    code, err = _run_to_a_closed_pipe("export.verify", str(folder))
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == (1 if tampered else 0)


def test_export_table_to_a_reader_that_left_publishes_and_exits_0(tmp_path):
    code, err = _run_to_a_closed_pipe("export.onnx", *SMALL_ARGS, "--output-dir", str(tmp_path))
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == 0
    assert sorted(p.suffix for p in tmp_path.glob("*.onnx*")) == [".json", ".onnx"]
