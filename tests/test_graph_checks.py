"""The graph checks reject what the README promises users never see (issue 17).

`check_onnx_graph` and `check_tflite_graph` are fed small hand-made files that break one rule
each (ONNX built with onnx.helper; TFLite converted from tiny tf.functions), and the pipeline is
shown to refuse to publish a file its builder returned that breaks a rule.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import cli
from export.errors import GraphCheckError
from export.onnx.check import check_onnx_graph, onnx_op_types
from export.tflite import check as tflite_check
from export.tflite.check import check_tflite_graph

NAMES = dict(input_names=["source1"], output_names=["output"])
# A tiny configuration for the pipeline cases (its files are small and quick to build).
TINY = ["--units", "4", "--heads", "1", "--query-len", "2", "--kv-len", "3",
        "--query-features", "3", "--kv-features", "2", "--quiet"]


# -- ONNX ------------------------------------------------------------------------------------------


def onnx_file(path, nodes, *, inputs=(("source1", [1, 3, 4]),), outputs=(("output", [1, 3, 4]),),
              initializers=(), opset=17) -> str:
    """A model of `nodes` with float inputs/outputs of the given dims (str: a symbolic axis)."""
    graph = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def relu(src="source1", dst="output"):
    return helper.make_node("Relu", [src], [dst])


def loop_nodes():
    """A Loop of one trip carrying a scalar through; its result is unused."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
    )
    def constant(name, kind, value):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, kind, [], [value]))

    return [
        constant("trips", TensorProto.INT64, 1), constant("cond", TensorProto.BOOL, True),
        constant("v", TensorProto.FLOAT, 1.0),
        helper.make_node("Loop", ["trips", "cond", "v"], ["v_final"], body=body),
        relu(),
    ]


def range_nodes():
    scalar = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [v]))
    return [scalar("start", 0.0), scalar("limit", 4.0), scalar("delta", 1.0),
            helper.make_node("Range", ["start", "limit", "delta"], ["steps"]),
            helper.make_node("Add", ["source1", "steps"], ["output"])]


def shape_nodes():
    return [helper.make_node("Shape", ["source1"], ["dims"]),
            helper.make_node("Reshape", ["source1", "dims"], ["output"])]


def test_a_clean_graph_passes(tmp_path):
    """The rules below fail on what they name, not on any graph."""
    check_onnx_graph(onnx_file(tmp_path / "ok.onnx", [relu()]), fixed_batch=True, **NAMES)
    dynamic = onnx_file(tmp_path / "dyn.onnx", shape_nodes(), inputs=[("source1", ["batch", 3, 4])],
                        outputs=[("output", ["batch", 3, 4])])
    # At a dynamic batch, shape arithmetic is allowed.
    check_onnx_graph(dynamic, fixed_batch=False, **NAMES)
    check_onnx_graph(dynamic, fixed_batch=True, symbolic_axes={"source1": [0], "output": [0]}, **NAMES)


ONNX_CASES = {
    "shape-op-fixed-batch": (
        lambda p: onnx_file(p, shape_nodes()), dict(fixed_batch=True),
        "run-time shape ops in a fixed-batch graph: ['Shape']"),
    "range-op-fixed-batch": (
        lambda p: onnx_file(p, range_nodes()), dict(fixed_batch=True),
        "run-time shape ops in a fixed-batch graph: ['Range']"),
    "loop-op-fixed-batch": (
        lambda p: onnx_file(p, loop_nodes()), dict(fixed_batch=True),
        "run-time shape ops in a fixed-batch graph: ['Loop']"),
    "symbolic-query-axis": (
        lambda p: onnx_file(p, [relu()], inputs=[("source1", ["batch", "q", 4])],
                            outputs=[("output", ["batch", 3, 4])]),
        dict(fixed_batch=False), "source1 has symbolic axes [0, 1], expected [0]"),
    "symbolic-batch-when-fixed": (
        lambda p: onnx_file(p, [relu()], inputs=[("source1", ["batch", 3, 4])]),
        dict(fixed_batch=True), "source1 has symbolic axes [0], expected []"),
    "static-batch-when-dynamic": (
        lambda p: onnx_file(p, [relu()], outputs=[("output", ["batch", 3, 4])]),
        dict(fixed_batch=False), "source1 has symbolic axes [], expected [0]"),
    "symbolic-axis-not-in-spec": (
        lambda p: onnx_file(p, [relu()], outputs=[("output", [1, "q", 4])]),
        dict(fixed_batch=True, symbolic_axes={"source1": [], "output": []}),
        "output has symbolic axes [1], expected []"),
    "wrong-input-name": (
        lambda p: onnx_file(p, [relu("x")], inputs=[("x", [1, 3, 4])]), dict(fixed_batch=True),
        "inputs ['x'] / outputs ['output'], expected ['source1'] / ['output']"),
    "wrong-output-name": (
        lambda p: onnx_file(p, [relu(dst="y")], outputs=[("y", [1, 3, 4])]), dict(fixed_batch=True),
        "inputs ['source1'] / outputs ['y'], expected ['source1'] / ['output']"),
    "extra-input": (
        lambda p: onnx_file(p, [relu()], inputs=[("source1", [1, 3, 4]), ("source2", [1, 3, 4])]),
        dict(fixed_batch=True), "inputs ['source1', 'source2'] / outputs ['output']"),
    "not-an-onnx-op": (
        lambda p: onnx_file(p, [helper.make_node("TFL_Gelu", ["source1"], ["output"], name="scope/gelu")]),
        dict(fixed_batch=True), "op TFL_Gelu is not an ONNX op (nodes ['scope/gelu'])"),
}


@pytest.mark.parametrize("case", list(ONNX_CASES), ids=list(ONNX_CASES))
def test_onnx_check_rejects(tmp_path, case):
    make, options, message = ONNX_CASES[case]
    path = make(tmp_path / f"{case}.onnx")
    with pytest.raises(GraphCheckError) as info:
        check_onnx_graph(path, **NAMES, **options)
    assert message in str(info.value) and str(info.value).startswith(path)


def test_onnx_check_rejects_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x08not a protobuf at all")
    with pytest.raises(GraphCheckError, match="onnx.checker rejects the model"):
        check_onnx_graph(str(path), fixed_batch=True, **NAMES)


# -- TFLite ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tflite_files(tmp_path_factory):
    """name -> a tiny .tflite breaking one rule (or none: "ok").

    Under `make mutation` (a session per mutant) they are converted once, into XATTN_TEST_ARTIFACTS:
    only TensorFlow's converter makes them, no code of this project.
    """
    import tensorflow as tf

    keep = os.environ.get("XATTN_TEST_ARTIFACTS")
    folder = Path(keep, "tflite-rules") if keep else tmp_path_factory.mktemp("tflite-rules")
    folder.mkdir(parents=True, exist_ok=True)

    def convert(name, fn, shape, *, select=False, custom=False, dtype=tf.float32):
        path = folder / f"{name}.tflite"
        if path.is_file():
            return str(path)
        concrete = tf.function(fn, input_signature=[tf.TensorSpec(shape, dtype)]).get_concrete_function()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
        if select:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                                   tf.lite.OpsSet.SELECT_TF_OPS]
        converter.allow_custom_ops = custom
        partial = folder / f"{name}.tflite.{os.getpid()}"
        partial.write_bytes(converter.convert())
        os.replace(partial, path)
        return str(path)

    def loop(x):
        return tf.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y * 2.0), [tf.constant(0), x])[1]

    return {
        "ok": convert("ok", lambda x: x * 2.0, [1, 4]),
        "shape": convert("shape", lambda x: tf.reshape(x, tf.stack([tf.shape(x)[0], 2, 2])), [None, 4]),
        "dynamic": convert("dynamic", lambda x: x * 2.0 + 1.0, [None, 4]),
        "while": convert("while", loop, [1, 4]),
        "flex": convert("flex", tf.linalg.inv, [1, 2, 2], select=True),
        "custom": convert("custom", tf.linalg.inv, [1, 2, 2], custom=True),
    }


TFLITE_CASES = {
    "shape-op": "non-builtin or dynamic ops ['SHAPE']",
    "while-op": "non-builtin or dynamic ops ['WHILE']",
    "dynamic-tensor": "tensors with a dynamic shape: [",
    "flex-op": "LiteRT cannot load it with builtin ops only: Select TensorFlow op(s)",
    "custom-op": "LiteRT cannot load it with builtin ops only: Encountered unresolved custom op",
}


def test_a_clean_tflite_file_passes(tflite_files):
    check_tflite_graph(tflite_files["ok"])


@pytest.mark.parametrize("case", list(TFLITE_CASES), ids=list(TFLITE_CASES))
def test_tflite_check_rejects(tflite_files, case):
    path = tflite_files[case.split("-")[0]]
    with pytest.raises(GraphCheckError) as info:
        check_tflite_graph(path)
    assert TFLITE_CASES[case] in str(info.value) and str(info.value).startswith(path)


def test_dynamic_tflite_tensors_are_named(tflite_files):
    with pytest.raises(GraphCheckError) as info:
        check_tflite_graph(tflite_files["dynamic"])
    listed = str(info.value).split("dynamic shape: ")[1]
    assert listed.startswith("[") and "mul" in listed


@pytest.mark.parametrize("op", ["FlexMatrixInverse", "CUSTOM", "VAR_HANDLE", "REDUCE_PROD"])
def test_tflite_forbidden_op_names(tflite_files, monkeypatch, op):
    """An interpreter linked with the Flex delegate (or a custom-op resolver) would load such a
    file: the op names alone must refuse it."""
    monkeypatch.setattr(tflite_check, "tflite_op_names", lambda path: ["FULLY_CONNECTED", op, "ADD"])
    with pytest.raises(GraphCheckError, match=rf"non-builtin or dynamic ops \['{op}'\]"):
        check_tflite_graph(tflite_files["ok"])


class FakeInterpreter:
    """LiteRT's Interpreter as check_tflite_graph sees it: tensors with these shape signatures."""

    signatures: dict = {}

    def __init__(self, model_path):
        self.model_path = model_path

    def get_tensor_details(self):
        return [{"name": n, "shape_signature": np.array(s, np.int32)} for n, s in self.signatures.items()]


def test_tflite_dynamic_means_minus_one_and_five_names_are_listed(tflite_files, monkeypatch):
    """A zero-size axis is static (only -1 marks a dynamic one); of many dynamic tensors, the
    first five are named."""
    monkeypatch.setattr(tflite_check, "tflite_op_names", lambda path: ["MUL"])
    monkeypatch.setattr(tflite_check, "Interpreter", FakeInterpreter)
    monkeypatch.setattr(FakeInterpreter, "signatures", {"x": [1, 4], "empty": [1, 0], "scalar": []})
    check_tflite_graph(tflite_files["ok"])
    dynamic = {f"t{i}": [-1, 4] for i in range(7)}
    monkeypatch.setattr(FakeInterpreter, "signatures", {"x": [1, 4], **dynamic})
    with pytest.raises(GraphCheckError) as info:
        check_tflite_graph(tflite_files["ok"])
    assert str(info.value) == (f"{tflite_files['ok']}: tensors with a dynamic shape: "
                               "['t0', 't1', 't2', 't3', 't4']")


def test_tflite_check_rejects_a_file_that_is_not_tflite(tmp_path):
    path = tmp_path / "junk.tflite"
    path.write_bytes(b"not a flatbuffer" * 4)
    with pytest.raises(GraphCheckError, match="LiteRT cannot load it"):
        check_tflite_graph(str(path))


# -- the pipeline refuses to publish what a check rejects --------------------------------------------


def _published(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if os.path.isdir(folder) else []


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_pipeline_refuses_to_publish_a_file_breaking_a_rule(tmp_path, monkeypatch, capsys, tflite_files, fmt):
    """A builder handing back a bad file (a Shape op at a fixed batch; a WHILE loop): exit 1,
    one line naming the rule, nothing published (not even the reference or golden vectors)."""
    import shutil

    from export.formats import Built

    def bad_build(spec, fn, workdir, **options):
        path = os.path.join(workdir, spec.artifact_name(fmt))
        if fmt == "onnx":
            onnx_file(path, shape_nodes() + [helper.make_node("Identity", ["source2"], ["unused"])],
                      inputs=[("source1", [1, 2, 3]), ("source2", [1, 3, 2])],
                      outputs=[("output", [1, 2, 3])])
            return Built(path, {"opset": 17})
        shutil.copyfile(tflite_files["while"], path)
        return Built(path, {})

    module = {"onnx": "export.onnx.build", "tflite": "export.tflite.build"}[fmt]
    monkeypatch.setattr(f"{module}.build_{fmt}", bad_build)
    out = tmp_path / "out"
    code = cli.main([*TINY, "--batch", "1", "--output-dir", str(out)], formats=(fmt,),
                    prog=f"python -m export.{fmt}")
    err = capsys.readouterr().err
    assert code == GraphCheckError.exit_code == 1
    assert err.count("\n") == 1, err
    rule = "run-time shape ops in a fixed-batch graph" if fmt == "onnx" else "non-builtin or dynamic ops"
    assert rule in err
    assert _published(out) == []


def test_graph_check_runs_before_verification(tmp_path, monkeypatch):
    """The check is not skipped when the file would pass parity: a real file, a check that
    rejects it, nothing published."""
    from export.formats import REGISTRY
    from export.pipeline import ExportRequest, export_artifacts
    from export.spec import ArtifactSpec

    seen = []

    def rejecting(path, spec):
        seen.append(os.path.basename(path))
        raise GraphCheckError(f"{path}: rejected on purpose")

    monkeypatch.setattr("export.onnx.check.check_onnx_file", rejecting)
    spec = ArtifactSpec(units=4, heads=1, query_len=2, kv_len=3, query_features=3, kv_features=2)
    with pytest.raises(GraphCheckError, match="rejected on purpose"):
        export_artifacts(ExportRequest(specs={"onnx": spec}, output_dir=str(tmp_path)))
    assert seen == [spec.artifact_name("onnx")]
    assert REGISTRY["onnx"].graph_check == "export.onnx.check:check_onnx_file"
    assert _published(tmp_path) == []
    assert np.all([not n.endswith(".json") for n in os.listdir(tmp_path)])


# -- details of the ONNX rules -----------------------------------------------------------------------


def test_onnx_check_full_shape_inference(tmp_path):
    """full_check: shapes that cannot agree are refused even though every node is valid."""
    path = onnx_file(tmp_path / "shapes.onnx", [helper.make_node("Add", ["source1", "other"], ["output"])],
                     inputs=[("source1", [1, 3, 4]), ("other", [1, 5, 4])])
    with pytest.raises(GraphCheckError, match="onnx.checker rejects the model"):
        check_onnx_graph(path, fixed_batch=True, input_names=["source1", "other"], output_names=["output"])


def test_onnx_check_names_three_unknown_nodes(tmp_path):
    nodes = [helper.make_node("Relu", ["source1"], ["x0"])]
    nodes += [helper.make_node("TFL_Gelu", [f"x{i}"], [f"x{i + 1}"], name=f"n{i}") for i in range(4)]
    nodes += [helper.make_node("Relu", ["x4"], ["output"])]
    three = r"op TFL_Gelu is not an ONNX op \(nodes \['n0', 'n1', 'n2'\]\)"
    with pytest.raises(GraphCheckError, match=three):
        check_onnx_graph(onnx_file(tmp_path / "four.onnx", nodes), fixed_batch=True, **NAMES)


def test_onnx_check_looks_inside_local_functions(tmp_path):
    """A Shape op hidden in a model-local function counts too."""
    function = helper.make_function(
        "local", "ShapeThenReshape", ["x"], ["y"],
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
        opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("ShapeThenReshape", ["source1"], ["output"], domain="local")], "g",
        [helper.make_tensor_value_info("source1", TensorProto.FLOAT, [1, 3, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 4])])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    path = str(tmp_path / "function.onnx")
    onnx.save(model, path)
    with pytest.raises(GraphCheckError, match=r"run-time shape ops in a fixed-batch graph: \['Shape'\]"):
        check_onnx_graph(path, fixed_batch=True, **NAMES)


def test_onnx_rules_read_the_graph_never_the_weights(tmp_path, monkeypatch):
    """Weights in external data (beside a model over 2 GB) are not loaded to check the graph:
    onnx.checker checks the data file is there, the rules read only the graph."""
    weights = numpy_helper.from_array(np.ones((1, 3, 4), np.float32), "w")
    path = onnx_file(tmp_path / "ext.onnx", [helper.make_node("Add", ["source1", "w"], ["output"])],
                     initializers=[weights])
    onnx.save_model(onnx.load(path), path, save_as_external_data=True, location="ext.weights",
                    size_threshold=0)
    assert os.path.getsize(tmp_path / "ext.weights") == 12 * 4  # the weights are out of the .onnx
    loaded = []
    real = onnx.load_external_data_for_model
    monkeypatch.setattr(onnx, "load_external_data_for_model",
                        lambda model, base_dir: (loaded.append(base_dir), real(model, base_dir))[1])
    check_onnx_graph(path, fixed_batch=True, **NAMES)
    assert onnx_op_types(path) == ["Add"]
    assert loaded == []
    onnx.load(path)
    assert loaded == [str(tmp_path)]  # the spy does see a load that reads the weights


def test_onnx_symbolic_axes_default_for_unlisted_tensors(tmp_path):
    """A tensor the spec's axes do not list keeps the batch rule."""
    path = onnx_file(tmp_path / "ok.onnx", [relu()], inputs=[("source1", ["batch", 3, 4])],
                     outputs=[("output", ["batch", 3, 4])])
    check_onnx_graph(path, fixed_batch=False, symbolic_axes={"source1": [0]}, **NAMES)
    with pytest.raises(GraphCheckError, match="output has symbolic axes"):
        check_onnx_graph(path, fixed_batch=True, symbolic_axes={"source1": [0]}, **NAMES)


def test_check_onnx_file_takes_batch_and_names_from_the_spec(tmp_path):
    from export.onnx.check import check_onnx_file
    from export.spec import ArtifactSpec

    spec = ArtifactSpec(units=4, heads=1, query_len=2, kv_len=3, query_features=3, kv_features=2)
    inputs = lambda b: [("source1", [b, 2, 3]), ("source2", [b, 3, 2])]  # noqa: E731
    nodes = [helper.make_node("Identity", ["source1"], ["output"])]
    dynamic = onnx_file(tmp_path / "dynamic.onnx", nodes, inputs=inputs("batch"),
                        outputs=[("output", ["batch", 2, 3])])
    fixed = onnx_file(tmp_path / "fixed.onnx", nodes, inputs=inputs(1), outputs=[("output", [1, 2, 3])])
    check_onnx_file(dynamic, spec)
    check_onnx_file(fixed, spec.replace(batch=1))
    with pytest.raises(GraphCheckError, match=r"source1 has symbolic axes \[\], expected \[0\]"):
        check_onnx_file(fixed, spec)
    with pytest.raises(GraphCheckError, match=r"source1 has symbolic axes \[0\], expected \[\]"):
        check_onnx_file(dynamic, spec.replace(batch=1))
    with pytest.raises(GraphCheckError, match=r"expected \['source1', 'source2'\] / \['output'\]"):
        check_onnx_file(onnx_file(tmp_path / "one.onnx", nodes, inputs=inputs(1)[:1],
                                  outputs=[("output", [1, 2, 3])]), spec.replace(batch=1))
    # A symbolic query length: its axis is allowed where the spec has it, and only there.
    free = spec.replace(query_len=None)
    by_length = onnx_file(tmp_path / "length.onnx", nodes, inputs=[("source1", ["batch", "q", 3]),
                                                                    ("source2", ["batch", 3, 2])],
                          outputs=[("output", ["batch", "q", 3])])
    check_onnx_file(by_length, free)
    with pytest.raises(GraphCheckError, match=r"source1 has symbolic axes \[0, 1\], expected \[0\]"):
        check_onnx_file(by_length, spec)


@pytest.fixture(scope="module")
def looping_tflite(tmp_path_factory) -> str:
    """A builtin-only TFLite file holding a WHILE (an LSTM-like loop), static inputs and outputs:
    what a user's `--saved-model` graph may be, and what our own graphs never are."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32)])
    def loop(x):
        def body(i, acc):
            return i + 1, acc * 0.5 + tf.cast(i, tf.float32)

        _, out = tf.while_loop(lambda i, acc: i < 3, body, (tf.constant(0), x))
        return {"y": out}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([loop.get_concrete_function()], loop)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path = tmp_path_factory.mktemp("loop") / "loop.tflite"
    path.write_bytes(converter.convert())
    assert "WHILE" in tflite_check.tflite_op_names(str(path))
    return str(path)


def test_a_loop_passes_only_the_check_of_a_users_graph(looping_tflite):
    from types import SimpleNamespace

    with pytest.raises(GraphCheckError, match=r"non-builtin or dynamic ops \['WHILE'\]"):
        tflite_check.check_tflite_file(looping_tflite)
    with pytest.raises(GraphCheckError, match=r"\['WHILE'\]"):
        tflite_check.check_tflite_file(looping_tflite, SimpleNamespace(user_graph=False))
    with pytest.raises(GraphCheckError, match=r"\['WHILE'\]"):
        check_tflite_graph(looping_tflite)
    # A --saved-model graph (spec.user_graph) may loop; its inputs and outputs stay static.
    tflite_check.check_tflite_file(looping_tflite, SimpleNamespace(user_graph=True))
    check_tflite_graph(looping_tflite, allowed=tflite_check.USER_GRAPH_OPS)
    with pytest.raises(GraphCheckError, match=r"\['WHILE'\]"):
        check_tflite_graph(looping_tflite, allowed=tflite_check.USER_GRAPH_OPS - {"WHILE"})


def test_shape_ops_pass_only_the_onnx_check_of_a_users_graph(tmp_path):
    """A `--saved-model` graph (SavedModelSpec: user_graph) may read shapes and loop at a fixed
    batch; a `--model` or layer graph of the same tensors may not; both keep the names and axes."""
    from export.model import ModelSpec
    from export.onnx.check import check_onnx_file
    from export.saved_model_reference import SavedModelSpec
    from export.spec import ArtifactSpec, TensorInfo

    tensors = dict(model_inputs=(TensorInfo("source1", (3, 4), "float32"),),
                   model_outputs=(TensorInfo("output", (3, 4), "float32"),), stem="m", batch=1)
    users, ours = SavedModelSpec(**tensors), ModelSpec(**tensors)
    assert users.user_graph is True
    assert ours.user_graph is False and ArtifactSpec(units=4, heads=1).user_graph is False
    for name, nodes in [("shape", shape_nodes()), ("loop", loop_nodes()), ("range", range_nodes())]:
        path = onnx_file(tmp_path / f"{name}.onnx", nodes)
        check_onnx_file(path, users)
        with pytest.raises(GraphCheckError, match="run-time shape ops in a fixed-batch graph"):
            check_onnx_file(path, ours)
    # The allowance is for ops only: a user's graph keeps the spec's names and static axes.
    symbolic = onnx_file(tmp_path / "symbolic.onnx", shape_nodes(), inputs=[("source1", ["b", 3, 4])])
    with pytest.raises(GraphCheckError, match=r"source1 has symbolic axes \[0\], expected \[\]"):
        check_onnx_file(symbolic, users)
    renamed = onnx_file(tmp_path / "renamed.onnx", [relu(dst="y")], outputs=[("y", [1, 3, 4])])
    with pytest.raises(GraphCheckError, match=r"outputs \['y'\], expected"):
        check_onnx_file(renamed, users)
