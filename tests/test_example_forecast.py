"""The forecasting example on the real CO2 data, trained briefly: it trains, saves, reloads under
safe_mode, and its files are what the export path reads."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("statsmodels")

EPOCHS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from examples.forecast.train import train_forecaster

    out = tmp_path_factory.mktemp("forecast")
    return str(out), train_forecaster(str(out), epochs=EPOCHS, seed=0)


def test_windows_are_chronological_float32_and_scaled_on_train():
    from examples.forecast.data import make_windows

    data = make_windows()
    for split in (data.train, data.val, data.test):
        assert split.past.dtype == split.future.dtype == split.target.dtype == np.float32
        assert split.past.shape[1:] == (data.past_len, 3)
        assert split.future.shape[1:] == (data.horizon, 3)
        assert np.isfinite(split.past).all() and np.isfinite(split.target).all()
        # The targets map back to the true ppm.
        np.testing.assert_allclose(data.to_ppm(split, split.target), split.truth, atol=1e-3)
    # No target month of one split appears in a later split's targets, or the other way round.
    assert data.train.months.max() < data.val.months.min()
    assert data.val.months.max() < data.test.months.min()
    np.testing.assert_allclose(np.std(data.train.target), 1.0, rtol=1e-5)


def test_trains_saves_and_reloads_in_safe_mode(trained):
    import keras

    import xattn  # noqa: F401  (registers CrossAttention)

    out, result = trained
    loss = result["history"]["loss"]
    assert len(loss) == EPOCHS and loss[-1] < loss[0]

    model = keras.saving.load_model(os.path.join(out, "forecaster.keras"), safe_mode=True)
    assert [t.name for t in model.inputs] == ["past", "future"]
    assert model.output_names == ["forecast"]
    assert any(isinstance(layer, xattn.CrossAttention) for layer in model.layers)

    with np.load(os.path.join(out, "sample_inputs.npz")) as f:
        sample = {k: f[k] for k in f.files}
    assert sorted(sample) == ["future", "past"]
    assert all(a.dtype == np.float32 for a in sample.values())
    outputs = np.asarray(model.predict(sample, verbose=0))
    assert outputs.shape == (len(sample["past"]), 12)
    assert np.isfinite(outputs).all()

    truth = np.load(os.path.join(out, "test_truth.npy"))
    with np.load(os.path.join(out, "test_inputs.npz")) as f:
        assert f["past"].shape[0] == truth.shape[0]
    assert np.isfinite(result["test_mae"])


def test_plot_writes_one_png(tmp_path):
    from examples.forecast.plot import plot_forecasts

    rng = np.random.default_rng(0)
    truth = 360 + rng.normal(size=(30, 12)).astype(np.float32)
    path = plot_forecasts(truth, {"Keras": truth + 0.5, "LiteRT int8": truth + 0.52},
                          str(tmp_path / "f.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_export_path_on_the_short_training(trained):
    """What `make example` does after training, with the float32 files and the int8 variant:
    every file verified on export, then the test split run in each runtime and drawn."""
    import keras

    from examples.forecast.export import export_all, run_test_split, tflm_fit
    from examples.forecast.plot import load_test_set, plot_forecasts

    out, _ = trained
    artifacts = os.path.join(out, "artifacts")
    export_all(out, artifacts, variants=("int8",))
    inputs, truth, level, months, scale = load_test_set(out)
    model = keras.saving.load_model(os.path.join(out, "forecaster.keras"), safe_mode=True)
    reference = np.asarray(model.predict(inputs, verbose=0))
    outputs = run_test_split(out=artifacts, inputs=inputs, variants=("int8",))
    assert ("tflm", "int8") in outputs  # TFLM's interpreter, a window at a time
    for (fmt, variant), values in outputs.items():
        rel = np.linalg.norm(values - reference) / np.linalg.norm(reference)
        assert rel < (1e-5 if variant == "none" else 5e-2), (fmt, variant, rel)
    fit = tflm_fit(artifacts)
    assert 1024 < fit["arena_bytes"] <= 256 * 1024 and fit["fits"]
    assert fit["flash_bytes"] == os.path.getsize(os.path.join(artifacts, "forecaster_int8.tflm.tflite"))
    png = plot_forecasts(truth, {"Keras": level[:, None] + scale * reference,
                                 "LiteRT int8": level[:, None] + scale * outputs[("tflite", "int8")]},
                         os.path.join(out, "forecast.png"), months=months)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
