"""The CrossAttention layer: fusionlab-learn's API and weight layout, fixed and static-shape friendly."""

from __future__ import annotations

import math
from numbers import Integral

import keras
import numpy as np
from keras import ops

# The mask bias, one idea for the layer and every exported graph: Keras' Softmax layer pushes
# masked logits to this value, and exp() of it underflows to exactly 0 in float32. float16 cannot
# hold it (max 65504): there it is -3e4, which padding and causal biases added together (-6e4)
# still fit, and whose exp() relative to any real logit is exactly 0 as well.
MASK_BIAS = -1e9
MASK_BIAS_FLOAT16 = -3e4

_PARAM_NAMES = (
    "units",
    "num_heads",
    "dropout",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
)


def _check_positive_int(name: str, value) -> int:
    # bool is an Integral in Python; a flag is never a size.
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)


def _check_dropout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(
            f"`dropout` must be a float in [0, 1). Received: dropout={value!r}"
        )
    return float(value)


@keras.saving.register_keras_serializable(package="xattn")
# mutmut (make mutation) leaves the class alone: Keras inspects its methods' signatures.
class CrossAttention(keras.layers.Layer):  # pragma: no mutate block
    """Cross attention: a query sequence attends to a second (key/value) sequence.

    Each source goes through its own `Dense(units)` projection; the projected
    `source1` is the query and the projected `source2` is both key and value of a
    multi-head attention with `num_heads` heads of size `units`. This is the
    layer documented as fusionlab-learn's `fusionlab.nn.components.CrossAttention`,
    with the same call and the same weights (`get_weights()` order and shapes), so
    a trained fusionlab layer's weights load into it. Unlike the original, its
    config round-trips, it saves to `.keras` without pickle, and it supports
    masks and attention scores with the semantics of
    `keras.layers.MultiHeadAttention`.

    The computation uses static shapes wherever they are known, so a trace with
    fully known input shapes holds no run-time shape arithmetic.

    Shapes: `B` batch, `Tq` query length, `Tkv` key/value length, `Fq` and `Fkv`
    the feature sizes of `source1` and `source2`, `H` heads, `U` units.

    Args:
        units: int, size of both `Dense` projections, of each attention head
            (`key_dim`) and of the output. Must be positive.
        num_heads: int, number of attention heads. Must be positive.
        dropout: float, dropout rate on the attention probabilities, applied
            only when `training=True`. Defaults to `0.0` (the original's).
        use_bias: bool, whether the projections and the attention use biases.
            Defaults to `True` (the original's).
        kernel_initializer: initializer for every kernel. Defaults to
            `"glorot_uniform"` (Keras' default, the original's).
        bias_initializer: initializer for every bias. Defaults to `"zeros"`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: a list or tuple `[source1, source2]`; `source1` of shape
            `(B, Tq, Fq)` (the query) and `source2` of shape `(B, Tkv, Fkv)`
            (key and value).
        training: bool, whether dropout is active. Defaults to `False`.
        attention_mask: optional boolean tensor `(B, Tq, Tkv)`; `True` means
            "may attend". Merged (logical AND) with the other masks.
        query_mask: optional boolean tensor `(B, Tq)`; `True` marks a real
            query position.
        value_mask: optional boolean tensor `(B, Tkv)`; `True` marks a real
            key/value position.
        use_causal_mask: bool, if `True` query position `i` attends only to
            key positions `j <= i`. Defaults to `False`.
        return_attention_scores: bool, if `True` return `(output, scores)`.
            Defaults to `False`.

    Returns:
        `output` of shape `(B, Tq, U)`, or `(output, scores)` with `scores` of
        shape `(B, H, Tq, Tkv)` when `return_attention_scores=True`. A query row
        whose keys are all masked gets all-zero scores, as in Keras.

    Example:

    ```python
    import numpy as np
    from xattn import CrossAttention

    source1 = np.random.normal(size=(32, 10, 64)).astype("float32")
    source2 = np.random.normal(size=(32, 10, 64)).astype("float32")
    cross_attn = CrossAttention(units=64, num_heads=4)
    outputs = cross_attn([source1, source2])  # (32, 10, 64)
    ```
    """

    def __init__(
        self,
        units,
        num_heads,
        dropout=0.0,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = _check_positive_int("units", units)
        self.num_heads = _check_positive_int("num_heads", num_heads)
        self.dropout = _check_dropout(dropout)
        if not isinstance(use_bias, bool):
            raise ValueError(f"`use_bias` must be a bool. Received: use_bias={use_bias!r}")
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = False

    def build(self, input_shape):
        source1_shape, source2_shape = _split_shapes(input_shape)
        common = dict(
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            bias_initializer=keras.initializers.get(
                keras.initializers.serialize(self.bias_initializer)
            ),
            dtype=self.dtype_policy,
        )
        # Attribute names and creation order are fusionlab's: they fix the order
        # of get_weights() and the variable paths inside `.keras`/`.weights.h5`.
        self.source1_dense = keras.layers.Dense(self.units, name="source1_dense", **_fresh(common))
        self.source2_dense = keras.layers.Dense(self.units, name="source2_dense", **_fresh(common))
        self.cross_attention = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=self.units,
            dropout=self.dropout,
            name="cross_attention",
            **_fresh(common),
        )
        self.source1_dense.build(source1_shape)
        self.source2_dense.build(source2_shape)
        query_shape = tuple(source1_shape[:-1]) + (self.units,)
        value_shape = tuple(source2_shape[:-1]) + (self.units,)
        self.cross_attention.build(query_shape, value_shape, value_shape)
        self._dropout_layer = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="attention_dropout"
        )
        self.built = True

    def call(
        self,
        inputs,
        training=False,
        *,
        attention_mask=None,
        query_mask=None,
        value_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
    ):
        source1, source2 = _split_inputs(inputs)
        mask = self._merge_masks(
            source1, source2, attention_mask, query_mask, value_mask, use_causal_mask
        )
        mha = self.cross_attention
        query = self.source1_dense(source1)  # (B, Tq, U)
        value = self.source2_dense(source2)  # (B, Tkv, U)
        query = mha.query_dense(query)  # (B, Tq, H, U)
        key = mha.key_dense(value)  # (B, Tkv, H, U)
        value = mha.value_dense(value)  # (B, Tkv, H, U)
        query = ops.multiply(query, ops.cast(1.0 / math.sqrt(self.units), query.dtype))
        scores = ops.einsum("aecd,abcd->acbe", key, query)  # (B, H, Tq, Tkv)
        if mask is not None:
            mask = ops.expand_dims(mask, axis=1)  # (B, 1, Tq, Tkv)
            large_negative = (
                MASK_BIAS_FLOAT16 if keras.backend.standardize_dtype(scores.dtype) == "float16"
                else MASK_BIAS
            )
            scores = ops.where(mask, scores, ops.cast(large_negative, scores.dtype))
        scores = ops.softmax(scores, axis=-1)
        if mask is not None:
            # A row with every key masked would otherwise be uniform (Keras zeroes it).
            scores = ops.where(mask, scores, ops.zeros_like(scores))
        weights = self._dropout_layer(scores, training=training) if self.dropout else scores
        context = ops.einsum("acbe,aecd->abcd", weights, value)  # (B, Tq, H, U)
        output = mha.output_dense(context)  # (B, Tq, U)
        if return_attention_scores:
            return output, scores
        return output

    def _merge_masks(self, source1, source2, attention_mask, query_mask, value_mask, causal):
        """Keras MultiHeadAttention's rule: every mask given is merged with AND."""
        expected = _mask_shapes(source1, source2)
        merged = None
        if query_mask is not None:
            query_mask = _check_mask("query_mask", query_mask, expected["query_mask"])
            merged = ops.expand_dims(query_mask, -1)  # (B, Tq, 1)
        if value_mask is not None:
            value_mask = _check_mask("value_mask", value_mask, expected["value_mask"])
            value_mask = ops.expand_dims(value_mask, -2)  # (B, 1, Tkv)
            merged = value_mask if merged is None else ops.logical_and(merged, value_mask)
        if causal:
            causal_mask = _causal_mask(source1, source2)  # (1, Tq, Tkv)
            merged = causal_mask if merged is None else ops.logical_and(merged, causal_mask)
        if attention_mask is not None:
            attention_mask = _check_mask("attention_mask", attention_mask, expected["attention_mask"])
            merged = attention_mask if merged is None else ops.logical_and(attention_mask, merged)
        return merged

    def compute_output_shape(self, input_shape, return_attention_scores=False, **kwargs):
        source1_shape, source2_shape = _split_shapes(input_shape)
        output_shape = tuple(source1_shape[:-1]) + (self.units,)
        if return_attention_scores:
            scores_shape = (source1_shape[0], self.num_heads, source1_shape[1], source2_shape[1])
            return output_shape, scores_shape
        return output_shape

    def compute_output_spec(self, inputs, training=False, **kwargs):
        source1, source2 = _split_inputs(inputs)
        shapes = self.compute_output_shape(
            [source1.shape, source2.shape],
            return_attention_scores=kwargs.get("return_attention_scores", False),
        )
        for name, expected in _mask_shapes(source1, source2).items():
            if kwargs.get(name) is not None:
                _check_mask_shape(name, tuple(kwargs[name].shape), expected)
        dtype = self.compute_dtype
        if kwargs.get("return_attention_scores", False):
            return tuple(keras.KerasTensor(s, dtype=dtype) for s in shapes)
        return keras.KerasTensor(shapes, dtype=dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }

    def get_params(self) -> dict:
        """The layer's hyper-parameters, as fusionlab's `get_params()`."""
        config = self.get_config()
        return {name: config[name] for name in _PARAM_NAMES}

    def set_params(self, **params) -> CrossAttention:
        """Change hyper-parameters before the layer is built; returns the layer."""
        unknown = sorted(set(params) - set(_PARAM_NAMES))
        if unknown:
            raise ValueError(
                f"Unknown parameter(s) {unknown}; expected some of {list(_PARAM_NAMES)}. "
                f"Received: {params!r}"
            )
        if self.built:
            raise ValueError(
                "`set_params` must be called before the layer is built; this layer "
                f"({self.name!r}) already holds weights. Build a new layer with "
                f"`CrossAttention(**{{**layer.get_params(), ...}})`. Received: {params!r}"
            )
        # Validate everything before changing anything.
        merged = {**self.get_params(), **params}
        checked = CrossAttention(**merged)
        for name in _PARAM_NAMES:
            setattr(self, name, getattr(checked, name))
        return self


def _fresh(common: dict) -> dict:
    # Initializer objects carry state (seed); each sublayer gets its own copy.
    out = dict(common)
    for key in ("kernel_initializer", "bias_initializer"):
        out[key] = keras.initializers.get(keras.initializers.serialize(common[key]))
    return out


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)}"
    if isinstance(value, dict):
        # Its repr would print every tensor in full.
        return f"{type(value).__name__} with keys {list(value)}"
    return repr(value) if not isinstance(value, (list, tuple)) else (
        f"{type(value).__name__} of length {len(value)}"
    )


def _split_inputs(inputs):
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
        raise ValueError(
            "CrossAttention expects a list or tuple of exactly two tensors "
            f"[source1, source2]. Received: {_describe(inputs)}"
        )
    for index, tensor in enumerate(inputs):
        shape = getattr(tensor, "shape", None)
        if shape is None or len(shape) != 3:
            raise ValueError(
                f"CrossAttention expects rank-3 tensors (batch, length, features); "
                f"source{index + 1} is {_describe(tensor)}."
            )
    _check_batches(tuple(inputs[0].shape), tuple(inputs[1].shape))
    return inputs[0], inputs[1]


def _check_batches(source1_shape: tuple, source2_shape: tuple) -> None:
    """Refuse batch sizes known to differ (ops would broadcast a batch of 1 silently)."""
    b1, b2 = source1_shape[0], source2_shape[0]
    if b1 is not None and b2 is not None and int(b1) != int(b2):
        raise ValueError(
            "`source1` and `source2` must have the same batch size. Received: "
            f"source1.shape={source1_shape}, source2.shape={source2_shape}"
        )


def _split_shapes(input_shape):
    if (
        not isinstance(input_shape, (list, tuple))
        or len(input_shape) != 2
        or not all(isinstance(s, (list, tuple)) for s in input_shape)
    ):
        raise ValueError(
            "CrossAttention expects the shapes of two inputs [source1, source2]. "
            f"Received: input_shape={input_shape!r}"
        )
    for index, shape in enumerate(input_shape):
        if len(shape) != 3:
            raise ValueError(
                "CrossAttention expects rank-3 inputs (batch, length, features). "
                f"Received: source{index + 1} shape {tuple(shape)}"
            )
        if shape[-1] is None:
            raise ValueError(
                f"The feature size of source{index + 1} must be known. "
                f"Received: shape {tuple(shape)}"
            )
    _check_batches(tuple(input_shape[0]), tuple(input_shape[1]))
    return tuple(input_shape[0]), tuple(input_shape[1])


def _mask_shapes(source1, source2) -> dict:
    """The shape each mask argument must fit: (B, Tq), (B, Tkv) and (B, Tq, Tkv)."""
    batch, q_len, kv_len = source1.shape[0], source1.shape[1], source2.shape[1]
    return {
        "query_mask": (batch, q_len),
        "value_mask": (batch, kv_len),
        "attention_mask": (batch, q_len, kv_len),
    }


def _check_mask_shape(name: str, shape: tuple, expected: tuple) -> None:
    fits = len(shape) == len(expected) and all(
        e is None or s is None or s == e or (i == 0 and s == 1)
        for i, (s, e) in enumerate(zip(shape, expected))
    )
    if not fits:
        batch = "B" if expected[0] is None else f"B={expected[0]}"
        want = "(" + ", ".join(batch if i == 0 else str(e) for i, e in enumerate(expected)) + ")"
        raise ValueError(
            f"`{name}` must have shape {want} to fit the inputs. Received: {name}.shape={shape}"
        )


def _check_mask(name: str, mask, expected: tuple):
    mask = ops.convert_to_tensor(mask)
    _check_mask_shape(name, tuple(mask.shape), expected)
    return ops.cast(mask, "bool")


def _causal_mask(source1, source2):
    q_len, kv_len = source1.shape[1], source2.shape[1]
    if q_len is not None and kv_len is not None:
        # Static lengths: a constant, no run-time shape arithmetic.
        return ops.convert_to_tensor(np.tril(np.ones((1, q_len, kv_len), dtype=bool)))
    q_len = ops.shape(source1)[1]
    kv_len = ops.shape(source2)[1]
    rows = ops.expand_dims(ops.arange(q_len), 1)
    cols = ops.expand_dims(ops.arange(kv_len), 0)
    return ops.expand_dims(ops.greater_equal(rows, cols), 0)
