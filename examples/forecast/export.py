"""`python -m examples.forecast.export --run-dir DIR`: the trained forecaster in every format and
variant, run on the test split in each runtime, drawn against the truth.

What `train` saved in DIR (the model, training windows as sample inputs, the test split) goes
through `python -m export --model` exactly as a user runs it: float32 SavedModel, TFLite and ONNX,
then float16, dynamic-int8 and int8 TFLite and ONNX files (TFLite int8 calibrated on the sample
inputs; ONNX int8 is weight-only, nothing to calibrate), and the TFLM file
(`python -m export.tflm`: the same full-int8 file for microcontrollers, with its smallest tensor
arena and C++). Each published file is then run on the whole test split in its own runtime
(onnxruntime, LiteRT, TFLM's interpreter), the forecasts turned back into ppm, and one PNG drawn:
Keras, onnxruntime, LiteRT float32 and LiteRT int8 against the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

VARIANTS = ("float16", "dynamic-int8", "int8")
PLOTTED = {  # label -> (format, variant) drawn in the PNG
    "onnxruntime (ONNX float32)": ("onnx", "none"),
    "LiteRT (TFLite float32)": ("tflite", "none"),
    "LiteRT (TFLite int8)": ("tflite", "int8"),
}
SUFFIX = {"none": "", "float16": "_fp16", "dynamic-int8": "_dynint8", "int8": "_int8"}
# The microcontroller class the TFLM row is judged against: 256 KB of RAM.
MCU_RAM_BYTES = 256 * 1024
TFLM_FILE = "forecaster_int8.tflm.tflite"


def export_all(run_dir: str, out: str, *, quiet: bool = True,
               variants: tuple[str, ...] = VARIANTS) -> None:
    """Every format and variant of DIR/forecaster.keras into `out`, as the CLI builds them (the
    TFLM file with `python -m export.tflm`)."""
    from export.cli import main

    common = ["--model", os.path.join(run_dir, "forecaster.keras"), "--sample-inputs",
              os.path.join(run_dir, "sample_inputs.npz"), "--output-dir", out]
    if quiet:
        common.append("--quiet")
    runs = [(("savedmodel", "tflite", "onnx"), [])]
    runs += [(("tflite", "onnx"), ["--quantize", v]) for v in variants]
    runs += [(("tflm",), [])]
    progs = {3: "python -m export", 2: "python -m export.tflite/onnx", 1: "python -m export.tflm"}
    for formats, extra in runs:
        code = main([*common, *extra], formats=formats, prog=progs[len(formats)])
        if code:
            raise SystemExit(code)


def run_test_split(out: str, inputs: dict[str, np.ndarray], variants: tuple[str, ...] = VARIANTS
                   ) -> dict[tuple[str, str], np.ndarray]:
    """(format, variant) -> the test split's forecasts from the published file, in its runtime."""
    from export.runtime import runtimes

    found = {}
    for fmt, ext in (("onnx", ".onnx"), ("tflite", ".tflite")):
        for variant in ("none", *variants):
            path = os.path.join(out, f"forecaster{SUFFIX[variant]}{ext}")
            with open(path + ".json") as f:
                manifest = json.load(f)
            runner = runtimes.load_runner(fmt, path, batch=manifest["inputs"][0]["shape"][0],
                                          inputs=manifest["inputs"])
            found[(fmt, variant)] = runner.run(inputs)["forecast"]
    # TFLM's interpreter, one window at a time (batch 1), as on the board.
    runner = runtimes.load_runner("tflm", os.path.join(out, TFLM_FILE), batch=1)
    found[("tflm", "int8")] = runner.run(inputs)["forecast"]
    return found


def tflm_fit(out: str) -> dict:
    """The TFLM file's RAM verdict from its manifest: the smallest tensor arena it ran in (every
    tensor, inputs and outputs included, and TFLM's per-model structures), against 256 KB."""
    with open(os.path.join(out, TFLM_FILE + ".json")) as f:
        report = json.load(f)["deployment"]
    return {"arena_bytes": report["arena_bytes"], "flash_bytes": report["flash_bytes"],
            "fits": report["arena_bytes"] <= MCU_RAM_BYTES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.forecast.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="build/forecast", help="where `train` saved its files")
    parser.add_argument("--output", help="PNG path (default RUN_DIR/forecast.png)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the export logs")
    args = parser.parse_args(argv)

    import keras

    import xattn  # noqa: F401  (registers CrossAttention for safe_mode loading)
    from examples.forecast.plot import load_test_set, plot_forecasts

    out = os.path.join(args.run_dir, "artifacts")
    export_all(args.run_dir, out, quiet=not args.verbose)
    inputs, truth, level, months, scale = load_test_set(args.run_dir)
    model = keras.saving.load_model(os.path.join(args.run_dir, "forecaster.keras"), safe_mode=True)
    reference = np.asarray(model.predict(inputs, verbose=0))
    outputs = run_test_split(out, inputs)

    def ppm(values):
        return level[:, None] + scale * values

    print(f"test split: {len(truth)} windows x {truth.shape[1]} months; errors against Keras in "
          "the model's scaled units, MAE against the truth in ppm")
    fit = tflm_fit(out)
    print(f"{'artifact':<26}{'max |diff|':>12}{'rel L2':>10}{'MAE ppm':>10}{'arena bytes':>13}")
    print(f"{'Keras':<26}{'':>12}{'':>10}{np.mean(np.abs(ppm(reference) - truth)):>10.3f}")
    for (fmt, variant), values in outputs.items():
        diff = values - reference
        rel = np.linalg.norm(diff) / np.linalg.norm(reference)
        label = f"{fmt} {'float32' if variant == 'none' else variant}"
        arena = f"{fit['arena_bytes']:>13,}" if fmt == "tflm" else ""
        print(f"{label:<26}{np.abs(diff).max():>12.2e}{rel:>10.1e}"
              f"{np.mean(np.abs(ppm(values) - truth)):>10.3f}{arena}".rstrip())
    print(f"tflm int8 {'fits' if fit['fits'] else 'does not fit'} a 256 KB-RAM microcontroller: "
          f"tensor arena {fit['arena_bytes']:,} of {MCU_RAM_BYTES:,} bytes (the smallest TFLM runs "
          f"it in; outside it: the interpreter, the stack, the application); the model's "
          f"{fit['flash_bytes']:,} bytes stay in flash")
    drawn = {"Keras": ppm(reference)}
    drawn.update({label: ppm(outputs[key]) for label, key in PLOTTED.items()})
    path = plot_forecasts(truth, drawn, args.output or os.path.join(args.run_dir, "forecast.png"),
                          months=months)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
