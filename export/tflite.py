"""TFLite (LiteRT) artifact: builtin ops only, static shapes, signature `serving_default`."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable

from export.errors import ConversionError
from export.spec import ArtifactSpec


def build_tflite(
    spec: ArtifactSpec,
    fn,
    workdir: str,
    *,
    configure: Callable | None = None,
) -> str:
    """Convert `fn` to a `.tflite` file under `workdir`; return its path.

    `configure(converter)` may set quantization options (see `export.quantize`). SELECT_TF_OPS
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
    if configure is not None:
        configure(converter)
    try:
        flatbuffer = converter.convert()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"TFLite conversion failed: {first}") from e
    path = os.path.join(workdir, spec.artifact_name("tflite"))
    with open(path, "wb") as f:
        f.write(flatbuffer)
    shutil.rmtree(os.path.dirname(saved), ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    from export.cli import main as cli_main

    return cli_main(argv, formats=("tflite",), prog="python -m export.tflite")


if __name__ == "__main__":
    sys.exit(main())
