"""The CPU int8 variant (issue 30): `--quantize int8-cpu`.

TFLite files with int8 projections (FULLY_CONNECTED) and the attention core (the BATCH_MATMULs
of two run-time operands and the late softmax between and after them: REDUCE_MAX, SUB, EXP, SUM,
DIV) in float32, made by the converter's own selective quantization,
calibrated and gated like int8. Each file here is built for real, read back with LiteRT's
interpreter (op and tensor details) and rerun against the Keras reference on fresh inputs.
ONNX/ORT build their int8 (weight-only) file for it; TFLM and --int8-io refuse it.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from conftest import run_module
from layer_zoo import randomize_weights

import xattn
from export import cli, reference
from export.errors import SpecError
from export.formats import REGISTRY, get_format
from export.pipeline import ExportRequest, export_artifacts
from export.runtime import check
from export.spec import ArtifactSpec

GATE = 5e-2  # int8's relative L2 gate, int8-cpu's too
FRESH_SEED = 626_262
MASKED = dict(query_mask=True, value_mask=True, causal=True, scores=True)
# The float32 ops of one unmasked core: the two BATCH_MATMULs and the late softmax.
LATE_CORE = ["BATCH_MATMUL", "BATCH_MATMUL", "DIV", "EXP", "REDUCE_MAX", "SUB", "SUM"]
# On the scores' path too, with masks: the masked logits (the margin's REDUCE_MIN, SUB, SELECT_V2),
# the kept keys' MUL and the reshapes. With scores returned the file has a SOFTMAX instead.
MASKED_LATE_CORE = (*LATE_CORE, "MUL", "REDUCE_MIN", "RESHAPE", "RESHAPE", "RESHAPE", "SELECT_V2",
                    "SUB")
MASKED_SOFTMAX_CORE = ("BATCH_MATMUL", "BATCH_MATMUL", "MUL", "REDUCE_MIN", "RESHAPE", "RESHAPE",
                       "SELECT_V2", "SOFTMAX", "SUB")


def op_dtypes(path: str) -> list[tuple[str, list[str], list[str]]]:
    """(op name, input dtypes, output dtypes) of the primary subgraph, before any delegate."""
    interpreter = Interpreter(
        model_path=path,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    dtype = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    return [(op["op_name"], [dtype[i] for i in op["inputs"] if i >= 0],
             [dtype[i] for i in op["outputs"]]) for op in interpreter._get_ops_details()]


def all_subgraph_ops(path: str) -> list[tuple[str, str]]:
    """(op name, output tensor type name) in every subgraph (signature) of the file."""
    from tensorflow.lite.python import schema_py_generated as schema_fb
    from tensorflow.lite.python import schema_util

    model = schema_fb.ModelT.InitFromPackedBuf(open(path, "rb").read(), 0)
    op_name = {v: k for k, v in vars(schema_fb.BuiltinOperator).items() if not k.startswith("_")}
    type_name = {v: k for k, v in vars(schema_fb.TensorType).items() if not k.startswith("_")}
    codes = [schema_util.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    return [(op_name[codes[op.opcodeIndex]], type_name[graph.tensors[op.outputs[0]].type])
            for graph in model.subgraphs for op in graph.operators]


CONVERSIONS = ("QUANTIZE", "DEQUANTIZE", "CAST")


def float_and_int8_ops(path: str) -> tuple[list[str], list[str]]:
    """Sorted op names computing in float32 (float32 outputs, no int8 input) and in int8 (int8
    outputs), the type conversions left out."""
    ops = [o for o in op_dtypes(path) if o[0] not in CONVERSIONS]
    floats = [n for n, i, o in ops if o == ["float32"] and "int8" not in i]
    int8s = [n for n, _, o in ops if o == ["int8"]]
    return sorted(floats), sorted(int8s)


def assert_core_float_projections_int8(path: str, *cores) -> None:
    """Exactly the attention cores `cores` (op names each; default one LATE_CORE) in float32,
    nothing else, every FULLY_CONNECTED int8 (input, weights, output)."""
    floats, int8s = float_and_int8_ops(path)
    assert floats == sorted(op for core in cores or (LATE_CORE,) for op in core), floats
    fcs = [o for o in op_dtypes(path) if o[0] == "FULLY_CONNECTED"]
    assert fcs and all(i[:2] == ["int8", "int8"] and o == ["int8"] for _, i, o in fcs), fcs
    assert "FULLY_CONNECTED" in int8s and "SOFTMAX" not in int8s


def fresh_rel_l2(path: str, spec: ArtifactSpec, keras_model) -> float:
    """The file in LiteRT (float32 inputs, as the file takes them) vs the Keras layer."""
    feeds = reference.make_inputs(spec, 8 * spec.batch, FRESH_SEED)
    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    got: dict[str, list] = {}
    for start in range(0, 8 * spec.batch, spec.batch):
        chunk = {k: v[start:start + spec.batch] for k, v in feeds.items()}
        for name, value in runner(**chunk).items():
            got.setdefault(name, []).append(value)
    outputs = {k: np.concatenate(v) for k, v in got.items()}
    return check.parity_metrics(reference.run_reference(keras_model, feeds), outputs)["rel_l2"]


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory):
    """`python -m export.tflite --quantize int8-cpu`, as a user types it."""
    out = str(tmp_path_factory.mktemp("int8cpu-cli"))
    done = run_module("export.tflite", "--quantize", "int8-cpu", "--output-dir", out)
    assert done.returncode == 0, done.stderr
    return out


def _load_reference(folder: str, spec: ArtifactSpec):
    return keras.saving.load_model(os.path.join(folder, spec.reference_name), compile=False,
                                   safe_mode=True)


def test_cli_publishes_a_verified_int8_cpu_file(cli_build):
    spec = ArtifactSpec(batch=1, quantize="int8-cpu")
    path = os.path.join(cli_build, spec.artifact_name("tflite"))
    assert path.endswith("_int8cpu.tflite") and os.path.isfile(path)
    manifest = json.load(open(path + ".json"))
    q = manifest["quantization"]
    assert (q["mode"], q["scheme"], q["io_dtype"]) == ("int8-cpu", "selective-integer", "float32")
    assert q["calibration"]["source"] == "random" and q["n_samples"] == 64
    assert "attention core (BATCH_MATMULs, softmax) float32" in q["activations"]
    assert manifest["parity"]["max_rel_error"] == GATE
    assert 0 < manifest["parity"]["rel_l2"] <= GATE
    done = run_module("export.verify", cli_build)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "int8cpu.tflite" in done.stdout


def test_projections_are_int8_and_the_core_float32(cli_build):
    spec = ArtifactSpec(batch=1, quantize="int8-cpu")
    assert_core_float_projections_int8(os.path.join(cli_build, spec.artifact_name("tflite")))


def test_fresh_inputs_within_the_int8_gate_and_smaller(cli_build):
    spec = ArtifactSpec(batch=1, quantize="int8-cpu")
    path = os.path.join(cli_build, spec.artifact_name("tflite"))
    rel = fresh_rel_l2(path, spec, _load_reference(cli_build, spec))
    assert 1e-4 < rel <= GATE  # quantized (not float32 by mistake), within the gate
    float32 = 4 * sum(w.size for w in reference.random_weights(spec, 0))
    assert os.path.getsize(path) < 0.35 * float32  # int8 weights


@pytest.mark.parametrize("scores", [False, True], ids=["late", "scores"])
def test_masks_scores_and_buckets_keep_every_core_float(tmp_path, scores):
    """Masks, causal, with and without scores at a batch of 2, and two length buckets: in every
    signature the core is float32 and the FULLY_CONNECTEDs int8; verified against the reference."""
    spec = ArtifactSpec(**dict(MASKED, scores=scores), batch=2, quantize="int8-cpu")
    (masked,) = export_artifacts(ExportRequest(specs={"tflite": spec},
                                               output_dir=str(tmp_path / "m"), seed=5))
    assert_core_float_projections_int8(masked.path,
                                       MASKED_SOFTMAX_CORE if scores else MASKED_LATE_CORE)
    # The mask's own arithmetic (SUB, MUL, ADD), off the scores' path, stays int8.
    assert {"SUB", "MUL", "ADD"} <= set(float_and_int8_ops(masked.path)[1])
    assert fresh_rel_l2(masked.path, spec, _load_reference(str(tmp_path / "m"), spec)) <= GATE
    if scores:
        return
    bucketed = ArtifactSpec(batch=1, lengths=((8, 8), (16, 16)), quantize="int8-cpu")
    (result,) = export_artifacts(ExportRequest(specs={"tflite": bucketed},
                                               output_dir=str(tmp_path / "b"), seed=5))
    ops = all_subgraph_ops(result.path)
    # Length buckets pad with masks: the masked core in each signature, nothing else in float.
    floats = [op for op, t in ops if t == "FLOAT32" and op not in CONVERSIONS]
    assert sorted(floats) == sorted(MASKED_LATE_CORE * 2), floats
    assert sorted({t for op, t in ops if op == "FULLY_CONNECTED"}) == ["INT8"]
    assert sum(op == "BATCH_MATMUL" for op, _ in ops) == 4  # two signatures, two each


def test_only_run_time_matmuls_are_denylisted(tmp_path):
    """A BATCH_MATMUL with a constant weight stays int8 (as in the int8 file); one of two
    computed operands, and the SOFTMAX, are the attention core."""
    import tensorflow as tf

    from export.tflite.quantize import attention_core_nodes

    weight = np.random.default_rng(0).standard_normal((2, 8, 8)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec((2, 4, 8), tf.float32, name="x")])
    def fn(x):
        projected = tf.matmul(x, tf.constant(weight), name="weighted")  # constant operand
        scores = tf.matmul(projected, x, transpose_b=True, name="scores")  # two computed
        weights = tf.nn.softmax(scores, name="weights")
        return {"y": tf.matmul(weights, x, name="mixed")}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    flatbuffer = converter.convert()
    ops = [op for op, _ in all_subgraph_ops(_write(tmp_path, flatbuffer))]
    assert ops.count("BATCH_MATMUL") == 3
    nodes = attention_core_nodes(flatbuffer)
    assert len(nodes) == 3 and {"scores", "weights"} <= set(nodes)
    assert "weighted" not in nodes  # the constant-weight one (its tensor is named so)


def test_the_late_softmax_is_the_core_and_other_subs_and_exps_are_not(tmp_path):
    """The walk keeps the ops between the scores and the weighted sum and up to the division;
    a SUB and an EXP before the query projection and after the output projection, and a
    REDUCE_MAX of the inputs, are not on those paths."""
    import tensorflow as tf

    from export.tflite.quantize import attention_core_nodes

    rng = np.random.default_rng(1)
    w_in, w_out = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))

    @tf.function(input_signature=[tf.TensorSpec((2, 4, 8), tf.float32, name="x")])
    def fn(x):
        pre = tf.exp(x - tf.reduce_max(x, axis=-1, keepdims=True))  # outside, before
        q = tf.reshape(tf.matmul(tf.reshape(pre, [8, 8]), w_in), [2, 4, 8])  # FULLY_CONNECTED
        logits = tf.matmul(q, x, transpose_b=True)
        e = tf.exp(logits - tf.reduce_max(logits, axis=-1, keepdims=True))
        context = tf.matmul(e, x) / tf.reduce_sum(e, axis=-1, keepdims=True)
        out = tf.matmul(tf.reshape(context, [8, 8]), w_out)  # FULLY_CONNECTED
        return {"y": tf.exp(out - 1.0)}  # outside, after

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    flatbuffer = converter.convert()
    ops = _ops_by_output(flatbuffer)
    assert sorted(ops.values()).count("EXP") == 3 and sorted(ops.values()).count("SUB") == 3
    assert sorted(ops[n] for n in attention_core_nodes(flatbuffer)) == LATE_CORE


def test_int8_cpu_graphs_get_the_late_softmax_int8_ones_do_not():
    from export.calibration import MASK_MARGIN, graph_options
    from export.graph import GraphOptions

    assert graph_options(ArtifactSpec(quantize="int8-cpu"), "tflite") == GraphOptions(late_softmax=True)
    assert graph_options(ArtifactSpec(quantize="none"), "tflite") == GraphOptions(late_softmax=True)
    assert graph_options(ArtifactSpec(quantize="int8"), "tflite") == GraphOptions()
    assert graph_options(ArtifactSpec(quantize="int8-cpu"), "onnx").late_softmax is False
    masked = ArtifactSpec(quantize="int8-cpu", causal=True)
    assert graph_options(masked, "tflite") == GraphOptions(mask_margin=MASK_MARGIN, late_softmax=True)
    # Passed whole, they reach folded_attention as its keywords.
    assert graph_options(masked, "tflite").keywords() == {"mask_margin": MASK_MARGIN, "late_softmax": True}


def _ops_by_output(flatbuffer: bytes) -> dict[str, str]:
    """{output tensor name: op name} of the first subgraph."""
    from tensorflow.lite.python import schema_py_generated as schema_fb
    from tensorflow.lite.python import schema_util

    model = schema_fb.ModelT.InitFromPackedBuf(flatbuffer, 0)
    op_name = {v: k for k, v in vars(schema_fb.BuiltinOperator).items() if not k.startswith("_")}
    codes = [schema_util.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    graph = model.subgraphs[0]
    return {graph.tensors[t].name.decode(): op_name[codes[op.opcodeIndex]]
            for op in graph.operators for t in op.outputs.tolist()}


def _write(folder, flatbuffer: bytes) -> str:
    path = str(folder / "probe.tflite")
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return path


def _two_attention_model() -> keras.Model:
    x = keras.Input((6, 5), name="x")
    ctx = keras.Input((7, 4), name="ctx")
    q = keras.layers.Dense(8, activation="relu", name="embed")(x)
    a = xattn.CrossAttention(8, 2, name="to_context")([q, ctx])
    h = keras.layers.LayerNormalization(name="norm")(keras.layers.Add(name="residual")([q, a]))
    s = xattn.CrossAttention(8, 2, name="self_causal")([h, h], use_causal_mask=True)
    y = keras.layers.Dense(3, name="head")(s)
    return randomize_weights(keras.Model({"x": x, "ctx": ctx}, {"y": y}, name="two"), 13)


def test_whole_model_keeps_every_folded_core_float(tmp_path):
    model = _two_attention_model()
    path = str(tmp_path / "two.keras")
    model.save(path)
    out = str(tmp_path / "out")
    assert cli.main(["--model", path, "--quantize", "int8-cpu", "--output-dir", out, "-q"],
                    formats=("tflite",), prog="python -m export.tflite") == 0
    artifact = os.path.join(out, "two_int8cpu.tflite")
    # Two CrossAttention layers, the second causal (its margin's ops on the scores' path); the
    # LayerNormalization between them (MEAN, SUB, RSQRT, MUL) stays int8.
    causal = (*LATE_CORE, "REDUCE_MIN", "RESHAPE", "RESHAPE", "RESHAPE", "SELECT_V2", "SUB")
    assert_core_float_projections_int8(artifact, LATE_CORE, causal)
    assert {"MEAN", "SUB", "RSQRT"} <= set(float_and_int8_ops(artifact)[1])
    manifest = json.load(open(artifact + ".json"))
    assert manifest["quantization"]["mode"] == "int8-cpu"
    assert manifest["parity"]["rel_l2"] <= GATE
    done = run_module("export.verify", out)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_format_builds_its_variant_for_int8_cpu():
    built = {name: fmt.variant_for("int8-cpu") for name, fmt in REGISTRY.items()}
    assert built == {"savedmodel": "none", "tflite": "int8-cpu", "onnx": "int8", "ort": "int8",
                     "tflm": "int8"}
    # A library caller asking ONNX for int8-cpu is told which file that is.
    with pytest.raises(SpecError, match=r"ONNX builds its int8 file for int8-cpu.*quantize='int8'"):
        from export.calibration import check_variant

        check_variant("onnx", ArtifactSpec(quantize="int8-cpu"))
    assert get_format("tflite").variant_for("int8") == "int8"


def test_tflm_refuses_int8_cpu_in_one_line(tmp_path):
    done = run_module("export.tflm", "--quantize", "int8-cpu", "--output-dir", str(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "TFLM files are integer-only" in lines[0] and "use --quantize int8" in lines[0]
    assert "Received: --quantize int8-cpu" in lines[0]
    assert not os.listdir(tmp_path)


def test_int8_io_refuses_int8_cpu(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--quantize", "int8-cpu", "--int8-io", "--output-dir", str(tmp_path)],
                 formats=("tflite",), prog="python -m export.tflite")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--int8-io needs the integer-only --quantize int8" in err[0]


def test_onnx_entry_point_builds_its_int8_file_for_int8_cpu(tmp_path):
    done = run_module("export.onnx", "--quantize", "int8-cpu", "--units", "8", "--heads", "2",
                      "--query-features", "8", "--kv-features", "8", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "onnx builds its int8 file for --quantize int8-cpu" in done.stderr
    spec = ArtifactSpec(units=8, heads=2, query_features=8, kv_features=8, quantize="int8")
    manifest = json.load(open(tmp_path / spec.manifest_name("onnx")))
    assert (manifest["quantization"]["mode"], manifest["quantization"]["scheme"]) == (
        "int8", "weight-only")
    assert not [n for n in os.listdir(tmp_path) if "int8cpu" in n]


def test_calibration_file_calibrates_int8_cpu(tmp_path):
    """--calibration reaches the selective quantizer: another file, its sha256 in the manifest,
    still within the gate."""
    rng = np.random.default_rng(2030)
    path = tmp_path / "calib.npz"
    np.savez(path, source1=(2.0 * rng.standard_normal((32, 10, 64))).astype(np.float32),
             source2=(2.0 * rng.standard_normal((32, 10, 64))).astype(np.float32))
    spec = ArtifactSpec(batch=1, quantize="int8-cpu")
    (seeded,) = export_artifacts(ExportRequest(specs={"tflite": spec},
                                               output_dir=str(tmp_path / "seeded")))
    (result,) = export_artifacts(ExportRequest(specs={"tflite": spec}, calibration=str(path),
                                               output_dir=str(tmp_path / "file")))
    manifest = json.load(open(result.manifest_path))
    assert manifest["quantization"]["calibration"]["source"] == "file"
    assert manifest["quantization"]["n_samples"] == 32
    assert manifest["parity"]["rel_l2"] <= GATE
    assert open(result.path, "rb").read() != open(seeded.path, "rb").read()  # other ranges
    assert_core_float_projections_int8(result.path)
