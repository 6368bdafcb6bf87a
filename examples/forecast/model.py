"""The forecaster: each future month is a query that attends to the encoded past.

Only layers that trace to TFLite builtins with static shapes (Conv1D, Dense,
LayerNormalization, Add, Reshape) plus `xattn.CrossAttention`; no Lambda, so the `.keras`
file loads under `safe_mode` once `xattn` is imported.
"""

from __future__ import annotations

import keras

import xattn
from examples.forecast.data import FUTURE_FEATURES, PAST_FEATURES


def build_forecaster(
    past_len: int,
    horizon: int,
    *,
    past_features: int = PAST_FEATURES,
    future_features: int = FUTURE_FEATURES,
    units: int = 32,
    num_heads: int = 4,
    kernel_size: int = 3,
) -> keras.Model:
    """Inputs `past (B, P, past_features)` and `future (B, H, future_features)`; output
    `forecast (B, H)`, one value per future step (in the data's scaled units)."""
    past = keras.Input((past_len, past_features), name="past")
    future = keras.Input((horizon, future_features), name="future")

    # Encoder: two causal convolutions see the local shape of the history; LayerNorm per step.
    x = keras.layers.Conv1D(units, kernel_size, padding="causal", activation="relu", name="past_conv1")(past)
    x = keras.layers.Conv1D(units, kernel_size, padding="causal", activation="relu", name="past_conv2")(x)
    encoded = keras.layers.LayerNormalization(name="past_norm")(x)  # (B, P, U)

    # Decoder: one query per future step from its known features (month, step).
    q = keras.layers.Dense(units, activation="relu", name="future_embed")(future)
    queries = keras.layers.Dense(units, name="future_query")(q)  # (B, H, U)
    attended = xattn.CrossAttention(units, num_heads, name="cross_attention")([queries, encoded])
    x = keras.layers.Add(name="residual")([queries, attended])
    x = keras.layers.LayerNormalization(name="decoder_norm")(x)
    x = keras.layers.Dense(units, activation="relu", name="head_hidden")(x)
    x = keras.layers.Dense(1, name="head")(x)  # (B, H, 1)
    forecast = keras.layers.Reshape((horizon,), name="forecast")(x)  # (B, H)
    # A list, not a dict: Keras orders dict inputs by key, and `past, future` reads better.
    return keras.Model([past, future], forecast, name="co2_forecaster")
