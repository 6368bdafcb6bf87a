"""The inference function every format traces: the layer's weights folded into constants, static shapes.

The Keras layer is the reference; this is the deployable computation. Two linear maps in a row
are one: `source1_dense` is folded into the query projection (with the 1/sqrt(d) scale),
`source2_dense` into the key and value projections, and key and value share one matmul. All
reshapes use constant shapes (`-1` only for a dynamic batch), so converters see no run-time
shape arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.spec import ArtifactSpec

# Masked logits get this added; exp() of it underflows to exactly 0 in float32, as in Keras.
MASK_BIAS = -1e9
LAYOUTS = ("onnx", "tflite")


@dataclass(frozen=True)
class FoldedWeights:
    """The layer's 12 weights folded into 4 matrices (float32, computed in float64)."""

    query_kernel: np.ndarray  # (Fq, H*D), scale folded in
    query_bias: np.ndarray  # (H*D,)
    kv_kernel: np.ndarray  # (Fkv, 2*H*D): [key | value]
    kv_bias: np.ndarray  # (2*H*D,)
    output_kernel: np.ndarray  # (H*D, U)
    output_bias: np.ndarray  # (U,)
    heads: int
    head_dim: int

    @property
    def parameter_count(self) -> int:
        return sum(
            int(a.size)
            for a in (self.query_kernel, self.query_bias, self.kv_kernel, self.kv_bias,
                      self.output_kernel, self.output_bias)
        )


def fold_weights(weights: list[np.ndarray], heads: int) -> FoldedWeights:
    """Fold the layer's `get_weights()` (fusionlab order) into the inference matrices."""
    if len(weights) != 12:
        raise ValueError(
            "Expected the 12 weights of a CrossAttention with biases "
            f"(use_bias=True). Received: {len(weights)} arrays"
        )
    w = [np.asarray(a, dtype=np.float64) for a in weights]
    s1_k, s1_b, s2_k, s2_b, q_k, q_b, k_k, k_b, v_k, v_b, o_k, o_b = w
    units = s1_k.shape[1]
    head_dim = q_k.shape[2]
    hd = heads * head_dim
    scale = 1.0 / np.sqrt(head_dim)
    q_k2, k_k2, v_k2 = (a.reshape(units, hd) for a in (q_k, k_k, v_k))  # (U, H*D)
    query_kernel = (s1_k @ q_k2) * scale
    query_bias = (s1_b @ q_k2 + q_b.reshape(hd)) * scale
    kv_kernel = np.concatenate([s2_k @ k_k2, s2_k @ v_k2], axis=1)
    kv_bias = np.concatenate([s2_b @ k_k2 + k_b.reshape(hd), s2_b @ v_k2 + v_b.reshape(hd)])
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return FoldedWeights(
        query_kernel=f32(query_kernel),
        query_bias=f32(query_bias),
        kv_kernel=f32(kv_kernel),
        kv_bias=f32(kv_bias),
        output_kernel=f32(o_k.reshape(hd, o_k.shape[-1])),
        output_bias=f32(o_b),
        heads=heads,
        head_dim=head_dim,
    )


def causal_bias(spec: ArtifactSpec) -> np.ndarray:
    """(Tq, Tkv) additive bias of Keras' causal mask: key j visible from query i iff j <= i."""
    allowed = np.tril(np.ones((spec.query_len, spec.kv_len), dtype=bool))
    return np.where(allowed, 0.0, MASK_BIAS).astype(np.float32)


def input_signature(spec: ArtifactSpec):
    import tensorflow as tf

    return [
        tf.TensorSpec(info.shape, tf.as_dtype(info.dtype), name=info.name)
        for info in spec.inputs()
    ]


def build_inference_function(spec: ArtifactSpec, folded: FoldedWeights, *, layout: str = "onnx"):
    """A `tf.function` with named inputs and a dict of named outputs, weights as constants.

    `layout` picks the head arrangement: "onnx" transposes heads into a batch axis and runs
    batched matmuls (what onnxruntime does best); "tflite" runs each head as its own plain
    matmul on slices (what XNNPACK does best).
    """
    import tensorflow as tf

    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}. Received: layout={layout!r}")
    tq, tkv, fq, fkv = spec.query_len, spec.kv_len, spec.query_features, spec.kv_features
    heads, d = folded.heads, folded.head_dim
    hd = heads * d
    units = folded.output_kernel.shape[1]
    b = -1 if spec.batch is None else spec.batch

    def attention_bias(query_mask, value_mask, causal):
        """Additive logits bias (B|1, 1|H, Tq, Tkv) and a 0/1 keep factor, or (None, None)."""
        bias, keep = None, None
        if causal is not None:
            bias = tf.reshape(causal, [1, 1, tq, tkv])
        if query_mask is not None or value_mask is not None:
            ones_q = tf.ones([1, 1, tq, 1])
            ones_v = tf.ones([1, 1, 1, tkv])
            q = ones_q if query_mask is None else tf.reshape(tf.cast(query_mask, tf.float32), [b, 1, tq, 1])
            v = ones_v if value_mask is None else tf.reshape(tf.cast(value_mask, tf.float32), [b, 1, 1, tkv])
            keep = q * v  # (B, 1, Tq, Tkv)
            pad_bias = (1.0 - keep) * MASK_BIAS
            bias = pad_bias if bias is None else bias + pad_bias
        if causal is not None and keep is not None:
            # Only padding can leave a row with no visible key (key 0 is always causal-visible).
            keep = keep * tf.reshape(tf.cast(causal == 0.0, tf.float32), [1, 1, tq, tkv])
        return bias, keep

    def forward(source1, source2, query_mask=None, value_mask=None):
        # Created inside the trace, the weights are Const nodes of the graph: no variables or
        # captured inputs for a converter to lose.
        wq, bq = tf.constant(folded.query_kernel), tf.constant(folded.query_bias)
        wkv, bkv = tf.constant(folded.kv_kernel), tf.constant(folded.kv_bias)
        wo, bo = tf.constant(folded.output_kernel), tf.constant(folded.output_bias)
        causal = tf.constant(causal_bias(spec)) if spec.causal else None
        x1 = tf.reshape(source1, [-1, fq])  # (B*Tq, Fq)
        x2 = tf.reshape(source2, [-1, fkv])  # (B*Tkv, Fkv)
        q = tf.matmul(x1, wq) + bq  # (B*Tq, H*D), already scaled
        kv = tf.matmul(x2, wkv) + bkv  # (B*Tkv, 2*H*D)
        bias, keep = attention_bias(query_mask, value_mask, causal)
        if layout == "onnx":
            q = tf.transpose(tf.reshape(q, [b, tq, heads, d]), [0, 2, 1, 3])  # (B, H, Tq, D)
            kv = tf.reshape(kv, [b, tkv, 2, heads, d])
            k = tf.transpose(kv[:, :, 0], [0, 2, 3, 1])  # (B, H, D, Tkv)
            v = tf.transpose(kv[:, :, 1], [0, 2, 1, 3])  # (B, H, Tkv, D)
            logits = tf.matmul(q, k)  # (B, H, Tq, Tkv)
            if bias is not None:
                logits = logits + bias
            probs = tf.nn.softmax(logits, axis=-1)
            if keep is not None:
                probs = probs * keep
            context = tf.matmul(probs, v)  # (B, H, Tq, D)
            context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [-1, hd])  # (B*Tq, H*D)
            scores = probs
        else:
            q = tf.reshape(q, [b, tq, hd])
            kv = tf.reshape(kv, [b, tkv, 2 * hd])
            contexts, head_scores = [], []
            for h in range(heads):
                qh = q[:, :, h * d:(h + 1) * d]  # (B, Tq, D)
                kh = kv[:, :, h * d:(h + 1) * d]  # (B, Tkv, D)
                vh = kv[:, :, hd + h * d:hd + (h + 1) * d]  # (B, Tkv, D)
                logits = tf.matmul(qh, kh, transpose_b=True)  # (B, Tq, Tkv)
                if bias is not None:
                    logits = logits + tf.reshape(bias, [-1, tq, tkv])
                probs = tf.nn.softmax(logits, axis=-1)
                if keep is not None:
                    probs = probs * tf.reshape(keep, [-1, tq, tkv])
                head_scores.append(probs)
                contexts.append(tf.matmul(probs, vh))  # (B, Tq, D)
            context = tf.reshape(tf.concat(contexts, axis=-1), [-1, hd])  # (B*Tq, H*D)
            scores = tf.stack(head_scores, axis=1) if spec.scores else None
        out = tf.reshape(tf.matmul(context, wo) + bo, [b, tq, units])  # (B, Tq, U)
        result = {"output": tf.identity(out, name="output")}
        if spec.scores:
            result["attention_scores"] = tf.identity(scores, name="attention_scores")
        return result

    signature = input_signature(spec)
    names = [s.name for s in signature]

    def call(*tensors):
        named = dict(zip(names, tensors))
        return forward(
            named["source1"], named["source2"], named.get("query_mask"), named.get("value_mask")
        )

    fn = tf.function(call, input_signature=signature, autograph=False)
    return fn
