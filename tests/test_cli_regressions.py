"""Crashes found by running command lines as a user does (issue 22), one regression test each.

The README commands test (test_commands.py) and the CLI fuzz (test_cli_fuzz.py) find them; each
is pinned here by the exact command line that crashed.
"""

from __future__ import annotations

import os

import pytest
from conftest import run_module

from export import resources
from export.buckets import DYNAMIC_CHECK_LENGTHS
from export.errors import OutOfMemoryError, SpecError
from export.runtime import verify
from export.spec import ArtifactSpec


def test_the_readme_dynamic_length_command_publishes_a_verified_file(tmp_path):
    # README "Dynamic lengths": the memory guard multiplied the symbolic lengths (None) and the
    # command ended in a TypeError traceback. The exact command, --output-dir appended.
    done = run_module("export.onnx", "--query-len", "dynamic", "--kv-len", "dynamic",
                      "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    published = [f for f in os.listdir(tmp_path) if f.endswith(".onnx")]
    assert published == ["xattn_u64_h4_qdynx64_kvdynx64.onnx"]
    results = verify.verify_path(str(tmp_path))
    assert [r.status for r in results] == ["passed"], [r.reason for r in results]


def test_memory_estimate_of_a_symbolic_length_is_the_largest_verified_one():
    largest = max(DYNAMIC_CHECK_LENGTHS)
    dynamic = {"onnx": ArtifactSpec(query_len=None, kv_len=None, batch=None)}
    at_largest = {"onnx": ArtifactSpec(query_len=largest, kv_len=largest, batch=None)}
    assert resources.estimate_bytes(dynamic) == resources.estimate_bytes(at_largest)
    one_axis = {"onnx": ArtifactSpec(query_len=5, kv_len=None, batch=None)}
    assert resources.estimate_bytes(one_axis) == resources.estimate_bytes(
        {"onnx": ArtifactSpec(query_len=5, kv_len=largest, batch=None)})
    # The refusal says the symbolic lengths were estimated at the largest verified length.
    wide = {"onnx": ArtifactSpec(units=4096, heads=64, query_len=None, kv_len=None, batch=None)}
    with pytest.raises(OutOfMemoryError, match=rf"dynamic lengths estimated at {largest}, the "
                                               r"largest verified\); 1.0 GiB is available"):
        resources.check_memory(wide, available=1 << 30)


def test_a_model_export_over_one_with_other_golden_inputs_names_sample_inputs(tmp_path):
    # README "Whole models": `--model forecaster.keras` then the same model `--quantize int8
    # --sample-inputs samples.npz` into the same folder was refused as "other weights", though
    # the weights were the same: the golden inputs differed (seeded rows vs --sample-inputs).
    from types import SimpleNamespace

    from export.model import ModelSpec
    from export.pipeline import _guard_shared_files
    from export.spec import TensorInfo

    (tmp_path / "forecaster.onnx.json").write_text(
        '{"golden": "forecaster.golden.npz", "golden_sha256": "' + "a" * 64 + '"}')
    spec = ModelSpec(model_inputs=(TensorInfo("past", (12, 3), "float32"),),
                     model_outputs=(TensorInfo("output", (4,), "float32"),), stem="forecaster",
                     quantize="int8")
    goldens = {"forecaster.golden.npz": SimpleNamespace(sha256="b" * 64)}
    with pytest.raises(SpecError, match=r"other weights under the name 'forecaster' or other "
                                        r"--sample-inputs, .* pass --name to keep both"):
        _guard_shared_files(str(tmp_path), {"tflite": spec}, goldens)
    layer = ArtifactSpec(name="forecaster")
    with pytest.raises(SpecError, match=r"under the name 'forecaster', and this export") as refused:
        _guard_shared_files(str(tmp_path), {"tflite": layer}, goldens)
    assert "--sample-inputs" not in str(refused.value)


# -- found by the CLI fuzz (tests/test_cli_fuzz.py) --------------------------------------------


def _one_usage_line(err: str, prog: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err


@pytest.mark.parametrize("flag", ["--weights", "--model", "--sample-inputs", "--output-dir",
                                  "--sign-key", "--calibration"])
def test_an_empty_path_is_a_usage_error_not_no_flag(flag, tmp_path, monkeypatch, capsys):
    # `--weights "$UNSET"` exported random weights (exit 0), `--sign-key ""` an unsigned set.
    from export import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ended:
        cli.main([flag, ""], formats=("tflite",), prog="python -m export.tflite")
    assert ended.value.code == 2
    _one_usage_line(capsys.readouterr().err, "python -m export.tflite", flag, "must name a file")
    assert os.listdir(tmp_path) == []


def test_verify_with_an_empty_public_key_checks_nothing_silently_no_more(capsys):
    # `--public-key ""` verified without checking a signature, exit 0.
    from export.runtime.verify import cli as verify_cli

    with pytest.raises(SystemExit) as ended:
        verify_cli.main(["--public-key", "", "artifacts"])
    assert ended.value.code == 2
    _one_usage_line(capsys.readouterr().err, "python -m export.verify", "--public-key")


def test_serve_with_an_empty_triton_repository_does_not_start_a_server(capsys):
    # `--triton-repository ""` fell through to serving (a server until Ctrl-C).
    from export.runtime.serve import cli as serve_cli

    with pytest.raises(SystemExit) as ended:
        serve_cli.main(["artifacts", "--triton-repository", ""])
    assert ended.value.code == 2
    _one_usage_line(capsys.readouterr().err, "python -m export.serve", "--triton-repository")


def test_bench_with_an_empty_model_is_refused_not_a_layer_benchmark(capsys):
    # `python -m export.bench --model ""` ran the lone layer's benchmark.
    from export.bench.cli import main as bench_main

    with pytest.raises(SystemExit) as ended:
        bench_main(["--model", ""])
    assert ended.value.code == 2
    _one_usage_line(capsys.readouterr().err, "python -m export.bench", "--model")


@pytest.mark.parametrize("flag", [["--units", "4"], ["--heads", "2"], ["--seed", "3"],
                                  ["--lengths", "8,16"], ["--kv-len", "12"]])
def test_bench_with_a_model_refuses_the_lone_layers_flags(flag, capsys):
    # `python -m export.bench --model m.keras --units 4` ignored --units (the flags have defaults,
    # so nothing told them from absent): one usage line, exit 2, before any model is loaded.
    from export.bench.cli import main as bench_main

    with pytest.raises(SystemExit) as ended:
        bench_main(["--model", "missing.keras", *flag])
    assert ended.value.code == 2
    _one_usage_line(capsys.readouterr().err, "python -m export.bench", f"--model and {flag[0]}")


@pytest.mark.parametrize("target", ["missing/figures.json", "."])
def test_loadbench_json_that_cannot_be_written_is_one_line_before_measuring(target, tmp_path,
                                                                            monkeypatch, capsys):
    # The figures were measured for minutes, then open(--json) raised: a traceback, no figures.
    from export.runtime.serve import loadbench

    measured = []
    monkeypatch.setattr(loadbench, "run", lambda args: measured.append(args) or {"fault": None, "cpus": 2})
    monkeypatch.chdir(tmp_path)
    assert loadbench.main(["--json", target]) == 2
    _one_usage_line(capsys.readouterr().err, "python -m export.serve.loadbench", f"--json {target}")
    assert measured == []  # refused before measuring


def test_loadbench_json_that_fails_after_measuring_is_one_line(tmp_path, monkeypatch, capsys):
    from export.runtime.serve import loadbench

    def run(args):  # the folder disappears while measuring
        os.rmdir(tmp_path / "out")
        return {"fault": None, "cpus": 2, "cells": [], "workers": 2, "load_before": 0.5,
                "load_after": 1.0}

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(loadbench, "run", run)
    assert loadbench.main(["--json", str(tmp_path / "out" / "f.json")]) == 2
    _one_usage_line(capsys.readouterr().err, "python -m export.serve.loadbench", "cannot write --json")


def test_ort_serialization_failure_is_the_childs_last_line():
    # The layer table's ORT cell read "ORT serialization (onnxruntime) failed: Traceback (most
    # recent call last):": the first line of the child's traceback.
    from export.ort.build import child_reason

    stderr = (
        'Traceback (most recent call last):\n  File "<string>", line 8, in <module>\n'
        "onnxruntime.capi.onnxruntime_pybind11_state.InvalidGraph: [ONNXRuntimeError] : 10 : "
        'INVALID_GRAPH : Load model from model.onnx failed:This is an invalid model. In Node, '
        '("functional_1/gram_inverse_1/MatrixInverse", MatrixInverse, "", -1) : ("x:0": '
        'tensor(float),) -> ("y:0",) , Error No Op registered for MatrixInverse with '
        "domain_version of 18\n")
    assert child_reason(stderr) == ("op MatrixInverse is not an ONNX op (nodes "
                                    "['functional_1/gram_inverse_1/MatrixInverse'])")
    other = ('Traceback (most recent call last):\n  File "x"\n'
             "onnxruntime.capi.x.Fail: [ONNXRuntimeError] bad\n")
    assert child_reason(other) == "Fail: [ONNXRuntimeError] bad"
    assert child_reason("") == "no output"
    assert child_reason("killed\n") == "killed"


def test_the_bare_keras_script_answers_help():
    done = run_module("export.bench.bare_keras_export", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    done = run_module("export.bench.bare_keras_export", "out", "8")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
