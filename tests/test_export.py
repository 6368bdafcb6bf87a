"""The export pipeline through the library (issue 3): parity per format, graphs, manifests, publish.

Artifacts come from the session `artifact_factory` (one `export_artifacts` call per configuration,
all three formats). Every runtime here is driven directly (onnxruntime, the LiteRT interpreter,
TensorFlow) rather than through `export.runtime.runtimes`, and compared with the published `.keras`
reference loaded by Keras itself, on inputs the pipeline never saw.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from export import publish, reference
from export.errors import ParityError
from export.formats import get_format
from export.pipeline import ExportRequest, export_artifacts
from export.spec import ArtifactSpec

# Per-format parity tolerances (max abs diff vs the Keras reference), float32.
ATOL = {"savedmodel": 1e-5, "onnx": 1e-4, "tflite": 1e-4}
FORMATS = ("savedmodel", "tflite", "onnx")
# Unequal lengths and features, units unlike the features, 1 to 8 heads.
CONFIGS = {
    "u32-h2-q12x16-kv5x24": dict(units=32, heads=2, query_len=12, query_features=16, kv_len=5,
                                 kv_features=24),
    "u16-h8-q7x9-kv11x3": dict(units=16, heads=8, query_len=7, query_features=9, kv_len=11,
                               kv_features=3),
    "u64-h1-q3x40-kv9x8": dict(units=64, heads=1, query_len=3, query_features=40, kv_len=9,
                               kv_features=8),
}
CONFIG_IDS = list(CONFIGS)
SMALL = CONFIG_IDS[0]
# Fresh inputs: neither the pipeline's verification seeds nor the golden seed.
FRESH_SEED = 424242
ONNX_SHAPE_OPS = {"Shape", "ConstantOfShape", "Range", "ReduceProd", "Size", "Loop", "If", "Scan"}
TFLITE_FORBIDDEN = {"SHAPE", "REDUCE_PROD", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE",
                    "CALL_ONCE", "CUSTOM"}
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")
BIAS_INDICES = (1, 3, 5, 7, 9, 11)  # in the layer's 12 weights (fusionlab order)


# -- helpers --------------------------------------------------------------------------------------


def spec_for(config_id: str, fmt: str, **changes) -> ArtifactSpec:
    return ArtifactSpec(**{**CONFIGS[config_id], "batch": get_format(fmt).default_batch, **changes})


def built(artifact_factory, config_id: str):
    """(output_dir, {fmt: ArtifactResult}) of all three formats of one configuration."""
    return artifact_factory(**CONFIGS[config_id])


_REFERENCES: dict[str, object] = {}


def load_reference(path: str):
    """The published `.keras` file, as a user loads it."""
    if path not in _REFERENCES:
        import keras

        import xattn  # noqa: F401  (registers CrossAttention)

        _REFERENCES[path] = keras.saving.load_model(path)
    return _REFERENCES[path]


def reference_outputs(path: str, feeds: dict) -> np.ndarray:
    return np.asarray(load_reference(path)(feeds, training=False)["output"])


def fresh_inputs(spec: ArtifactSpec, rows: int, seed: int = FRESH_SEED) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "source1": rng.standard_normal((rows, spec.query_len, spec.query_features), dtype=np.float32),
        "source2": rng.standard_normal((rows, spec.kv_len, spec.kv_features), dtype=np.float32),
    }


def run_onnx(path: str, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["output"], feeds)[0]


def run_tflite(path: str, feeds: dict) -> np.ndarray:
    """Row by row through the `serving_default` signature (the file's batch is 1)."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner("serving_default")
    rows = len(feeds["source1"])
    return np.concatenate(
        [runner(**{k: v[i:i + 1] for k, v in feeds.items()})["output"] for i in range(rows)]
    )


def run_savedmodel(path: str, feeds: dict) -> np.ndarray:
    import tensorflow as tf

    signature = tf.saved_model.load(path).signatures["serving_default"]
    return signature(**{k: tf.constant(v) for k, v in feeds.items()})["output"].numpy()


RUN = {"onnx": run_onnx, "tflite": run_tflite, "savedmodel": run_savedmodel}


def tflite_interpreter_without_delegates(path: str):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=path,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    return interpreter


def onnx_dims(value) -> list:
    """A graph input/output's dims: an int, or the symbol's name (str) for a symbolic axis."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
            for d in value.type.tensor_type.shape.dim]


def tree_sha256(path: str) -> str:
    """Independent of export.publish: file bytes; a folder's names and bytes in sorted path order."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            digest.update(fh.read())
        return digest.hexdigest()
    entries = sorted(
        (os.path.relpath(os.path.join(root, n), path).replace(os.sep, "/"), n in dirs)
        for root, dirs, names in os.walk(path) for n in dirs + names
    )
    for rel, is_dir in entries:
        if is_dir:
            digest.update(b"dir\0" + rel.encode() + b"\0")
            continue
        with open(os.path.join(path, rel), "rb") as fh:
            data = fh.read()
        digest.update(b"file\0" + rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def snapshot(folder: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = tree_sha256(p)
    return out


def leftovers(folder: str) -> list[str]:
    return [e for e in os.listdir(folder) if e.startswith((".xattn-staging-", ".xattn-trash-"))]


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config_id", CONFIG_IDS)
def test_parity_with_keras_reference(artifact_factory, config_id, fmt):
    out, results = built(artifact_factory, config_id)
    result = results[fmt]
    spec = result.spec
    feeds = fresh_inputs(spec, 3)
    expected = reference_outputs(os.path.join(out, spec.reference_name), feeds)
    got = RUN[fmt](result.path, feeds)
    assert got.shape == (3, spec.query_len, spec.units)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL[fmt])
    # The reference itself is not trivial (a constant or zero output would pass anything).
    assert np.std(expected) > 1e-2


@pytest.mark.parametrize("fmt", ["onnx", "savedmodel"])
def test_dynamic_batch_runs_at_two_sizes(artifact_factory, fmt):
    out, results = built(artifact_factory, SMALL)
    result = results[fmt]
    assert result.spec.batch is None
    for rows, seed in ((1, 11), (6, 12)):
        feeds = fresh_inputs(result.spec, rows, seed)
        got = RUN[fmt](result.path, feeds)
        assert got.shape[0] == rows
        expected = reference_outputs(os.path.join(out, result.spec.reference_name), feeds)
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL[fmt])


# -- ONNX graph -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_id", CONFIG_IDS)
def test_onnx_dynamic_graph_only_batch_symbolic(artifact_factory, config_id):
    import onnx

    _, results = built(artifact_factory, config_id)
    result = results["onnx"]
    onnx.checker.check_model(result.path, full_check=True)
    model = onnx.load(result.path)
    assert [i.name for i in model.graph.input] == ["source1", "source2"]
    assert [o.name for o in model.graph.output] == ["output"]
    expected = {info.name: list(info.shape) for info in result.spec.inputs() + result.spec.outputs()}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = onnx_dims(value)
        assert isinstance(dims[0], str), f"{value.name}: batch axis should be symbolic, got {dims}"
        assert dims[1:] == expected[value.name][1:], value.name
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == result.manifest["opset"]


def test_onnx_fixed_batch_graph_is_static(artifact_factory):
    import onnx

    from export.onnx.build import max_opset

    out, results = artifact_factory(formats=("onnx",), batch=2, **CONFIGS[SMALL])
    result = results["onnx"]
    assert result.spec.batch == 2
    onnx.checker.check_model(result.path, full_check=True)
    model = onnx.load(result.path)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    assert not ops & ONNX_SHAPE_OPS, sorted(ops & ONNX_SHAPE_OPS)
    assert [i.name for i in model.graph.input] == ["source1", "source2"]
    assert [o.name for o in model.graph.output] == ["output"]
    spec = result.spec
    assert [onnx_dims(i) for i in model.graph.input] == [
        [2, spec.query_len, spec.query_features], [2, spec.kv_len, spec.kv_features]
    ]
    assert onnx_dims(model.graph.output[0]) == [2, spec.query_len, spec.units]
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == result.manifest["opset"] == max_opset()
    feeds = fresh_inputs(spec, 2)
    np.testing.assert_allclose(
        run_onnx(result.path, feeds),
        reference_outputs(os.path.join(out, spec.reference_name), feeds), rtol=0, atol=ATOL["onnx"],
    )


# -- TFLite ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_id", CONFIG_IDS)
def test_tflite_builtin_static_and_named(artifact_factory, config_id):
    _, results = built(artifact_factory, config_id)
    result = results["tflite"]
    interpreter = tflite_interpreter_without_delegates(result.path)
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert ops, "no ops read from the interpreter"
    bad = {op for op in ops if op in TFLITE_FORBIDDEN or "FLEX" in op.upper() or "VAR" in op}
    assert not bad, sorted(bad)
    dynamic = [t["name"] for t in interpreter.get_tensor_details()
               if (np.asarray(t["shape_signature"]) < 0).any()]
    assert not dynamic, dynamic
    signatures = interpreter.get_signature_list()
    assert list(signatures) == ["serving_default"]
    assert sorted(signatures["serving_default"]["inputs"]) == ["source1", "source2"]
    assert signatures["serving_default"]["outputs"] == ["output"]
    details = interpreter.get_signature_runner("serving_default").get_input_details()
    spec = result.spec
    assert list(details["source1"]["shape"]) == [1, spec.query_len, spec.query_features]
    assert list(details["source2"]["shape"]) == [1, spec.kv_len, spec.kv_features]


# -- SavedModel -----------------------------------------------------------------------------------


def test_savedmodel_signature_and_constants(artifact_factory):
    import tensorflow as tf

    _, results = built(artifact_factory, SMALL)
    result = results["savedmodel"]
    loaded = tf.saved_model.load(result.path)
    assert list(loaded.signatures) == ["serving_default"]
    signature = loaded.signatures["serving_default"]
    args, kwargs = signature.structured_input_signature
    assert args == ()
    spec = result.spec
    assert {k: tuple(v.shape) for k, v in kwargs.items()} == {
        "source1": (None, spec.query_len, spec.query_features),
        "source2": (None, spec.kv_len, spec.kv_features),
    }
    assert list(signature.structured_outputs) == ["output"]
    # Weights are constants: the signature reads no variable and captures nothing.
    assert tuple(signature.variables) == ()
    assert list(signature.captured_inputs) == []


def test_savedmodel_stores_each_weight_once(artifact_factory):
    from tensorflow.core.protobuf import saved_model_pb2

    _, results = built(artifact_factory, SMALL)
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(results["savedmodel"].path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for fn in graph.library.function for n in fn.node_def]
    weights = [n.attr["value"].tensor.tensor_content for n in nodes if n.op == "Const"]
    weights = [w for w in weights if len(w) >= 1024]
    assert weights, "no weight constants in the graph"
    assert len(weights) == len(set(weights)), "a weight constant is stored more than once"


def test_weights_are_constants_in_onnx_and_tflite(artifact_factory):
    import onnx

    _, results = built(artifact_factory, SMALL)
    model = onnx.load(results["onnx"].path)
    assert [i.name for i in model.graph.input] == ["source1", "source2"]
    initializers = {i.name: i for i in model.graph.initializer}
    weight_count = sum(int(np.prod(i.dims)) for i in initializers.values())
    # At least the folded attention weights are stored in the file itself.
    spec = results["onnx"].spec
    assert weight_count >= spec.query_features * spec.units
    ops = {op["op_name"] for op in tflite_interpreter_without_delegates(
        results["tflite"].path)._get_ops_details()}
    assert not ops & {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE"}


# -- verification catches a broken artifact -------------------------------------------------------


def _zero_bias_builder(monkeypatch, fmt: str, spec: ArtifactSpec, seed: int):
    """Swap format `fmt`'s builder for one converting the right kernels with the biases dropped."""
    import importlib

    from export.graph import build_inference_function, fold_weights

    module = importlib.import_module(f"export.{fmt}.build")
    original = getattr(module, f"build_{fmt}")
    weights = reference.random_weights(spec, seed)
    for i in BIAS_INDICES:
        weights[i] = np.zeros_like(weights[i])
    broken_fn = build_inference_function(spec, fold_weights(weights, spec.heads),
                                         layout=get_format(fmt).layout)

    def broken(spec_, fn, workdir, **kwargs):
        return original(spec_, broken_fn, workdir, **kwargs)

    monkeypatch.setattr(module, f"build_{fmt}", broken)


@pytest.mark.parametrize("fmt", FORMATS)
def test_verification_rejects_dropped_biases(tmp_path, monkeypatch, fmt):
    spec = spec_for(SMALL, fmt)
    _zero_bias_builder(monkeypatch, fmt, spec, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier file\n")
    with pytest.raises(ParityError, match=r"max abs diff .* exceeds atol="):
        export_artifacts(ExportRequest(specs={fmt: spec}, output_dir=str(out), seed=0))
    assert sorted(os.listdir(out)) == sorted(["keep.txt", publish.LOCK_NAME])


def test_verification_rejects_nan_outputs(tmp_path, monkeypatch):
    """What a weightless TFLite returns (NaN) never passes, whatever the tolerance."""
    import export.runtime.runtimes as runtimes

    original = runtimes.load_runner

    def nan_runner(fmt, path, **kwargs):
        runner = original(fmt, path, **kwargs)
        real = runner._fn
        runner._fn = lambda feeds: {k: np.full_like(v, np.nan) for k, v in real(feeds).items()}
        return runner

    monkeypatch.setattr(runtimes, "load_runner", nan_runner)
    spec = spec_for(SMALL, "tflite")
    with pytest.raises(ParityError, match="NaN"):
        export_artifacts(ExportRequest(specs={"tflite": spec}, output_dir=str(tmp_path), seed=0,
                                       atol=1e3))
    assert os.listdir(tmp_path) in ([], [publish.LOCK_NAME])


# -- manifest and golden vectors --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_fields(artifact_factory, fmt):
    out, results = built(artifact_factory, SMALL)
    result = results[fmt]
    spec = result.spec
    with open(os.path.join(out, spec.manifest_name(fmt)), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest == result.manifest
    artifact = os.path.join(out, manifest["artifact"])
    assert manifest["format"] == fmt
    assert manifest["artifact"] == spec.artifact_name(fmt) == os.path.basename(result.path)
    assert os.path.isdir(artifact) if fmt == "savedmodel" else os.path.isfile(artifact)
    assert manifest["sha256"] == tree_sha256(artifact) == publish.sha256_path(artifact)
    assert manifest["bytes"] == publish.size_bytes(artifact) > 0
    batch = None if fmt != "tflite" else 1
    assert manifest["inputs"] == [
        {"name": "source1", "shape": [batch, spec.query_len, spec.query_features], "dtype": "float32"},
        {"name": "source2", "shape": [batch, spec.kv_len, spec.kv_features], "dtype": "float32"},
    ]
    assert manifest["outputs"] == [
        {"name": "output", "shape": [batch, spec.query_len, spec.units], "dtype": "float32"}
    ]
    assert manifest["config"]["units"] == spec.units
    assert manifest["config"]["num_heads"] == spec.heads
    assert manifest["reference"] == spec.reference_name
    assert manifest["golden"] == spec.golden_name
    assert os.path.isfile(os.path.join(out, manifest["reference"]))
    assert os.path.isfile(os.path.join(out, manifest["golden"]))
    if fmt == "onnx":
        assert isinstance(manifest["opset"], int) and manifest["opset"] >= 13
    else:
        assert "opset" not in manifest
    parity = manifest["parity"]
    assert set(parity) == {"runtime", "n_samples", "max_abs", "mean_abs", "rmse", "rel_l2",
                           "cosine", "atol", "passed"}
    runtime = {"onnx": "onnxruntime", "tflite": "ai-edge-litert", "savedmodel": "tensorflow"}[fmt]
    assert parity["runtime"].startswith(runtime)
    assert parity["passed"] is True
    assert parity["atol"] == ATOL[fmt]
    assert parity["n_samples"] >= 3
    assert 0 < parity["max_abs"] <= parity["atol"]
    assert 0 <= parity["mean_abs"] <= parity["rmse"] <= parity["max_abs"]
    assert 0 <= parity["rel_l2"] < 1e-4
    assert parity["cosine"] > 0.999999
    # The figures are the file's, not what the pipeline believed: rerun it here (its runtime,
    # driven directly) on the pipeline's verification batches against the published reference.
    batches = [spec.batch] * 3 if spec.batch is not None else [1, 5, 8]
    assert parity["n_samples"] == sum(batches)
    diffs = []
    for i, rows in enumerate(batches):
        feeds = reference.make_inputs(spec, rows, reference.VERIFY_SEED + i)
        diffs.append(RUN[fmt](artifact, feeds) - reference_outputs(os.path.join(out, spec.reference_name),
                                                                   feeds))
    measured = float(np.max(np.abs(np.concatenate([d.ravel() for d in diffs]))))
    assert measured == pytest.approx(parity["max_abs"], rel=0.05, abs=1e-7), (measured, parity)
    assert {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert",
            "python"} <= set(manifest["versions"])
    assert all(isinstance(v, str) and v for v in manifest["versions"].values())
    assert ISO_UTC.match(manifest["created"]), manifest["created"]
    created = dt.datetime.fromisoformat(manifest["created"].replace("Z", "+00:00"))
    assert created.utcoffset() == dt.timedelta(0)


def test_golden_vectors_are_the_reference_outputs(artifact_factory):
    out, results = built(artifact_factory, SMALL)
    spec = results["onnx"].spec
    with np.load(os.path.join(out, spec.golden_name), allow_pickle=False) as golden:
        arrays = {k: golden[k] for k in golden.files}
    assert sorted(arrays) == ["output", "source1", "source2"]
    assert arrays["source1"].dtype == arrays["output"].dtype == np.float32
    rows = len(arrays["source1"])
    assert rows >= 2 and arrays["source1"].shape == (rows, spec.query_len, spec.query_features)
    feeds = {"source1": arrays["source1"], "source2": arrays["source2"]}
    expected = reference_outputs(os.path.join(out, spec.reference_name), feeds)
    np.testing.assert_allclose(arrays["output"], expected, rtol=0, atol=1e-6)
    # Every published artifact reproduces its golden vectors within its tolerance.
    for fmt, result in results.items():
        np.testing.assert_allclose(RUN[fmt](result.path, feeds), arrays["output"], rtol=0,
                                   atol=ATOL[fmt], err_msg=fmt)


def test_reference_is_a_model_with_named_inputs(artifact_factory):
    from xattn import CrossAttention

    out, results = built(artifact_factory, SMALL)
    model = load_reference(os.path.join(out, results["onnx"].spec.reference_name))
    assert sorted(t.name for t in model.inputs) == ["source1", "source2"]
    layers = [layer for layer in model.layers if isinstance(layer, CrossAttention)]
    assert len(layers) == 1
    # Every weight, biases included, is random and non-zero.
    for w in layers[0].get_weights():
        assert np.count_nonzero(w) == w.size


# -- publishing -----------------------------------------------------------------------------------


def test_rerun_replaces_files(artifact_factory, tmp_path):
    """The same configuration exported twice more into a folder that already holds it."""
    first_out, _ = built(artifact_factory, SMALL)
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    # Every format of the name at once: new weights replace the shared reference and golden.
    specs = {fmt: spec_for(SMALL, fmt) for fmt in FORMATS}
    names = set(os.listdir(out))
    for seed in (1, 2):
        results = export_artifacts(ExportRequest(specs=specs, output_dir=str(out), seed=seed))
        assert set(os.listdir(out)) == names
        assert not leftovers(str(out))
        for r in results:
            with open(r.manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            assert manifest["weights"] == f"seed {seed}"
            assert manifest["sha256"] == tree_sha256(r.path)
    # The last run's artifacts are in place: they reproduce the last reference.
    spec = specs["onnx"]
    _REFERENCES.pop(str(out / spec.reference_name), None)
    feeds = fresh_inputs(spec, 2)
    expected = reference_outputs(str(out / spec.reference_name), feeds)
    for fmt in specs:
        np.testing.assert_allclose(RUN[fmt](str(out / spec.artifact_name(fmt)), feeds), expected,
                                   rtol=0, atol=ATOL[fmt], err_msg=fmt)


def test_specs_must_agree_except_batch(tmp_path):
    from export.errors import SpecError

    a = spec_for(SMALL, "onnx")
    b = dataclasses.replace(spec_for(SMALL, "tflite"), units=8, name="")
    with pytest.raises(SpecError):
        export_artifacts(ExportRequest(specs={"onnx": a, "tflite": b}, output_dir=str(tmp_path)))


def test_other_weights_under_a_shared_name_are_refused(artifact_factory, tmp_path):
    """One name = one set of weights: replacing the golden file that other formats' manifests
    are verified with is refused before anything is built; the same weights re-export fine."""
    from export.errors import SpecError

    src, _ = built(artifact_factory, SMALL)
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    onnx_only = {"onnx": spec_for(SMALL, "onnx")}
    with pytest.raises(SpecError, match=r"built from other weights .* --name"):
        export_artifacts(ExportRequest(specs=onnx_only, output_dir=str(out), seed=1))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # The weights the folder was built with (seed 0): fine, and --name keeps both.
    export_artifacts(ExportRequest(specs=onnx_only, output_dir=str(out), seed=0))
    renamed = {"onnx": spec_for(SMALL, "onnx", name="other")}
    export_artifacts(ExportRequest(specs=renamed, output_dir=str(out), seed=1))
    assert (out / "other.onnx").is_file() and (out / "other.golden.npz").is_file()
