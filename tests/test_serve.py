"""`python -m export.serve`: the Open Inference Protocol on both engines, driven by tritonclient.

One server per engine (a real `python -m export.serve` process: `--engine embedded`, uvicorn
workers; `--engine ray`, one local Ray instance) serves the default ONNX and TFLite artifacts for
the whole session, and the protocol suite runs against each; `tritonclient.http`, unmodified,
talks to them with JSON and binary tensors. Bad requests go through raw HTTP so that each kind is
sent exactly as named. The last test of each engine stops its server with Ctrl-C (marked
`stops_server`: conftest runs it after every other test of that server, whatever the order). The embedded
engine's drain (SIGTERM under load), readiness (warm-up) and bind address have their own servers.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
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
from conftest import REPO, run_module

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

STEM = "xattn_u64_h4_q10x64_kv10x64"
ONNX, TFLITE = f"{STEM}_onnx", f"{STEM}_tflite"
MODELS = {"onnx": ONNX, "tflite": TFLITE}
MAX_BATCH = 8
MAX_BODY_MB = 1
STARTUP_TIMEOUT_S = 240
# Ray is the serve extra's; without it the embedded engine's tests still run.
HAVE_RAY = importlib.util.find_spec("ray") is not None
ENGINES = ["embedded", pytest.param("ray", marks=pytest.mark.skipif(
    not HAVE_RAY, reason="Ray Serve (the serve extra) is not installed"))]
BATCH_WAIT_MS = 20  # Ray's batches: long enough that 16 concurrent requests share some
ENGINE_OF: dict[int, str] = {}  # a server's pid -> its engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 5) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture(scope="session")
def artifacts(artifact_factory):
    out, _ = artifact_factory()
    return out


@pytest.fixture(scope="session")
def golden(artifacts):
    with np.load(os.path.join(artifacts, f"{STEM}.golden.npz")) as z:
        return {k: z[k] for k in z.files}


def _manifest(artifacts: str, fmt: str) -> dict:
    with open(os.path.join(artifacts, f"{STEM}.{fmt}.json")) as f:
        return json.load(f)


def _start(artifacts, logs, *args, env=None, wait_ready=True):
    """A `python -m export.serve` process on a free port: (process, port, stdout, stderr)."""
    port = _free_port()
    out, err = open(logs / "stdout", "w"), open(logs / "stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "export.serve", artifacts, "--port", str(port), *args],
        cwd=REPO, stdout=out, stderr=err, env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"export.runtime.serve exited {proc.returncode}: {(logs / 'stderr').read_text()}")
        try:
            if not wait_ready and _get(port, "/v2/health/live") == 200:
                break
            # The CLI prints `ready` once start() returns, just after /v2 starts answering.
            if "ready " in (logs / "stdout").read_text() and _get(port, "/v2/health/ready") == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"export.runtime.serve not ready in {STARTUP_TIMEOUT_S} s")
        time.sleep(0.1)
    return proc, port, out, err


def _finish(proc, *files):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    for f in files:
        f.close()


@pytest.fixture(scope="session", params=ENGINES)
def server(request, artifacts, tmp_path_factory):
    """One server per engine for the session: (process, port, log folder)."""
    logs = tmp_path_factory.mktemp(f"serve-logs-{request.param}")
    proc, port, out, err = _start(
        artifacts, logs, "--engine", request.param, "--max-batch", str(MAX_BATCH),
        "--max-body-mb", str(MAX_BODY_MB), "--batch-wait-ms", str(BATCH_WAIT_MS),
    )
    ENGINE_OF[proc.pid] = request.param
    yield proc, port, logs
    _finish(proc, out, err)


@pytest.fixture(scope="session")
def client(server):
    _, port, _ = server
    return httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=8)


def _inputs(arrays: dict, binary: bool) -> list:
    inputs = []
    for name in ("source1", "source2"):
        tensor = httpclient.InferInput(name, list(arrays[name].shape), "FP32")
        tensor.set_data_from_numpy(arrays[name], binary_data=binary)
        inputs.append(tensor)
    return inputs


# -- health and metadata ---------------------------------------------------------------------------


def test_health_and_server_metadata(client, server):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    for name in MODELS.values():
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, model_version="1")
    _, _, logs = server
    printed = (logs / "stdout").read_text()
    assert f"serving  {ONNX}" in printed and f"serving  {TFLITE}" in printed
    assert "not served: SavedModel" in printed


def test_head_answers_as_get_and_an_encoded_slash_is_404(server):
    """Issue 27: `HEAD /v2/health/ready` answered 400; `/v2/models/<name>%2Fready` was decoded
    and routed. Both engines."""
    _, port, _ = server

    def status(method: str, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(method, path)
            return conn.getresponse().status
        finally:
            conn.close()

    assert status("HEAD", "/v2/health/ready") == 200
    assert status("HEAD", "/v2/health/live") == 200
    assert status("GET", f"/v2/models/{ONNX}/ready") == 200
    assert status("GET", f"/v2/models/{ONNX}%2Fready") == 404
    assert status("GET", f"/v2/models/{ONNX}%2fready") == 404


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_model_metadata_is_the_manifest(client, artifacts, fmt):
    manifest = _manifest(artifacts, fmt)
    metadata = client.get_model_metadata(MODELS[fmt])
    assert metadata["name"] == MODELS[fmt]
    assert metadata["platform"] == {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite"}[fmt]
    for key in ("inputs", "outputs"):
        assert [t["name"] for t in metadata[key]] == [t["name"] for t in manifest[key]]
        for served, entry in zip(metadata[key], manifest[key]):
            assert served["datatype"] == "FP32"
            # Axis 0 is -1 even for the batch-1 TFLite file: the server feeds it in chunks.
            assert served["shape"] == [-1, *entry["shape"][1:]]
    assert metadata["parameters"]["sha256"] == manifest["sha256"]


# -- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_infer_matches_the_golden_outputs(client, artifacts, golden, fmt, binary):
    atol = _manifest(artifacts, fmt)["parity"]["atol"]
    result = client.infer(
        MODELS[fmt], _inputs(golden, binary), request_id="req-1",
        outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)],
    )
    np.testing.assert_allclose(result.as_numpy("output"), golden["output"], rtol=0, atol=atol)
    response = result.get_response()
    assert response["id"] == "req-1" and response["model_name"] == MODELS[fmt]
    assert ("parameters" in response["outputs"][0]) == binary


def test_infer_without_requested_outputs_returns_binary(client, golden):
    # tritonclient then sets binary_data_output: every output comes back as binary data.
    result = client.infer(ONNX, _inputs(golden, binary=True))
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 4 * 10 * 64 * 4
    np.testing.assert_allclose(result.as_numpy("output"), golden["output"], atol=1e-4)


def _stats(port: int, model: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/v2/models/{model}/stats")
        reply = conn.getresponse()
        assert reply.status == 200 and reply.getheader("Content-Type") == "application/json"
        return json.loads(reply.read())["model_stats"][0]
    finally:
        conn.close()


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_concurrent_requests_are_batched_and_split_back(server, client, artifacts, fmt):
    """Each caller of concurrent requests gets its own rows. The Ray engine merges them into
    batches of up to --max-batch rows (its statistics show fewer runs than requests); the embedded
    engine runs each request as it comes (one run each)."""
    from export.runtime.runtimes import load_runner

    proc, port, _ = server
    engine = ENGINE_OF[proc.pid]
    manifest = _manifest(artifacts, fmt)
    path = os.path.join(artifacts, manifest["artifact"])
    runner = load_runner(fmt, path, batch=manifest["inputs"][0]["shape"][0],
                         inputs=manifest["inputs"])
    rng = np.random.default_rng(7)
    requests = []
    for i in range(16):
        rows = 1 + i % 3  # 1..3 rows: batches of up to MAX_BATCH rows mix sizes
        requests.append({
            n: rng.normal(size=(rows, 10, 64)).astype(np.float32) for n in ("source1", "source2")
        })
    before = _stats(port, MODELS[fmt])
    pending = [client.async_infer(MODELS[fmt], _inputs(r, binary=i % 2 == 0))
               for i, r in enumerate(requests)]
    for request, handle in zip(requests, pending):
        got = handle.get_result(timeout=60).as_numpy("output")
        np.testing.assert_allclose(got, runner.run(request)["output"], rtol=0, atol=1e-5)
    after = _stats(port, MODELS[fmt])
    rows = sum(len(r["source1"]) for r in requests)
    runs = after["execution_count"] - before["execution_count"]
    answered = (after["inference_stats"]["success"]["count"]
                - before["inference_stats"]["success"]["count"])
    counted = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    sizes = {b["batch_size"] for b in after["batch_stats"]
             if b["compute_infer"]["count"] > counted.get(b["batch_size"], 0)}
    if engine == "ray":  # one replica: its statistics are the server's
        assert after["inference_count"] - before["inference_count"] == rows
        assert answered == len(requests) and runs < len(requests), after  # some requests shared a run
        assert max(sizes) > 3 and max(sizes) <= MAX_BATCH, sizes  # merged, never past --max-batch
    else:  # each of the --workers processes counts its own (before and after may come from two
        # of them): a process that never merges has run exactly the requests it answered
        assert after["execution_count"] == after["inference_stats"]["success"]["count"], after


def test_statistics_route_answers_get_only(server):
    _, port, _ = server
    stats = _stats(port, ONNX)
    assert stats["name"] == ONNX and stats["version"] == "1"
    assert stats["execution_count"] == sum(b["compute_infer"]["count"] for b in stats["batch_stats"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{ONNX}/stats", body=b"{}")
        reply = conn.getresponse()
        assert reply.status == 400 and "no route POST" in json.loads(reply.read())["error"]
    finally:
        conn.close()


def test_gzip_request_body(client, golden):
    result = client.infer(ONNX, _inputs(golden, binary=True), request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("output"), golden["output"], atol=1e-4)


def test_readme_example_runs(server, capsys):
    """The docs' tritonclient example, as written, against this server."""
    from doc_pages import block

    _, port, _ = server
    code = block("python", "tritonclient.http as httpclient")
    scope: dict = {}
    exec(compile(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), "docs (tritonclient)", "exec"), scope)
    assert scope["output"].shape == (2, 10, 64) and np.isfinite(scope["output"]).all()
    assert "'shape': [-1, 10, 64]" in capsys.readouterr().out



def _session(lines) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown after it) of a block showing a shell session: `$ ` starts
    a command, a line after one ending in `\\` continues it, the rest is output."""
    found: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            found.append((line[2:], []))
        elif found and found[-1][0].endswith("\\") and not found[-1][1]:
            found[-1] = (found[-1][0] + "\n" + line, [])
        elif found:
            found[-1][1].append(line)
    return found


def _assert_as_shown(printed: str, shown: list[str]) -> None:
    """The lines printed are the lines shown; a line of JSON numbers (`"data":[...`) matches up to
    its numbers, and they within 1e-4 (another CPU may round the last digits its own way)."""
    printed_lines = printed.splitlines()
    assert len(printed_lines) == len(shown), (printed, shown)
    for got, want in zip(printed_lines, shown):
        if '"data":[' not in want:
            assert got == want
            continue
        head = want.index('"data":[') + len('"data":[')
        assert got[:head] == want[:head], (got, want)
        numbers = [want[head:].split(","), got[head:].split(",")]  # the last ones are cut short
        count = min(len(n) for n in numbers) - 1
        assert count >= 1, (got, want)
        np.testing.assert_allclose(*[[float(n) for n in listed[:count]] for listed in numbers],
                                   rtol=0, atol=1e-4)


def test_docs_curl_requests_answer_as_shown(server, request, tmp_path):
    """The serving page's curl sessions (a request that succeeds, one that fails), run as written
    in one folder (`python` the venv's, 8000 the server's port): each prints what the page shows,
    and the page's request.json gives the same values from the TFLite model within 1e-4."""
    if request.node.callspec.params["server"] != "embedded":
        pytest.skip("the page's requests go to the default engine; Ray answers in its own JSON spacing")
    from doc_commands import all_blocks

    _, port, _ = server
    blocks = [b for b in all_blocks() if b.page == "docs/serving.md"
              and any(line.startswith("$ curl") for line in b.lines)]
    assert len(blocks) == 2, "the page shows a request that succeeds and one that fails"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    for block in blocks:
        for command, shown in _session(block.lines):
            command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            done = subprocess.run(["bash", "-c", f"set -o pipefail\n{command}"], cwd=tmp_path,
                                  capture_output=True, text=True, env=env, timeout=60)
            assert done.returncode == 0 and not done.stderr, (command, done.stderr)
            _assert_as_shown(done.stdout, shown)
    body = (tmp_path / "request.json").read_bytes()
    outputs = {}
    for fmt, model in MODELS.items():
        status, content = _send(port, "POST", f"/v2/models/{model}/infer", body,
                                {"Content-Type": "application/json"})
        assert status == 200, content
        (output,) = json.loads(content)["outputs"]
        assert output["shape"] == [1, 10, 64] and output["datatype"] == "FP32"
        outputs[fmt] = np.reshape(output["data"], output["shape"])
    np.testing.assert_allclose(outputs["tflite"], outputs["onnx"], rtol=0, atol=1e-4)

# -- bad requests ---------------------------------------------------------------------------------

ROW = np.zeros((1, 10, 64), np.float32)


def _json_request(**override) -> bytes:
    tensor = {"shape": [1, 10, 64], "datatype": "FP32", "data": ROW.reshape(-1).tolist()}
    request = {"inputs": [{"name": "source1", **tensor}, {"name": "source2", **tensor}]}
    for key, value in override.items():
        if key in ("source1", "source2"):
            request["inputs"][key == "source2"].update(value)
        elif key == "drop_source2":
            request["inputs"] = request["inputs"][:1]
        elif key == "extra_input":
            request["inputs"].append({"name": "source3", **tensor})
        else:
            request[key] = value
    return json.dumps(request).encode()


def _binary_request(size_claimed: int = 2560, extra: bytes = b"", header_length=None):
    tensor = {"shape": [1, 10, 64], "datatype": "FP32",
              "parameters": {"binary_data_size": size_claimed}}
    header = json.dumps({"inputs": [{"name": "source1", **tensor},
                                    {"name": "source2", **tensor}]}).encode()
    body = header + ROW.tobytes() * 2 + extra
    return body, {"Inference-Header-Content-Length": str(header_length or len(header))}


BAD_REQUESTS = {
    # id: (path, body, extra headers, words the error names)
    "unknown-model": ("/v2/models/nope/infer", _json_request(), {}, "unknown model"),
    "unknown-model-metadata": ("/v2/models/nope", None, {}, "unknown model"),
    "wrong-shape": ("infer", _json_request(source1={"shape": [1, 10, 63], "data": [0.0] * 630}),
                    {}, "shape"),
    "wrong-rank": ("infer", _json_request(source1={"shape": [640]}), {}, "shape"),
    "wrong-dtype": ("infer", _json_request(source1={"datatype": "INT32", "data": [0] * 640}),
                    {}, "datatype"),
    "fp64-for-fp32": ("infer", _json_request(source1={"datatype": "FP64"}), {}, "datatype"),
    "bytes-datatype": ("infer", _json_request(source1={"datatype": "BYTES"}), {}, "datatype"),
    "missing-input": ("infer", _json_request(drop_source2=True), {}, "missing input"),
    "extra-input": ("infer", _json_request(extra_input=True), {}, "unexpected input"),
    "malformed-json": ("infer", b'{"inputs": [', {}, "not JSON"),
    "not-an-object": ("infer", b"[1, 2]", {}, "JSON object"),
    "no-inputs": ("infer", b'{"inputs": []}', {}, "inputs"),
    "count-mismatch": ("infer", _json_request(source1={"data": [0.0] * 639}), {}, "elements"),
    "ragged-data": ("infer", _json_request(source1={"data": [[0.0], [0.0, 1.0]]}), {}, "ragged"),
    "string-data": ("infer", _json_request(source1={"data": ["0"] * 640}), {}, "numbers"),
    "zero-rows": ("infer", _json_request(source1={"shape": [0, 10, 64], "data": []},
                                         source2={"shape": [0, 10, 64], "data": []}),
                  {}, "at least one row"),
    "unknown-output": ("infer", _json_request(outputs=[{"name": "scores"}]), {}, "unknown output"),
    "binary-size-wrong": ("infer", *_binary_request(size_claimed=2556), "binary_data_size"),
    "binary-trailing-bytes": ("infer", *_binary_request(extra=b"\0" * 8), "no input claims"),
    "header-length-too-big": ("infer", *_binary_request(header_length=10**6), "Header"),
    "header-length-not-int": ("infer", _json_request(),
                              {"Inference-Header-Content-Length": "abc"}, "integer"),
    "unknown-encoding": ("infer", _json_request(), {"Content-Encoding": "br"}, "Content-Encoding"),
    "bad-gzip": ("infer", b"not gzip", {"Content-Encoding": "gzip"}, "gzip"),
    "gzip-bomb": ("infer", gzip.compress(b" " * (MAX_BODY_MB << 20) * 2),
                  {"Content-Encoding": "gzip"}, "inflates"),
    "oversized-body": ("infer", b" " * ((MAX_BODY_MB << 20) + 1), {}, "at most"),
    "oversized-body-chunked": ("infer", b" " * ((MAX_BODY_MB << 20) + 1), {"chunked": True},
                               "exceeds"),
    "get-infer": ("infer-GET", None, {}, "POST"),
    "wrong-version": ("/v2/models/{model}/versions/2/infer", _json_request(), {}, "version"),
}


# Bodies above the limit are 413 Payload Too Large; every other bad request is 400.
TOO_LARGE = {"gzip-bomb", "oversized-body", "oversized-body-chunked"}


def _send(port: int, method: str, path: str, body: bytes | None, headers: dict):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = dict(headers)
    try:
        if headers.pop("chunked", False):  # no Content-Length: the limit applies as it arrives
            conn.request(method, path, body=iter([body[i:i + 65536]
                                                  for i in range(0, len(body), 65536)]),
                         headers=headers, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_with_one_line(server, kind, fmt):
    _, port, _ = server
    path, body, headers, words = BAD_REQUESTS[kind]
    method = "GET" if body is None else "POST"
    if path.startswith("infer"):
        method = "GET" if path == "infer-GET" else method
        path = f"/v2/models/{MODELS[fmt]}/infer"
    path = path.format(model=MODELS[fmt])
    status, content = _send(port, method, path, body, headers)
    assert status == (413 if kind in TOO_LARGE else 400), content
    error = json.loads(content)
    assert list(error) == ["error"]
    assert "\n" not in error["error"] and words.lower() in error["error"].lower(), error


def test_tritonclient_sees_400_errors(client, golden):
    with pytest.raises(httpclient.InferenceServerException) as info:
        client.infer("nope", _inputs(golden, binary=True))
    assert info.value.status() == "400" and "unknown model" in info.value.message()
    bad = httpclient.InferInput("source1", [1, 10, 64], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 10, 64), np.int32))
    with pytest.raises(httpclient.InferenceServerException) as info:
        client.infer(ONNX, [bad, _inputs(golden, binary=True)[1]])
    assert info.value.status() == "400" and "datatype FP32" in info.value.message()


def test_server_survives_bad_requests(client, server, golden):
    """A burst of garbage, cut connections included, then the server still answers."""
    _, port, _ = server
    for body in (b"\xff\xfe", b"{" * 100_000, b'{"inputs": [{"name": 1}]}', b"null"):
        status, _ = _send(port, "POST", f"/v2/models/{ONNX}/infer", body, {})
        assert status == 400
    for _ in range(3):  # a client that hangs up halfway through its body
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"POST /v2/models/{ONNX}/infer HTTP/1.1\r\nHost: x\r\n"
                      "Content-Length: 100000\r\n\r\n{\"inputs\"".encode())
    assert client.is_server_ready()
    result = client.infer(ONNX, _inputs(golden, binary=True))
    np.testing.assert_allclose(result.as_numpy("output"), golden["output"], atol=1e-4)


# -- the CLI without a server ---------------------------------------------------------------------


def test_tampered_artifact_is_refused(artifacts, tmp_path):
    folder = tmp_path / "tampered"
    shutil.copytree(artifacts, folder)
    path = folder / f"{STEM}.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_module("export.serve", str(folder), "--port", str(_free_port()), timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{STEM}.onnx" in lines[0] and "sha256" in lines[0], lines
    assert "serving" not in result.stdout


def test_port_in_use_is_a_usage_error(artifacts, server):
    _, port, _ = server
    result = run_module("export.serve", artifacts, "--port", str(port), timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot listen" in result.stderr


def test_triton_repository_parses_as_triton_model_config(artifacts, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "triton"
    result = run_module("export.serve", artifacts, "--triton-repository", str(repo),
                        "--max-batch", "16", "--replicas", "2", timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(repo)) == [ONNX]  # TFLite and SavedModel have no Triton backend here
    manifest = _manifest(artifacts, "onnx")
    config = text_format.Parse((repo / ONNX / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.name == ONNX and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    for key in ("input", "output"):
        entries = manifest[key + "s"]
        assert [t.name for t in getattr(config, key)] == [t["name"] for t in entries]
        for tensor, entry in zip(getattr(config, key), entries):
            assert tensor.data_type == model_config_pb2.TYPE_FP32
            assert list(tensor.dims) == entry["shape"][1:]
    assert config.parameters["xattn_sha256"].string_value == manifest["sha256"]
    model = (repo / ONNX / "1" / "model.onnx").read_bytes()
    assert hashlib.sha256(model).hexdigest() == manifest["sha256"]


def test_serve_never_imports_tensorflow():
    code = ("import sys, export.serve.__main__, export.runtime.serve.cli, "
            "export.runtime.serve.deployments, export.runtime.serve.loadbench, "
            "export.runtime.serve.endpoint, export.runtime.serve.embedded, export.runtime.serve.worker, "
            "export.runtime.serve.loadgen, export.runtime.serve.grpc_service, export.runtime.serve.triton; "
            "print(sorted({'tensorflow', 'keras', 'tf2onnx'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- KServe V2 gRPC (embedded engine, --grpc-port) --------------------------------------------------


@pytest.fixture(scope="session")
def grpc_client(artifacts, tmp_path_factory):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    logs = tmp_path_factory.mktemp("serve-grpc")
    grpc_port = _free_port()
    proc, _, out, err = _start(artifacts, logs, "--grpc-port", str(grpc_port))
    yield grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"), proc
    _finish(proc, out, err)
    assert proc.returncode == 0, (logs / "stderr").read_text()


def test_grpc_health_and_metadata(grpc_client, artifacts):
    _, client, _ = grpc_client
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata().extensions
    for fmt, name in MODELS.items():
        assert client.is_model_ready(name) and not client.is_model_ready("nope")
        metadata = client.get_model_metadata(name, as_json=True)
        manifest = _manifest(artifacts, fmt)
        assert [t["name"] for t in metadata["inputs"]] == [t["name"] for t in manifest["inputs"]]
        assert metadata["inputs"][0]["shape"] == ["-1", "10", "64"]


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_grpc_infer_matches_the_golden_outputs(grpc_client, artifacts, golden, fmt):
    grpcclient, client, _ = grpc_client
    inputs = []
    for name in ("source1", "source2"):
        tensor = grpcclient.InferInput(name, list(golden[name].shape), "FP32")
        tensor.set_data_from_numpy(golden[name])
        inputs.append(tensor)
    result = client.infer(MODELS[fmt], inputs, request_id="g-1",
                          outputs=[grpcclient.InferRequestedOutput("output")])
    atol = _manifest(artifacts, fmt)["parity"]["atol"]
    np.testing.assert_allclose(result.as_numpy("output"), golden["output"], rtol=0, atol=atol)
    assert result.get_response().id == "g-1"


def test_grpc_errors_name_what_was_wrong(grpc_client, golden):
    grpcclient, client, _ = grpc_client
    good = grpcclient.InferInput("source2", [4, 10, 64], "FP32")
    good.set_data_from_numpy(golden["source2"])
    with pytest.raises(grpcclient.InferenceServerException) as info:
        client.infer("nope", [good])
    assert info.value.status() == "StatusCode.NOT_FOUND" and "unknown model" in info.value.message()
    bad = grpcclient.InferInput("source1", [4, 10, 64], "INT32")
    bad.set_data_from_numpy(np.zeros((4, 10, 64), np.int32))
    with pytest.raises(grpcclient.InferenceServerException) as info:
        client.infer(ONNX, [bad, good])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "datatype FP32" in info.value.message()
    with pytest.raises(grpcclient.InferenceServerException) as info:
        client.infer(ONNX, [good])
    assert "missing input" in info.value.message()


# -- bind address, readiness, drain ---------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (/proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].rsplit(":", 1)
                if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    found.add(address)
    return found


def test_listens_on_loopback_only_by_default(server):
    _, port, _ = server
    # 0100007F is 127.0.0.1 as /proc/net/tcp writes it; 0.0.0.0 would be 00000000.
    assert _listening_addresses(port) == {"0100007F"}


def test_ready_only_after_every_worker_warmed_up(artifacts, tmp_path):
    hold = tmp_path / "hold"
    proc, port, out, err = _start(artifacts, tmp_path, "--workers", "2", wait_ready=False,
                                  env={"XATTN_SERVE_WARMUP_HOLD": str(hold)})
    try:
        for _ in range(5):  # live, but no warm-up request has run yet: not ready
            assert _get(port, "/v2/health/live") == 200
            assert _get(port, "/v2/health/ready") == 503
            time.sleep(0.1)
        assert "ready " not in (tmp_path / "stdout").read_text()
        hold.touch()
        deadline = time.monotonic() + 60
        while _get(port, "/v2/health/ready") != 200:
            assert time.monotonic() < deadline, "not ready 60 s after the warm-up could run"
            time.sleep(0.05)
    finally:
        _finish(proc, out, err)


@pytest.mark.parametrize("engine", ["embedded"])
def test_sigterm_under_load_drains_without_losing_a_request(artifacts, tmp_path, engine):
    """8 keep-alive clients busy; SIGTERM: every request sent gets its answer, exit 0."""
    import asyncio
    import threading

    from export.runtime.serve.loadgen import build_request, run_job

    proc, port, out, err = _start(artifacts, tmp_path, "--engine", engine, "--workers", "2",
                                  "--drain-seconds", "5")
    header = json.dumps({"inputs": [
        {"name": n, "shape": [1, 10, 64], "datatype": "FP32",
         "parameters": {"binary_data_size": 2560}} for n in ("source1", "source2")
    ]}).encode()
    request = build_request(f"/v2/models/{ONNX}/infer", header + ROW.tobytes() * 2,
                            {"Inference-Header-Content-Length": str(len(header))})
    job = {"host": "127.0.0.1", "port": port, "request": request.decode("latin-1"),
           "connections": 8, "warmup": 0, "duration": 30, "rows": 1, "stop_when_refused": True}
    results = {}
    load = threading.Thread(target=lambda: results.update(asyncio.run(run_job(job))))
    try:
        load.start()
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "stderr").read_text()
        load.join(30)
        assert not load.is_alive()
    finally:
        _finish(proc, out, err)
    assert "stopped" in (tmp_path / "stderr").read_text()
    assert len(results["latencies"]) > 100, results["latencies"][:5]
    assert results["lost"] == 0 and results["errors"] == 0, {k: v for k, v in results.items()
                                                             if k != "latencies"}
    assert results["refused"] == 8  # each client ended at a closed door, not a dropped request


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def test_a_killed_worker_is_replaced(artifacts, tmp_path, golden):
    proc, port, out, err = _start(artifacts, tmp_path, "--workers", "2")
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = _children(proc.pid)
            if victim not in now and len(now) == 2 and _get(port, "/v2/health/ready") == 200:
                break
            assert time.monotonic() < deadline, f"workers {now}, not replaced in 60 s"
            time.sleep(0.1)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        for _ in range(4):  # new connections: the kernel spreads them over both workers
            result = client.infer(ONNX, _inputs(golden, binary=True))
            np.testing.assert_allclose(result.as_numpy("output"), golden["output"], atol=1e-4)
        client.close()
        assert "restarting it" in (tmp_path / "stderr").read_text()
    finally:
        _finish(proc, out, err)


@pytest.mark.parametrize("flags, words", [
    (["--address", "auto"], "needs --engine ray"),
    (["--engine", "ray", "--grpc-port", "8001"], "needs --engine embedded"),
])
def test_engine_flags_that_contradict_are_usage_errors(artifacts, flags, words):
    result = run_module("export.serve", artifacts, "--port", str(_free_port()), *flags,
                        timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def test_host_is_documented_in_help():
    result = run_module("export.serve", "--help", timeout=120)
    assert result.returncode == 0
    assert "default 127.0.0.1" in " ".join(result.stdout.split())


def test_load_benchmark_runs_both_entry_points(artifacts, tmp_path):
    """`python -m export.bench serve` (and its alias) on the embedded engine, briefly."""
    out = tmp_path / "figures.json"
    result = run_module("export.bench", "serve", artifacts, "--engines", "embedded",
                        "--clients", "2", "--duration", "0.3", "--no-fault", "--json", str(out),
                        timeout=300)
    assert result.returncode == 0, result.stderr
    cells = json.loads(out.read_text())["cells"]
    setups = {(c["setup"].split(",")[0], c["encoding"], c["rows"]) for c in cells}
    assert setups == {("in-process", "-", 1), ("in-process", "-", 32), ("embedded", "json", 1),
                      ("embedded", "binary", 1), ("embedded", "binary", 32),
                      ("embedded", "grpc", 1)}
    for cell in cells:
        assert cell["requests"] > 0 and cell["errors"] == 0, cell
        assert cell["rows_per_s"] == pytest.approx(cell["rps"] * cell["rows"])
    assert "goals (issue 23), embedded engine:" in result.stdout
    alias = run_module("export.serve.loadbench", "--help", timeout=120)
    assert alias.returncode == 0 and "--engines" in alias.stdout


# -- Ctrl-C: after every other test of its server (tests/conftest.py, `stops_server`) ------------


@pytest.mark.stops_server("server")
def test_ctrl_c_stops_the_server_cleanly(server):
    proc, port, logs = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0, (logs / "stderr").read_text()
    assert "stopped" in (logs / "stderr").read_text()
    with pytest.raises(OSError):
        _get(port, "/v2/health/ready", timeout=2)
