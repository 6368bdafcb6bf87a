"""TFLite (LiteRT) artifact: builtin ops only, static shapes, signature `serving_default`."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator

from export.errors import ConversionError, first_line
from export.native_output import captured_native_output
from export.spec import ArtifactSpec


def build_tflite(
    spec: ArtifactSpec,
    fn,
    workdir: str,
    *,
    configure: Callable | None = None,
    calibration=None,
) -> str:
    """Convert `fn` to a `.tflite` file under `workdir`; return its path.

    `configure(converter)` may set quantization options; by default they are those of
    `spec.quantize` (`export.quantize.configure_tflite`, with `calibration` for int8). SELECT_TF_OPS
    stays off: a file that needs Flex ops fails here instead of on the device.
    """
    import tensorflow as tf

    if spec.batch is None:
        raise ConversionError("TFLite artifacts have a static batch; got batch=dynamic")
    # From a SavedModel (not from concrete functions): only this path keeps the signature
    # `serving_default` with its input and output names in the flatbuffer.
    from export.savedmodel import build_savedmodel

    saved = build_savedmodel(spec, fn, os.path.join(workdir, "tflite-src"))
    converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if configure is None and spec.quantize != "none":
        from export.quantize import configure_tflite

        configure = configure_tflite(spec, calibration)
    if configure is not None:
        configure(converter)
    try:
        with _calibration_chatter_dropped(converter):
            flatbuffer = converter.convert()
    except Exception as e:
        raise ConversionError(f"TFLite conversion failed: {first_line(e)}") from e
    path = os.path.join(workdir, spec.artifact_name("tflite"))
    with open(path, "wb") as f:
        f.write(flatbuffer)
    shutil.rmtree(os.path.dirname(saved), ignore_errors=True)
    return path


@contextlib.contextmanager
def _calibration_chatter_dropped(converter) -> Iterator[None]:
    """Full-int8 calibration runs the deprecated tf.lite.Interpreter (a UserWarning) and prints
    `fully_quantize: 0, inference_type: 6, ...` from C++ straight to the process's stderr, past
    `-q` and TF_CPP_MIN_LOG_LEVEL. Both are dropped while it converts; what the converter prints
    is written back if the conversion fails."""
    if getattr(converter, "representative_dataset", None) is None:
        yield
        return
    with warnings.catch_warnings(), captured_native_output((1, 2)):
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        yield


def main(argv: list[str] | None = None) -> int:
    from export.cli import main as cli_main

    return cli_main(argv, formats=("tflite",), prog="python -m export.tflite")


if __name__ == "__main__":
    sys.exit(main())
