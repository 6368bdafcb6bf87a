"""Issue 27 follow-ups: ids outside an Embedding's range at serve time, LiteRT's error text that
grew across requests, and two configurations that publish the same file name.

One small `--model` export (ids -> Embedding(20), a float context -> CrossAttention), shared by
the module; decoding is tested through the protocol functions, one request on a live server.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

VOCAB = 20


@pytest.fixture(scope="module")
def token_export(tmp_path_factory):
    """(output folder, model path): the token model exported to ONNX and TFLite via --model."""
    import keras
    from layer_zoo import randomize_weights

    import xattn
    from export import cli

    folder = tmp_path_factory.mktemp("token-export")
    ids = keras.Input((6,), dtype="int32", name="ids")
    ctx = keras.Input((5, 4), name="ctx")
    embedded = keras.layers.Embedding(VOCAB, 4, name="embedding")(ids)
    model = randomize_weights(keras.Model([ids, ctx], xattn.CrossAttention(4, 2)([embedded, ctx])), 4)
    path = str(folder / "tokens.keras")
    model.save(path)
    rng = np.random.default_rng(0)
    np.savez(folder / "s.npz", ids=rng.integers(0, VOCAB, (4, 6)).astype("int32"),
             ctx=rng.standard_normal((4, 5, 4)).astype("float32"))
    out = folder / "out"
    rc = cli.main(["--model", path, "--sample-inputs", str(folder / "s.npz"), "--output-dir",
                   str(out), "--quiet"], formats=("onnx", "tflite"))
    assert rc == 0
    return str(out), path


@pytest.fixture(scope="module")
def token_endpoints(token_export):
    from export.runtime.serve import load_models
    from export.runtime.serve.endpoint import ModelEndpoint

    models, _ = load_models(token_export[0])
    return {m.format: ModelEndpoint(m, max_body=1 << 20, max_batch=8) for m in models}


def _json_body(ids, ctx) -> bytes:
    return json.dumps({"inputs": [
        {"name": "ids", "datatype": "INT32", "shape": list(ids.shape), "data": ids.ravel().tolist()},
        {"name": "ctx", "datatype": "FP32", "shape": list(ctx.shape), "data": ctx.ravel().tolist()},
    ]}).encode()


def _binary_body(ids, ctx) -> tuple[bytes, str]:
    header = json.dumps({"inputs": [
        {"name": "ids", "datatype": "INT32", "shape": list(ids.shape),
         "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "ctx", "datatype": "FP32", "shape": list(ctx.shape),
         "parameters": {"binary_data_size": ctx.nbytes}},
    ]}).encode()
    return header + ids.tobytes() + ctx.tobytes(), str(len(header))


def _feeds(bad: int | None = None):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (2, 6)).astype(np.int32)
    if bad is not None:
        ids[1, 3] = bad
    return ids, rng.standard_normal((2, 5, 4)).astype(np.float32)


# -- 1: ids outside [0, input_dim) -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_the_manifest_records_the_range_of_ids_that_feed_an_embedding(fmt, token_export):
    from export.runtime.schema import check_manifest_schema

    with open(os.path.join(token_export[0], f"tokens.{fmt}.json")) as f:
        manifest = json.load(f)
    ranges = {t["name"]: t.get("range") for t in manifest["inputs"]}
    assert ranges == {"ids": [0, VOCAB], "ctx": None}
    check_manifest_schema(manifest)


@pytest.mark.parametrize("bad", [VOCAB, 1000, -1], ids=["input_dim", "far-past", "negative"])
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_ids_outside_the_range_are_400_naming_input_value_and_range(fmt, bad, token_endpoints):
    """An id past input_dim got the runtime's error as a 500; -1 was answered (ONNX Gather wraps
    it to the last row). Both are now the client's 400, over JSON, binary and gRPC alike."""
    from export.runtime.serve.grpc_service import to_http_body
    from export.runtime.serve.protocol import RequestError

    endpoint = token_endpoints[fmt]
    ids, ctx = _feeds(bad)
    needle = rf"input `ids` holds {bad}, outside \[0, {VOCAB}\)"
    with pytest.raises(RequestError, match=needle) as raised:
        endpoint.decode(_json_body(ids, ctx), None, None)
    assert raised.value.status == 400
    with pytest.raises(RequestError, match=needle):
        endpoint.decode(*_binary_body(ids, ctx), None)
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=endpoint.name)
    for name, array, datatype in (("ids", ids, "INT32"), ("ctx", ctx, "FP32")):
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    with pytest.raises(RequestError, match=needle):
        endpoint.decode(*to_http_body(request), None)
    # The ids at both ends of the range are answered.
    ids[0, 0], ids[1, 3] = 0, VOCAB - 1
    decoded, feeds = endpoint.decode(_json_body(ids, ctx), None, None)
    assert endpoint.run(feeds)["output"].shape == (2, 6, 4)


@pytest.fixture(scope="module")
def live_server(token_export):
    """The embedded engine in this process's control: 1 worker, --read-timeout 1,
    --body-timeout 2, --max-connections 4; yields its port."""
    import socket

    from export.runtime.serve import ServeOptions, load_models, start, stop

    models, _ = load_models(token_export[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start(models, ServeOptions(workers=1, port=port, read_timeout_s=1.0,
                                        body_timeout_s=2.0, max_connections=4))
    try:
        yield port
    finally:
        stop(server)


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_a_live_server_answers_400_for_an_id_past_the_embedding(live_server):
    for name in ("tokens_onnx", "tokens_tflite"):
        status, body = _post(live_server, f"/v2/models/{name}/infer",
                             _json_body(*_feeds(VOCAB + 5)))
        assert status == 400, body
        assert body["error"] == (f"input `ids` holds {VOCAB + 5}, outside [0, {VOCAB}) (the ids "
                                 "its Embedding takes)")
        status, body = _post(live_server, f"/v2/models/{name}/infer", _json_body(*_feeds()))
        assert status == 200, body


def test_verify_refuses_golden_ids_outside_the_manifest_range():
    from export.errors import ManifestError
    from export.runtime.manifest import check_golden_ranges, tensors_of

    inputs = tensors_of([{"name": "ids", "shape": [None, 3], "dtype": "int32", "range": [0, 5]}],
                        "inputs")
    check_golden_ranges({"ids": np.array([[0, 4, 2]], np.int32)}, inputs)
    with pytest.raises(ManifestError, match=r"golden input 'ids' holds 5, outside the manifest's "
                                            r"range \[0, 5\)"):
        check_golden_ranges({"ids": np.array([[0, 5, 2]], np.int32)}, inputs)


@pytest.mark.parametrize("bounds, dtype", [([0], "int32"), ([0, 5, 9], "int32"), ([5, 5], "int32"),
                                           ([0, 1.5], "int32"), ([0, 5], "float32")],
                         ids=["one", "three", "empty", "float-bound", "float-input"])
def test_a_malformed_range_is_a_manifest_error(bounds, dtype):
    from export.errors import ManifestError
    from export.runtime.manifest import tensors_of

    with pytest.raises(ManifestError, match=r"manifest inputs 'ids': .*range"):
        tensors_of([{"name": "ids", "shape": [None, 3], "dtype": dtype, "range": bounds}], "inputs")


def test_the_schema_takes_a_range_of_two_integers_only():
    from export.runtime.schema import manifest_schema, validate

    schema = manifest_schema()
    tensors = schema["$defs"]["tensors"]
    ok = [{"name": "ids", "shape": [None, 3], "dtype": "int32", "range": [0, 5]}]
    assert validate(ok, tensors, schema, "inputs") is None
    three = [{**ok[0], "range": [0, 5, 9]}]
    assert "must hold at most 2 item(s)" in validate(three, tensors, schema, "inputs")


# -- 2: LiteRT's error text grew across requests ---------------------------------------------------


def test_a_litert_error_holds_this_requests_error_only(token_export, token_endpoints):
    """LiteRT's error reporter keeps every message: the second failed invoke raised both errors,
    the third all three (on a server, other clients' errors in this one's answer). Ids past the
    Embedding are refused before the runtime now, so they go to the runner directly here."""
    import logging

    from export.runtime import runtimes
    from export.runtime.serve.endpoint import guarded

    ids, ctx = _feeds(VOCAB + 5)
    runner = runtimes.load_runner("tflite", os.path.join(token_export[0], "tokens.tflite"))
    texts = []
    for _ in range(3):
        with pytest.raises(RuntimeError) as raised:
            runner.run({"ids": ids, "ctx": ctx})
        texts.append(str(raised.value))
    assert texts[0].count("failed to invoke") == 1, texts[0]
    assert texts == [texts[0]] * 3
    ids[1, 3] = 0
    assert runner.run({"ids": ids, "ctx": ctx})["output"].shape == (2, 6, 4)  # still serves
    # The server's reply, twice in a row: the same one line, this request's error alone.
    endpoint = token_endpoints["tflite"]
    bad = {"ids": _feeds(VOCAB + 5)[0], "ctx": ctx}
    replies = [guarded(lambda: endpoint.run(bad), logging.getLogger("test"), "tokens")
               for _ in range(2)]
    assert [r.status for r in replies] == [500, 500]
    assert replies[0].body == replies[1].body
    assert json.loads(replies[1].body)["error"].count("failed to invoke") == 1


# -- 3: two configurations, one file name ----------------------------------------------------------

LAYER = ["--units", "8", "--heads", "2", "--query-len", "3", "--kv-len", "4", "--query-features",
         "5", "--kv-features", "6", "--quiet"]


def test_a_publish_that_replaces_another_configurations_artifact_is_refused(tmp_path, capsys):
    """`--name a_int8` (float32) and `--name a --quantize int8` both write a_int8.onnx: the second
    replaced the first silently. Now it exits 2 with one line and touches nothing; the same
    configuration again still replaces its own file."""
    from export import cli

    out = tmp_path / "out"
    assert cli.main([*LAYER, "--name", "a_int8", "--output-dir", str(out)], formats=("onnx",)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    rc = cli.main([*LAYER, "--name", "a", "--quantize", "int8", "--output-dir", str(out)],
                  formats=("onnx",))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.search(r"a_int8\.onnx in .* was published by another configuration \(--name a_int8 "
                     r"onnx quantize=none\), and this export \(--name a onnx quantize=int8\) would "
                     r"replace it under the same file name; pass another --name", err[0]), err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # The same configuration replaces its own artifact, by design.
    assert cli.main([*LAYER, "--name", "a_int8", "--output-dir", str(out)],
                    formats=("onnx",)) == 0
    # And the other order: the quantized one first, then a float32 one named like it.
    other = tmp_path / "other"
    assert cli.main([*LAYER, "--name", "a", "--quantize", "int8", "--output-dir", str(other)],
                    formats=("onnx",)) == 0
    capsys.readouterr()
    assert cli.main([*LAYER, "--name", "a_int8", "--output-dir", str(other)],
                    formats=("onnx",)) == 2
    assert "(--name a onnx quantize=int8)" in capsys.readouterr().err


# -- 4: a body that trickles in forever -------------------------------------------------------------


def test_a_body_that_trickles_is_closed_at_the_body_timeout(live_server):
    """1 byte every 0.4 s never stalls for --read-timeout (1 s), and kept a connection (with 32 MB
    declared) open as long as it liked. --body-timeout (2 s) bounds the whole body; the server
    answers others meanwhile."""
    import socket
    import time

    port = live_server
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v2/models/tokens_onnx/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 1000\r\n\r\n{")
    started = time.monotonic()
    closed_after = None
    sock.settimeout(0.4)
    while time.monotonic() - started < 10:
        try:
            if sock.recv(4096) == b"":
                closed_after = time.monotonic() - started
                break
        except TimeoutError:
            pass
        except OSError:
            closed_after = time.monotonic() - started
            break
        try:
            sock.sendall(b" ")
        except OSError:
            closed_after = time.monotonic() - started
            break
        status, _ = _post(port, "/v2/models/tokens_onnx/infer", _json_body(*_feeds()))
        assert status == 200
    sock.close()
    assert closed_after is not None, "a trickling body kept its connection 10 s"
    assert 1.5 < closed_after < 5, closed_after


def test_connections_past_the_limit_get_503_and_are_closed(live_server):
    """Connections were unlimited (800 slow ones stayed open). Past --max-connections (4 here)
    one more is answered 503 in one line and closed; once the idle ones are closed
    (--read-timeout), requests are answered again."""
    import socket
    import time

    port = live_server
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port)) as extra:
        extra.settimeout(5)
        answer = b""
        while chunk := extra.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": (
        "this worker holds 4 open connections (the server's limit, --max-connections); retry "
        "later")}
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            status, _ = _post(port, "/v2/models/tokens_onnx/infer", _json_body(*_feeds()))
        except OSError:
            status = None
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200


def test_the_body_timeout_is_checked_like_the_read_timeout():
    from export.errors import UsageError
    from export.runtime.serve import ServeOptions, check_options

    for value in (0.0, -1.0, 1e300):
        with pytest.raises(UsageError, match=r"--body-timeout must be in \(0, 86400\]"):
            check_options(ServeOptions(body_timeout_s=value))
    assert ServeOptions().body_timeout_s == 60.0
    for value in (0, -3):
        with pytest.raises(UsageError, match=r"--max-connections must be in \[1, 1048576\]"):
            check_options(ServeOptions(max_connections=value))
