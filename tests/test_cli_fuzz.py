"""CLI fuzz (issue 22): combinations of the documented flags, each value valid or not, through
every entry point's `main(argv)` in this process. Every run ends in exit 0, or in one error line
(`<prog>: error: ...`) with a documented exit code (0-7, 130) after at most the CLI's own log lines —
never a traceback.

The exports run twice over: "dry", the whole command line (parsing, the checks of flags that do
not fit together, --weights/--model/--sign-key loading, the memory guard) up to the pipeline, which
records the request instead of converting (fast: many examples); and for real on tiny shapes
(few examples). Hypothesis is derandomized (the same examples on every run) and bounded.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export import pipeline

EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 7, 130}
LOG_LINE = re.compile(r"^[a-z][\w-]*\s{2,}\S")  # the CLI's own lines: `build    reference ...`
ERROR_LINE = re.compile(r"^python -m [\w.]+: (error: \S.*|interrupted.*)$")
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SMALL = ["--units", "8", "--heads", "2", "--query-len", "4", "--kv-len", "4",
         "--query-features", "8", "--kv-features", "8"]

# Documented flags (README "Flags (shared by every entry point)"), each with values a user may
# type: valid ones and wrong ones. Files named here are made by the `world` fixture.
# Valid values | wrong ones ("|" splits them); None: a flag without a value.
EXPORT_VALUES = {
    "--units": "8 1 | 0 -3 x",
    "--heads": "2 1 | 0 x",
    "--query-len": "4 1 dynamic DYNAMIC | 0 x",
    "--kv-len": "4 3 dynamic | 0 -1",
    "--query-features": "8 1 | 0 x",
    "--kv-features": "8 5 | 0",
    "--lengths": "4,8 4x8,8x4 4 | 0 x , 4x",
    "--batch": "1 2 dynamic | 0 x",
    "--query-mask": None, "--value-mask": None, "--causal": None, "--scores": None,
    "--weights": "layer.keras | missing.keras junk.keras notes.txt junk.weights.h5 ''",
    "--seed": "0 3 | -1 x",
    "--name": "custom ok-name.1 | a/b ../up",
    "--sign-key": "key.pem | missing.pem junk.pem ''",
    "--opset": "17 18 | 1 999 x",
    "--atol": "1e-4 0.5 | 0 nan inf -1 x 1e-30",
    "--quantize": "none float16 dynamic-int8 int8 int8-cpu | bogus",
    "--int8-io": None,
    "--calibration": "calibration.npz | missing.npz junk.npz ''",
    "--max-rel-error": "0.05 0.5 | 0 x",
    "--model": "model.keras | missing.keras junk.keras ''",
    "--import": "json | no_such_module_xyz",
    "--input-shape": "x=4,8 | x=0 bad nope=4,8",
    "--sample-inputs": "samples.npz | missing.npz junk.npz ''",
    "--output-dir": "out nested/out | notes.txt ''",
    "-v": None, "-q": None,
}
ENTRY = {"export": None, "export.onnx": ("onnx",), "export.tflite": ("tflite",),
         "export.savedmodel": ("savedmodel",), "export.ort": ("ort",)}


def call(main, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) as the shell would see it: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else f"exit {e.code!r}")
    return code, out.getvalue(), err.getvalue()


def assert_clean_ending(code, err: str, argv: list[str]) -> None:
    shown = f"argv {argv}: exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, shown
    assert code in EXIT_CODES, shown
    if code == 0:
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and ERROR_LINE.match(lines[-1]), shown  # one error line, the last
    assert all(LOG_LINE.match(line) for line in lines[:-1]), shown  # before it: log lines only


def flag_args(draw, values: dict, max_flags: int) -> list[str]:
    """Up to `max_flags` distinct flags; at most one of them (drawn) gets a wrong value."""
    chosen = draw(st.lists(st.sampled_from(sorted(values)), max_size=max_flags, unique=True))
    with_values = [f for f in chosen if values[f] is not None]
    wrong = draw(st.sampled_from([None, *with_values])) if with_values else None
    argv = []
    for flag in chosen:
        argv.append(flag)
        if values[flag] is not None:
            good, _, bad = values[flag].partition("|")
            argv.append(draw(st.sampled_from(_values(bad if flag == wrong else good))))
    return argv


def _values(text: str) -> list[str]:
    """`8 1` -> ["8", "1"]; `''` is the empty string (what `--flag "$UNSET"` passes)."""
    return [("" if v == "''" else v) for v in text.split()] or [""]


def small_shapes(argv: list[str]) -> list[str]:
    """SMALL before `argv` (whose flags override), but none with --model, no lengths with
    --lengths: what a user of those would not type."""
    if "--model" in argv:
        return argv
    if "--lengths" in argv:
        return [*SMALL[:4], *SMALL[8:], *argv]
    return SMALL + argv


def flags(values: dict, max_flags: int):
    """Up to `max_flags` distinct flags of `values`, each with one of its values."""
    return st.composite(lambda draw: flag_args(draw, values, max_flags))()


@pytest.fixture(scope="module")
def world(tmp_path_factory, artifact_factory):
    """A folder holding every file the flags name: good ones small, bad ones junk."""
    import keras
    from test_trust import write_key_pair

    from xattn import CrossAttention

    folder = tmp_path_factory.mktemp("fuzz-world")
    rng = np.random.default_rng(5)
    s1, s2 = keras.Input((4, 8), name="source1"), keras.Input((4, 8), name="source2")
    layer_model = keras.Model([s1, s2], CrossAttention(8, 2)([s1, s2]))
    for w in layer_model.weights:
        w.assign(rng.uniform(0.1, 0.5, tuple(w.shape)).astype("float32"))
    layer_model.save(folder / "layer.keras")
    x = keras.Input((4, 8), name="x")
    user = keras.Model(x, keras.layers.Dense(3, name="head")(CrossAttention(8, 2)([x, x])))
    for w in user.weights:
        w.assign(rng.uniform(0.1, 0.5, tuple(w.shape)).astype("float32"))
    user.save(folder / "model.keras")
    np.savez(folder / "samples.npz", x=rng.standard_normal((8, 4, 8), dtype=np.float32))
    np.savez(folder / "calibration.npz", source1=rng.standard_normal((8, 4, 8), dtype=np.float32),
             source2=rng.standard_normal((8, 4, 8), dtype=np.float32))
    for junk in ("junk.keras", "junk.npz", "junk.pem", "junk.pub", "junk.weights.h5", "notes.txt"):
        (folder / junk).write_text("not what it says\n")
    write_key_pair(str(folder), "key")
    built, _ = artifact_factory(formats=("onnx",), units=8, heads=2, query_len=4, kv_len=4,
                                query_features=8, kv_features=8)
    shutil.copytree(built, folder / "artifacts")
    return folder


@pytest.fixture()
def in_world(world, tmp_path, monkeypatch):
    """Each test in its own copy of the world, so written files never reach the repository."""
    here = tmp_path / "w"
    shutil.copytree(world, here, symlinks=True)
    monkeypatch.chdir(here)
    return here


def _export_main(entry: str):
    from export import cli

    formats = ENTRY[entry]
    if formats is None:
        return lambda argv: cli.main(argv, prog="python -m export")
    return lambda argv: cli.main(argv, formats=formats, prog=f"python -m {entry}")


@pytest.mark.parametrize("entry", sorted(ENTRY))
def test_export_command_lines_dry(entry, in_world, monkeypatch):
    """Up to the pipeline: every check of the command line, every file the flags name."""
    seen = []

    def record(request):
        for spec in request.specs.values():
            seen.append(spec.describe())
        return []

    monkeypatch.setattr(pipeline, "export_artifacts", record)
    main = _export_main(entry)

    codes: list = []

    @settings(FUZZ, max_examples=100)
    @given(st.data())
    def run(data):
        argv = small_shapes(data.draw(flags(EXPORT_VALUES, 6)))
        code, _, err = call(main, argv)
        codes.append(code)
        assert_clean_ending(code, err, argv)

    run()

    assert codes.count(0) >= 2, f"too few repositories written: {codes}"
    assert seen and codes.count(0) >= len(codes) // 10, f"too few reached the pipeline: {codes}"


REAL_VALUES = {k: v for k, v in EXPORT_VALUES.items()
               if k not in ("--model", "--import", "--input-shape", "--sample-inputs", "--sign-key")}


@pytest.mark.parametrize("entry", ["export.onnx", "export.tflite"])
def test_export_command_lines_for_real(entry, in_world):
    """Tiny shapes, the real pipeline: conversion, verification and publish included."""
    main = _export_main(entry)

    codes: list = []

    @settings(FUZZ, max_examples=8)
    @given(st.data())
    def run(data):
        argv = small_shapes(data.draw(flags(REAL_VALUES, 4)))
        if "--output-dir" not in argv:
            argv += ["--output-dir", "real-out"]
        code, _, err = call(main, argv)
        codes.append(code)
        assert_clean_ending(code, err, argv)

    run()

    assert codes.count(0) >= 2, f"too few repositories written: {codes}"
    assert codes.count(0) >= 2, f"too few examples published: {codes}"


VERIFY_VALUES = {"--public-key": "key.pub | missing.pub junk.pub ''", "-q": None}
VERIFY_PATHS = ["artifacts", "artifacts/", "missing", "notes.txt", "junk.npz", ".", "",
                "artifacts/xattn_u8_h2_q4x8_kv4x8.onnx.json"]


def test_verify_command_lines(in_world):
    from export.runtime.verify import cli as verify_cli

    codes: list = []

    @settings(FUZZ, max_examples=30)
    @given(st.data())
    def run(data):
        argv = data.draw(flags(VERIFY_VALUES, 2))
        paths = data.draw(st.lists(st.sampled_from(VERIFY_PATHS), max_size=2))
        argv = argv + paths
        code, _, err = call(verify_cli.main, argv)
        codes.append(code)
        assert "Traceback" not in err and code in EXIT_CODES, (argv, code, err)
        if code == 2:  # usage: one line (verify's failures are one line per artifact, exit 1)
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and ERROR_LINE.match(lines[0]), (argv, err)

    run()

    assert codes.count(0) >= 3, f"too few examples verified: {codes}"


SERVE_VALUES = {
    "--replicas": "1 2 | 0 x", "--threads": "1 2 | 0 -2", "--max-batch": "1 32 | 0",
    "--batch-wait-ms": "2 0.5 | 0 nan x", "--host": "127.0.0.1", "--port": "8000 | 0 70000 x",
    "--address": "auto", "--max-body-mb": "1 | 0 inf",
}


def test_serve_command_lines_writing_a_triton_repository(in_world):
    """`--triton-repository` always (a server would run until Ctrl-C): verify, then write."""
    from export.runtime.serve import cli as serve_cli

    codes: list = []

    @settings(FUZZ, max_examples=15)
    @given(st.data())
    def run(data):
        argv = data.draw(flags(SERVE_VALUES, 4))
        path = data.draw(st.sampled_from(["artifacts", "missing", "notes.txt", "."]))
        target = data.draw(st.sampled_from(["triton", "nested/triton", "notes.txt", ""]))
        argv = [path, *argv, "--triton-repository", target]
        code, _, err = call(serve_cli.main, argv)
        codes.append(code)
        assert_clean_ending(code, err, argv)

    run()

    assert codes.count(0) >= 2, f"too few repositories written: {codes}"


LOADBENCH_VALUES = {
    "--clients": "1 1,8 | 0 x ,", "--replicas": "1 1,2 | 0 -1", "--max-batch": "1 32 | 0",
    "--threads": "1 | 0", "--duration": "0.5 3 | 0 nan", "--port": "8765 | 0 x",
    "--fault-timeout": "60 | 0", "--no-fault": None, "--json": "figures.json | missing/f.json artifacts ''",
}


def test_loadbench_command_lines(in_world, monkeypatch):
    """The load benchmark's command line up to the measuring (which starts servers: stubbed with
    the figures it returns), then its --json."""
    from export.runtime.serve import loadbench

    monkeypatch.setattr(loadbench, "run", lambda args: {"fault": None, "cpus": 2, "cells": [],
                                                      "workers": 2, "load_before": 0.5,
                                                      "load_after": 1.0})
    codes: list = []

    @settings(FUZZ, max_examples=40)
    @given(st.data())
    def run(data):
        argv = data.draw(flags(LOADBENCH_VALUES, 4)) + data.draw(st.sampled_from([[], ["artifacts"]]))
        code, _, err = call(loadbench.main, argv)
        codes.append(code)
        assert_clean_ending(code, err, argv)

    run()
    assert codes.count(0) >= 5, f"too few examples ran: {codes}"


BENCH_VALUES = {
    "--units": "8 | 0 x", "--heads": "2 | 0", "--query-len": "4 | 0", "--kv-len": "4 | -1",
    "--batch": "1 1,32 | 0 x", "--lengths": "4,8 | 0", "--buckets": "4,8 | x",
    "--threads": "1 | 0", "--runtimes": "onnx onnx,tflite | bogus", "--variants": "none | bogus",
    "--onnx-batch": "dynamic fixed | other", "--iterations": "1 | 0", "--warmup": "1 | -1",
    "--max-seconds": "0.1 | 0 nan", "--startup-runs": "1 | 0", "--model": "model.keras | ''",
    "--json": "b.json | ''", "--keep-dir": "kept | ''", "-v": None, "-q": None,
}


def test_bench_command_lines_with_a_wrong_value(in_world):
    """A benchmark runs for a minute: here every command line has one wrong value, so each ends
    in its one usage line (the full runs: .ci/run's smoke run, tests/test_bench.py)."""
    from export.bench.cli import main as bench_main

    @settings(FUZZ, max_examples=40)
    @given(st.data())
    def run(data):
        argv = data.draw(flags(BENCH_VALUES, 4))
        valued = [a for a in argv if a in BENCH_VALUES and BENCH_VALUES[a] is not None]
        if not valued:
            argv = argv + ["--iterations", "0"]
        else:
            flag = data.draw(st.sampled_from(valued))
            wrong = _values(BENCH_VALUES[flag].partition("|")[2])
            i = argv.index(flag)
            argv[i + 1] = data.draw(st.sampled_from(wrong))
        code, _, err = call(bench_main, argv)
        assert code == 2 or (code == 0 and "--help" in argv), (argv, code, err)
        assert_clean_ending(code, err, argv)

    run()
