"""Tests for `xattn.CrossAttention` against fusionlab-learn's original composition (issue 2).

Every weight is random and non-zero (biases included) and every generator is seeded. The
reference is a faithful replica of fusionlab's layer: two `Dense(units)` and a Keras
`MultiHeadAttention(num_heads, key_dim=units)`, created in that order in `__init__`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import xattn
from xattn import CrossAttention

SEED = 1234
BATCH = 3
WEIGHT_SCALE = 0.3
# float32, our layer against the reference composition with the same weights.
PARITY_ATOL = 1e-5
# The same saved model run again (other process, or a restored copy): only op order may differ.
RELOAD_ATOL = 1e-6
# Ops that compute shapes at run time; a trace with fully known shapes must hold none.
SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})
NUM_WEIGHTS = 12


class Fusionlab:
    """Stands in for `fusionlab.nn.components`.

    The replica keeps the original's class name: inside a functional model, `.weights.h5`
    paths start with the snake-cased class name (`layers/cross_attention/...`).
    """

    class CrossAttention(keras.layers.Layer):
        """fusionlab-learn's CrossAttention, as published; only the call arguments are new."""

        def __init__(self, units, num_heads, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.num_heads = num_heads
            self.source1_dense = keras.layers.Dense(units)
            self.source2_dense = keras.layers.Dense(units)
            self.cross_attention = keras.layers.MultiHeadAttention(
                num_heads=num_heads, key_dim=units
            )

        def call(
            self,
            inputs,
            training=False,
            attention_mask=None,
            use_causal_mask=False,
            return_attention_scores=False,
        ):
            source1, source2 = inputs
            source1 = self.source1_dense(source1)
            source2 = self.source2_dense(source2)
            return self.cross_attention(
                query=source1,
                value=source2,
                key=source2,
                attention_mask=attention_mask,
                use_causal_mask=use_causal_mask,
                return_attention_scores=return_attention_scores,
                training=training,
            )


@dataclass(frozen=True)
class LayerCase:
    units: int
    num_heads: int
    q_len: int
    q_features: int
    kv_len: int
    kv_features: int

    @property
    def id(self) -> str:
        return (
            f"u{self.units}-h{self.num_heads}-q{self.q_len}x{self.q_features}"
            f"-kv{self.kv_len}x{self.kv_features}"
        )

    @property
    def input_shapes(self) -> list[tuple[int, int, int]]:
        return [(BATCH, self.q_len, self.q_features), (BATCH, self.kv_len, self.kv_features)]

    def weight_shapes(self) -> list[tuple[int, ...]]:
        """fusionlab's `get_weights()` layout, written out from the issue."""
        u, h = self.units, self.num_heads
        return [
            (self.q_features, u), (u,),  # source1_dense
            (self.kv_features, u), (u,),  # source2_dense
            (u, h, u), (h, u),  # query
            (u, h, u), (h, u),  # key
            (u, h, u), (h, u),  # value
            (h, u, u), (u,),  # attention output
        ]  # fmt: skip


CASES = [
    LayerCase(32, 2, 12, 16, 5, 24),  # Tq > Tkv, Fq != Fkv, units unlike both
    LayerCase(8, 1, 6, 20, 9, 12),  # one head, Tq < Tkv
    LayerCase(16, 3, 7, 5, 7, 5),  # equal lengths and features, units larger
    LayerCase(4, 8, 10, 32, 3, 6),  # eight small heads
    LayerCase(24, 5, 1, 7, 4, 9),  # a single query position
]
CASE_IDS = [case.id for case in CASES]

# Which masks a scenario passes; "causal" is `use_causal_mask=True`.
MASK_SCENARIOS = {
    "no-mask": (),
    "query-mask": ("query_mask",),
    "value-mask": ("value_mask",),
    "attention-mask": ("attention_mask",),
    "causal": ("causal",),
    "query-value-masks": ("query_mask", "value_mask"),
    "all-masks-causal": ("query_mask", "value_mask", "attention_mask", "causal"),
}


@pytest.fixture(autouse=True)
def _seed_everything():
    keras.utils.set_random_seed(SEED)


def max_abs_diff(a, b) -> float:
    a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(a.astype("float64") - b.astype("float64")), initial=0.0))


def random_weights(layer: keras.layers.Layer, rng: np.random.Generator) -> list[np.ndarray]:
    return [
        (rng.normal(size=w.shape) * WEIGHT_SCALE).astype(w.dtype) for w in layer.get_weights()
    ]


def random_inputs(case: LayerCase, rng: np.random.Generator, batch: int = BATCH):
    return [
        rng.normal(size=(batch, case.q_len, case.q_features)).astype("float32"),
        rng.normal(size=(batch, case.kv_len, case.kv_features)).astype("float32"),
    ]


def build_reference(case: LayerCase, inputs) -> Fusionlab.CrossAttention:
    reference = Fusionlab.CrossAttention(case.units, case.num_heads)
    reference(inputs)  # the original builds lazily, on its first call
    return reference


@dataclass
class Pair:
    """Our layer and the reference with the same random weights, and data to feed them."""

    case: LayerCase
    ours: CrossAttention
    reference: Fusionlab.CrossAttention
    inputs: list[np.ndarray]
    query_mask: np.ndarray  # (B, Tq)
    value_mask: np.ndarray  # (B, Tkv)
    attention_mask: np.ndarray  # (B, Tq, Tkv)

    def mask_arguments(self, scenario: str) -> tuple[dict, dict, np.ndarray]:
        """Keyword arguments for ours and for the reference, and the merged (B, Tq, Tkv) mask.

        Keras' MHA.call ignores its `query_mask` argument (it reads the Keras mask of the
        query tensor), so the reference gets query and value masks folded into
        `attention_mask`, as `query_mask[:, :, None] & value_mask[:, None, :]`.
        """
        parts = MASK_SCENARIOS[scenario]
        q_len, kv_len = self.case.q_len, self.case.kv_len
        merged = np.ones((BATCH, q_len, kv_len), dtype=bool)
        ours = {}
        if "query_mask" in parts:
            ours["query_mask"] = self.query_mask
            merged &= self.query_mask[:, :, None]
        if "value_mask" in parts:
            ours["value_mask"] = self.value_mask
            merged &= self.value_mask[:, None, :]
        if "attention_mask" in parts:
            ours["attention_mask"] = self.attention_mask
            merged &= self.attention_mask
        reference = {"use_causal_mask": "causal" in parts}
        if ours:
            reference["attention_mask"] = merged.copy()
        if "causal" in parts:
            ours["use_causal_mask"] = True
            merged &= np.tril(np.ones((q_len, kv_len), dtype=bool))
        return ours, reference, merged


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def pair(request) -> Pair:
    case = request.param
    rng = np.random.default_rng(SEED)
    inputs = random_inputs(case, rng)
    reference = build_reference(case, inputs)
    reference.set_weights(random_weights(reference, rng))
    ours = CrossAttention(case.units, case.num_heads)
    ours.build(case.input_shapes)
    ours.set_weights(reference.get_weights())

    query_mask = rng.random((BATCH, case.q_len)) < 0.7
    query_mask[0] = True
    value_mask = rng.random((BATCH, case.kv_len)) < 0.7
    value_mask[0, 0] = True
    value_mask[-1] = False  # one sample with nothing to attend to
    attention_mask = rng.random((BATCH, case.q_len, case.kv_len)) < 0.6
    attention_mask[0, :, 0] = True
    return Pair(case, ours, reference, inputs, query_mask, value_mask, attention_mask)


# --- The shared layer checks (keras-hub `run_layer_test` manner) ---------------------------


@dataclass
class SavedLayerModel:
    """A `.keras` file of a model holding the layer, its inputs and expected outputs (`.npy`)."""

    name: str
    model: Path
    inputs: dict[str, Path]
    expected: list[Path]
    config: dict

    def manifest_entry(self) -> dict:
        return {
            "name": self.name,
            "model": str(self.model),
            "inputs": {key: str(path) for key, path in self.inputs.items()},
            "expected": [str(path) for path in self.expected],
            "config": self.config,
        }


def save_layer_model(
    layer: CrossAttention, case: LayerCase, directory: Path, *, call_kwargs=None
) -> SavedLayerModel:
    """Save a `keras.Model` (inputs `source1`, `source2`) holding `layer`, with test data."""
    directory.mkdir(parents=True, exist_ok=True)
    source1 = keras.Input((case.q_len, case.q_features), name="source1")
    source2 = keras.Input((case.kv_len, case.kv_features), name="source2")
    outputs = layer([source1, source2], **(call_kwargs or {}))
    model = keras.Model([source1, source2], outputs)
    model_path = directory / "model.keras"
    model.save(model_path)

    data = dict(zip(("source1", "source2"), random_inputs(case, np.random.default_rng(SEED))))
    inputs = {}
    for key, array in data.items():
        inputs[key] = directory / f"{key}.npy"
        np.save(inputs[key], array, allow_pickle=False)
    results = model(data)
    results = results if isinstance(results, (list, tuple)) else [results]
    expected = []
    for index, result in enumerate(results):
        expected.append(directory / f"expected_{index}.npy")
        np.save(expected[-1], keras.ops.convert_to_numpy(result), allow_pickle=False)
    config = json.loads(json.dumps(layer.get_config()))
    return SavedLayerModel(directory.name, model_path, inputs, expected, config)


def run_layer_checks(
    case: LayerCase, directory: Path, *, call_kwargs=None, **options
) -> SavedLayerModel:
    """Config round trips, explicit build, symbolic and eager calls, `.keras` save and reload.

    `options` are further constructor arguments. Returns the saved model so a caller can
    reload it in a fresh process.
    """
    layer = CrossAttention(case.units, case.num_heads, **options)
    units, heads = layer.units, layer.num_heads
    q_len, kv_len = case.q_len, case.kv_len

    # Config: through JSON, and through Keras' own (de)serialization.
    config = layer.get_config()
    restored = CrossAttention.from_config(json.loads(json.dumps(config)))
    assert restored.get_config() == config
    deserialized = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(deserialized) is CrossAttention
    assert deserialized.get_config() == config

    # Explicit build: every sublayer and every weight, before any call.
    layer.build([list(shape) for shape in case.input_shapes])
    assert layer.built
    for sublayer in (layer.source1_dense, layer.source2_dense, layer.cross_attention):
        assert sublayer.built, sublayer.name
    expected_shapes = case.weight_shapes() if layer.use_bias else case.weight_shapes()[::2]
    assert [tuple(w.shape) for w in layer.weights] == expected_shapes
    layer.set_weights(random_weights(layer, np.random.default_rng(SEED)))

    # Symbolic call, batch unknown. Scores first: a functional model's connectivity check
    # counts a layer's outputs from its first call, so a later two-output model would fail
    # after a first one-output call (keras.layers.MultiHeadAttention does the same).
    symbolic = [
        keras.KerasTensor((None, q_len, case.q_features)),
        keras.KerasTensor((None, kv_len, case.kv_features)),
    ]
    output, scores = layer(symbolic, return_attention_scores=True)
    assert output.shape == (None, q_len, units)
    assert scores.shape == (None, heads, q_len, kv_len)
    output = layer(symbolic)
    assert isinstance(output, keras.KerasTensor)
    assert output.shape == (None, q_len, units)

    # Eager call.
    inputs = random_inputs(case, np.random.default_rng(SEED + 1))
    output, scores = layer(inputs, return_attention_scores=True)
    assert tuple(output.shape) == (BATCH, q_len, units)
    assert tuple(scores.shape) == (BATCH, heads, q_len, kv_len)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(output)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores).sum(-1), 1.0, atol=1e-5)
    assert max_abs_diff(layer(inputs), output) == 0.0

    # The layer rebuilt from its config computes the same function.
    restored.build(case.input_shapes)
    restored.set_weights(layer.get_weights())
    assert max_abs_diff(restored(inputs), output) <= RELOAD_ATOL

    # `.keras` save, and reload here (the fresh-process reload is its own test).
    saved = save_layer_model(layer, case, directory, call_kwargs=call_kwargs)
    reloaded = keras.saving.load_model(saved.model)
    data = {key: np.load(path, allow_pickle=False) for key, path in saved.inputs.items()}
    results = reloaded(data)
    results = results if isinstance(results, (list, tuple)) else [results]
    assert len(results) == len(saved.expected)
    for result, path in zip(results, saved.expected):
        assert max_abs_diff(result, np.load(path, allow_pickle=False)) <= RELOAD_ATOL
    return saved


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_checks(case, tmp_path):
    run_layer_checks(case, tmp_path)


_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys

    import keras
    import numpy as np

    import xattn

    for entry in json.load(open(sys.argv[1])):
        model = keras.saving.load_model(entry["model"])  # default safe_mode
        assert [t.name for t in model.inputs] == ["source1", "source2"], model.inputs
        [layer] = [l for l in model.layers if isinstance(l, xattn.CrossAttention)]
        config = json.loads(json.dumps(layer.get_config()))
        assert config == entry["config"], (config, entry["config"])
        data = {k: np.load(p, allow_pickle=False) for k, p in entry["inputs"].items()}
        results = model(data)
        results = results if isinstance(results, (list, tuple)) else [results]
        assert len(results) == len(entry["expected"])
        for result, path in zip(results, entry["expected"]):
            expected = np.load(path, allow_pickle=False)
            diff = float(np.max(np.abs(keras.ops.convert_to_numpy(result) - expected)))
            assert diff <= float(sys.argv[2]), (entry["name"], path, diff)
            print(entry["name"], path.rsplit("/", 1)[-1], "max abs diff", diff)
    """
)


def test_keras_reload_in_fresh_process(tmp_path):
    """`import xattn` is all a fresh process needs to load the model, under safe_mode."""
    plain = run_layer_checks(CASES[0], tmp_path / "defaults")
    options = run_layer_checks(
        dataclasses.replace(CASES[1], num_heads=3),
        tmp_path / "options-causal-scores",
        call_kwargs={"use_causal_mask": True, "return_attention_scores": True},
        dropout=0.25,
        use_bias=False,
        kernel_initializer=keras.initializers.HeNormal(seed=7),
        bias_initializer="ones",
        name="fused_attention",
    )
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([plain.manifest_entry(), options.manifest_entry()]))
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(manifest), str(RELOAD_ATOL)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("max abs diff") == 3, result.stdout


# --- Parity with the reference composition --------------------------------------------------


@pytest.mark.parametrize("scenario", list(MASK_SCENARIOS))
def test_parity_with_scores(pair, scenario):
    ours_kwargs, reference_kwargs, _ = pair.mask_arguments(scenario)
    output, scores = pair.ours(pair.inputs, return_attention_scores=True, **ours_kwargs)
    expected_output, expected_scores = pair.reference(
        pair.inputs, return_attention_scores=True, **reference_kwargs
    )
    assert max_abs_diff(output, expected_output) <= PARITY_ATOL
    assert max_abs_diff(scores, expected_scores) <= PARITY_ATOL


@pytest.mark.parametrize("scenario", list(MASK_SCENARIOS))
def test_parity_without_scores(pair, scenario):
    """Compared on query rows with at least one key to attend to; see the next test for the rest."""
    ours_kwargs, reference_kwargs, merged = pair.mask_arguments(scenario)
    output = keras.ops.convert_to_numpy(pair.ours(pair.inputs, **ours_kwargs))
    expected = keras.ops.convert_to_numpy(pair.reference(pair.inputs, **reference_kwargs))
    attendable = merged.any(axis=-1)  # (B, Tq)
    assert attendable.any()
    assert max_abs_diff(output[attendable], expected[attendable]) <= PARITY_ATOL
    # Both of our paths are one computation.
    with_scores, _ = pair.ours(pair.inputs, return_attention_scores=True, **ours_kwargs)
    assert max_abs_diff(output, with_scores) == 0.0


def test_fully_masked_rows_are_zeroed(pair):
    """A query row with every key masked attends to nothing: zero scores, output = output bias.

    Keras' MultiHeadAttention disagrees with itself there. With `return_attention_scores=True`
    its Softmax layer zeroes the row (as ours does, always); without, it goes through
    `ops.dot_product_attention`, whose row is uniform (the mean of the values).
    """
    case = pair.case
    attention_mask = np.ones((BATCH, case.q_len, case.kv_len), dtype=bool)
    attention_mask[0, -1] = False  # one row
    attention_mask[1] = False  # a whole sample
    blocked = ~attention_mask.any(axis=-1)  # (B, Tq)

    output, scores = pair.ours(
        pair.inputs, attention_mask=attention_mask, return_attention_scores=True
    )
    output = keras.ops.convert_to_numpy(output)
    scores = keras.ops.convert_to_numpy(scores)
    plain = keras.ops.convert_to_numpy(pair.ours(pair.inputs, attention_mask=attention_mask))
    assert max_abs_diff(plain, output) == 0.0
    assert np.all(scores.transpose(0, 2, 1, 3)[blocked] == 0.0)
    output_bias = keras.ops.convert_to_numpy(pair.ours.cross_attention.output_dense.bias)
    assert max_abs_diff(output[blocked], np.broadcast_to(output_bias, output[blocked].shape)) <= (
        PARITY_ATOL
    )

    reference_with_scores, _ = pair.reference(
        pair.inputs, attention_mask=attention_mask, return_attention_scores=True
    )
    assert max_abs_diff(output, reference_with_scores) <= PARITY_ATOL
    reference_plain = keras.ops.convert_to_numpy(
        pair.reference(pair.inputs, attention_mask=attention_mask)
    )
    assert max_abs_diff(output[~blocked], reference_plain[~blocked]) <= PARITY_ATOL
    # Documents the Keras inconsistency; if this fails, Keras has changed its semantics.
    assert max_abs_diff(output[blocked], reference_plain[blocked]) > 1e-3


# --- Weight layout and transplant -----------------------------------------------------------


def test_weight_layout(pair):
    ours = [w.shape for w in pair.ours.get_weights()]
    assert ours == [w.shape for w in pair.reference.get_weights()]
    assert ours == pair.case.weight_shapes()
    assert len(ours) == NUM_WEIGHTS
    for weight in pair.ours.get_weights():
        assert np.all(weight != 0.0)


def test_weight_transplant(pair):
    fresh = CrossAttention(pair.case.units, pair.case.num_heads)
    fresh.build(pair.case.input_shapes)
    fresh.set_weights(pair.reference.get_weights())
    ours_kwargs, reference_kwargs, _ = pair.mask_arguments("all-masks-causal")
    output, scores = fresh(pair.inputs, return_attention_scores=True, **ours_kwargs)
    expected_output, expected_scores = pair.reference(
        pair.inputs, return_attention_scores=True, **reference_kwargs
    )
    assert max_abs_diff(output, expected_output) <= PARITY_ATOL
    assert max_abs_diff(scores, expected_scores) <= PARITY_ATOL


def _functional_model(layer: keras.layers.Layer, case: LayerCase) -> keras.Model:
    source1 = keras.Input((case.q_len, case.q_features), name="source1")
    source2 = keras.Input((case.kv_len, case.kv_features), name="source2")
    return keras.Model([source1, source2], layer([source1, source2]))


def test_weights_h5_transplant(pair, tmp_path):
    """A `.weights.h5` saved from a model holding the original loads into one holding ours.

    Keras addresses weights by attribute path (`layers/cross_attention/source1_dense/vars/0`),
    and raises if any is missing, so this checks the paths as well as the values.
    """
    case = pair.case
    reference_layer = Fusionlab.CrossAttention(case.units, case.num_heads)
    reference_model = _functional_model(reference_layer, case)
    reference_model.set_weights(pair.reference.get_weights())
    path = tmp_path / "fusionlab.weights.h5"
    reference_model.save_weights(path)

    ours_model = _functional_model(CrossAttention(case.units, case.num_heads), case)
    ours_model.load_weights(path)
    for ours, theirs in zip(ours_model.get_weights(), reference_model.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    data = {"source1": pair.inputs[0], "source2": pair.inputs[1]}
    assert max_abs_diff(ours_model(data), reference_model(data)) <= PARITY_ATOL


# --- Static shapes ----------------------------------------------------------------------------


def _graph_op_types(concrete_function) -> set[str]:
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types |= {node.op for node in function.node_def}
    return types


@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_static_shapes_trace_without_shape_ops(case):
    layer = CrossAttention(case.units, case.num_heads)
    layer.build(case.input_shapes)

    @tf.function
    def traced(source1, source2, query_mask, value_mask, attention_mask):
        return layer(
            [source1, source2],
            query_mask=query_mask,
            value_mask=value_mask,
            attention_mask=attention_mask,
            use_causal_mask=True,
            return_attention_scores=True,
        )

    concrete = traced.get_concrete_function(
        tf.TensorSpec(case.input_shapes[0], tf.float32),
        tf.TensorSpec(case.input_shapes[1], tf.float32),
        tf.TensorSpec((BATCH, case.q_len), tf.bool),
        tf.TensorSpec((BATCH, case.kv_len), tf.bool),
        tf.TensorSpec((BATCH, case.q_len, case.kv_len), tf.bool),
    )
    op_types = _graph_op_types(concrete)
    assert "Softmax" in op_types  # the trace really holds the layer
    assert not op_types & SHAPE_OPS, sorted(op_types & SHAPE_OPS)
    # TensorFlow folds `tf.shape` of a fully known tensor into a constant, so also require
    # that shape inference lost nothing: every tensor in the trace has a static shape.
    unknown = [
        f"{op.type} {op.name}: {tensor.shape}"
        for op in concrete.graph.get_operations()
        for tensor in op.outputs
        if not tensor.shape.is_fully_defined()
    ]
    assert not unknown, unknown
    output, scores = concrete.structured_outputs
    assert output.shape == (BATCH, case.q_len, case.units)
    assert scores.shape == (BATCH, case.num_heads, case.q_len, case.kv_len)


# --- Serialization ----------------------------------------------------------------------------


def test_registered_name():
    assert keras.saving.get_registered_name(CrossAttention) == "xattn>CrossAttention"
    assert keras.saving.get_registered_object("xattn>CrossAttention") is CrossAttention


def test_get_config_holds_every_constructor_argument():
    layer = CrossAttention(
        units=12,
        num_heads=3,
        dropout=0.1,
        use_bias=False,
        kernel_initializer="he_uniform",
        bias_initializer="ones",
    )
    config = layer.get_config()
    arguments = [
        name
        for name, parameter in inspect.signature(CrossAttention.__init__).parameters.items()
        if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert set(arguments) <= set(config)
    assert config["units"] == 12 and config["num_heads"] == 3
    assert config["dropout"] == 0.1 and config["use_bias"] is False
    assert config["kernel_initializer"]["class_name"] == "HeUniform"
    assert config["bias_initializer"]["class_name"] == "Ones"
    restored = CrossAttention.from_config(json.loads(json.dumps(config)))
    assert restored.get_config() == config


def test_base_layer_kwargs_round_trip():
    layer = CrossAttention(4, 2, name="fused", dtype="float64", trainable=False)
    restored = CrossAttention.from_config(json.loads(json.dumps(layer.get_config())))
    for candidate in (layer, restored):
        assert candidate.name == "fused"
        assert candidate.dtype_policy.name == "float64"
        assert candidate.trainable is False
    case = CASES[2]
    restored.build(case.input_shapes)
    assert all(w.dtype == "float64" for w in restored.weights)
    assert restored.trainable_weights == [] and len(restored.non_trainable_weights) == 12
    output = restored(random_inputs(case, np.random.default_rng(SEED)))
    assert keras.backend.standardize_dtype(output.dtype) == "float64"


@pytest.mark.parametrize("batch", [None, 5])
def test_compute_output_shape(batch):
    layer = CrossAttention(32, 2)
    shapes = [(batch, 12, 16), (batch, 5, 24)]
    assert layer.compute_output_shape(shapes) == (batch, 12, 32)
    assert layer.compute_output_shape(shapes, return_attention_scores=True) == (
        (batch, 12, 32),
        (batch, 2, 12, 5),
    )


# --- get_params / set_params ------------------------------------------------------------------


def test_get_params():
    params = CrossAttention(8, 2).get_params()
    names = ["units", "num_heads", "dropout", "use_bias", "kernel_initializer", "bias_initializer"]
    assert list(params) == names
    assert (params["units"], params["num_heads"], params["dropout"]) == (8, 2, 0.0)
    assert params["use_bias"] is True
    json.dumps(params)


def test_set_params_before_build_changes_the_layer():
    layer = CrossAttention(8, 2)
    assert layer.set_params(units=6, num_heads=4, dropout=0.2) is layer
    assert (layer.units, layer.num_heads, layer.dropout) == (6, 4, 0.2)
    assert layer.get_config()["units"] == 6
    case = LayerCase(6, 4, 3, 5, 4, 7)
    layer.build(case.input_shapes)
    assert [tuple(w.shape) for w in layer.weights] == case.weight_shapes()


def test_set_params_rejects_bad_values_without_changing_anything():
    layer = CrossAttention(8, 2)
    with pytest.raises(ValueError, match=r"`num_heads`.*num_heads=0"):
        layer.set_params(units=16, num_heads=0)
    assert (layer.units, layer.num_heads) == (8, 2)


def test_set_params_after_build_raises():
    layer = CrossAttention(8, 2)
    layer.build(CASES[0].input_shapes)
    with pytest.raises(ValueError, match=r"`set_params` must be called before the layer is built"):
        layer.set_params(units=16)
    assert layer.units == 8


def test_set_params_unknown_parameter_raises():
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['key_dim'\]"):
        CrossAttention(8, 2).set_params(key_dim=4)


# --- Errors -----------------------------------------------------------------------------------

BAD_SIZES = [0, -1, 2.5, True, "4", None]


@pytest.mark.parametrize("value", BAD_SIZES, ids=[repr(v) for v in BAD_SIZES])
@pytest.mark.parametrize("argument", ["units", "num_heads"])
def test_bad_sizes_raise(argument, value):
    kwargs = {"units": 8, "num_heads": 2, argument: value}
    message = rf"`{argument}` must be a positive integer.*{re.escape(f'{argument}={value!r}')}"
    with pytest.raises(ValueError, match=message):
        CrossAttention(**kwargs)


@pytest.mark.parametrize("value", [-0.1, 1.0, True, "0.1"], ids=repr)
def test_bad_dropout_raises(value):
    with pytest.raises(ValueError, match=rf"`dropout`.*{re.escape(f'dropout={value!r}')}"):
        CrossAttention(8, 2, dropout=value)


def test_bad_use_bias_raises():
    with pytest.raises(ValueError, match=r"`use_bias` must be a bool.*use_bias=1"):
        CrossAttention(8, 2, use_bias=1)


def _bad_inputs(case: LayerCase):
    source1, source2 = random_inputs(case, np.random.default_rng(SEED))
    return {
        "single-tensor": (source1, r"two tensors.*Received: \w+ of shape \(3, 12, 16\)"),
        "three-tensors": ([source1, source2, source2], r"two tensors.*Received: list of length 3"),
        "rank-2": ([source1, source2[:, 0]], r"rank-3.*source2 is \w+ of shape \(3, 24\)"),
        "dict": (
            {"source1": source1, "source2": source2},
            r"two tensors.*Received: dict with keys \['source1', 'source2'\]",
        ),
    }


@pytest.fixture(scope="module")
def built_layer() -> CrossAttention:
    layer = CrossAttention(CASES[0].units, CASES[0].num_heads)
    layer.build(CASES[0].input_shapes)
    return layer


@pytest.mark.parametrize("kind", ["single-tensor", "three-tensors", "rank-2", "dict"])
def test_bad_call_inputs_raise(built_layer, kind):
    inputs, message = _bad_inputs(CASES[0])[kind]
    with pytest.raises(ValueError, match=message):
        built_layer(inputs)  # built: the call itself checks
    with pytest.raises(ValueError, match=r"Received"):
        CrossAttention(4, 2)(inputs)  # not built: the build checks first


@pytest.mark.parametrize(
    "name, shape",
    [
        ("query_mask", (BATCH, 11)),
        ("query_mask", (BATCH + 1, 12)),
        ("query_mask", (BATCH, 12, 1)),
        ("value_mask", (BATCH, 12)),
        ("attention_mask", (BATCH, 5, 12)),
        ("attention_mask", (BATCH, 12)),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_bad_mask_shapes_raise(built_layer, name, shape):
    inputs = random_inputs(CASES[0], np.random.default_rng(SEED))
    mask = np.ones(shape, dtype=bool)
    message = rf"`{name}` must have shape .*Received: {name}.shape={re.escape(str(shape))}"
    with pytest.raises(ValueError, match=message):
        built_layer(inputs, **{name: mask})
    symbolic = [keras.KerasTensor(s) for s in CASES[0].input_shapes]
    with pytest.raises(ValueError, match=rf"`{name}` must have shape"):
        built_layer(symbolic, **{name: keras.KerasTensor(shape, dtype="bool")})


def test_broadcastable_masks_are_accepted(pair):
    """A batch of 1 broadcasts, as in Keras."""
    query_mask = pair.query_mask[:1]
    output = pair.ours(pair.inputs, query_mask=query_mask)
    expected = pair.ours(pair.inputs, query_mask=np.repeat(query_mask, BATCH, axis=0))
    assert max_abs_diff(output, expected) == 0.0


# --- Docstring example and dropout ------------------------------------------------------------


def test_docstring_example_runs():
    [code] = re.findall(r"```python\n(.*?)```", CrossAttention.__doc__, flags=re.S)
    namespace: dict = {}
    exec(textwrap.dedent(code), namespace)
    assert "CrossAttention(units=64, num_heads=4)" in code
    assert tuple(namespace["outputs"].shape) == (32, 10, 64)
    # The values are fusionlab's, with the example's layer's weights.
    inputs = [namespace["source1"], namespace["source2"]]
    reference = build_reference(LayerCase(64, 4, 10, 64, 10, 64), inputs)
    reference.set_weights(namespace["cross_attn"].get_weights())
    assert max_abs_diff(namespace["outputs"], reference(inputs)) < 1e-5


def test_dropout_only_in_training(pair):
    case = pair.case
    dropped = CrossAttention(case.units, case.num_heads, dropout=0.5)
    dropped.build(case.input_shapes)
    dropped.set_weights(pair.ours.get_weights())
    expected = pair.ours(pair.inputs)
    assert max_abs_diff(dropped(pair.inputs), expected) == 0.0
    assert max_abs_diff(dropped(pair.inputs, training=False), expected) == 0.0
    assert max_abs_diff(dropped(pair.inputs, training=True), expected) > 1e-3


def test_package_surface():
    """`from xattn import *` gives the layer and nothing else; the version is the project's."""
    namespace: dict = {}
    exec("from xattn import *", namespace)
    assert sorted(k for k in namespace if not k.startswith("__")) == ["CrossAttention"]
    assert namespace["CrossAttention"].__module__ == "xattn.layer"
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^version = "(.+)"$', pyproject, re.M).group(1) == xattn.__version__
