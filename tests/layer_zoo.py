"""Small functional models, one around each Keras layer, for the table of which layers export in
which format (README). Keras only: what exports them lives in the tests that use the zoo.

Every model has fixed non-batch input shapes and named inputs, and every weight is set from a
seeded generator, away from zero (biases included: a dropped zero bias passes any parity test),
with BatchNormalization's moving statistics non-trivial. `Lambda` is in the zoo as the layer that
must be refused: its `.keras` file does not load with `safe_mode=True`.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable

import keras
import numpy as np

import xattn

SEQ = 8  # query / sequence length
KV_SEQ = 10  # key/value length of the attention models
FEATURES = 6
UNITS = 16
VOCAB = 50  # Embedding input ids are in [0, VOCAB)

# Layers whose `.keras` file must fail to load under safe_mode (arbitrary Python code).
UNSAFE = frozenset({"Lambda"})


def _seq(name: str = "x", features: int = FEATURES, length: int = SEQ):
    return keras.Input((length, features), name=name)


def randomize_weights(model: keras.Model, seed: int) -> keras.Model:
    """Set every weight (trainable or not) from `seed`: magnitudes in [0.1, 0.6) with a random
    sign; moving variances in [0.5, 2)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "moving_variance" in variable.path:
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.uniform(0.1, 0.6, shape) * rng.choice([-1.0, 1.0], shape)
        variable.assign(value.astype(variable.dtype))
    return model


def _model(name: str, inputs, outputs) -> keras.Model:
    model_name = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    model = keras.Model(inputs, outputs, name=model_name)
    return randomize_weights(model, zlib.crc32(name.encode()))


def _dense():
    x = _seq()
    return _model("Dense", x, keras.layers.Dense(UNITS, activation="relu", name="dense")(x))


def _conv1d():
    x = _seq()
    return _model("Conv1D", x, keras.layers.Conv1D(UNITS, 3, padding="same", name="conv1d")(x))


def _conv1d_causal():
    x = _seq()
    return _model("Conv1D causal", x,
                  keras.layers.Conv1D(UNITS, 3, padding="causal", name="conv1d_causal")(x))


def _layer_norm():
    x = _seq()
    return _model("LayerNormalization", x, keras.layers.LayerNormalization(name="layer_norm")(x))


def _batch_norm():
    x = _seq()
    return _model("BatchNormalization", x, keras.layers.BatchNormalization(name="batch_norm")(x))


def _embedding():
    tokens = keras.Input((SEQ,), dtype="int32", name="tokens")
    return _model("Embedding", tokens, keras.layers.Embedding(VOCAB, UNITS, name="embedding")(tokens))


def _dropout():
    x = _seq()
    h = keras.layers.Dense(UNITS, name="dense")(x)
    return _model("Dropout", x, keras.layers.Dropout(0.3, name="dropout")(h))


def _max_pool():
    x = _seq()
    return _model("MaxPooling1D", x, keras.layers.MaxPooling1D(2, name="max_pool")(x))


def _avg_pool():
    x = _seq()
    return _model("AveragePooling1D", x, keras.layers.AveragePooling1D(2, name="avg_pool")(x))


def _global_avg_pool():
    x = _seq()
    return _model("GlobalAveragePooling1D", x, keras.layers.GlobalAveragePooling1D(name="global_avg_pool")(x))


def _concatenate():
    a, b = _seq("a"), _seq("b", features=4)
    return _model("Concatenate", [a, b], keras.layers.Concatenate(name="concatenate")([a, b]))


def _add():
    a, b = _seq("a"), _seq("b")
    return _model("Add", [a, b], keras.layers.Add(name="add")([a, b]))


def _multi_head_attention():
    query, value = _seq("query"), _seq("value", length=KV_SEQ)
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")
    return _model("MultiHeadAttention", [query, value], attention(query, value))


def _cross_attention():
    query, value = _seq("query"), _seq("value", length=KV_SEQ)
    attention = xattn.CrossAttention(UNITS, 2, name="cross_attention")
    return _model("CrossAttention", [query, value], attention([query, value]))


def _lstm():
    x = _seq()
    return _model("LSTM", x, keras.layers.LSTM(UNITS, return_sequences=True, name="lstm")(x))


def _gru():
    x = _seq()
    return _model("GRU", x, keras.layers.GRU(UNITS, return_sequences=True, name="gru")(x))


def _lambda():
    x = _seq()
    return _model("Lambda", x, keras.layers.Lambda(lambda t: t * 2.0 + 1.0, name="lambda")(x))


# README row label -> builder. Insertion order is the table's order.
ZOO: dict[str, Callable[[], keras.Model]] = {
    "Dense": _dense,
    "Conv1D": _conv1d,
    "Conv1D causal": _conv1d_causal,
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "Embedding": _embedding,
    "Dropout": _dropout,
    "MaxPooling1D": _max_pool,
    "AveragePooling1D": _avg_pool,
    "GlobalAveragePooling1D": _global_avg_pool,
    "Concatenate": _concatenate,
    "Add": _add,
    "MultiHeadAttention": _multi_head_attention,
    "CrossAttention": _cross_attention,
    "LSTM": _lstm,
    "GRU": _gru,
    "Lambda": _lambda,
}


def zoo_inputs(model: keras.Model, *, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs by name: standard normal floats, integer ids in [0, VOCAB)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in model.inputs:
        shape = (batch, *tensor.shape[1:])
        if "int" in str(tensor.dtype):
            inputs[tensor.name] = rng.integers(0, VOCAB, shape).astype(tensor.dtype)
        else:
            inputs[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
    return inputs


def save_zoo_model(name: str, folder: str) -> str:
    """Build `ZOO[name]` and save it as `<folder>/<model name>.keras`; return the path."""
    model = ZOO[name]()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{model.name}.keras")
    model.save(path)
    return path


def save_zoo(folder: str) -> dict[str, str]:
    """Every zoo model saved into `folder`: {label: path}."""
    return {name: save_zoo_model(name, folder) for name in ZOO}


def zoo_call_args(model: keras.Model, inputs: dict[str, np.ndarray]):
    """`inputs` by name -> what `model(...)` takes without a structure warning: one array for a
    one-input model, a list in `model.inputs` order otherwise."""
    arrays = [inputs[t.name] for t in model.inputs]
    return arrays[0] if len(arrays) == 1 else arrays
