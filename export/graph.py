"""The inference function every format traces: the layer's weights folded into constants, static shapes.

The Keras layer is the reference; this is the deployable computation. Two linear maps in a row
are one: `source1_dense` is folded into the query projection (with the 1/sqrt(d) scale),
`source2_dense` into the key and value projections, and key and value share one matmul. All
reshapes use constant shapes (`-1` only for a dynamic batch), so converters see no run-time
shape arithmetic.

The "source" layout folds one step further, per head: queries meet keys through
`Wq_h·Wk_hᵀ` and values leave through `Wv_h·Wo_h`, so attention runs on `source2` itself and
neither keys nor values are ever computed (the key bias only shifts each row of logits, which
the softmax ignores; the value bias reaches the output through rows of probabilities that sum
to 1). Where `source2` has no more features than a head, it does fewer FLOPs than the head
layouts (about half at the defaults), has no transposes, and holds half the parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from export.spec import ArtifactSpec
from xattn.layer import MASK_BIAS

# Head layouts, named by what they do (see build_inference_function).
LAYOUTS = ("batched-heads", "per-head", "source")

# The longest key rows `late_softmax` applies to. Measured in LiteRT/XNNPACK, one thread, Tq = Tkv,
# float32 file against the same with one SOFTMAX (python -m export.bench.breakdown): 0.80x the
# time at length 10 batch 32 (0.89x batch 1), 0.97-1.0x at 16 and 32; at 64 1.0x batch 1 and
# 1.01x batch 32; at 256 1.05x batch 1 and 1.25x batch 32 (five passes over a large tensor
# instead of one fused pass per row).
LATE_SOFTMAX_MAX_KEYS = 32


@dataclass(frozen=True)
class GraphOptions:
    """What a variant asks of the folded graph (export.calibration.graph_options), passed whole
    from the pipeline through a reference's `inference_function` and the model rewrites to
    `folded_attention`, whose keywords these fields are (see there): a new option is a field here,
    a keyword there, and a line in `graph_options`."""

    mask_margin: float | None = None  # int8 activations: masked logits = row minimum - margin
    late_softmax: bool = False  # float activations in XNNPACK: divide by the sum after P·V

    def keywords(self) -> dict:
        """The options as `folded_attention`'s (and `build_inference_function`'s) keywords."""
        return dataclasses.asdict(self)


NO_GRAPH_OPTIONS = GraphOptions()  # the float32 graph as it is (every option off)


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
    # The "source" layout's matrices (None when folded by hand from the six above).
    qk_kernel: np.ndarray | None = None  # (Fq, H*Fkv): per head Wq_h·Wk_hᵀ, scale folded in
    qk_bias: np.ndarray | None = None  # (H*Fkv,): per head bq_h·Wk_hᵀ
    vo_kernel: np.ndarray | None = None  # (H*Fkv, U): per head Wv_h·Wo_h, stacked
    vo_bias: np.ndarray | None = None  # (U,): sum over heads of bv_h·Wo_h

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
    output_kernel = o_k.reshape(hd, o_k.shape[-1])
    heads_of = lambda a: [a[..., h * head_dim:(h + 1) * head_dim] for h in range(heads)]  # noqa: E731
    q_h, qb_h = heads_of(query_kernel), heads_of(query_bias)
    k_h, v_h, vb_h = heads_of(kv_kernel[:, :hd]), heads_of(kv_kernel[:, hd:]), heads_of(kv_bias[hd:])
    o_h = [output_kernel[h * head_dim:(h + 1) * head_dim] for h in range(heads)]  # (D, U) each
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return FoldedWeights(
        query_kernel=f32(query_kernel),
        query_bias=f32(query_bias),
        kv_kernel=f32(kv_kernel),
        kv_bias=f32(kv_bias),
        output_kernel=f32(output_kernel),
        output_bias=f32(o_b),
        heads=heads,
        head_dim=head_dim,
        qk_kernel=f32(np.concatenate([q @ k.T for q, k in zip(q_h, k_h)], axis=1)),
        qk_bias=f32(np.concatenate([b @ k.T for b, k in zip(qb_h, k_h)])),
        vo_kernel=f32(np.concatenate([v @ o for v, o in zip(v_h, o_h)], axis=0)),
        vo_bias=f32(sum(b @ o for b, o in zip(vb_h, o_h))),
    )


def executed_flops(spec: ArtifactSpec, layout: str, *, batch: int = 1) -> int:
    """FLOPs (2 per multiply-add) the matmuls of `layout` run for `batch` rows of `spec`."""
    tq, tkv, fq, fkv, u, h = (spec.query_len, spec.kv_len, spec.query_features,
                              spec.kv_features, spec.units, spec.heads)
    d = u  # the layer's key_dim is its units
    if layout == "source":
        macs = tq * fq * h * fkv + 2 * h * tq * tkv * fkv + tq * h * fkv * u
    elif layout in LAYOUTS:
        macs = tq * fq * h * d + tkv * fkv * 2 * h * d + 2 * h * tq * tkv * d + tq * h * d * u
    else:
        raise ValueError(f"`layout` must be one of {LAYOUTS}. Received: layout={layout!r}")
    return 2 * batch * macs


def preferred_layout(spec: ArtifactSpec, runtime_layout: str) -> str:
    """"source" where it does no more FLOPs than the runtime's head layout, else that layout.

    Measured (python -m export.bench): "source" wins in onnxruntime and in LiteRT/XNNPACK alike
    at the defaults; `runtime_layout` (the format record's `layout`: "batched-heads" or
    "per-head") is the fallback for shapes where source2 has more features than a head.
    """
    if executed_flops(spec, "source") <= executed_flops(spec, runtime_layout):
        return "source"
    return runtime_layout


# While `shared_weights` is active: array bytes -> the one tf.Variable holding them.
_SHARED_WEIGHTS: dict | None = None


@contextlib.contextmanager
def shared_weights(module: tf.Module) -> Iterator[None]:
    """Weights traced inside become variables of `module`, one per distinct array.

    A SavedModel with several signatures (length buckets) then stores each weight once, in its
    checkpoint, instead of as a constant in every signature's graph. Outside, weights are
    constants of the graph (what every converter is given: nothing to lose on the way).
    """
    global _SHARED_WEIGHTS
    previous, _SHARED_WEIGHTS = _SHARED_WEIGHTS, {}
    module.weights = []
    try:
        yield
    finally:
        module.weights = list(_SHARED_WEIGHTS.values())
        _SHARED_WEIGHTS = previous


def _weight(array: np.ndarray):
    """A weight in the graph: a constant, or the shared variable (see shared_weights)."""
    if _SHARED_WEIGHTS is None:
        return tf.constant(array)
    array = np.ascontiguousarray(array, dtype=np.float32)
    key = (array.shape, array.tobytes())
    if key not in _SHARED_WEIGHTS:
        with tf.init_scope():
            _SHARED_WEIGHTS[key] = tf.Variable(array, trainable=False,
                                               name=f"weight_{len(_SHARED_WEIGHTS)}")
    return _SHARED_WEIGHTS[key]


def _reshape(x, shape: list, *, expand: tuple = (), swap: bool = False):
    """`tf.reshape(x, shape)`; with a symbolic length, the same by Unsqueeze (`expand`: the axes
    to insert) or by moving the unit axis 1 of a (B, 1, Tq, Tkv) tensor to 2 (`swap`), which need no
    run-time shape arithmetic (every such reshape costs Shape/Concat/Cast ops in ONNX)."""
    if all(isinstance(d, int) for d in shape):
        return tf.reshape(x, shape)
    for axis in expand:
        x = tf.expand_dims(x, axis)
    return tf.expand_dims(tf.squeeze(x, 1), 2) if swap else x


def _length(x):
    """Axis 1 of `x`: an int where static, a scalar tensor where symbolic."""
    # int64: what ONNX Reshape takes (int32 would add a Cast before every Reshape).
    return int(x.shape[1]) if x.shape[1] is not None else tf.shape(x, out_type=tf.int64)[1]


def causal_bias(query_len: int, kv_len: int) -> np.ndarray:
    """(Tq, Tkv) additive bias of Keras' causal mask: key j visible from query i iff j <= i."""
    allowed = np.tril(np.ones((query_len, kv_len), dtype=bool))
    return np.where(allowed, 0.0, MASK_BIAS).astype(np.float32)


def input_signature(spec: ArtifactSpec):
    return [
        tf.TensorSpec(info.shape, tf.as_dtype(info.dtype), name=info.name)
        for info in spec.inputs()
    ]


def build_inference_function(spec: ArtifactSpec, folded: FoldedWeights, *,
                             layout: str = "batched-heads",
                             mask_margin: float | None = None, late_softmax: bool = False,
                             late_softmax_max_keys: int = LATE_SOFTMAX_MAX_KEYS):
    """A `tf.function` with named inputs and a dict of named outputs, weights as constants.

    The lone layer's artifact: `folded_attention` on the spec's inputs (see there for `layout`,
    `mask_margin`, `late_softmax` and `late_softmax_max_keys`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}. Received: layout={layout!r}")
    signature = input_signature(spec)
    names = [s.name for s in signature]

    def call(*tensors):
        named = dict(zip(names, tensors))
        out, scores = folded_attention(
            named["source1"], named["source2"], folded, layout=layout, batch=spec.batch,
            query_mask=named.get("query_mask"), value_mask=named.get("value_mask"),
            causal=spec.causal, return_scores=spec.scores, mask_margin=mask_margin,
            late_softmax=late_softmax, late_softmax_max_keys=late_softmax_max_keys,
        )
        result = {"output": tf.identity(out, name="output")}
        if spec.scores:
            result["attention_scores"] = tf.identity(scores, name="attention_scores")
        return result

    return tf.function(call, input_signature=signature, autograph=False)


def folded_attention(source1, source2, folded: FoldedWeights, *, layout: str, batch: int | None,
                     query_mask=None, value_mask=None, attention_mask=None, causal: bool = False,
                     return_scores: bool = False, mask_margin: float | None = None,
                     late_softmax: bool = False,
                     late_softmax_max_keys: int = LATE_SOFTMAX_MAX_KEYS):
    """The folded CrossAttention on TensorFlow tensors: `(output, scores or None)`.

    The one implementation every artifact runs: the lone layer's (`build_inference_function`)
    and every CrossAttention inside a user's model (export.model). Lengths and feature sizes come
    from the tensors' static shapes; `batch` is the fixed batch, or None for a dynamic one.

    `layout` picks the head arrangement: "batched-heads" transposes heads into a batch axis and
    runs batched matmuls (onnxruntime's choice); "per-head" runs each head as its own plain matmul
    on slices, without transposes (better in XNNPACK); "source" attends over `source2` directly
    with the per-head folded matrices (see the module docstring; fastest in both runtimes where
    it applies, see `preferred_layout`).

    `mask_margin` is for integer graphs (export.calibration.graph_options): masked logits are
    then replaced by their row's smallest logit minus `mask_margin` instead of getting MASK_BIAS
    added. A -1e9 would stretch the int8 range of the logits over 1e9 and round every real logit
    to one value; this way the range grows by the margin only.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}. Received: layout={layout!r}")
    # A symbolic length (a dynamic-length ONNX) is read at run time; a static one is a constant.
    tq, fq = _length(source1), int(source1.shape[2])
    tkv, fkv = _length(source2), int(source2.shape[2])
    heads, d = folded.heads, folded.head_dim
    hd = heads * d
    units = folded.output_kernel.shape[1]
    b = -1 if batch is None else batch
    # With `mask_margin` the bias only marks masked logits (-1, or -2 where padding and causal
    # both mask): an int8 graph represents 0 and -1 exactly, while an int8 product with -1e9
    # got the scale of its output and rounded the 0/1 factor of the padding mask to 0.
    mask_bias = MASK_BIAS if mask_margin is None else -1.0

    def attention_bias(causal_const):
        """Additive logits bias (B|1, 1|H, Tq, Tkv) and a 0/1 keep factor, or (None, None)."""
        bias, keep = None, None
        if causal_const is not None:
            bias = tf.reshape(causal_const, [1, 1, tq, tkv])
        if query_mask is not None or value_mask is not None or attention_mask is not None:
            keep = None
            if query_mask is not None:
                keep = _reshape(tf.cast(query_mask, tf.float32), [b, 1, tq, 1], expand=(1, 3))
            if value_mask is not None:
                v = _reshape(tf.cast(value_mask, tf.float32), [b, 1, 1, tkv], expand=(1, 1))
                keep = v if keep is None else keep * v
            if attention_mask is not None:
                a = tf.reshape(tf.cast(attention_mask, tf.float32), [b, 1, tq, tkv])
                keep = a if keep is None else keep * a
            if query_mask is None and attention_mask is None:
                keep = keep * tf.ones([1, 1, tq, 1])  # (B, 1, Tq, Tkv)
            elif value_mask is None and attention_mask is None:
                keep = keep * tf.ones([1, 1, 1, tkv])
            pad_bias = (1.0 - keep) * mask_bias
            bias = pad_bias if bias is None else bias + pad_bias
        if causal_const is not None and keep is not None:
            # Only padding can leave a row with no visible key (key 0 is always causal-visible).
            keep = keep * tf.reshape(tf.cast(causal_const == 0.0, tf.float32), [1, 1, tq, tkv])
        return bias, keep

    def add_mask(logits, bias):
        if mask_margin is None:
            return logits + bias
        floor = tf.reduce_min(logits, axis=-1, keepdims=True) - mask_margin
        return tf.where(bias < -0.5, floor, logits)

    def heads_attention(x1, bias, keep):
        # Only the head layouts' weights: a SavedModel keeps even unused constants.
        wq, bq = _weight(folded.query_kernel), _weight(folded.query_bias)
        wkv, bkv = _weight(folded.kv_kernel), _weight(folded.kv_bias)
        wo, bo = _weight(folded.output_kernel), _weight(folded.output_bias)
        x2 = tf.reshape(source2, [-1, fkv])  # (B*Tkv, Fkv)
        q = tf.matmul(x1, wq) + bq  # (B*Tq, H*D), already scaled
        kv = tf.matmul(x2, wkv) + bkv  # (B*Tkv, 2*H*D)
        if layout == "batched-heads":
            q = tf.transpose(tf.reshape(q, [b, tq, heads, d]), [0, 2, 1, 3])  # (B, H, Tq, D)
            kv = tf.reshape(kv, [b, tkv, 2, heads, d])
            k = tf.transpose(kv[:, :, 0], [0, 2, 3, 1])  # (B, H, D, Tkv)
            v = tf.transpose(kv[:, :, 1], [0, 2, 1, 3])  # (B, H, Tkv, D)
            logits = tf.matmul(q, k)  # (B, H, Tq, Tkv)
            if bias is not None:
                logits = add_mask(logits, bias)
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
                    logits = add_mask(logits, tf.reshape(bias, [-1, tq, tkv]))
                probs = tf.nn.softmax(logits, axis=-1)
                if keep is not None:
                    probs = probs * tf.reshape(keep, [-1, tq, tkv])
                head_scores.append(probs)
                contexts.append(tf.matmul(probs, vh))  # (B, Tq, D)
            context = tf.reshape(tf.concat(contexts, axis=-1), [-1, hd])  # (B*Tq, H*D)
            scores = tf.stack(head_scores, axis=1) if return_scores else None
        out = tf.reshape(tf.matmul(context, wo) + bo, [b, tq, units])  # (B, Tq, U)
        return out, scores

    def source_attention(x1, bias, keep):
        if folded.qk_kernel is None:
            raise ValueError("The 'source' layout needs FoldedWeights from fold_weights().")
        # Rows ordered (query position, head): every head attends over the same source2 rows,
        # so all heads are one batched matmul and the head sum is the output matmul's.
        q = tf.matmul(x1, _weight(folded.qk_kernel)) + _weight(folded.qk_bias)
        q = tf.reshape(q, [b, tq * heads, fkv])  # (B, Tq*H, Fkv)
        logits = tf.matmul(q, source2, transpose_b=True)  # (B, Tq*H, Tkv)
        late = (late_softmax and not return_scores and isinstance(tkv, int)
                and tkv <= late_softmax_max_keys)
        sums = None

        def normalize(x):
            """softmax(x), or exp(x - row max) with the row sums kept for after (`late`)."""
            nonlocal sums
            if not late:
                return tf.nn.softmax(x, axis=-1)
            e = tf.exp(x - tf.reduce_max(x, axis=-1, keepdims=True))
            sums = tf.reduce_sum(e, axis=-1, keepdims=True)
            return e

        if bias is None:
            probs = normalize(logits)
        else:
            logits = add_mask(tf.reshape(logits, [b, tq, heads, tkv]),
                              _reshape(bias, [-1, tq, 1, tkv], swap=True))
            probs = normalize(logits)  # (B, Tq, H, Tkv)
            if keep is not None:
                probs = probs * _reshape(keep, [-1, tq, 1, tkv], swap=True)
            probs = tf.reshape(probs, [b, tq * heads, tkv])
            if late:
                sums = tf.reshape(sums, [b, tq * heads, 1])
        context = tf.matmul(probs, source2)  # (B, Tq*H, Fkv)
        if late:
            # Masked keys are out of `probs` (keep) but not of the sums: a row with every key
            # masked has sums >= 1 and a zero context, as with the softmax.
            context = context / sums
        context = tf.reshape(context, [-1, heads * fkv])  # (B*Tq, H*Fkv)
        vo_bias = folded.vo_bias.astype(np.float64)
        if keep is None:
            out = tf.matmul(context, _weight(folded.vo_kernel)) + _weight(
                (folded.output_bias + vo_bias).astype(np.float32))
        else:
            # A query row with every key masked has all-zero probabilities: no value bias.
            # min(visible keys, 1) as a matmul and a relu, not a ReduceMax: NNAPI and CoreML's
            # NeuralNetwork format have no ReduceMax, and one such node split the graph in two.
            # The 1 is a (1, 1) tensor, not a scalar: tf2onnx merges equal constants and names
            # the survivor after whichever it met first, which varies between processes (the
            # padding bias holds a scalar 1 already).
            if isinstance(tkv, int) and tkv == 1:
                row_any = tf.reshape(keep, [-1, 1])  # (B*Tq, 1): already 0 or 1
            else:
                if isinstance(tkv, int):
                    visible = tf.matmul(tf.reshape(keep, [-1, tkv]), tf.ones([tkv, 1]))
                else:  # a symbolic length: no constant of its size (mobile graphs are static)
                    visible = tf.reshape(tf.reduce_sum(keep, axis=-1), [-1, 1])
                one = tf.ones([1, 1])
                row_any = one - tf.nn.relu(one - visible)  # (B*Tq, 1)
            out = (tf.matmul(context, _weight(folded.vo_kernel)) + _weight(folded.output_bias)
                   + row_any * _weight(folded.vo_bias))
        out = tf.reshape(out, [b, tq, units])  # (B, Tq, U)
        scores = None
        if return_scores:
            scores = tf.transpose(tf.reshape(probs, [b, tq, heads, tkv]), [0, 2, 1, 3])  # (B, H, Tq, Tkv)
        return out, scores

    # Created inside the trace, the weights are Const nodes of the graph: no variables or
    # captured inputs for a converter to lose.
    causal_const = None
    if causal and isinstance(tq, int) and isinstance(tkv, int):
        causal_const = tf.constant(causal_bias(tq, tkv) * np.float32(mask_bias / MASK_BIAS))
    elif causal:
        # One length may be static (a Python int: int32 range) and the other read at run time
        # (int64): both int64, or `Less` gets mismatched types.
        rows, cols = tf.range(tf.cast(tq, tf.int64)), tf.range(tf.cast(tkv, tf.int64))
        hidden = rows[:, None] < cols[None, :]  # key j after query i
        causal_const = tf.cast(hidden, tf.float32) * mask_bias
    x1 = tf.reshape(source1, [-1, fq])  # (B*Tq, Fq)
    bias, keep = attention_bias(causal_const)
    if layout == "source":
        return source_attention(x1, bias, keep)
    return heads_attention(x1, bias, keep)
