"""Unsafe input (issue 7), property-based: random argument lists at the CLI parser, random bytes at
`export.runtime.verify` as artifacts, manifests and golden files. Always a clean exit code and one line
per artifact, never a traceback.

No export runs here: once the flags parse, `export_artifacts` is replaced by a sentinel.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from export import FORMATS, cli
from export.runtime.verify.cli import main as verify_main

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
SMALL = dict(units=32, heads=2, query_len=12, query_features=16, kv_len=5, kv_features=24)

# -- the CLI parser --------------------------------------------------------------------------------

FLAGS = [
    "--units", "--heads", "--query-len", "--kv-len", "--query-features", "--kv-features",
    "--batch", "--weights", "--seed", "--output-dir", "--name", "--opset", "--atol",
    "--quantize", "--int8-io", "--calibration", "--max-rel-error", "--query-mask", "--value-mask",
    "--causal", "--scores", "-v", "--verbose", "-q", "--quiet", "--unknown", "-x",
]
JUNK = [
    "0", "1", "2", "-1", "-0", "+5", "64", "0x10", "1e3", "1e-3", "nan", "inf", "-inf", "abc",
    "dynamic", "DYNAMIC", "none", "int8", "float16", "dynamic-int8", "", " ", "-", "--", "=",
    "--units=0", "--heads=-3", "--batch=dynamic", "x" * 300, "9" * 40, "💥", "a/b", "../../etc",
    "/nonexistent/w.keras", "w.weights.h5", "calib.npz", "weights.txt", "name with spaces",
]
ENTRY_POINTS = {
    "python -m export": FORMATS, "python -m export.onnx": ("onnx",),
    "python -m export.tflite": ("tflite",), "python -m export.savedmodel": ("savedmodel",),
}


class Parsed(Exception):
    """Raised instead of exporting: the flags parsed and resolved into a request."""


@contextlib.contextmanager
def export_logger_restored():
    """cli.main reconfigures the package logger; give other tests theirs back."""
    logger = logging.getLogger("export")
    state = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = state


@SETTINGS
@given(
    prog=st.sampled_from(list(ENTRY_POINTS)),
    argv=st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(JUNK), st.text(max_size=12)),
                  max_size=8),
)
def test_cli_any_arguments_exit_cleanly(prog, argv):
    out, err = io.StringIO(), io.StringIO()
    with (
        tempfile.TemporaryDirectory() as cwd,
        contextlib.chdir(cwd) if hasattr(contextlib, "chdir") else _chdir(cwd),
        mock.patch("export.pipeline.export_artifacts", side_effect=Parsed),
        export_logger_restored(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = cli.main(argv, formats=ENTRY_POINTS[prog], prog=prog)
        except SystemExit as e:
            code = e.code
            assert code == 2 or (code == 0 and ({"-h", "--help"} & set(argv))), (argv, code)
            if code == 2:
                assert err.getvalue().count("\n") == 1, err.getvalue()
        except Parsed:
            code = None  # parsed; the export itself is not what is tested here
        else:
            assert code in (1, 2, 3, 4), (argv, code)
            last = err.getvalue().strip().splitlines()[-1]
            assert last.startswith(f"{prog}: error: "), err.getvalue()
        # Nothing was written where an export would publish.
        assert os.listdir(cwd) == []
    assert "Traceback" not in err.getvalue()


@contextlib.contextmanager
def _chdir(path):  # contextlib.chdir is Python 3.11+
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# -- export.runtime.verify ----------------------------------------------------------------------------


class Template(dict):
    """fmt -> (manifest dict, artifact path, golden bytes); a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Template({sorted(self)})"


@pytest.fixture(scope="module")
def template(artifact_factory):
    """A real published export to damage."""
    out, results = artifact_factory(**SMALL)
    found = Template()
    for fmt, r in results.items():
        with open(r.manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        with open(os.path.join(out, manifest["golden"]), "rb") as f:
            golden = f.read()
        found[fmt] = (manifest, r.path, golden)
    return found


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """Random bytes, or the original with bits flipped, a cut, or junk spliced in."""
    kind = draw(st.sampled_from(["random", "flip", "truncate", "splice"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    data = bytearray(original)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def write_case(folder: str, manifest: dict, artifact: str, golden: bytes) -> str:
    """A folder with one manifest, its artifact (copied), golden file and reference; the manifest path."""
    dst = os.path.join(folder, manifest["artifact"])
    if os.path.isdir(artifact):
        shutil.copytree(artifact, dst)
    else:
        shutil.copyfile(artifact, dst)
    with open(os.path.join(folder, manifest["golden"]), "wb") as f:
        f.write(golden)
    reference = os.path.join(os.path.dirname(artifact), str(manifest.get("reference")))
    if os.path.isfile(reference):  # the reference .keras the manifest's reference_sha256 covers
        shutil.copyfile(reference, os.path.join(folder, manifest["reference"]))
    raw = manifest.get("golden_raw")
    for name in (raw.get("index"), raw.get("data")) if isinstance(raw, dict) else ():
        source = os.path.join(os.path.dirname(artifact), str(name))
        if os.path.isfile(source):  # the raw golden pair for JS readers (export.runtime.golden_raw)
            shutil.copyfile(source, os.path.join(folder, name))
    path = os.path.join(folder, manifest["artifact"] + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return path


def run_verify(path: str) -> tuple[int, list[str]]:
    """main() on one manifest: the exit code and the stdout lines; no traceback, no exception."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = verify_main([path])
    lines = out.getvalue().splitlines()
    assert code in (0, 1), (code, out.getvalue(), err.getvalue())
    assert len(lines) == 2, out.getvalue()  # one line for the artifact, one summary
    assert lines[0].startswith("✓ " if code == 0 else "✗ "), lines
    assert "unexpected" not in lines[0], lines[0]  # every failure has a reason of its own
    assert "Traceback" not in err.getvalue()
    # Which check caught it (shown by --hypothesis-show-statistics).
    reason = re.sub(r"\S*xattn\S*", "<file>", lines[0].split("  ", 1)[-1])
    event(re.sub(r"[0-9a-f]{12}\.\.\.|\d+(\.\d+)?(e-?\d+)?", "N", reason)[:60] if code else "passed")
    return code, lines


def artifact_file(fmt: str, artifact: str) -> str:
    """The file whose bytes get damaged: the artifact itself, or the SavedModel's graph."""
    return os.path.join(artifact, "saved_model.pb") if fmt == "savedmodel" else artifact


@SETTINGS
@given(data=st.data(), fmt=st.sampled_from(["onnx", "tflite", "savedmodel"]),
       manifest_agrees=st.booleans())
def test_verify_random_artifact_bytes(template, data, fmt, manifest_agrees):
    """Damaged artifacts: a sha256 mismatch, or (when the manifest is updated to agree, so the
    runtime really sees the bytes) whatever the runtime makes of them; never a traceback."""
    manifest, artifact, golden = template[fmt]
    with open(artifact_file(fmt, artifact), "rb") as f:
        original = f.read()
    junk = data.draw(damaged(original))
    with tempfile.TemporaryDirectory() as folder:
        path = write_case(folder, dict(manifest), artifact, golden)
        target = artifact_file(fmt, os.path.join(folder, manifest["artifact"]))
        with open(target, "wb") as f:
            f.write(junk)
        if manifest_agrees:
            from export.publish import sha256_path, size_bytes

            copy = dict(manifest)
            artifact_path = os.path.join(folder, manifest["artifact"])
            copy.update(sha256=sha256_path(artifact_path), bytes=size_bytes(artifact_path))
            with open(path, "w", encoding="utf-8") as f:
                json.dump(copy, f)
        code, lines = run_verify(path)
        if junk == original:
            assert code == 0, lines
        elif not manifest_agrees:
            assert code == 1 and manifest["artifact"] in lines[0]
            assert "sha256 mismatch" in lines[0] or "bytes, the manifest says" in lines[0], lines
        elif code == 1:  # the runtime saw the bytes: a reason of its own, never the sha256
            assert "sha256 mismatch" not in lines[0] and "bytes, the manifest says" not in lines[0]
        else:  # damage the runtime shrugs off: the file really reproduces its golden vectors
            assert_reproduces_golden(fmt, os.path.join(folder, manifest["artifact"]), manifest, golden)


def assert_reproduces_golden(fmt: str, artifact: str, manifest: dict, golden: bytes) -> None:
    """The artifact run here (export.runtime.runtimes) on the golden inputs gives the golden outputs."""
    import numpy as np

    from export.runtime.runtimes import load_runner

    with np.load(io.BytesIO(golden), allow_pickle=False) as arrays:
        data = {k: arrays[k] for k in arrays.files}
    names = [t["name"] for t in manifest["inputs"]]
    batch = manifest["inputs"][0]["shape"][0]
    got = load_runner(fmt, artifact, batch=batch, inputs=manifest["inputs"]).run(
        {k: data[k] for k in names})
    np.testing.assert_allclose(got["output"], data["output"], rtol=0, atol=manifest["parity"]["atol"])


# The fields every manifest must hold, and their JSON types (export.runtime.manifest).
REQUIRED = {"format": str, "artifact": str, "sha256": str, "inputs": list, "outputs": list,
            "golden": str, "parity": dict}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(data=st.data(), fmt=st.sampled_from(["onnx", "tflite"]),
       kind=st.sampled_from(["bytes", "field", "json"]))
def test_verify_random_manifests(template, data, fmt, kind):
    manifest, artifact, golden = template[fmt]
    with tempfile.TemporaryDirectory() as folder:
        path = write_case(folder, dict(manifest), artifact, golden)
        if kind == "bytes":
            with open(path, "rb") as f:
                text = f.read()
            content = data.draw(damaged(text))
        elif kind == "field":
            key = data.draw(st.sampled_from(sorted(manifest) + ["extra"]))
            value = data.draw(JSON)
            content = json.dumps({**manifest, key: value}).encode()
        else:
            content = json.dumps(data.draw(JSON)).encode()
        with open(path, "wb") as f:
            f.write(content)
        code, lines = run_verify(path)
        if kind == "json":
            assert code == 1
        elif kind == "bytes":
            try:
                same = json.loads(content) == manifest
            except ValueError:
                same = False
                assert code == 1 and "manifest is not" in lines[0], lines
            if same:
                assert code == 0, lines
        elif key == "extra":  # a field verify does not know changes nothing
            assert code == 0, lines
        elif key in REQUIRED and not isinstance(value, REQUIRED[key]):
            assert code == 1 and key in lines[0], (key, value, lines)


@SETTINGS
@given(data=st.data(), keep_sha=st.booleans())
def test_verify_random_golden_files(template, data, keep_sha):
    manifest, artifact, golden = template["onnx"]
    junk = data.draw(damaged(golden))
    with tempfile.TemporaryDirectory() as folder:
        changed = dict(manifest)
        if not keep_sha:
            del changed["golden_sha256"]  # so the bytes are parsed, not just hashed
        path = write_case(folder, changed, artifact, junk)
        code, lines = run_verify(path)
        if keep_sha and junk != golden:
            assert code == 1 and "golden file" in lines[0]
