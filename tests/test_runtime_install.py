"""The runtime half installs and runs alone (README, Install): a fresh venv with only
`pip install ".[runtime]"` holds no TensorFlow, Keras, tf2onnx or onnx, stays under 300 MB of
site-packages, and verifies and serves (embedded engine) artifacts the build venv published.

The venv lives under the user's cache folder (export.caches: `~/.cache/xattn/runtime-venv`), made
anew each run with pip's own cache; it runs outside the repository, so only the installed package
is imported.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

from export.caches import cache_dir

pytestmark = pytest.mark.slow

BUILD_ONLY = ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx")
MAX_SITE_BYTES = 300 * 1024 * 1024
STEM = "xattn_u64_h4_q10x64_kv10x64"
INSTALL_TIMEOUT_S = 900
READY_TIMEOUT_S = 180


def _site_bytes(venv: str) -> int:
    (site,) = [os.path.join(root, "site-packages") for root, dirs, _ in os.walk(os.path.join(venv, "lib"))
               if "site-packages" in dirs]
    total = 0
    for root, _, files in os.walk(site):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


@pytest.fixture(scope="module")
def runtime_venv():
    """A fresh venv holding `.[runtime]` only: (python, seconds the install took)."""
    venv = cache_dir("runtime-venv")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    python = os.path.join(venv, "bin", "python")
    started = time.monotonic()
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", f"{REPO}[runtime]"],
                          cwd=os.path.dirname(venv), capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return python, time.monotonic() - started


def _run(python: str, *args: str, cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def published(artifact_factory):
    out, _ = artifact_factory()  # savedmodel, tflite, onnx: built by this (the build) venv
    return out


def test_runtime_venv_holds_no_build_half_and_fits_300_mb(runtime_venv, tmp_path):
    python, seconds = runtime_venv
    listed = _run(python, "-m", "pip", "list", "--format", "json", cwd=str(tmp_path))
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"numpy", "onnxruntime", "ai-edge-litert", "uvicorn", "xattn"} <= names, names
    assert not names & set(BUILD_ONLY), names & set(BUILD_ONLY)
    size = _site_bytes(os.path.dirname(os.path.dirname(python)))
    print(f"runtime venv: {size / 2**20:.0f} MiB of site-packages, installed in {seconds:.1f} s")
    assert size < MAX_SITE_BYTES, f"{size / 2**20:.0f} MiB"
    imported = _run(python, "-c", "import export, export.runtime.verify, export.runtime.serve.cli, "
                                   "export.command",
                    cwd=str(tmp_path))
    assert imported.returncode == 0, imported.stderr
    # ... and the package is the installed one, not the checkout.
    where = _run(python, "-c", "import export; print(export.__file__)", cwd=str(tmp_path))
    assert not where.stdout.strip().startswith(REPO + os.sep), where.stdout


def test_runtime_venv_verifies_what_the_build_venv_published(runtime_venv, published, tmp_path):
    python, _ = runtime_venv
    for argv in (["-m", "export.verify", published],
                 [os.path.join(os.path.dirname(python), "xattn"), "verify", published]):
        if argv[0] != "-m":
            done = subprocess.run(argv, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
        else:
            done = _run(python, *argv, cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr
        # TFLite and ONNX run; the SavedModel needs TensorFlow, not here: reported, not failed.
        assert "2 passed, 0 failed, 1 not run (3 manifests in" in done.stdout, done.stdout
        assert "tensorflow is not importable here" in done.stdout


@pytest.mark.parametrize("argv", [
    ["-m", "export.onnx", "--units", "8"], ["XATTN", "export", "tflite"], ["XATTN", "bench"],
    ["-m", "export.bench", "--units", "8"],
], ids=["python-m-export-onnx", "xattn-export", "xattn-bench", "python-m-export-bench"])
def test_runtime_venv_refuses_to_export_in_one_line(runtime_venv, argv, tmp_path):
    python, _ = runtime_venv
    xattn = os.path.join(os.path.dirname(python), "xattn")
    command = [xattn, *argv[1:]] if argv[0] == "XATTN" else [python, *argv]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                          env=env)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "exports, which needs the build half: tensorflow, keras, tf2onnx, onnx not installed here "\
           "(pip install 'xattn[build]')" in lines[0], lines[0]
    assert not os.listdir(tmp_path)  # nothing written (no artifacts/ folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_runtime_venv_serves_on_the_embedded_engine(runtime_venv, published, tmp_path):
    python, _ = runtime_venv
    port = _free_port()
    logs, out = open(tmp_path / "stderr", "w"), open(tmp_path / "stdout", "w")
    proc = subprocess.Popen([python, "-m", "export.serve", published, "--port", str(port),
                             "--workers", "1"], cwd=str(tmp_path), stdout=out, stderr=logs,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()
            try:
                # The CLI prints `ready` once it is serving (a Ctrl-C before is a startup's: 130).
                if ("ready " in (tmp_path / "stdout").read_text()
                        and _request(port, "GET", "/v2/health/ready")[0] == 200):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.2)
        with np.load(os.path.join(published, f"{STEM}.golden.npz")) as z:
            golden = {k: z[k] for k in z.files}
        with open(os.path.join(published, f"{STEM}.onnx.json")) as f:
            atol = json.load(f)["parity"]["atol"]
        for fmt in ("onnx", "tflite"):
            request = {
                "inputs": [{"name": n, "shape": list(golden[n].shape), "datatype": "FP32",
                            "data": golden[n].reshape(-1).tolist()} for n in ("source1", "source2")],
                "outputs": [{"name": "output", "parameters": {"binary_data": False}}],
            }
            status, body = _request(port, "POST", f"/v2/models/{STEM}_{fmt}/infer",
                                    json.dumps(request).encode())
            assert status == 200, body[:300]
            (output,) = json.loads(body)["outputs"]
            got = np.asarray(output["data"], np.float32).reshape(output["shape"])
            np.testing.assert_allclose(got, golden["output"], rtol=0, atol=atol)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        logs.close()
        out.close()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
