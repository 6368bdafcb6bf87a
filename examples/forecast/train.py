"""Train the CO2 forecaster and save what the export and the plot need.

    python -m examples.forecast.train --epochs 60 --output-dir build/forecast

Writes to the output folder:
  forecaster.keras    the trained model (loads with safe_mode=True after `import xattn`)
  sample_inputs.npz   one array per model input (`past`, `future`): the first test windows
  test_inputs.npz     the same for the whole test split
  test_truth.npy      (N, H) the true ppm of every test window
  test_meta.npz       `level` (N,), `scale` (), `months` (N, H) strings: outputs -> ppm is
                      level[:, None] + scale * outputs
and prints the test MAE (ppm) of the model against two naive baselines.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # as `export` runs TensorFlow
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

# Rows of `sample_inputs.npz`: training windows spread over the train split. They are what the
# export calibrates int8 on and takes its golden vectors from (never the test split).
SAMPLE_WINDOWS = 64


def train_forecaster(output_dir: str, *, epochs: int = 60, seed: int = 0, batch_size: int = 32,
                     verbose: int = 0) -> dict:
    """Train, save, and return {"history", "test_mae", "baselines", "seconds", "paths"}."""
    # Keras (and TensorFlow under it) only once the flags above are parsed and set.
    import keras

    from examples.forecast.data import make_windows, naive_forecasts
    from examples.forecast.model import build_forecaster

    keras.utils.set_random_seed(seed)
    data = make_windows()
    model = build_forecaster(data.past_len, data.horizon)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse", jit_compile=False)
    start = time.perf_counter()
    history = model.fit(
        data.train.inputs(), data.train.target,
        validation_data=(data.val.inputs(), data.val.target),
        epochs=epochs, batch_size=batch_size, shuffle=True, verbose=verbose,
    )
    seconds = time.perf_counter() - start

    test = data.test
    predicted = data.to_ppm(test, model.predict(test.inputs(), verbose=0))
    test_mae = float(np.mean(np.abs(predicted - test.truth)))
    baselines = {name: float(np.mean(np.abs(p - test.truth)))
                 for name, p in naive_forecasts(test, data).items()}

    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in (
        "forecaster.keras", "sample_inputs.npz", "test_inputs.npz", "test_truth.npy", "test_meta.npz")}
    model.save(paths["forecaster.keras"])
    spread = np.linspace(0, len(data.train.target) - 1, SAMPLE_WINDOWS).astype(int)
    np.savez(paths["sample_inputs.npz"], **{k: v[spread] for k, v in data.train.inputs().items()})
    np.savez(paths["test_inputs.npz"], **test.inputs())
    np.save(paths["test_truth.npy"], test.truth)
    np.savez(paths["test_meta.npz"], level=test.level, scale=np.float32(data.scale),
             months=test.months.astype(str))
    return {"history": history.history, "test_mae": test_mae, "baselines": baselines,
            "seconds": seconds, "paths": paths, "predicted": predicted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.forecast.train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--output-dir", default="build/forecast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="print Keras' progress per epoch")
    args = parser.parse_args(argv)
    result = train_forecaster(args.output_dir, epochs=args.epochs, seed=args.seed,
                              verbose=2 if args.verbose else 0)
    loss = result["history"]["loss"]
    print(f"trained {args.epochs} epochs in {result['seconds']:.1f} s; loss {loss[0]:.4f} -> {loss[-1]:.4f}, "
          f"val_loss {result['history']['val_loss'][-1]:.4f}")
    print(f"test MAE over 12 months ahead: model {result['test_mae']:.3f} ppm", end="")
    for name, mae in result["baselines"].items():
        print(f", {name} {mae:.3f} ppm", end="")
    print()
    print(f"saved {', '.join(os.path.basename(p) for p in result['paths'].values())} in {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
