"""Every command the documentation shows runs (issue 22): each `python -m ...` and `make ...` line
of a fenced block in README.md and docs/**/*.md (tests/doc_commands.py collects them), and the
`--help` of every entry point, exit 0 and no traceback.

As a user types them, in a temporary folder: the commands of one block run in order in one folder
(a block builds `ortdemo/`, the next line verifies it); a block that reads `artifacts/` before
building it starts from what `make artifacts` built. Builders get small shapes appended where the
command does not give that flag itself (appended, never rewritten). Inputs a command names
(`forecaster.keras`, `samples.npz`, `my_layers`, `key.pem`, ...) are made once, small. A command
shown twice with the same lines before it in its block runs once. Blocks run two at a time.

A command is skipped only by SKIP below, with the reason. When the documentation changes, this
test follows it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from doc_commands import Command, commands, doc_pages

SERVER = "a server that runs until Ctrl-C: tests/test_serve.py starts, queries and stops one"
ARM = ("aarch64 emulation: an arm64 root file system and wheels downloaded, minutes under qemu; .ci/run "
       "runs make verify-arm as its own step, tests/test_arm.py the failure paths")
SKIP = {
    "make test": "the suite itself: it would run this test again",
    "make test-fast": "the suite's fast tier: it would run this test's neighbours again",
    "make install-sizes": "three fresh venvs (minutes): tests/test_runtime_install.py installs the "
                          "runtime one and runs it",
    "make example": "trains the forecaster (about a minute on 2 cores); tests/test_example_forecast.py "
                    "runs its steps on a short training",
    "make verify-web": "npm ci and Chromium (network, minutes): .ci/run runs it as its own step",
    "make bench": "the full benchmark, about 75 s: .ci/run runs a smoke run of python -m export.bench",
    "make coverage": "the whole suite again, under coverage (minutes)",
    "make mutation": "mutation testing (minutes)",
    "make serve": SERVER,
    "python -m export.serve artifacts/ --workers 2 --threads 1 --port 8000": SERVER,
    "python -m export.serve artifacts/ --engine ray --replicas 2 --max-batch 32": SERVER,
    "python -m export.serve artifacts/ --grpc-port 8001": SERVER,
    "python -m export.serve artifacts/ --engine ray --address auto":
        "needs another machine: a running Ray cluster",
    "make verify-arm": ARM,
    "python -m export.arm build/arm/artifacts --report build/arm/report.json": ARM,
    "python -m export.arm artifacts/ --cpu cortex-a53 --cpu neoverse-n1": ARM,
    "python -m export --quantize float16 --arm": ARM,
    "python -m export.verify --public-key key.pub artifacts/ # after an edit + recomputed sha256":
        "shows the failure (exit 1) after an edit; tests/test_trust.py makes that edit",
    "for q in float16 dynamic-int8 int8; do python -m export.onnx --quantize $q --output-dir "
    "variants/; python -m export.tflite --quantize $q --output-dir variants/; done":
        "a shell loop of six builds (about a minute); tests/test_quantize.py builds each variant",
    "for q in float16 dynamic-int8; do for f in onnx tflite; do python -m export.$f --quantize $q "
    "--query-mask --value-mask --causal --scores --output-dir variants/; done; done":
        "a shell loop of four builds (about 40 s); tests/test_quantize.py builds each variant",
    "make fusionlab-fixtures":
        "makes a fusionlab-learn 0.3.1 venv (TF 2.15, ~600 MB from the package index) in the cache, "
        "then rewrites the committed fixtures; tests/test_fusionlab.py tests what it wrote",
    # docs/exporting/savedmodel.md's XTFT block: the same three commands on the same fixture run in
    # tests/test_saved_model.py (xtft_exported, the XTFT export; its tests run the compare
    # script and export.verify on that folder), which also checks each file against fusionlab's
    # outputs. Run here too, the export was made twice per `make test`.
    "python -m export --saved-model tests/fixtures/fusionlab/xtft_savedmodel --sample-inputs "
    "tests/fixtures/fusionlab/xtft_inputs.npz --output-dir xtft/":
        "the same command on the same fixture runs in tests/test_saved_model.py (xtft_exported), "
        "which also checks each file against fusionlab's own outputs",
    "python -m export --saved-model tests/fixtures/fusionlab/xtft_savedmodel --sample-inputs "
    "tests/fixtures/fusionlab/xtft_inputs.npz":
        "the same command on the same fixture runs in tests/test_saved_model.py (the XTFT CLI "
        "fixture, 35-80 s), which also checks each file against fusionlab's own outputs",
    # docs/fusionlab.md's block: the same export from an empty folder is tests/test_fusionlab.py's
    # fusionlab_exports (.h5), and its compare command runs there on what that published.
    "python -m export --model tests/fixtures/fusionlab/forecaster.h5 --sample-inputs "
    "tests/fixtures/fusionlab/forecaster_inputs.npz":
        "the same command from an empty folder is tests/test_fusionlab.py's fusionlab_exports",
    "python -m examples.fusionlab.compare artifacts/ tests/fixtures/fusionlab/forecaster_inputs.npz "
    "tests/fixtures/fusionlab/forecaster_outputs.npz":
        "runs in tests/test_fusionlab.py (test_the_pages_compare_command_passes_on_the_h5_export) "
        "on the .h5 export fusionlab_exports made with the block's first command",
    "python -m examples.fusionlab.compare xtft/ tests/fixtures/fusionlab/xtft_inputs.npz "
    "tests/fixtures/fusionlab/xtft_outputs.npz":
        "runs on the XTFT export in tests/test_saved_model.py "
        "(test_parity_script_reports_fusionlab_figures), which also feeds it a wrong expectation",
    "python -m export.verify xtft/":
        "runs on the XTFT export in tests/test_saved_model.py "
        "(test_xtft_export_verify_and_serve_runner_reset)",
}
# Builders: they take the layer's shape flags; what the appended small shapes are.
BUILDERS = ("export", "export.onnx", "export.tflite", "export.savedmodel", "export.ort", "export.tflm")
SMALL = (("--units", "8"), ("--heads", "2"), ("--query-len", "4"), ("--kv-len", "4"),
         ("--query-features", "8"), ("--kv-features", "8"))
# What a folder a command runs in holds of the repository (a clone: code, venv, Makefile).
LINKED = (".venv", "Makefile", "pyproject.toml", "xattn", "export", "examples", "tests", "mkdocs.yml", "docs")
TIMEOUT = 300  # a command that never ends (a server) fails in minutes, not ten
WORKERS = 2
DOCUMENTED = commands()


def _skip_reason(command: Command) -> str | None:
    """SKIP's reason for `text # comment` (one of two commands alike), else for `text`."""
    return SKIP.get(f"{command.text} # {command.comment}") or SKIP.get(command.text)


def _command_argv(command: Command) -> list[str]:
    """`_argv`, and `xattn ...` as the console script beside this interpreter, given what `_argv`
    gives the `python -m` command it is an alias of."""
    if command.argv[:1] != ["xattn"]:
        return _argv(command)
    xattn = os.path.join(os.path.dirname(sys.executable), "xattn")
    alias = _module_form(command.argv)
    if alias[:1] == ["xattn"]:  # no module form: `xattn --help`, `xattn --version`
        return [xattn, *command.argv[1:]]
    added = _argv(dataclasses.replace(command, text=shlex.join(alias)))[len(alias):]
    return [xattn, *command.argv[1:], *added]


def _module_form(argv: list[str]) -> list[str]:
    """`xattn CMD ...` as the `python -m MODULE ...` it is an alias of (export.command); else argv
    (`xattn --help` included)."""
    from export.command import BY_NAME

    if argv[:1] != ["xattn"] or len(argv) < 2 or argv[1] not in BY_NAME:
        return argv
    from export.formats import REGISTRY

    command, rest = argv[1], argv[2:]
    if command == "export" and rest[:1] and rest[0] in REGISTRY:
        return ["python", "-m", f"export.{rest[0]}", *rest[1:]]
    if command == "bench" and rest[:1] == ["serve"]:
        return ["python", "-m", "export.serve.loadbench", *rest[1:]]
    return ["python", "-m", BY_NAME[command].module, *rest]


def _argv(command: Command) -> list[str]:
    """The command as run: `python` is this interpreter; builders get SMALL where not given."""
    argv = command.argv
    if argv[:2] == ["python", "-m"]:
        module, args = argv[2], argv[3:]
        if module in BUILDERS and "--model" not in args and "--saved-model" not in args:
            given = set(args) | ({"--query-len", "--kv-len"} if "--lengths" in args else set())
            args = args + [part for flag, value in SMALL if flag not in given for part in (flag, value)]
        return [sys.executable, "-m", module, *args]
    if argv[:1] == ["make"]:
        # the venv the repository's tests run in: never reinstalled by this test
        return ["make", "--no-print-directory", "-o", ".venv/.installed", "-o", ".venv/.installed-test",
                *argv[1:]]
    raise AssertionError(f"{command.where}: no way to run {command.text!r}; add it to SKIP with a reason")


def _touches_artifacts(command: Command) -> str | None:
    """'writes' or 'reads' when the command uses the folder artifacts/, else None."""
    argv = _module_form(command.argv)
    if argv[:1] == ["make"]:
        return {"artifacts": "writes", "verify": "reads"}.get(argv[1] if len(argv) > 1 else "")
    if argv[:2] != ["python", "-m"]:
        return None
    if argv[2] in BUILDERS:
        out = argv[argv.index("--output-dir") + 1] if "--output-dir" in argv else "artifacts"
        return "writes" if out.strip("/").split("/")[0] == "artifacts" else None
    if any(a.strip("/").split("/")[0] == "artifacts" for a in argv[3:]):
        return "reads"
    return None


def _link_repo(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in LINKED:
        os.symlink(os.path.join(REPO, name), os.path.join(folder, name))


def _run(argv: list[str], cwd: str) -> dict:
    start = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = None, str(e.stdout or ""), f"timed out after {TIMEOUT} s"
    return {"argv": argv, "code": code, "stdout": out, "stderr": err,
            "seconds": round(time.monotonic() - start, 1)}


# -- the inputs the commands name -----------------------------------------------------------------

MY_LAYERS = '''"""A user's module registering a custom layer (`--import my_layers`)."""
import keras


@keras.saving.register_keras_serializable(package="my_layers")
class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale
'''


def _make_inputs(folder: str) -> None:
    """forecaster.keras + samples.npz, tagger.keras (a custom layer from my_layers.py, int token
    inputs of unknown length) + tokens.npz, and the key pair key.pem / key.pub."""
    import keras
    from layer_zoo import randomize_weights
    from test_trust import write_key_pair

    from examples.forecast.train import train_forecaster
    from xattn import CrossAttention

    # The README's forecaster: the example's model, trained briefly on the real CO2 data (as in
    # tests/test_example_forecast.py; int8 needs a trained model), and its sample inputs.
    trained = os.path.join(os.path.dirname(folder), "forecast")
    train_forecaster(trained, epochs=2, seed=0)
    shutil.copy(os.path.join(trained, "forecaster.keras"), folder)
    shutil.copy(os.path.join(trained, "sample_inputs.npz"), os.path.join(folder, "samples.npz"))
    rng = np.random.default_rng(22)

    with open(os.path.join(folder, "my_layers.py"), "w", encoding="utf-8") as f:
        f.write(MY_LAYERS)
    spec = importlib.util.spec_from_file_location("my_layers", os.path.join(folder, "my_layers.py"))
    my_layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(my_layers)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = my_layers.Scale(name="scale")(keras.layers.Embedding(50, 8, name="embed")(tokens))
    x = CrossAttention(8, 2, name="cross_attention")([x, x])
    tagger = keras.Model(tokens, keras.layers.Dense(3, name="tags")(x))
    randomize_weights(tagger, 23).save(os.path.join(folder, "tagger.keras"))
    np.savez(os.path.join(folder, "tokens.npz"), tokens=rng.integers(0, 50, (16, 64), dtype=np.int32))

    write_key_pair(folder, "key")


# -- running them -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def command_results(tmp_path_factory) -> dict:
    """{command's where: result} for every documented command not in SKIP."""
    root = str(tmp_path_factory.mktemp("commands"))
    inputs = os.path.join(root, "inputs")
    os.makedirs(inputs)
    _make_inputs(inputs)
    base = os.path.join(root, "base")  # what `make artifacts` makes, as the README's first step
    _link_repo(base)
    made = _run(_argv(Command("make artifacts", "base", "base")), base)
    assert made["code"] == 0 and os.path.isdir(os.path.join(base, "artifacts")), made["stderr"]

    blocks: dict[str, list[Command]] = {}
    for command in DOCUMENTED:
        if not _skip_reason(command):
            blocks.setdefault(command.block, []).append(command)
    # A command's key: its text and the lines run before it in its block. The first command
    # (in document order) with a key runs; a later one with the same key shares its result.
    first: dict[tuple, str] = {("make artifacts",): "base"}
    keys: dict[str, tuple] = {}
    for listed in blocks.values():
        for i, command in enumerate(listed):
            keys[command.where] = tuple(c.text for c in listed[: i + 1])
            first.setdefault(keys[command.where], command.where)
    results: dict[str, dict] = {"base": made}

    def run_block(block: str, listed: list[Command]) -> None:
        # up to its last command that runs first here (the ones before set up its folder)
        last = max(i for i, c in enumerate(listed) if first[keys[c.where]] == c.where)
        folder = os.path.join(root, block.replace("/", "_").replace(":", "_"))
        _link_repo(folder)
        for name in os.listdir(inputs):
            shutil.copy(os.path.join(inputs, name), folder)
        uses = [_touches_artifacts(c) for c in listed if _touches_artifacts(c)]
        if uses and uses[0] == "reads":
            shutil.copytree(os.path.join(base, "artifacts"), os.path.join(folder, "artifacts"),
                            symlinks=True)
        for command in listed[: last + 1]:
            results[command.where] = _run(_command_argv(command), folder)

    runs = {block: listed for block, listed in blocks.items()
            if any(first[keys[c.where]] == c.where for c in listed)}
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(run_block, block, listed) for block, listed in runs.items()]:
            future.result()
    for where, key in keys.items():  # repeats: the result of the first run
        results.setdefault(where, results[first[key]])
    for where, result in results.items():  # shown with -s: what each command costs
        print(f"{result['seconds']:6.1f} s  exit {result['code']}  {where}  {' '.join(result['argv'][1:])}")
    return results


def test_the_documentation_shows_commands():
    texts = [c.text for c in DOCUMENTED]
    assert any(t.startswith("python -m export") for t in texts), texts
    assert any(t.startswith("make ") for t in texts), texts


@pytest.mark.parametrize("command", DOCUMENTED, ids=[f"{c.where} {c.text[:60]}" for c in DOCUMENTED])
def test_documented_command_runs(command: Command, command_results):
    reason = _skip_reason(command)
    if reason:
        pytest.skip(reason)
    result = command_results[command.where]
    shown = f"{command.where}: {' '.join(result['argv'])}\n{result['stderr'][-3000:]}"
    assert result["code"] == 0, shown
    assert "Traceback" not in result["stderr"], shown


def test_no_page_shows_a_traceback():
    """A one-line reason belongs where the documentation once showed `Traceback (most recent...`."""
    for page in doc_pages():
        with open(os.path.join(REPO, page), encoding="utf-8") as f:
            assert "Traceback (most recent call last)" not in f.read(), page


# -- `--help` of every entry point ---------------------------------------------------------------


def entry_points() -> list[str]:
    """Every module `python -m` runs: packages with a __main__.py, modules with a main guard."""
    found = set()
    for path in glob.glob(os.path.join(REPO, "export", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "examples", "**", "*.py"), recursive=True):
        module = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
        with open(path, encoding="utf-8") as f:
            runnable = 'if __name__ == "__main__":' in f.read()
        if module.endswith(".__main__"):
            found.add(module[: -len(".__main__")])
        elif runnable:
            found.add(module)
    return sorted(found)


ENTRY_POINTS = entry_points()


@pytest.fixture(scope="session")
def help_results(tmp_path_factory) -> dict:
    folder = str(tmp_path_factory.mktemp("help"))
    _link_repo(folder)
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        runs = {m: pool.submit(_run, [sys.executable, "-m", m, "--help"], folder) for m in ENTRY_POINTS}
        return {m: future.result() for m, future in runs.items()}


def test_entry_points_are_found():
    assert {"export", "export.onnx", "export.verify", "export.serve", "export.bench"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_of_every_entry_point(module: str, help_results):
    result = help_results[module]
    assert result["code"] == 0, f"python -m {module} --help:\n{result['stderr'][-3000:]}"
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert "usage:" in result["stdout"], result["stdout"]
