"""Shared pytest setup. TensorFlow's C++ logs are silenced here, before anything imports it."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# What `import export` sets too; set here first so every test and subprocess runs TF the same way.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# The project is TensorFlow-only (SavedModel, TFLite and ONNX via tf2onnx).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


# -- export fixtures shared by every test module ------------------------------------------------

import fcntl  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_FORMATS = ("savedmodel", "tflite", "onnx")


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory):
    """build(formats=..., seed=0, batch=<format default>, **spec fields) -> (output_dir, {fmt: result}).

    Builds through the library (`export.pipeline.export_artifacts`) once per distinct request
    and caches it for the whole session. The folder is shared: tests that change files in it
    must copy it first (`shutil.copytree`).
    """
    from export.formats import get_format
    from export.pipeline import ExportRequest, export_artifacts
    from export.spec import ArtifactSpec

    def specs_of(formats, fields) -> dict:
        specs = {}
        for fmt in formats:
            spec_fields = dict(fields)
            spec_fields.setdefault("batch", get_format(fmt).default_batch)
            if not get_format(fmt).quantizable:
                spec_fields.pop("quantize", None)
            specs[fmt] = ArtifactSpec(**spec_fields)
        return specs

    cache = {}
    # `make mutation` runs the tests once per mutant, each time a new session: there the builds
    # are kept on disk (XATTN_TEST_ARTIFACTS), made once by unmutated code. Under pytest-xdist
    # (`make test`: -n 2) each worker is a session of its own: the workers share one folder of
    # builds, beside their own temporary folders, each build made once under a file lock.
    keep = os.environ.get("XATTN_TEST_ARTIFACTS")
    if not keep and os.environ.get("PYTEST_XDIST_WORKER"):
        keep = str(tmp_path_factory.getbasetemp().parent / "shared-artifacts")

    def build(formats=ALL_FORMATS, seed=0, **fields):
        key = (tuple(formats), seed, tuple(sorted(fields.items())))
        if key not in cache and keep:
            kept = os.path.join(keep, hashlib.sha256(repr(key).encode()).hexdigest()[:16])
            os.makedirs(keep, exist_ok=True)
            with open(kept + ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another worker building the same: wait for it
                if not os.path.isfile(os.path.join(kept, "results.pickle")):
                    shutil.rmtree(kept, ignore_errors=True)
                    os.makedirs(kept)
                    results = export_artifacts(ExportRequest(specs=specs_of(formats, fields),
                                                             output_dir=os.path.join(kept, "out"),
                                                             seed=seed))
                    with open(os.path.join(kept, "results.pickle"), "wb") as f:
                        pickle.dump({r.format: r for r in results}, f)
            with open(os.path.join(kept, "results.pickle"), "rb") as f:
                cache[key] = (os.path.join(kept, "out"), pickle.load(f))  # written just above
        if key not in cache:
            out = tmp_path_factory.mktemp("artifacts")
            results = export_artifacts(ExportRequest(specs=specs_of(formats, fields), output_dir=str(out),
                                                     seed=seed))
            cache[key] = (str(out), {r.format: r for r in results})
        return cache[key]

    return build


def run_module(module: str, *args: str, cwd: str | None = None, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a subprocess, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_json(path: str) -> dict:
    """A manifest (or any JSON file) as a dict."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, data: dict) -> None:
    """Write a (possibly edited or forged) manifest back."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


# -- `make mutation`: mutmut runs each mutant's tests in a process forked from its fork server -----


def pytest_configure(config):
    if os.environ.get("MUTANT_UNDER_TEST"):
        import gc

        # The fork shares TensorFlow's heap with the fork server; a full garbage collection (pytest
        # runs one at the end of each session) would walk it and copy its pages: ~0.5 s a mutant.
        gc.freeze()


# Whole files of the fast tier (`make test-fast`, `-m fast`): pure logic that builds nothing and
# starts no server. Other files mark their fast tests themselves (@pytest.mark.fast).
FAST_FILES = ("test_manifest.py", "test_publish_files.py", "test_structure.py")
# Under pytest-xdist (`make test`: --dist loadfile) a worker takes the next file when it is free:
# the longest files first (their build fixtures and subprocesses; the durations `make test
# PYTEST_ADDOPTS=--durations=0` prints), so that no worker is left alone with one at the end.
# Only the order of files changes: within a file the tests keep theirs.
LONGEST_FILES = ("test_commands.py", "test_saved_model.py", "test_model.py",
                 "test_layer_table.py", "test_reproducible.py", "test_fusionlab.py",
                 "test_runtime_install.py", "test_trust.py", "test_tflm.py")
# ... and tests/test_serve.py last, as in a one-process run (alphabetical: after every in-process
# ORT build): its session gRPC client (tritonclient.grpc) leaves gRPC's threads in the worker, and
# an ORT export later in that process failed once in four xdist runs with gRPC's "epoll_wait
# error: Bad file descriptor" in the child, when export/ort/serialize.py still set up its child in
# a preexec_fn (it now starts it from a launcher; the order is kept as a one-process run has it).
LAST_FILES = ("test_serve.py",)


def _stopping_tests_last(items: list) -> None:
    """A test marked `stops_server` ends its session server: it runs after every other selected
    test that shares that server (same fixture parameter), whatever the selection or order."""
    def param(item, fixture: str):
        return getattr(getattr(item, "callspec", None), "params", {}).get(fixture)

    for item in [i for i in items if i.get_closest_marker("stops_server")]:
        server = item.get_closest_marker("stops_server").args[0]
        items.remove(item)
        sharing = [n for n, other in enumerate(items)
                   if server in getattr(other, "fixturenames", ())
                   and param(other, server) == param(item, server)]
        items.insert(sharing[-1] + 1 if sharing else len(items), item)


def pytest_collection_modifyitems(config, items):
    """The fast tier's files marked `fast`; under mutmut, the quickest tests first: with -x a
    killed mutant stops at its first failure.

    The durations are those mutmut measured on unmutated code (mutmut-stats.json, in the `mutants`
    folder the tests run from); without them the order stays as it is.
    """
    for item in items:
        if item.path.name in FAST_FILES:
            item.add_marker(pytest.mark.fast)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects: the same order in each
        rank = {name: i for i, name in enumerate(LONGEST_FILES)}
        rank.update({name: len(LONGEST_FILES) + 1 + i for i, name in enumerate(LAST_FILES)})
        items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))
    _stopping_tests_last(items)
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    try:
        with open("mutmut-stats.json", encoding="utf-8") as f:
            durations = json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
