"""The layer's mask logic, small and exact (issue 17): merging, the causal mask at known and
unknown lengths, shape checks and their messages. Fast enough to run once per mutant."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from xattn import CrossAttention
from xattn import layer as layer_module

B, TQ, TKV, F, U, H = 2, 4, 5, 3, 4, 2


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(3)
    built = CrossAttention(U, H)
    built.build([(B, TQ, F), (B, TKV, F)])
    built.set_weights([0.5 * rng.standard_normal(w.shape).astype("float32") for w in built.get_weights()])
    return built


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(4)
    return [rng.standard_normal((B, TQ, F)).astype("float32"),
            rng.standard_normal((B, TKV, F)).astype("float32")]


def merged(layer, inputs, **masks):
    source1, source2 = (keras.ops.convert_to_tensor(x) for x in inputs)
    got = layer._merge_masks(source1, source2, masks.get("attention_mask"), masks.get("query_mask"),
                             masks.get("value_mask"), masks.get("causal", False))
    return None if got is None else np.broadcast_to(np.asarray(got), (B, TQ, TKV))


def full(mask):
    return np.broadcast_to(mask, (B, TQ, TKV))


same = np.testing.assert_array_equal


def test_merge_masks_is_an_and_of_every_mask(layer, inputs):
    rng = np.random.default_rng(5)
    q = rng.random((B, TQ)) < 0.6
    v = rng.random((B, TKV)) < 0.6
    a = rng.random((B, TQ, TKV)) < 0.6
    causal = np.tril(np.ones((TQ, TKV), bool))[None]
    assert merged(layer, inputs) is None
    same(merged(layer, inputs, query_mask=q), full(q[:, :, None]))
    same(merged(layer, inputs, value_mask=v), full(v[:, None, :]))
    same(merged(layer, inputs, attention_mask=a), a)
    same(merged(layer, inputs, causal=True), full(causal))
    same(merged(layer, inputs, query_mask=q, value_mask=v), q[:, :, None] & v[:, None, :])
    same(merged(layer, inputs, query_mask=q, causal=True), q[:, :, None] & causal)
    same(merged(layer, inputs, value_mask=v, attention_mask=a), v[:, None, :] & a)
    same(merged(layer, inputs, causal=True, attention_mask=a), causal & a)
    every = merged(layer, inputs, query_mask=q, value_mask=v, attention_mask=a, causal=True)
    same(every, q[:, :, None] & v[:, None, :] & a & causal)
    # Masks of numbers are masks too (cast to bool).
    same(merged(layer, inputs, value_mask=v.astype("float32")),
                                  full(v[:, None, :]))


@pytest.mark.parametrize("q_len,kv_len", [(4, 5), (5, 4), (3, 3), (1, 6)])
def test_causal_mask_known_and_unknown_lengths(q_len, kv_len):
    """Known lengths: a constant. Unknown lengths (a traced graph with None axes): computed at
    run time, the same lower triangle."""
    want = np.tril(np.ones((1, q_len, kv_len), bool))
    s1, s2 = np.zeros((1, q_len, F), "float32"), np.zeros((1, kv_len, F), "float32")
    np.testing.assert_array_equal(np.asarray(layer_module._causal_mask(
        keras.ops.convert_to_tensor(s1), keras.ops.convert_to_tensor(s2))), want)

    @tf.function(input_signature=[tf.TensorSpec((None, None, F)), tf.TensorSpec((None, None, F))])
    def traced(a, b):
        assert a.shape[1] is None and b.shape[1] is None
        return layer_module._causal_mask(a, b)

    np.testing.assert_array_equal(traced(s1, s2).numpy(), want)


@pytest.mark.parametrize("q_len,kv_len", [(4, 5), (None, 5), (4, None)], ids=["known", "q-free", "kv-free"])
def test_causal_mask_is_bool_and_a_constant_only_when_both_lengths_are_known(q_len, kv_len):
    """Both lengths known (the batch free): one bool constant in the graph, nothing computed at
    run time; either length unknown: computed, the same lower triangle of bools."""

    @tf.function(input_signature=[tf.TensorSpec((None, q_len, F)), tf.TensorSpec((None, kv_len, F))])
    def traced(a, b):
        return layer_module._causal_mask(a, b)

    concrete = traced.get_concrete_function()
    graph_ops = {op.type for op in concrete.graph.get_operations()}
    assert concrete.outputs[0].dtype == tf.bool
    if q_len and kv_len:
        assert graph_ops == {"Placeholder", "Const", "Identity"}, graph_ops
    else:
        assert {"Shape", "Range", "GreaterEqual"} <= graph_ops, graph_ops
    s1, s2 = np.zeros((2, 4, F), "float32"), np.zeros((2, 5, F), "float32")
    np.testing.assert_array_equal(traced(s1, s2).numpy(), np.tril(np.ones((1, 4, 5), bool)))


def test_layer_causal_at_unknown_lengths_matches_known(layer, inputs):
    expected, expected_scores = layer(inputs, use_causal_mask=True, return_attention_scores=True)

    @tf.function(input_signature=[tf.TensorSpec((None, None, F)), tf.TensorSpec((None, None, F))])
    def traced(a, b):
        return layer([a, b], use_causal_mask=True, return_attention_scores=True)

    out, scores = traced(*inputs)
    np.testing.assert_allclose(out.numpy(), np.asarray(expected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), np.asarray(expected_scores), rtol=0, atol=1e-6)
    assert np.all(scores.numpy()[:, :, ~np.tril(np.ones((TQ, TKV), bool))] == 0)


def test_masked_keys_get_no_weight_and_masked_queries_are_zeroed(layer, inputs):
    v = np.ones((B, TKV), bool)
    v[0, 1:] = False  # the first sample sees key 0 only
    q = np.ones((B, TQ), bool)
    q[1, 2] = False
    _, scores = layer(inputs, value_mask=v, query_mask=q, return_attention_scores=True)
    scores = np.asarray(scores)
    np.testing.assert_allclose(scores[0, :, :, 0], 1.0, atol=1e-6)
    assert np.all(scores[0, :, :, 1:] == 0)
    assert np.all(scores[1, :, 2, :] == 0)  # a fully masked query row: zeros, not uniform
    np.testing.assert_allclose(np.delete(scores[1], 2, axis=1).sum(-1), 1.0, atol=1e-6)


def test_mask_shapes():
    s1, s2 = keras.KerasTensor((None, 7, F)), keras.KerasTensor((None, 9, F))
    assert layer_module._mask_shapes(s1, s2) == {
        "query_mask": (None, 7), "value_mask": (None, 9), "attention_mask": (None, 7, 9)}


@pytest.mark.parametrize("shape,expected,ok", [
    ((2, 4), (2, 4), True), ((1, 4), (2, 4), True), ((None, 4), (2, 4), True),
    ((3, 4), (None, 4), True), ((2, None), (2, 4), True),
    ((2, 5), (2, 4), False), ((2, 1), (2, 4), False), ((3, 4), (2, 4), False),
    ((2, 4, 1), (2, 4), False), ((2,), (2, 4), False),
], ids=lambda x: str(x))
def test_check_mask_shape(shape, expected, ok):
    if ok:
        layer_module._check_mask_shape("value_mask", shape, expected)
        return
    with pytest.raises(ValueError) as info:
        layer_module._check_mask_shape("value_mask", shape, expected)
    want = "(B=2, 4)" if expected[0] == 2 else "(B, 4)"
    assert str(info.value) == (f"`value_mask` must have shape {want} to fit the inputs. "
                               f"Received: value_mask.shape={shape}")


def test_check_mask_names_the_batch_as_b_when_unknown():
    with pytest.raises(ValueError, match=r"must have shape \(B, 4, 5\) to fit"):
        layer_module._check_mask_shape("attention_mask", (2, 4, 6), (None, 4, 5))
    with pytest.raises(ValueError, match=r"`query_mask` must have shape \(B=3, 4\)"):
        layer_module._check_mask("query_mask", np.ones((3, 5), bool), (3, 4))
    got = layer_module._check_mask("query_mask", np.array([[1, 0, 2, 0]]), (3, 4))
    assert got.dtype == "bool" and np.asarray(got).tolist() == [[True, False, True, False]]
