"""Attacks on the issue-27 fixes (a hostile round after Trust III): one regression test per defect.

Library functions are tested directly; a subprocess or a socket only where the command line or
the wire is the point.
"""

from __future__ import annotations

import json
import os
import types

import pytest

from export import pipeline
from export.errors import SpecError

# -- a set named `NAME.len_8` must not replace the golden file of `NAME --lengths 8,...` --------


def test_a_name_equal_to_a_bucket_golden_is_refused_not_published_over_it(tmp_path):
    # `--name bk --lengths 8,16` relies on bk.len_8.golden.npz through its signature len_8; a later
    # `--name bk.len_8` writes the same file name. Only the manifest's top-level golden was
    # guarded: the second export published over it and `export.runtime.verify` then failed the first.
    manifest = {"golden": "bk.len_16.golden.npz", "golden_sha256": "a" * 64,
                "signatures": [{"key": "len_8", "golden": "bk.len_8.golden.npz",
                                "golden_sha256": "b" * 64},
                               {"key": "len_16", "golden": "bk.len_16.golden.npz",
                                "golden_sha256": "a" * 64}]}
    (tmp_path / "bk.onnx.json").write_text(json.dumps(manifest))
    goldens = {"bk.len_8.golden.npz": types.SimpleNamespace(sha256="c" * 64)}
    with pytest.raises(SpecError, match=r"bk\.onnx\.json .* under the name 'bk\.len_8'"):
        pipeline._guard_shared_files(str(tmp_path), {}, goldens)
    # The same golden bytes (a rebuild with the same weights) are not a conflict.
    pipeline._guard_shared_files(str(tmp_path), {}, {
        "bk.len_8.golden.npz": types.SimpleNamespace(sha256="b" * 64)})


# -- a sequence of length 0 is the client's mistake (400), not the server's (500) ---------------


@pytest.mark.parametrize("lengths", [(0, 1), (1, 0), (0, 0)], ids=["tq0", "tkv0", "both0"])
def test_a_zero_length_sequence_is_a_400_not_an_onnxruntime_500(lengths):
    # A dynamic-length file (`--lengths 8,16` ONNX) took shape [1, 0, 64]: onnxruntime failed in
    # its Add/Reshape and the server answered 500 with the runtime's message.
    from export.runtime.serve.protocol import RequestError, TensorSpec, decode_infer_request

    tq, tkv = lengths
    inputs = [TensorSpec("source1", "FP32", (-1, -1, 4)), TensorSpec("source2", "FP32", (-1, -1, 4))]
    body = json.dumps({"inputs": [
        {"name": "source1", "shape": [1, tq, 4], "datatype": "FP32", "data": [0.5] * 4 * tq},
        {"name": "source2", "shape": [1, tkv, 4], "datatype": "FP32", "data": [0.5] * 4 * tkv},
    ]}).encode()
    with pytest.raises(RequestError, match=r"input `source[12]` has an axis of size 0") as e:
        decode_infer_request(body, None, inputs, [TensorSpec("output", "FP32", (-1, -1, 4))])
    assert e.value.status == 400


# -- the header limit holds whatever the head's chunking --------------------------------------


@pytest.fixture(scope="module")
def guarded_uvicorn():
    """uvicorn in a thread with the embedded engine's protocol (4 KiB heads, 1 s stalls) and an
    app that answers 200 with the body's length: the wire behaviour without any model."""
    import socket
    import threading
    import time

    import uvicorn

    from export.runtime.serve.worker import _protocol_class, _uvicorn_config

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(_uvicorn_config(app, _protocol_class(4096, 1.0)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(5)


def _exchange(port: int, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer


@pytest.mark.parametrize("where", ["header", "url", "header-with-body"])
def test_a_head_over_the_limit_sent_in_one_chunk_gets_431(guarded_uvicorn, where):
    # Heads were counted by whole chunks, except a chunk that also completed the request: a
    # 70 KiB header sent in one write was answered 200 by a server documented to refuse past
    # 64 KiB (--max-header-kb). Here the limit is 4 KiB; 6 KiB arrive in one write.
    big = "a" * 6000
    path, headers, body = "/v2", f"X-Big: {big}\r\n", b""
    if where == "url":
        path, headers = f"/v2?{big}", ""
    elif where == "header-with-body":
        body = b"{}"
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode() + body
    answer = _exchange(guarded_uvicorn, request)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:120]
    assert b"over 4096 bytes" in answer
    # Under the limit, the same request is answered, its body read.
    ok = request.replace(big.encode(), b"a" * 3000)
    assert _exchange(guarded_uvicorn, ok).startswith(b"HTTP/1.1 200 ")


def test_a_pipelined_request_behind_an_oversized_head_is_not_run(guarded_uvicorn):
    big = b"a" * 6000
    first = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n"
    second = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    answer = _exchange(guarded_uvicorn, first + second)
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.count(b"HTTP/1.1 ") == 1, answer[:300]


# -- error lines and notes quote names read from files: escaped, one line ---------------------


FORGED = "\x1b[1A\x1b[2K✓ ok.onnx\nready"


def test_an_error_quoting_a_file_name_cannot_forge_terminal_lines(capsys):
    # `python -m export.serve` printed "refusing to serve <artifact>: ..." with the manifest's
    # artifact as it is: an ANSI code in it rewrote the line above (export.runtime.verify escaped it).
    from export.cli import report_failures
    from export.errors import ManifestError

    def fail():
        raise ManifestError(f"refusing to serve {FORGED}: sha256 mismatch")

    assert report_failures("python -m export.serve", fail) == (None, 1)
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1, err
    assert "\\x1b[1A\\x1b[2K✓ ok.onnx\\x0aready" in err


def test_serve_notes_escape_the_artifact_name(monkeypatch, tmp_path, capsys):
    import export.runtime.serve
    from export.runtime.serve import cli

    monkeypatch.setattr(export.runtime.serve, "load_models",
                        lambda path: ([], [f"- {FORGED}  not served: format tflm"]))
    # Exit 2 (no ONNX model for the repository) after the notes: printed before anything else.
    assert cli.main([str(tmp_path), "--triton-repository", str(tmp_path / "repo")]) == 2
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[1A" in out and "\\x0aready" in out, out


# -- gRPC: data the server would not read is refused, not ignored -----------------------------


def _grpc_request(*, raw: bool):
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    import numpy as np

    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="source1", datatype="FP32", shape=[1, 2])
    if raw:
        request.raw_input_contents.append(np.ones(2, "<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend([1.0, 1.0])
    return request


@pytest.mark.parametrize("stray", ["contents-beside-raw", "int-beside-fp32"])
def test_grpc_contents_that_would_be_ignored_are_refused(stray):
    # Raw bytes won over typed contents (fp32_contents [9, 9] ignored), and int_contents beside
    # an FP32 input's fp32_contents were dropped: the request ran on data the client did not
    # mean. Triton refuses both; so does this server now, with the input named.
    from export.errors import InputError
    from export.runtime.serve.grpc_service import to_http_body

    request = _grpc_request(raw=stray == "contents-beside-raw")
    if stray == "contents-beside-raw":
        request.inputs[0].contents.fp32_contents.extend([9.0, 9.0])
        match = r"input `source1` has fp32_contents, but raw_input_contents are given"
    else:
        request.inputs[0].contents.int_contents.extend([9, 9])
        match = r"input `source1` has int_contents, but its datatype is FP32"
    with pytest.raises(InputError, match=match):
        to_http_body(request)
    assert to_http_body(_grpc_request(raw=True))[0]  # the plain forms still pass
    assert to_http_body(_grpc_request(raw=False))[0]


def test_grpc_classification_is_refused_as_over_http():
    from export.errors import InputError
    from export.runtime.serve.grpc_service import to_http_body

    request = _grpc_request(raw=True)
    request.outputs.add(name="output").parameters["classification"].int64_param = 3
    with pytest.raises(InputError, match="classification extension is not supported"):
        to_http_body(request)


# -- a header the engines read differently when repeated is refused --------------------------


@pytest.mark.parametrize("name", ["Inference-Header-Content-Length", "Content-Encoding"])
def test_a_repeated_protocol_header_is_a_400(name):
    # Sent twice, the embedded engine used the last value and Ray's Starlette the first: one
    # request (`Content-Encoding: gzip` then `identity`) was read two ways.
    from export.runtime.serve.endpoint import single_header
    from export.runtime.serve.protocol import RequestError
    from export.runtime.serve.worker import _values

    scope = {"headers": [(name.lower().encode(), b"gzip"), (b"host", b"x"),
                         (name.lower().encode(), b"identity")]}
    with pytest.raises(RequestError, match=rf"header {name} is sent 2 times; send it once"):
        single_header(_values(scope, name.lower().encode()), name)
    assert single_header(_values(scope, b"host"), "Host") == "x"
    assert single_header([], name) is None


def test_the_embedded_engine_answers_a_repeated_content_encoding_with_400():
    import asyncio

    from export.runtime.serve.worker import App

    class Endpoint:  # only what App reaches before decoding; decoding is never reached
        name = "m"

        def route(self, method, path):
            return "infer"

        def decode(self, body, length, encoding):
            raise AssertionError(f"decoded with Content-Encoding {encoding!r}")

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    app = App({"m": Endpoint()}, None, None, 0, 1 << 20)
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer",
             "raw_path": b"/v2/models/m/infer",
             "headers": [(b"content-encoding", b"gzip"), (b"content-encoding", b"identity")]}
    reply = asyncio.run(app._handle(scope, receive))
    assert reply.status == 400 and b"Content-Encoding is sent 2 times" in reply.body, reply


def test_a_websocket_upgrade_is_plain_http_not_a_500(guarded_uvicorn):
    # With the websockets package installed, uvicorn handed `Upgrade: websocket` to its WebSocket
    # protocol; the app has no WebSocket route, so every such request was a 500 and an ERROR line.
    answer = _exchange(guarded_uvicorn, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n"
                       b"Upgrade: websocket\r\nConnection: Upgrade, close\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:120]


# -- the Triton config.pbtxt quotes every string it writes ------------------------------------


def test_a_tensor_name_cannot_write_triton_config_outside_its_string():
    # A Keras input named `q" ... } ] instance_group [ { count: 64 kind: KIND_GPU } ] ...` exported
    # and verified; `--triton-repository` wrote it between quotes as it is, and Triton's parser
    # read 64 GPU instances and a third input from it.
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    from export.runtime.serve.triton import model_config

    hostile = ('q" data_type: TYPE_FP32 dims: [ 1 ] } ] instance_group [ { count: 64 kind: '
               'KIND_GPU } ] input [ { name: "q\\\n\x1b é')
    manifest = {"artifact": "m.onnx", "sha256": "0" * 64,
                "inputs": [{"name": hostile, "shape": [None, 4, 6], "dtype": "float32"},
                           {"name": "kv", "shape": [None, 5, 7], "dtype": "float32"}],
                "outputs": [{"name": "output", "shape": [None, 4, 8], "dtype": "float32"}]}
    text = model_config(types.SimpleNamespace(name="m_onnx", manifest=manifest))
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [t.name for t in config.input] == [hostile, "kv"]
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


# -- nothing is created outside --output-dir through a link planted in it ---------------------


def test_a_link_at_the_lock_name_creates_nothing_outside_the_output_dir(tmp_path):
    # `out/.xattn.lock -> /elsewhere/file`: the lock was opened with O_CREAT through the link,
    # so an export created /elsewhere/file (and flocked it). Now: exit 5, nothing created.
    import errno

    from export import publish, resources
    from export.errors import OutputDirError

    out, victim = tmp_path / "out", tmp_path / "elsewhere" / "file"
    out.mkdir()
    victim.parent.mkdir()
    (out / publish.LOCK_NAME).symlink_to(victim)
    with pytest.raises(OSError) as e:
        with publish.folder_lock(str(out)):
            pass
    assert e.value.errno == errno.ELOOP and not victim.exists()
    error = resources.as_export_error(e.value, str(out))
    assert isinstance(error, OutputDirError) and error.exit_code == 5


# -- export.runtime.verify fails closed, it does not hang ---------------------------------------------


def test_a_savedmodel_folder_holding_a_named_pipe_is_refused_before_it_is_hashed(tmp_path):
    # `mkfifo x_savedmodel/variables/pipe`: the folder's sha256 opened the pipe and waited for a
    # writer forever (`python -m export.verify` hung; no line, no exit code).
    from export.errors import ManifestError
    from export.runtime.verify import _check_artifact

    folder = tmp_path / "x_savedmodel"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"\0")
    os.mkfifo(folder / "variables" / "pipe")
    fmt = types.SimpleNamespace(is_folder=True)
    manifest = {"artifact": "x_savedmodel", "sha256": "0" * 64}
    outcome = []

    def check():
        try:
            _check_artifact(str(folder), fmt, manifest)
        except ManifestError as e:
            outcome.append(e)

    import threading

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # the old behaviour: blocked in open(); a writer's EOF releases it
        os.close(os.open(folder / "variables" / "pipe", os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("hashing the folder blocked on the named pipe")
    assert outcome and "holds x_savedmodel/variables/pipe, neither a file" in str(outcome[0])
