"""One PNG of the test-split forecast from several runtimes against the truth."""

from __future__ import annotations

import numpy as np


def _stitch(windows: np.ndarray, horizon: int) -> np.ndarray:
    """(N, H) windows -> one line: every H-th window back to back, so each month is shown as
    forecast from the last origin before it (1 to H months ahead). 1-D input is kept as is."""
    windows = np.asarray(windows, np.float64)
    if windows.ndim == 1:
        return windows
    windows = windows.reshape(windows.shape[0], horizon)
    return windows[::horizon].reshape(-1)


def plot_forecasts(truth: np.ndarray, predictions: dict[str, np.ndarray], path: str, *,
                   months: np.ndarray | None = None, title: str = "Mauna Loa CO2, test split",
                   unit: str = "ppm") -> str:
    """Draw `predictions` (label -> array shaped like `truth`) against `truth` into one PNG.

    `truth` is `(N, H)` forecast windows (as `test_truth.npy`) or a 1-D series. Windows are
    shown back to back, every H-th one. The top panel holds the truth and every source with its
    MAE; the bottom one each source minus the first (the reference, e.g. "Keras"), which is where
    a runtime's or a quantized variant's deviation becomes visible. `months` `(N, H)` labels the
    x axis with dates. Returns `path`.
    """
    # matplotlib only when drawing, on Agg: no display on servers and CI.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = np.asarray(truth)
    horizon = truth.shape[1] if truth.ndim == 2 else 1
    y_true = _stitch(truth, horizon)
    if months is not None:
        x = _stitch(np.asarray(months).astype("datetime64[M]").astype("datetime64[D]"), horizon)
        x = np.asarray(x, dtype="datetime64[D]")
    else:
        x = np.arange(len(y_true))
    lines = {label: _stitch(np.asarray(p).reshape(truth.shape), horizon) for label, p in predictions.items()}

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    top.plot(x, y_true, color="black", linewidth=2.2, label="truth")
    styles = ["-", "--", ":", "-."]
    # One colour and dash per source, the same in both panels.
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {label: {"color": colors[i % len(colors)], "linestyle": styles[i % len(styles)]}
             for i, label in enumerate(lines)}
    for label, y in lines.items():
        mae = float(np.mean(np.abs(np.asarray(predictions[label]).reshape(truth.shape) - truth)))
        top.plot(x, y, linewidth=1.4, label=f"{label} (MAE {mae:.3f} {unit})", **style[label])
    if horizon > 1:
        # Mark where each window's forecast starts (a new origin).
        for start in x[::horizon]:
            top.axvline(start, color="0.85", linewidth=0.6, zorder=0)
    top.set_ylabel(unit)
    top.set_title(f"{title}: {horizon}-step forecasts from successive origins" if horizon > 1 else title)
    top.legend(loc="upper left", fontsize=8)

    if lines:
        reference_label, reference = next(iter(lines.items()))
        for label, y in lines.items():
            if label == reference_label:
                continue
            diff = y - reference
            bottom.plot(x, diff, linewidth=1.2, label=f"{label} (max |diff| {np.max(np.abs(diff)):.2e})",
                        **style[label])
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set_ylabel(f"minus {reference_label}")
        if len(lines) > 1:
            bottom.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("month" if months is not None else "step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_test_set(run_dir: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, float]:
    """What `train` saved for the test split: (inputs by name, truth ppm (N, H), level (N,),
    months (N, H) strings, scale). Outputs -> ppm is `level[:, None] + scale * outputs`."""
    import os

    with np.load(os.path.join(run_dir, "test_inputs.npz")) as f:
        inputs = {k: f[k] for k in f.files}
    truth = np.load(os.path.join(run_dir, "test_truth.npy"))
    with np.load(os.path.join(run_dir, "test_meta.npz")) as f:
        level, months, scale = f["level"], f["months"], float(f["scale"])
    return inputs, truth, level, months, scale


def main(argv: list[str] | None = None) -> int:
    """`python -m examples.forecast.plot --run-dir DIR`: the Keras model's test forecast and the
    naive baselines, from what `train` saved (the export pipeline adds the runtimes)."""
    import argparse
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    parser = argparse.ArgumentParser(prog="python -m examples.forecast.plot", description=main.__doc__)
    parser.add_argument("--run-dir", default="build/forecast")
    parser.add_argument("--output", help="PNG path. Defaults to RUN_DIR/forecast.png")
    args = parser.parse_args(argv)

    # Keras only here: the plotting function itself needs numpy and matplotlib alone.
    import keras

    import xattn  # noqa: F401  (registers CrossAttention for safe_mode loading)

    inputs, truth, level, months, scale = load_test_set(args.run_dir)
    model = keras.saving.load_model(os.path.join(args.run_dir, "forecaster.keras"), safe_mode=True)
    keras_ppm = level[:, None] + scale * model.predict(inputs, verbose=0)
    past_len, horizon = inputs["past"].shape[1], truth.shape[1]
    # The same month a year before each step (horizon <= 12).
    seasonal = level[:, None] + scale * inputs["past"][:, past_len - 12 : past_len - 12 + horizon, 0]
    path = plot_forecasts(truth, {"Keras": keras_ppm, "seasonal naive": seasonal},
                          args.output or os.path.join(args.run_dir, "forecast.png"), months=months)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
