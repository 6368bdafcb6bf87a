"""`xattn` (export.command): one console script over every entry point, exit codes defined once by
the error classes, and the parser refusing what a format cannot take before any model is built."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_module

from export import errors
from export.command import COMMANDS, build_parser
from export.flags import build_parser as export_parser
from export.formats import REGISTRY

XATTN = os.path.join(os.path.dirname(sys.executable), "xattn")
SMALL = ["--units", "8", "--heads", "2", "--query-len", "3", "--kv-len", "4",
         "--query-features", "5", "--kv-features", "6"]


def xattn(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`xattn ARGS` as a user types it: the console script pip installed beside this Python."""
    if not os.path.isfile(XATTN):
        pytest.fail(f"{XATTN} missing: the console script comes with `make install` "
                    "(pip install -e '.[build]')")
    return subprocess.run([XATTN, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ})


def _one_error_line(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- exit codes: the error classes define them; the epilogs and the docs are generated -------------


@pytest.mark.fast
def test_every_error_class_code_is_in_the_table_and_named_by_the_first_class():
    table = errors.exit_codes()
    assert table[0] == "ok"
    for cls in errors.error_classes():
        assert cls.exit_code in table, cls
    assert table[errors.SpecError.exit_code] == errors.SpecError.brief
    assert table[130] == errors.Interrupted.brief and errors.INTERRUPTED_EXIT_CODE == 130
    assert (table[8], table[9]) == (errors.ProvisionError.brief, errors.EmulatorError.brief)
    assert list(table) == sorted(table)


@pytest.mark.fast
def test_epilogs_are_generated_from_the_classes():
    assert export_parser().epilog == errors.exit_codes_epilog()
    assert build_parser().epilog == errors.exit_codes_epilog()
    text = errors.exit_codes_epilog((0, 2), {2: "usage"})
    assert text == "exit codes: 0 ok; 2 usage"
    with pytest.raises(ValueError, match=r"no error class defines: \[42\]"):
        errors.exit_codes_epilog((0, 42))
    with pytest.raises(ValueError, match=r"\[43\]"):
        errors.exit_codes_epilog((0,), {43: "made up"})


@pytest.mark.fast
def test_docs_exit_code_page_lists_each_code_from_the_classes():
    sys.path.insert(0, os.path.join(REPO, "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(os.path.join(REPO, "docs"))
    page = hooks.exit_codes_page()
    for cls in errors.error_classes()[1:]:
        assert f"| {cls.exit_code} | `{cls.__name__}` |" in page, cls
    assert page.count("| 130 |") == 1


# -- refusing before working ------------------------------------------------------------------------

# (format, argv) for every refusal the registry declares, each checked in a fresh process that
# must not have imported TensorFlow by the time it exits 2.
REFUSALS = (
    [(f.name, ["--lengths", "8,16"], "one static length") for f in REGISTRY.values()
     if not f.several_lengths]
    + [(f.name, ["--batch", "dynamic"], "static batch") for f in REGISTRY.values()
       if not f.dynamic_batch]
    + [(f.name, ["--kv-len", "dynamic"], "static lengths") for f in REGISTRY.values()
       if not f.dynamic_length]
)


@pytest.mark.fast
@pytest.mark.parametrize("fmt, argv, words", REFUSALS,
                         ids=[f"{f}-{a[0].lstrip('-')}" for f, a, _ in REFUSALS])
def test_parser_refuses_what_the_format_cannot_take_before_importing_tensorflow(fmt, argv, words,
                                                                                 tmp_path):
    code = (
        "import sys\n"
        f"from export.{fmt}.__main__ import main\n"
        "try:\n"
        f"    main({argv!r} + ['--output-dir', {str(tmp_path / 'out')!r}])\n"
        "except SystemExit as e:\n"
        "    heavy = [m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules]\n"
        "    print(e.code, ','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["2"], (done.stdout, done.stderr)  # exit 2, nothing heavy loaded
    line = _one_error_line(subprocess.CompletedProcess([], 2, "", done.stderr), 2, words)
    assert line.startswith(f"python -m export.{fmt}: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.fast
def test_refusals_cover_tflm_lengths_the_case_that_took_seconds():
    assert ("tflm", ["--lengths", "8,16"], "one static length") in REFUSALS
    assert REGISTRY["tflm"].refusal(lengths=True) is not None
    assert REGISTRY["onnx"].refusal(lengths=True, dynamic_batch=True, dynamic_length="--kv-len") is None
    assert "int8 only" in REGISTRY["tflm"].refusal(quantize="float16")
    assert REGISTRY["tflm"].refusal(quantize="int8") is None
    assert "float32 only" in REGISTRY["savedmodel"].refusal(quantize="int8")
    assert REGISTRY["onnx"].refusal(quantize="dynamic-int8") is None


@pytest.mark.fast
def test_a_static_batch_among_several_formats_is_no_refusal():
    from export.flags import check_format_flags

    args = export_parser().parse_args(["--batch", "dynamic"])
    assert check_format_flags(args, ("tflite", "onnx")) is None
    assert "static batch" in check_format_flags(args, ("tflite",))


# -- `xattn` ---------------------------------------------------------------------------------------


@pytest.mark.fast
def test_xattn_help_lists_every_command_and_its_alias():
    done = xattn("--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for command in COMMANDS:
        assert f"{command.name} " in text and f"[{command.alias}]" in text, command
    assert errors.exit_codes_epilog() in text


@pytest.mark.fast
@pytest.mark.parametrize("argv, words", [
    ([], "a command is required"),
    (["nope"], "unknown command 'nope'"),
], ids=["none", "unknown"])
def test_xattn_usage_errors(argv, words):
    _one_error_line(xattn(*argv), 2, "xattn: error:", words)


FAST = pytest.mark.fast  # no TensorFlow in the process (the bench parses before importing it)


@pytest.mark.parametrize("argv, words", [
    pytest.param(["export", "--units", "0"], "xattn export: error: argument --units", marks=FAST,
                 id="export"),
    pytest.param(["export", "tflm", "--lengths", "8,16"], "xattn export tflm: error: TFLM",
                 marks=FAST, id="export-tflm"),
    pytest.param(["verify", "/no/such/folder"], "xattn verify: error: no such file or folder",
                 marks=FAST, id="verify"),
    pytest.param(["serve", "/no/such/folder"], "xattn serve: error: no such file or folder",
                 marks=FAST, id="serve"),
    pytest.param(["bench", "--iterations", "0"], "xattn bench: error: argument --iterations",
                 marks=FAST, id="bench"),
    pytest.param(["bench", "serve", "--bogus"], "xattn bench serve: error: unrecognized",
                 id="bench-serve"),
    pytest.param(["arm", "/no/such/folder"], "xattn arm: error: no such file or folder",
                 marks=FAST, id="arm"),
])
def test_each_command_runs_its_entry_under_its_own_name(argv, words):
    _one_error_line(xattn(*argv), 2, words)


# Where the build half is missing (a runtime-only install), as test_runtime_install.py's venv has it.
_WITHOUT_BUILD_HALF = (
    "import sys, export.reporting as r\n"
    "r.BUILD_HALF_PACKAGES = ('no_such_module_xattn',)\n"
    "from export.bench.cli import main\n"
    "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    "print(code, [m for m in ('tensorflow', 'keras', 'export.bench.suite') if m in sys.modules])\n"
)


@pytest.mark.fast
@pytest.mark.parametrize("argv, words", [
    (["--units", "8"], "python -m export.bench exports, which needs the build half: "
                       "no_such_module_xattn not installed here (pip install 'xattn[build]')"),
    (["--units", "8", "--runtimes", "onnx,trt"], "argument --runtimes: must be a comma-separated"),
], ids=["build-half-missing", "bad-flag-first"])
def test_bench_refuses_before_importing_tensorflow(argv, words):
    done = subprocess.run([sys.executable, "-c", _WITHOUT_BUILD_HALF, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[0] == "2 []", done.stdout + done.stderr  # exit 2, nothing heavy
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m export.bench: error: "), done.stderr
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("command", [
    "export", "export onnx",  # --help computes the ONNX opset's default: tf2onnx, TensorFlow
    pytest.param("verify", marks=FAST), pytest.param("serve", marks=FAST), "bench", "bench serve",
    pytest.param("arm", marks=FAST)])
def test_each_command_help_is_its_entry_points(command):
    done = xattn(*command.split(), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: xattn {command} "), done.stdout[:80]


@pytest.fixture(scope="module")
def both_spellings(tmp_path_factory):
    """The same small ONNX export as `python -m export.onnx` and as `xattn export onnx`."""
    out = {}
    for spelling in ("module", "xattn"):
        folder = str(tmp_path_factory.mktemp(f"spelling-{spelling}"))
        argv = [*SMALL, "--output-dir", folder, "-q"]
        done = (run_module("export.onnx", *argv) if spelling == "module"
                else xattn("export", "onnx", *argv))
        assert done.returncode == 0, done.stderr
        out[spelling] = folder
    return out


def test_both_spellings_of_an_export_publish_the_same_file(both_spellings):
    def digest(folder):
        (name,) = [n for n in os.listdir(folder) if n.endswith(".onnx")]
        with open(os.path.join(folder, name), "rb") as f:
            return name, hashlib.sha256(f.read()).hexdigest()

    assert digest(both_spellings["module"]) == digest(both_spellings["xattn"])


def test_both_spellings_of_verify_agree(both_spellings):
    folder = both_spellings["xattn"]
    by_module = run_module("export.verify", folder)
    by_xattn = xattn("verify", folder)
    assert by_module.returncode == by_xattn.returncode == 0, by_xattn.stderr
    assert by_module.stdout == by_xattn.stdout and "1 passed, 0 failed" in by_xattn.stdout


def test_xattn_serve_writes_a_triton_repository(both_spellings, tmp_path):
    done = xattn("serve", both_spellings["xattn"], "--triton-repository", str(tmp_path / "repo"))
    assert done.returncode == 0, done.stderr
    (model,) = os.listdir(tmp_path / "repo")
    assert os.path.isfile(tmp_path / "repo" / model / "config.pbtxt")
    assert f"wrote {tmp_path / 'repo' / model}/config.pbtxt" in done.stdout
