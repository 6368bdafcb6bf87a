"""Trust, third round (issue 27): one regression test per hole a hostile user found.

Library functions are tested directly; a subprocess runs once per entry point where the command
line itself is the point. Artifacts come from the session `artifact_factory`; shapes are small.
"""

from __future__ import annotations

import argparse
import os
import re

import numpy as np
import pytest
from conftest import run_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export import flags
from export.errors import SpecError
from export.formats import FORMAT_NAMES
from export.names import MAX_NAME_LENGTH, check_name, is_valid_name
from export.spec import QUANTIZE_MODES, ArtifactSpec
from export.tflm.cpp import c_identifier, file_names

SMALL = dict(units=8, heads=2, query_features=6, kv_features=7)

# -- 1, 2: one name rule, checked by the parser of every entry point ------------------------------

HOSTILE_NAMES = ["../escaped", "../../x", "/some/dir/x", "a/b", "nl\n", "\nnl", "", " ", ".hidden",
                 "-flag", "..", ".", "x" * (MAX_NAME_LENGTH + 1), "tab\tname", "nul\0x", "é",
                 "a\\b", "x\r"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[repr(n)[:20] for n in HOSTILE_NAMES])
def test_the_name_rule_refuses_names_that_leave_the_folder_or_hold_a_newline(name):
    assert not is_valid_name(name)
    with pytest.raises(SpecError, match=r"`name` must be 1-128 characters .* Received: name="):
        check_name(name)
    if name:  # an empty name in a spec means "derive it"; the parser refuses `--name ''`
        with pytest.raises(SpecError):
            ArtifactSpec(name=name)


def test_every_entry_points_parser_refuses_a_bad_name_with_exit_2(capsys):
    """One argparse type on `--name` for every format tuple (each `python -m export.<fmt>`)."""
    for formats in [FORMAT_NAMES, *[(f,) for f in FORMAT_NAMES]]:
        parser = flags.build_parser(formats, prog="x")
        for name in ("../escaped", "nl\n", "/tmp/x", ""):
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args(["--name", name])
            assert exit_.value.code == 2
            err = capsys.readouterr().err
            assert ("argument --name: must be 1-128 characters" in err
                    or "argument --name: must not be empty" in err) and repr(name) in err
            assert len(err.strip().splitlines()) == 1
        assert parser.parse_args(["--name", "9lives-A__b.v2"]).name == "9lives-A__b.v2"


def test_model_specs_check_the_name_too():
    """`--model`'s ModelSpec took any stem: `/some/dir/x` led build_tflite to rmtree /some/dir."""
    from export.model import ModelSpec
    from export.model_load import default_stem
    from export.spec import TensorInfo

    tensors = dict(model_inputs=(TensorInfo("x", (3,), "float32"),),
                   model_outputs=(TensorInfo("output", (3,), "float32"),))
    for name in ("/some/dir/x", "../escaped", "nl\n"):
        with pytest.raises(SpecError, match="Received: name="):
            ModelSpec(**tensors, stem=name, named=True)
    assert ModelSpec(**tensors, stem="9lives", named=True).name == "9lives"
    # A model file's own name becomes a stem that follows the rule, whatever it is.
    for path in ("dir/../x.keras", "-.keras", "a\n.keras", "ü.keras", "/x/.hidden.keras"):
        assert is_valid_name(default_stem(path)), path


@pytest.mark.parametrize("module", ["export.tflite", "export.tflm"])
def test_cli_with_a_path_as_name_exits_2_and_touches_nothing(module, tmp_path):
    """`--model m.keras --name <victim>/x` deleted <victim> (exit 4); `--name ../escaped` wrote
    above --output-dir. Now the parser refuses both: exit 2, one line, nothing written."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    out = tmp_path / "deep" / "out"
    for name in (str(victim / "x"), "../escaped", "nl\n"):
        ran = run_module(module, "--model", str(tmp_path / "m.keras"), "--name", name,
                         "--output-dir", str(out), timeout=120)
        assert ran.returncode == 2, ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
        assert "argument --name: must be 1-128 characters" in ran.stderr
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]


def test_tflite_build_removes_only_the_folder_it_created(tmp_path):
    """The SavedModel it converts from is staged in a folder the build creates; it used to remove
    `dirname(<workdir>/tflite-src/<name>.savedmodel)`, a path made from the name."""
    from export.reference import LayerReference, random_weights
    from export.tflite.build import build_tflite

    spec = ArtifactSpec(**SMALL, query_len=3, kv_len=4, batch=1, name="kept")
    neighbour = tmp_path / "tflite-src"
    neighbour.mkdir()
    (neighbour / "mine.txt").write_text("not the build's")
    fn, _ = LayerReference(spec, random_weights(spec, 1), "seed 1").inference_function(
        spec, fallback_layout="per-head")
    built = build_tflite(spec, fn, str(tmp_path))
    assert (neighbour / "mine.txt").read_text() == "not the build's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tflite-src",
                                                                 os.path.basename(built.path)])


_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*")
_names = st.one_of(
    st.from_regex(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}", fullmatch=True),
    st.text(alphabet=st.sampled_from("aZ09_.-/\\\n\r\t \0é:~"), max_size=12),
    st.sampled_from(HOSTILE_NAMES),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_names, other=_names)
def test_no_accepted_name_leaves_the_folder_or_breaks_cpp(name, other, tmp_path_factory):
    """Property: a name the rule accepts gives, for every format and variant, file names that are
    one component inside --output-dir, and C++ prefixes (symbols, guards) that are valid,
    unreserved identifiers, different for different names. A name it refuses is refused by the
    parser's type as well."""
    try:
        parsed = flags.artifact_name(name) == name
    except argparse.ArgumentTypeError:
        parsed = False
    assert parsed == is_valid_name(name)
    if not parsed:
        with pytest.raises(SpecError):
            check_name(name)
        return
    out = os.path.realpath("/srv/out")
    for quantize in QUANTIZE_MODES:
        spec = ArtifactSpec(name=name, quantize=quantize, int8_io=quantize == "int8")
        stem = spec.artifact_name("tflm")[: -len(".tflm.tflite")]
        files = [spec.reference_name, spec.golden_name, *file_names(stem)]
        for fmt in FORMAT_NAMES:
            files += [spec.artifact_name(fmt), spec.manifest_name(fmt)]
        for file in files:
            assert os.sep not in file and file not in (".", "..") and "\n" not in file
            assert os.path.dirname(os.path.realpath(os.path.join(out, file))) == out
            assert len(file.encode()) <= 255
        ident = c_identifier(stem)
        assert _IDENT.fullmatch(ident), ident  # no `__`, no leading `_` or digit
        for suffix in ("_model_data", "_model_data_len", "_arena_bytes", "_op_resolver",
                       "_register_ops", "_MODEL_DATA_H_", "_OP_RESOLVER_H_"):
            assert "__" not in ident + suffix
        if is_valid_name(other) and other != name:
            other_stem = ArtifactSpec(name=other, quantize=quantize,
                                      int8_io=quantize == "int8").artifact_name("tflm")[:-12]
            assert c_identifier(other_stem) != ident


# -- 5: --causal with every static/dynamic combination of lengths ---------------------------------

@pytest.mark.parametrize("query_len,kv_len", [(3, None), (None, 5), (None, None)],
                         ids=["q3-kvdyn", "qdyn-kv5", "qdyn-kvdyn"])
def test_causal_exports_and_verifies_with_any_dynamic_length(query_len, kv_len, artifact_factory):
    """`--kv-len dynamic --causal` failed (int64 vs int32 in `Less`); each combination now builds,
    verifies (export_artifacts raises otherwise), and the ONNX file matches the Keras layer with
    its causal mask at lengths it was not built at."""
    import keras
    import onnxruntime as ort

    out, results = artifact_factory(formats=("savedmodel", "onnx"), query_len=query_len,
                                    kv_len=kv_len, causal=True, **SMALL)
    assert set(results) == {"savedmodel", "onnx"}
    onnx = results["onnx"]
    layer = keras.saving.load_model(os.path.join(out, onnx.spec.reference_name))
    if not isinstance(layer, keras.layers.Layer) or hasattr(layer, "layers"):
        layer = next(x for x in layer.layers if type(x).__name__ == "CrossAttention")
    session = ort.InferenceSession(onnx.path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for tq, tkv in ((2, 7), (6, 2)):
        tq, tkv = query_len or tq, kv_len or tkv
        s1 = rng.standard_normal((2, tq, 6), dtype=np.float32)
        s2 = rng.standard_normal((2, tkv, 7), dtype=np.float32)
        expected = np.asarray(layer([s1, s2], use_causal_mask=True))
        got = session.run(["output"], {"source1": s1, "source2": s2})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)


# -- 7 (and 6's Embedding): --sample-inputs values that do not fit ----------------------------------


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    """ids (int32) -> Embedding(20) and a float context -> CrossAttention; random weights."""
    import keras
    from layer_zoo import randomize_weights

    import xattn

    ids = keras.Input((6,), dtype="int32", name="ids")
    ctx = keras.Input((5, 4), name="ctx")
    embedded = keras.layers.Embedding(20, 4, name="embedding")(ids)
    model = randomize_weights(keras.Model([ids, ctx], xattn.CrossAttention(4, 2)([embedded, ctx])), 4)
    path = str(tmp_path_factory.mktemp("token") / "tokens.keras")
    model.save(path)
    return path


def _samples(folder, ids, ctx=None) -> str:
    rng = np.random.default_rng(0)
    path = os.path.join(folder, "s.npz")
    np.savez(path, ids=ids, ctx=rng.standard_normal((len(ids), 5, 4)) if ctx is None else ctx)
    return path


@pytest.mark.parametrize("ids, ctx, needle", [
    (np.full((4, 6), 2 ** 40, np.int64), None, r"ids holds 1099511627776, which does not fit the "
                                               r"model input's int32 \(-2147483648..2147483647\)"),
    (np.full((4, 6), 3, np.uint64), np.full((4, 5, 4), 1e39), r"ctx holds 1e\+39, which does not "
                                                              r"fit the model input's float32"),
    (np.full((4, 6), 25, np.int32), None, r"ids holds 25, outside \[0, 20\) of Embedding 'embedding'"),
    (np.full((4, 6), -1, np.int32), None, r"ids holds -1, outside \[0, 20\) of Embedding"),
], ids=["int64-2**40", "float64-1e39", "id-past-embedding", "negative-id"])
def test_sample_inputs_that_do_not_fit_exit_2_naming_input_and_value(ids, ctx, needle, token_model,
                                                                     tmp_path, capsys):
    from export import cli

    samples = _samples(str(tmp_path), ids, ctx)
    rc = cli.main(["--model", token_model, "--sample-inputs", samples, "--output-dir",
                   str(tmp_path / "o")], formats=("onnx",))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.search(needle, err[0]), err[0]
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_ids_past_an_embedding_deeper_inside_are_one_line_too(tmp_path):
    """An Embedding behind another layer escapes the direct check: the reference run's TensorFlow
    error becomes one SpecError line naming the value, not a page of InvalidArgumentError."""
    import keras

    from export.model import ModelReference, ModelSpec
    from export.model_load import model_tensors

    ids = keras.Input((6,), dtype="int32", name="ids")
    shifted = keras.layers.Identity(name="before")(ids)
    out = keras.layers.Dense(3)(keras.layers.Embedding(20, 4, name="emb")(shifted))
    model = keras.Model(ids, out)
    path = str(tmp_path / "deep.keras")
    model.save(path)
    inputs, outputs = model_tensors(model, {})
    spec = ModelSpec(model_inputs=inputs, model_outputs=outputs, stem="deep")
    ref = ModelReference(path, model, {"ids": np.full((2, 6), 99, np.int32)}, "s.npz")
    with pytest.raises(SpecError, match=r"the model refuses --sample-inputs s\.npz: .*"
                                        r"indices\[0,0\] = 99 is not in \[0, 20\)") as raised:
        ref.run(spec, ref.make_inputs(spec, 2, 0))
    assert "\n" not in str(raised.value) and "function_node" not in str(raised.value)


# -- 4, 10 and the protocol's nitpicks: decoding is shared by both engines and gRPC --------------


@pytest.fixture(scope="module")
def masked_endpoints(artifact_factory):
    """A served ModelEndpoint per runtime (ONNX, TFLite) of a small masked artifact."""
    from export.runtime.serve import load_models
    from export.runtime.serve.endpoint import ModelEndpoint

    out, _ = artifact_factory(formats=("onnx", "tflite"), query_len=4, kv_len=5, query_mask=True,
                              value_mask=True, **SMALL)
    models, _ = load_models(out)
    return {m.format: ModelEndpoint(m, max_body=1 << 20, max_batch=8) for m in models}


def _binary_body(feeds: dict, raw: dict) -> tuple[bytes, str]:
    import json

    inputs = [{"name": n, "datatype": "BOOL" if a.dtype == bool else "FP32", "shape": list(a.shape),
               "parameters": {"binary_data_size": len(raw[n])}} for n, a in feeds.items()]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return header + b"".join(raw[n] for n in feeds), str(len(header))


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_bool_bytes_other_than_1_mean_true(fmt, masked_endpoints):
    """A query_mask whose true bytes are 0x02 (or 0xff) gave another answer from the ONNX file
    (its Cast made 2.0); every non-zero byte is now true, in the decoder both engines and gRPC's
    raw contents go through."""
    endpoint = masked_endpoints[fmt]
    rng = np.random.default_rng(7)
    feeds = {"source1": rng.standard_normal((2, 4, 6), dtype=np.float32),
             "source2": rng.standard_normal((2, 5, 7), dtype=np.float32),
             "query_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool),
             "value_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)}
    answers = []
    for true_byte in (1, 2, 0xFF):
        raw = {n: (a.view(np.uint8) * true_byte).astype(np.uint8).tobytes() if a.dtype == bool
               else a.tobytes() for n, a in feeds.items()}
        body, length = _binary_body(feeds, raw)
        decoded, checked = endpoint.decode(body, length, None)
        assert checked["query_mask"].dtype == bool
        assert set(np.unique(checked["query_mask"].view(np.uint8))) <= {0, 1}
        answers.append(endpoint.run(checked)["output"])
        # gRPC: raw_input_contents with the same bytes, through to_http_body.
        from tritonclient.grpc import service_pb2

        from export.runtime.serve.grpc_service import to_http_body

        request = service_pb2.ModelInferRequest(model_name=endpoint.name)
        for n, a in feeds.items():
            request.inputs.add(name=n, datatype="BOOL" if a.dtype == bool else "FP32",
                               shape=list(a.shape))
            request.raw_input_contents.append(raw[n])
        _, via_grpc = endpoint.decode(*to_http_body(request), None)
        answers.append(endpoint.run(via_grpc)["output"])
    for answer in answers[1:]:
        np.testing.assert_array_equal(answer, answers[0])


def test_a_true_among_fp32_data_is_refused():
    from export.runtime.serve.protocol import RequestError, TensorSpec, decode_infer_request

    spec = [TensorSpec("x", "FP32", (-1, 2))]
    ok = decode_infer_request(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],'
                              b'"data":[1.5,2]}]}', None, spec, [])
    np.testing.assert_array_equal(ok.feeds["x"], [[1.5, 2.0]])
    for data in (b"[1.5,true]", b"[[false],[2]]"):
        shape = b"[1,2]" if data.startswith(b"[1") else b"[2,1]"
        body = (b'{"inputs":[{"name":"x","datatype":"FP32","shape":' + shape + b',"data":'
                + data + b'}]}')
        with pytest.raises(RequestError, match=r"input `x` data must be numbers; received a "
                                               r"true/false among them"):
            decode_infer_request(body, None, [TensorSpec("x", "FP32", (-1, -1))], [])


def test_nan_outputs_are_refused_in_json_and_carried_in_binary():
    """NaN/inf became JSON null without a word: now a JSON output holding them is refused with a
    line saying so; binary outputs carry them exactly."""
    from export.runtime.serve.protocol import (
        HEADER_LENGTH,
        InferRequest,
        RequestError,
        TensorSpec,
        encode_infer_response,
    )

    outputs = [TensorSpec("output", "FP32", (-1, 3))]
    results = {"output": np.array([[1.0, np.nan, np.inf]], np.float32)}
    with pytest.raises(RequestError, match=r"output `output` holds 2 NaN/inf value\(s\), which "
                                           r"JSON cannot carry; ask for it as binary data"):
        encode_infer_response("m", InferRequest(None, {}), results, outputs)
    body, headers = encode_infer_response("m", InferRequest(None, {}, binary_default=True),
                                          results, outputs)
    carried = np.frombuffer(body[int(headers[HEADER_LENGTH]):], np.float32)
    np.testing.assert_array_equal(carried, results["output"].reshape(-1))


def test_grpc_nan_in_fp32_contents_names_the_tensor_and_value():
    """It answered "request body is not JSON ... line 1 column 84" to a protobuf request."""
    from tritonclient.grpc import service_pb2

    from export.errors import InputError
    from export.runtime.serve.grpc_service import to_http_body

    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="source1", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, float("nan"), 2.0])
    with pytest.raises(InputError, match=r"input `source1` fp32_contents holds nan; typed "
                                         r"contents take finite numbers"):
        to_http_body(request)
    tensor.contents.fp32_contents[1] = float("-inf")
    with pytest.raises(InputError, match=r"fp32_contents holds -inf"):
        to_http_body(request)
    tensor.contents.fp32_contents[1] = 0.5
    body, length = to_http_body(request)
    assert b'"data": [1.0, 0.5, 2.0]' in body[:int(length)]


# -- 6: serve options and the Triton writer: one line, exit 2, instead of tracebacks ---------------


@pytest.mark.parametrize("changes, needle", [
    (dict(port=8123, grpc_port=8123), r"--grpc-port must differ from --port .* Received: --port "
                                      r"8123 --grpc-port 8123"),
    (dict(grpc_port=8124, max_body_bytes=2048 << 20), r"--max-body-mb with --grpc-port must be "
                                                      r"below 2048 .* Received: 2048 MiB"),
    (dict(drain_seconds=1e300), r"--drain-seconds must be in \(0, 86400\]. Received: 1e\+300"),
    (dict(batch_wait_ms=1e300), r"--batch-wait-ms must be in \(0, 60000\]. Received: 1e\+300"),
], ids=["grpc-port=port", "grpc-2048mb", "drain-1e300", "batch-wait-1e300"])
def test_serve_options_that_cannot_work_are_usage_errors(changes, needle):
    from export.errors import UsageError
    from export.runtime.serve import ServeOptions, check_options, start

    options = ServeOptions(**changes)
    with pytest.raises(UsageError, match=needle):
        check_options(options)
    with pytest.raises(UsageError, match=needle):  # the library's start checks them too
        start([], options)
    check_options(ServeOptions(grpc_port=8124, max_body_bytes=2047 << 20, drain_seconds=86400))


def test_serve_cli_refuses_grpc_on_the_http_port_before_verifying(tmp_path):
    ran = run_module("export.serve", str(tmp_path / "nothing-here"), "--port", "8125",
                     "--grpc-port", "8125", timeout=120)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.strip().splitlines() == [
        "python -m export.serve: error: --grpc-port must differ from --port (HTTP listens there). "
        "Received: --port 8125 --grpc-port 8125"]


def test_triton_repository_in_the_way_is_one_line(masked_endpoints, artifact_factory, tmp_path):
    from export.errors import UsageError
    from export.runtime.serve import load_models
    from export.runtime.serve.triton import write_repository

    out, _ = artifact_factory(formats=("onnx", "tflite"), query_len=4, kv_len=5, query_mask=True,
                              value_mask=True, **SMALL)
    models, _ = load_models(out)
    onnx = next(m for m in models if m.format == "onnx")
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    with pytest.raises(UsageError, match=r"--triton-repository .*file/repo cannot be created: Not "
                                         r"a directory"):
        write_repository(models, str(blocker / "repo"))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / onnx.name).write_text("someone's file")
    with pytest.raises(UsageError, match=rf"{onnx.name} exists and is not a model folder"):
        write_repository(models, str(repo))
    assert (repo / onnx.name).read_text() == "someone's file"
    assert sorted(p.name for p in repo.iterdir()) == [onnx.name]  # no staging left behind
    # A folder there is replaced; a neighbour named `<model>.old` is not someone else's to delete.
    (repo / onnx.name).unlink()
    (repo / f"{onnx.name}.old").mkdir()
    (repo / f"{onnx.name}.old" / "keep.txt").write_text("mine")
    write_repository(models, str(repo))
    write_repository(models, str(repo))
    assert (repo / f"{onnx.name}.old" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in repo.iterdir()) == [onnx.name, f"{onnx.name}.old"]
    assert (repo / onnx.name / "1" / "model.onnx").read_bytes() == onnx.data


@pytest.mark.parametrize("text", ["16,,64", "16,64,", ",16", "1_6", "+16", "\u0661\u0666", " "])
def test_lengths_with_an_empty_part_or_odd_digits_are_refused(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        flags.build_parser(("onnx",), prog="x").parse_args(["--lengths", text])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --lengths: `--lengths` takes positive lengths" in err[0]


# -- 9 and the HTTP nitpicks: one real embedded server (1 worker, --read-timeout 1) ---------------


@pytest.fixture(scope="module")
def guarded_server(artifact_factory, tmp_path_factory):
    """`python -m export.serve` on small ONNX/TFLite files: one worker, a 1 s read timeout."""
    import socket
    import subprocess
    import sys
    import time

    from conftest import REPO

    out, _ = artifact_factory(formats=("onnx", "tflite"), query_len=4, kv_len=5, query_mask=True,
                              value_mask=True, **SMALL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = tmp_path_factory.mktemp("serve-logs")
    err = open(logs / "stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "export.serve", out, "--port", str(port),
                             "--workers", "1", "--read-timeout", "1"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 240
    while _status(port, "GET", "/v2/health/ready") != 200:
        assert proc.poll() is None, (logs / "stderr").read_text()
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.2)
    yield port
    proc.send_signal(2)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    err.close()


def _status(port: int, method: str, path: str) -> int | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def _closed_within(sock, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (reads b"" or a reset), or None if it stayed open."""
    import time

    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def test_stalled_connections_are_dropped_while_others_are_answered(guarded_server):
    """Half a head, 1 byte of a 100-byte body, and a silent connection: each is closed about
    --read-timeout (1 s) after it stalls; meanwhile the server keeps answering."""
    import socket
    import time

    port = guarded_server
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    socks[0].sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    socks[1].sendall(b"POST /v2/models/x/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    for _ in range(3):  # answered while the three stall
        assert _status(port, "GET", "/v2/health/ready") == 200
    assert time.monotonic() - started < 1.0
    for sock in socks:
        closed = _closed_within(sock, 6.0)
        assert closed is not None, "a stalled connection stayed open"
        sock.close()
    assert time.monotonic() - started < 6.0
    assert _status(port, "GET", "/v2/health/ready") == 200


def test_a_header_block_over_the_limit_gets_431_and_the_server_stays_small(guarded_server):
    import socket

    port = guarded_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        try:  # 8 MB of one header: refused long before it is all sent
            while sent < 8 << 20:
                sock.sendall(b"X-Big: " + b"a" * 65536 + b"\r\n")
                sent += 65545
        except OSError:
            pass
        sock.settimeout(5)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request line and headers over 65536 bytes" in answer
    assert sent < 8 << 20  # refused before it was all sent (the worker did not read it all)
    # 60 KiB of headers is under the limit and answered.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * 60_000 + b"\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert _status(port, "GET", "/v2/health/ready") == 200


def test_head_health_is_200_and_an_encoded_slash_is_not_routed(guarded_server):
    port = guarded_server
    assert _status(port, "HEAD", "/v2/health/ready") == 200
    assert _status(port, "HEAD", "/v2/health/live") == 200
    assert _status(port, "HEAD", "/v2") == 200
    name = "xattn_u8_h2_q4x6_kv5x7_qmask_vmask_onnx"
    assert _status(port, "GET", f"/v2/models/{name}/ready") == 200
    assert _status(port, "HEAD", f"/v2/models/{name}") == 200
    assert _status(port, "GET", f"/v2/models/{name}%2Fready") == 404
    assert _status(port, "GET", f"/v2/models/{name}%2fready") == 404


def test_worker_configuration_is_json_not_pickle(masked_endpoints, artifact_factory):
    import json

    from export.runtime.serve import ServeOptions, load_models
    from export.runtime.serve.worker import decode_config, encode_config

    out, _ = artifact_factory(formats=("onnx", "tflite"), query_len=4, kv_len=5, query_mask=True,
                              value_mask=True, **SMALL)
    models, _ = load_models(out)
    options = ServeOptions(workers=3, read_timeout_s=2.5, max_header_bytes=4096)
    data = encode_config(models, options, "1.2.3")
    assert json.loads(data)["version"] == "1.2.3"  # plain JSON; pickle's b"\x80" never leads
    config = decode_config(data)
    assert config["options"] == options and config["workers"] == 3
    assert [(m.name, m.format, m.manifest, m.data) for m in config["models"]] == \
        [(m.name, m.format, m.manifest, m.data) for m in models]
    source = open(os.path.join(os.path.dirname(flags.__file__), "runtime", "serve", "worker.py")).read()
    assert "pickle" not in source.replace("no pickle", "").replace("not pickle", "")


# -- 8: .ort bytes the same from a cold and a warm bytecode cache -----------------------------------


def _bytecode_caches() -> list[str]:
    """The __pycache__ folders of what the ORT child imports (onnxruntime, numpy)."""
    import glob

    import numpy
    import onnxruntime

    return sorted(p for pkg in (onnxruntime, numpy) for p in glob.glob(
        os.path.join(os.path.dirname(pkg.__file__), "**", "__pycache__"), recursive=True))


def test_ort_bytes_do_not_depend_on_the_bytecode_cache(artifact_factory, tmp_path):
    """A fresh clone's first `make artifacts` (no .pyc yet) gave another .ort sha256 than every
    later build: the serializing child compiled and wrote bytecode. It now reads and writes none.
    Cold: the packages' __pycache__ folders moved aside for one run (then put back)."""
    import hashlib
    import shutil

    from export.ort.serialize import serialize_ort

    out, results = artifact_factory(formats=("onnx",), query_len=4, kv_len=5, **SMALL)

    def ort_sha(tag: str) -> str:
        scratch = tmp_path / tag
        scratch.mkdir()
        done = serialize_ort(results["onnx"].path, str(tmp_path / f"{tag}.ort"), str(scratch))
        assert done.returncode == 0, done.stderr
        assert not any((scratch / "no-pycache").rglob("*")), "the child wrote bytecode"
        return hashlib.sha256((tmp_path / f"{tag}.ort").read_bytes()).hexdigest()

    warm = ort_sha("warm")
    aside = tmp_path / "aside"
    moved = []
    try:
        for i, cache in enumerate(_bytecode_caches()):
            aside.mkdir(exist_ok=True)
            shutil.move(cache, aside / str(i))
            moved.append((cache, aside / str(i)))
        cold = ort_sha("cold")
        written = [c for c, _ in moved if os.path.exists(c)]
    finally:
        for cache, kept in moved:
            if not os.path.exists(cache):
                shutil.move(kept, cache)
    assert cold == warm
    assert not written, f"the child wrote {written[0]}"
    assert ort_sha("warm-again") == warm


@pytest.mark.skipif(not os.path.exists("/proc/self/personality"), reason="Linux's personality(2)")
def test_the_ort_child_starts_from_a_launcher_with_randomization_off():
    """The serializing child's addresses repeat (ADDR_NO_RANDOMIZE), set by a fresh launcher that
    then execs it: no code runs between fork and exec in the exporting process, whose threads
    (TensorFlow's, a server's gRPC) made a `preexec_fn` fail once under the test workers."""
    import subprocess
    import sys

    from export.ort import serialize

    done = subprocess.run(
        [sys.executable, "-I", "-B", "-c", serialize.LAUNCHER_SOURCE, "-I", "-c",
         "print(open('/proc/self/personality').read())"],
        capture_output=True, text=True, timeout=60, env={"LC_ALL": "C"})
    assert done.returncode == 0, done.stderr
    assert int(done.stdout, 16) & 0x0040000, done.stdout
    mine = int(open("/proc/self/personality").read(), 16)
    assert not mine & 0x0040000  # this process (the parent) is left as it was


@pytest.mark.parametrize("length", ["1_0", "+10", "\u0661\u0660", "0x0a", ""])
def test_header_length_takes_ascii_digits_only(length):
    from export.runtime.serve.protocol import RequestError, TensorSpec, decode_infer_request

    with pytest.raises(RequestError, match=r"Inference-Header-Content-Length must be an integer"):
        decode_infer_request(b'{"inputs":[]}' + b"\0" * 8, length, [TensorSpec("x", "FP32", (-1,))],
                             [])


def test_a_body_limit_below_1_kib_is_a_usage_error():
    from export.errors import UsageError
    from export.runtime.serve import ServeOptions, check_options

    with pytest.raises(UsageError, match=r"--max-body-mb must allow at least 1 KiB. Received: 1 "
                                         r"bytes"):
        check_options(ServeOptions(max_body_bytes=int(1e-6 * (1 << 20))))


def test_a_grpc_port_taken_after_the_check_is_one_oserror_line():
    """The worker died with grpcio's `Failed to bind` traceback; build_server now raises one
    OSError line, which the worker prints and exits 2 with."""
    import socket

    from export.runtime.serve.grpc_service import build_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen for gRPC on 127.0.0.1:{port}: ") as e:
            build_server(object(), port, "127.0.0.1", 1 << 20)
        assert "\n" not in str(e.value)


def test_a_tflm_set_named_with_a_digit_and_a_dash_builds_and_verifies(artifact_factory):
    """`--name 9lives` gave `#ifndef 9LIVES_INT8_MODEL_DATA_H_`. The whole TFLM path with such a
    name: the manifest names the symbol prefix, the header uses it, export.runtime.verify passes."""
    from export.runtime.verify import verify_path

    out, results = artifact_factory(formats=("tflm",), quantize="int8", query_len=4, kv_len=5,
                                    name="9lives-x", **SMALL)
    deployment = results["tflm"].manifest["deployment"]
    assert deployment["symbol_prefix"] == c_identifier("9lives-x_int8")
    assert deployment["symbol_prefix"].startswith("m_9lives_x_int8_")
    header = open(os.path.join(out, deployment["files"]["model_data_h"])).read()
    guard = f"{deployment['symbol_prefix']}_MODEL_DATA_H_"
    assert f"#ifndef {guard}\n#define {guard}\n" in header
    assert f"{deployment['symbol_prefix']}_model_data[];" in header
    assert [r.status for r in verify_path(out)] == ["passed"]
