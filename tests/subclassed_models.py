"""A Keras 3 subclassed model holding CrossAttention, registered for `--import subclassed_models`
(tests/test_saved_model.py exports it: traced through `call`, each CrossAttention folded)."""

from __future__ import annotations

import keras

import xattn


@keras.saving.register_keras_serializable(package="xattn_tests")
class Forecaster(keras.Model):
    """history (B, T, F) and context (B, S, F) -> (B, T, 3), through two CrossAttention blocks."""

    def __init__(self, units: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.encode = keras.layers.Dense(units, name="encode")
        self.first = xattn.CrossAttention(units, 2, name="first_attention")
        self.second = xattn.CrossAttention(units, 4, name="second_attention")
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, inputs):
        history, context = inputs
        h = self.encode(history)
        h = self.norm(h + self.first([h, context]))
        h = h + self.second([h, context])
        return self.head(h)

    def get_config(self):
        return {**super().get_config(), "units": self.units}
