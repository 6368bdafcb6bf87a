"""Every layer-zoo model builds, runs, has no zero weight, and round-trips through `.keras`
under safe_mode, except Lambda, which safe_mode must refuse."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from layer_zoo import UNSAFE, ZOO, save_zoo_model, zoo_call_args, zoo_inputs

NAMES = list(ZOO)
IDS = [name.replace(" ", "-") for name in NAMES]


@pytest.mark.parametrize("name", NAMES, ids=IDS)
def test_zoo_model_builds_runs_and_round_trips(name, tmp_path):
    model = ZOO[name]()
    assert all(not t.name.startswith("input") for t in model.inputs), "inputs must be named"
    assert all(dim is not None for t in model.inputs for dim in t.shape[1:])
    for variable in model.weights:
        assert np.all(np.asarray(variable) != 0), variable.path

    inputs = zoo_call_args(model, zoo_inputs(model))
    expected = np.asarray(model(inputs))
    assert np.isfinite(expected).all()
    # Same seed, same model.
    np.testing.assert_array_equal(np.asarray(ZOO[name]()(inputs)), expected)

    path = save_zoo_model(name, str(tmp_path))
    if name in UNSAFE:
        with pytest.raises(ValueError, match="(?i)unsafe|safe_mode"):
            keras.saving.load_model(path, safe_mode=True)
        return
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(reloaded(inputs)), expected, rtol=1e-6, atol=1e-6)
