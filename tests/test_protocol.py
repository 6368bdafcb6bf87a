"""The Open Inference Protocol's decoding and encoding (export.runtime.serve.protocol), on their own: every
rule a request is held to, without a server, a runtime or TensorFlow (the fast tier). The same
kinds of bad request run end to end over HTTP in tests/test_serve.py."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from export.errors import InputError
from export.runtime.serve import protocol
from export.runtime.serve.protocol import (
    HEADER_LENGTH,
    BodyTooLarge,
    RequestError,
    TensorSpec,
    decode_infer_request,
    encode_infer_response,
    error_body,
    read_content_encoding,
)

pytestmark = pytest.mark.fast

INPUTS = [TensorSpec("source1", "FP32", (-1, 3, 4)), TensorSpec("source2", "FP32", (-1, 5, 4))]
OUTPUTS = [TensorSpec("output", "FP32", (-1, 3, 4)), TensorSpec("attention_scores", "FP32", (-1, 2, 3, 5))]
RNG = np.random.default_rng(7)
S1 = RNG.standard_normal((2, 3, 4)).astype(np.float32)
S2 = RNG.standard_normal((2, 5, 4)).astype(np.float32)


def _tensor(name: str, array: np.ndarray, **override) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": "FP32",
            "data": array.reshape(-1).tolist(), **override}


def _json(**override) -> bytes:
    request = {"inputs": [_tensor("source1", S1), _tensor("source2", S2)]}
    for key, value in override.items():
        if key in ("source1", "source2"):
            request["inputs"][key == "source2"].update(value)
        elif key == "drop_source2":
            request["inputs"] = request["inputs"][:1]
        elif key == "extra_input":
            request["inputs"].append(_tensor("source3", S1))
        else:
            request[key] = value
    return json.dumps(request).encode()


def _binary(claim1: int | None = None, extra: bytes = b"") -> tuple[bytes, str]:
    inputs = [{"name": n, "shape": list(a.shape), "datatype": "FP32",
               "parameters": {"binary_data_size": a.nbytes if claim1 is None or n == "source2"
                              else claim1}} for n, a in (("source1", S1), ("source2", S2))]
    header = json.dumps({"id": "b-1", "inputs": inputs}).encode()
    return header + S1.tobytes() + S2.tobytes() + extra, str(len(header))


def _decode(body: bytes, header_length: str | None = None):
    return decode_infer_request(body, header_length, INPUTS, OUTPUTS)


# -- what decodes ---------------------------------------------------------------------------------


def test_json_request_decodes_to_the_arrays_sent():
    request = _decode(_json(id="r-1"))
    assert request.id == "r-1" and request.rows == 2 and request.outputs is None
    np.testing.assert_array_equal(request.feeds["source1"], S1)
    np.testing.assert_array_equal(request.feeds["source2"], S2)
    assert request.feeds["source1"].dtype == np.float32


def test_binary_request_decodes_to_the_same_bits():
    body, length = _binary()
    request = _decode(body, length)
    assert request.id == "b-1"
    assert request.feeds["source1"].tobytes() == S1.tobytes()
    assert request.feeds["source2"].tobytes() == S2.tobytes()


def test_requested_outputs_and_their_encoding():
    body = _json(outputs=[{"name": "output", "parameters": {"binary_data": True}},
                          {"name": "attention_scores"}],
                 parameters={"binary_data_output": False})
    request = _decode(body)
    assert request.outputs == {"output": True, "attention_scores": False}


def test_response_round_trips_json_and_binary():
    results = {"output": S1 * 2, "attention_scores": np.ones((2, 2, 3, 5), np.float32)}
    request = _decode(_json(id="x", outputs=[{"name": "output"}]))
    body, headers = encode_infer_response("m", request, results, OUTPUTS)
    assert headers == {"Content-Type": "application/json"}
    response = json.loads(body)
    assert response["id"] == "x" and response["model_name"] == "m"
    (out,) = response["outputs"]
    np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(out["shape"]), S1 * 2)

    request = _decode(_json(parameters={"binary_data_output": True}))
    body, headers = encode_infer_response("m", request, results, OUTPUTS)
    size = int(headers[HEADER_LENGTH])
    response = json.loads(body[:size])
    assert [t["name"] for t in response["outputs"]] == ["output", "attention_scores"]
    first = response["outputs"][0]["parameters"]["binary_data_size"]
    np.testing.assert_array_equal(
        np.frombuffer(body[size:size + first], np.float32).reshape(2, 3, 4), S1 * 2)
    assert len(body) == size + first + 2 * 2 * 3 * 5 * 4


def test_integer_and_bool_inputs_keep_their_values():
    inputs = [TensorSpec("ids", "INT32", (-1, 3)), TensorSpec("mask", "BOOL", (-1, 3))]
    body = json.dumps({"inputs": [
        {"name": "ids", "shape": [1, 3], "datatype": "INT32", "data": [1, -2, 2**31 - 1]},
        {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [True, False, True]},
    ]}).encode()
    request = decode_infer_request(body, None, inputs, [])
    assert request.feeds["ids"].tolist() == [[1, -2, 2**31 - 1]]
    assert request.feeds["mask"].dtype == np.bool_ and request.feeds["mask"].tolist() == [[True, False, True]]
    too_big = body.replace(b"2147483647", b"2147483648")
    with pytest.raises(RequestError, match="does not fit int32"):
        decode_infer_request(too_big, None, inputs, [])


def test_tensor_spec_from_a_manifest_entry_and_datatypes():
    spec = TensorSpec.from_manifest({"name": "source1", "shape": [1, 10, None], "dtype": "float32"})
    assert spec == TensorSpec("source1", "FP32", (-1, 10, -1))
    fixed = TensorSpec.from_manifest({"name": "x", "shape": [4, 2], "dtype": "int8"},
                                     batch_axis_variable=False)
    assert fixed.shape == (4, 2) and fixed.datatype == "INT8"
    assert spec.metadata() == {"name": "source1", "datatype": "FP32", "shape": [-1, 10, -1]}
    assert protocol.datatype_of(">f4") == "FP32" and protocol.datatype_of("bool") == "BOOL"
    with pytest.raises(ValueError, match="no Open Inference Protocol datatype for complex64"):
        protocol.datatype_of("complex64")


def test_content_encodings():
    raw = _json()
    assert read_content_encoding(gzip.compress(raw), "gzip", 1 << 20) == raw
    assert read_content_encoding(zlib.compress(raw), "deflate", 1 << 20) == raw
    assert read_content_encoding(raw, None, 1) is raw
    assert read_content_encoding(raw, "identity", 1) is raw


def test_error_body_is_one_line_json():
    assert json.loads(error_body("a\nb  c")) == {"error": "a b c"}
    assert json.loads(error_body(RequestError("first\nsecond"))) == {"error": "first"}


# -- what is refused, and how it is named -----------------------------------------------------------

BAD = {
    # id: (body, header length, words the one-line error holds)
    "wrong-shape": (_json(source1={"shape": [2, 3, 5], "data": [0.0] * 30}), None, "must have shape"),
    "wrong-rank": (_json(source1={"shape": [24]}), None, "must have shape"),
    "wrong-dtype": (_json(source1={"datatype": "INT32", "data": [0] * 24}), None, "datatype FP32"),
    "bytes-datatype": (_json(source1={"datatype": "BYTES"}), None, "received BYTES"),
    "missing-input": (_json(drop_source2=True), None, "missing input(s) `source2`"),
    "extra-input": (_json(extra_input=True), None, "unexpected input `source3`"),
    "twice": (json.dumps({"inputs": [_tensor("source1", S1)] * 2}).encode(), None, "given twice"),
    "malformed-json": (b'{"inputs": [', None, "not JSON"),
    "not-utf8": (b'{"inputs": "\xff"}', None, "UTF-8"),
    "too-deep": (b"[" * 100000 + b"]" * 100000, None, "JSON"),  # orjson: depth limit; json: nested too deeply
    "not-an-object": (b"[1, 2]", None, "must be a JSON object, not a list"),
    "no-inputs": (b'{"inputs": []}', None, "non-empty `inputs`"),
    "id-not-string": (_json(id=3), None, "`id` must be a string"),
    "parameters-not-object": (_json(parameters=[1]), None, "parameters must be a JSON object"),
    "negative-dim": (_json(source1={"shape": [2, -3, 4]}), None, "non-negative integers"),
    "bool-dim": (_json(source1={"shape": [True, 3, 4]}), None, "non-negative integers"),
    "count-mismatch": (_json(source1={"data": [0.0] * 23}), None, "holds 24 elements; data holds 23"),
    "ragged-data": (_json(source1={"data": [[0.0], [0.0, 1.0]]}), None, "ragged"),
    "string-data": (_json(source1={"data": ["0"] * 24}), None, "must be numbers; received strings"),
    "null-data": (_json(source1={"data": [None] * 24}), None, "received mixed values"),
    "data-not-list": (_json(source1={"data": 1.0}), None, "must be a JSON list"),
    "no-data": (json.dumps({"inputs": [{k: v for k, v in _tensor("source1", S1).items() if k != "data"},
                                       _tensor("source2", S2)]}).encode(),
                None, "neither `data` nor binary_data_size"),
    "float-overflow": (_json(source1={"data": [1e300] * 24}), None, "does not fit float32"),
    "batch-mismatch": (_json(source2={"shape": [1, 5, 4], "data": [0.0] * 20}), None,
                       "same batch size"),
    "zero-rows": (_json(source1={"shape": [0, 3, 4], "data": []},
                        source2={"shape": [0, 5, 4], "data": []}), None, "at least one row"),
    "unknown-output": (_json(outputs=[{"name": "scores"}]), None, "unknown output `scores`"),
    "outputs-not-list": (_json(outputs={"name": "output"}), None, "`outputs` must be a list"),
    "classification": (_json(outputs=[{"name": "output", "parameters": {"classification": 2}}]),
                       None, "classification extension"),
    "binary-output-not-bool": (_json(parameters={"binary_data_output": 1}), None,
                               "binary_data_output must be true or false"),
    "binary-size-wrong": (*_binary(claim1=S1.nbytes - 4), "binary_data_size says 92"),
    "binary-trailing-bytes": (*_binary(extra=b"\0" * 8), "8 bytes of binary data that no input claims"),
    "header-length-too-big": (_binary()[0], str(10**6), "the body holds"),
    "header-length-zero": (_binary()[0], "0", f"{HEADER_LENGTH} is 0"),
    "header-length-not-int": (_json(), "abc", "must be an integer"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_request_is_one_typed_line(kind):
    body, length, words = BAD[kind]
    with pytest.raises(RequestError) as info:
        _decode(body, length)
    message = str(info.value)
    assert isinstance(info.value, InputError) and info.value.status == 400
    assert "\n" not in message and words in message, message


def test_binary_and_data_at_once_is_refused():
    body = json.dumps({"inputs": [
        {**_tensor("source1", S1), "parameters": {"binary_data_size": S1.nbytes}},
        _tensor("source2", S2)]}).encode()
    with pytest.raises(RequestError, match="both `data` and binary_data_size"):
        _decode(body + S1.tobytes(), str(len(body)))


@pytest.mark.parametrize("encoding, body, words", [
    ("br", b"x", "unsupported Content-Encoding 'br'"),
    ("gzip", b"not gzip", "not valid gzip data"),
    ("deflate", b"not deflate", "not valid deflate data"),
], ids=["unknown", "bad-gzip", "bad-deflate"])
def test_bad_content_encoding(encoding, body, words):
    with pytest.raises(RequestError, match=words):
        read_content_encoding(body, encoding, 1 << 20)


def test_a_gzip_bomb_stops_at_the_limit():
    bomb = gzip.compress(b" " * (4 << 20))
    with pytest.raises(BodyTooLarge, match="inflates to more than 1048576 bytes") as info:
        read_content_encoding(bomb, "gzip", 1 << 20)
    assert info.value.status == 413
    assert len(read_content_encoding(bomb, "gzip", 4 << 20)) == 4 << 20


def test_statistics_report_counts_rows_runs_and_runs_by_batch_size():
    from export.runtime.serve.endpoint import Statistics

    stats = Statistics()
    empty = json.loads(stats.report("m"))["model_stats"][0]
    assert (empty["inference_count"], empty["execution_count"], empty["batch_stats"]) == (0, 0, [])
    for rows, ns in ((3, 100), (8, 50), (3, 20)):
        stats.count(rows, ns)
    stats.requests += 5  # e.g. the run of 8 rows merged three requests (the Ray engine)
    got = json.loads(stats.report("m"))["model_stats"][0]
    assert got["name"] == "m" and got["version"] == "1" and got["last_inference"] > 0
    assert (got["inference_count"], got["execution_count"]) == (14, 3)
    assert got["inference_stats"]["success"] == {"count": 5}
    assert got["inference_stats"]["compute_infer"] == {"count": 3, "ns": 170}
    assert got["batch_stats"] == [
        {"batch_size": 3, "compute_infer": {"count": 2, "ns": 120}},
        {"batch_size": 8, "compute_infer": {"count": 1, "ns": 50}},
    ]


def test_statistics_route_does_not_wait_for_a_run():
    """`/stats` answers on the engine's event loop: it must not take the runtime's lock, which a
    run in another thread holds for its whole length (the event loop stalled behind it)."""
    import threading

    from export.runtime.serve.endpoint import ModelEndpoint, Statistics

    endpoint = ModelEndpoint.__new__(ModelEndpoint)  # the route needs none of the runtime
    endpoint.name, endpoint.prefix = "m", "/v2/models/m"
    endpoint.lock, endpoint.statistics = threading.Lock(), Statistics()
    answered = []
    with endpoint.lock:  # a run in progress
        worker = threading.Thread(
            target=lambda: answered.append(endpoint.route("GET", "/v2/models/m/stats")))
        worker.start()
        worker.join(timeout=5)
        assert answered, "GET /stats waited for the run's lock"
    assert json.loads(answered[0].body)["model_stats"][0]["name"] == "m"


@pytest.mark.parametrize("artifact, fmt, name", [
    ("x.onnx", "onnx", "x_onnx"), ("x.tflite", "tflite", "x_tflite"), ("x.ort", "ort", "x_ort"),
    ("x.tflm.tflite", "tflm", "x_tflm"), ("x_int8.tflite", "tflite", "x_int8_tflite"),
])
def test_a_served_models_name_drops_its_formats_own_suffix(artifact, fmt, name):
    from export.runtime.serve import model_name

    assert model_name({"artifact": artifact, "format": fmt}) == name


def test_a_bucketed_runner_refuses_a_file_of_one_length_by_its_format():
    from export.bucketed import BucketedRunner

    with pytest.raises(InputError, match="x.tflm.tflite is a TFLM file: one static length"):
        BucketedRunner("x.tflm.tflite")
