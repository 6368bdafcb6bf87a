"""What changes while a user's model is traced (export.model.ModelReference.inference_function):
recurrent layers unrolled, LayerNormalization and Dense written the way converters fuse them,
and every CrossAttention running the folded computation. Each is a context manager that swaps a
class's `call` for the duration of the trace and restores it after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import tensorflow as tf

from export.graph import GraphOptions, folded_attention, preferred_layout
from export.spec import ArtifactSpec
from xattn import CrossAttention


@contextlib.contextmanager
def _unrolled(layers: list) -> Iterator[None]:
    """While tracing, recurrent layers unroll over their (static) time axis."""
    before = [layer.unroll for layer in layers]
    for layer in layers:
        layer.unroll = True
    try:
        yield
    finally:
        for layer, unroll in zip(layers, before):
            layer.unroll = unroll


def _fusable_layer_norm(layer) -> bool:
    """A LayerNormalization over the last axis with scale and offset (the common one)."""
    if type(layer) is not keras.layers.LayerNormalization or layer.rms_scaling:
        return False
    if not (layer.center and layer.scale) or layer.compute_dtype != "float32":
        return False
    rank = len(layer.input.shape) if getattr(layer, "_inbound_nodes", None) else None
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    return rank is not None and [a % rank for a in axes] == [rank - 1]


@contextlib.contextmanager
def _fused_layer_norms(layers: list) -> Iterator[None]:
    """While tracing, LayerNormalization over the last axis is written the way converters fuse.

    Same arithmetic as Keras (mean, variance of the centred input, rsqrt(var + epsilon), scale,
    offset), in the order tf2onnx's layer-norm rewriter recognises: the ONNX file holds one
    LayerNormalization node instead of a dozen elementwise ones (onnxruntime runs it as one
    kernel). TFLite gets the same few builtin ops either way.
    """
    by_id = {id(layer) for layer in layers}
    original = keras.layers.LayerNormalization.call

    def call(self, inputs):
        if id(self) not in by_id:
            return original(self, inputs)
        mean = tf.reduce_mean(inputs, axis=[-1], keepdims=True)
        centered = inputs - mean
        variance = tf.reduce_mean(tf.pow(centered, 2.0), axis=[-1], keepdims=True)
        normed = centered / tf.sqrt(variance + self.epsilon)
        return normed * tf.convert_to_tensor(self.gamma) + tf.convert_to_tensor(self.beta)

    keras.layers.LayerNormalization.call = call
    try:
        yield
    finally:
        keras.layers.LayerNormalization.call = original


@contextlib.contextmanager
def _erf_gelu() -> Iterator[None]:
    """While tracing, the exact GELU is written with `erf`, not `erfc`.

    TensorFlow's `tf.nn.gelu(approximate=False)` (Keras' `activation="gelu"`, Keras 2's
    default) computes `0.5 * x * erfc(-x / sqrt(2))`; ONNX has no Erfc and tf2onnx refuses it.
    `0.5 * x * (1 + erf(x / sqrt(2)))` is the same function: one `Erf` node in ONNX, and the
    pattern the TFLite converter fuses into its GELU builtin.
    """
    original = tf.nn.gelu

    def gelu(features, approximate=False, name=None):
        if approximate:
            return original(features, approximate=True, name=name)
        features = tf.convert_to_tensor(features)
        return 0.5 * features * (1.0 + tf.math.erf(features * 0.7071067811865476))

    tf.nn.gelu = gelu
    try:
        yield
    finally:
        tf.nn.gelu = original


def _plain_dense(layer) -> bool:
    """A float32 Dense without LoRA or quantization (what `_broadcast_dense` rewrites)."""
    return (type(layer) is keras.layers.Dense and layer.compute_dtype == "float32"
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None)


@contextlib.contextmanager
def _broadcast_dense(layers: list) -> Iterator[None]:
    """While tracing, Dense on a sequence is one broadcasting matmul.

    Keras computes `(B, T, F) @ (F, U)` as a tensordot: reshapes through the input's run-time
    shape, which a dynamic batch turns into Shape/Gather/Concat/Cast nodes around every Dense.
    One MatMul broadcasts over B and T instead: onnxruntime runs it directly, and the TFLite
    converter makes it a FULLY_CONNECTED. Same arithmetic.
    """
    by_id = {id(layer) for layer in layers}
    original = keras.layers.Dense.call

    def call(self, inputs, training=None):
        if id(self) not in by_id or len(inputs.shape) < 3:
            return original(self, inputs, training=training)
        x = tf.matmul(inputs, tf.convert_to_tensor(self.kernel))
        if self.bias is not None:
            x = x + tf.convert_to_tensor(self.bias)
        return self.activation(x) if self.activation is not None else x

    keras.layers.Dense.call = call
    try:
        yield
    finally:
        keras.layers.Dense.call = original


@contextlib.contextmanager
def _folded_cross_attention(folded: list, fallback_layout: str, options: GraphOptions,
                            layouts: dict[str, str]) -> Iterator[None]:
    """While tracing, the listed CrossAttention layers run `folded_attention` instead of Keras'.

    The class's `call` is swapped for the duration (Keras looks `call` up at each call); any
    other CrossAttention (none, since every one is folded) would run as before.
    """
    by_id = {id(f.layer): f for f in folded}
    original = CrossAttention.call

    def call(self, inputs, training=False, *, attention_mask=None, query_mask=None,
             value_mask=None, use_causal_mask=False, return_attention_scores=False):
        entry = by_id.get(id(self))
        if entry is None:
            return original(self, inputs, training, attention_mask=attention_mask,
                            query_mask=query_mask, value_mask=value_mask,
                            use_causal_mask=use_causal_mask,
                            return_attention_scores=return_attention_scores)
        source1, source2 = inputs
        shape = ArtifactSpec(units=self.units, heads=self.num_heads,
                             query_len=int(source1.shape[1]), kv_len=int(source2.shape[1]),
                             query_features=int(source1.shape[2]),
                             kv_features=int(source2.shape[2]))
        layout = preferred_layout(shape, fallback_layout)
        layouts[self.name] = layout
        out, scores = folded_attention(
            source1, source2, entry.folded, layout=layout, batch=source1.shape[0],
            query_mask=query_mask, value_mask=value_mask, attention_mask=attention_mask,
            causal=bool(use_causal_mask), return_scores=return_attention_scores,
            **options.keywords(),
        )
        return (out, scores) if return_attention_scores else out

    CrossAttention.call = call
    try:
        yield
    finally:
        CrossAttention.call = original
