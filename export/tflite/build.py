"""The TFLite (LiteRT) builder: builtin ops only, static shapes, signature `serving_default`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator

import tensorflow as tf

from export.errors import ConversionError, SpecError, first_line
from export.formats import Built
from export.metadata import add_tflite_metadata
from export.native_output import captured_native_output
from export.savedmodel.build import build_savedmodel
from export.spec import ArtifactSpec, bucket_key
from export.tflite.quantize import configure_tflite, convert_tflite, tflite_io_quantization
from export.tflite.signatures import alias_signature

log = logging.getLogger("export")


def build_tflite(
    spec: ArtifactSpec,
    fn,
    workdir: str,
    *,
    configure: Callable | None = None,
    calibration=None,
    metadata: dict[str, str] | None = None,
) -> Built:
    """Convert `fn` to a `.tflite` file under `workdir`.

    Args:
        spec: the artifact's shapes, names and variant; the batch must be fixed.
        fn: the inference function (`export.graph.build_inference_function`).
        workdir: the folder the file is written into.
        configure: `configure(converter)` may set quantization options; by default those of
            `spec.quantize` (`export.tflite.quantize.configure_tflite`).
        calibration: an `export.calibration.Calibration` for a full-int8 variant.
        metadata: {key: text} written into the file as the metadata buffer `xattn`
            (`export.metadata`).

    Returns:
        `Built(path, facts)`; an int8-io file's facts hold `io_quantization` (each integer
        input's and output's scale and zero point).

    Raises:
        ConversionError: a dynamic batch, or the converter failed. SELECT_TF_OPS stays off: a
        file that needs Flex ops fails here instead of on the device.
    """
    if spec.batch is None:
        raise ConversionError("TFLite artifacts have a static batch; got batch=dynamic")
    if spec.dynamic_lengths:
        raise SpecError("TFLite artifacts have static lengths; for several lengths in one file "
                        "use --lengths 16,64,256 (one signature per length)")
    # From a SavedModel (not from concrete functions): only this path keeps the signatures
    # (`serving_default`, and `len_16` ... for length buckets) with their input and output names.
    saved = build_savedmodel(spec, fn, os.path.join(workdir, "tflite-src")).path
    keys = list(fn) if isinstance(fn, dict) else ["serving_default"]
    converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=keys)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if configure is None and spec.quantize != "none":
        configure = configure_tflite(spec, calibration)
    if configure is not None:
        configure(converter)
    try:
        with _calibration_chatter_dropped(converter):
            flatbuffer = convert_tflite(converter, spec)
    except Exception as e:
        raise ConversionError(f"TFLite conversion failed: {first_line(e)}") from e
    if metadata:
        flatbuffer = add_tflite_metadata(flatbuffer, metadata)
    path = os.path.join(workdir, spec.artifact_name("tflite"))
    with open(path, "wb") as f:
        f.write(flatbuffer)
    if spec.lengths:
        alias_signature(path, "serving_default", bucket_key(spec.query_len, spec.kv_len))
    shutil.rmtree(os.path.dirname(saved), ignore_errors=True)
    facts = {"io_quantization": tflite_io_quantization(path)} if spec.int8_io else {}
    return Built(path, facts)


@contextlib.contextmanager
def _calibration_chatter_dropped(converter) -> Iterator[None]:
    """The converter's chatter, dropped while it converts: full-int8 calibration runs the
    deprecated tf.lite.Interpreter (a UserWarning) and prints `fully_quantize: 0, ...` from C++
    straight to the process's stderr, past `-q` and TF_CPP_MIN_LOG_LEVEL; a failed conversion
    prints its op lists there too."""
    # What the converter prints on a failure (op lists, MLIR locations) is in the error we raise:
    # it goes to the debug log (-v), so the user sees one line.
    def to_debug_log(text: bytes) -> None:
        log.debug("the TFLite converter printed:\n%s", text.decode("utf-8", "replace"))

    with warnings.catch_warnings(), captured_native_output((1, 2), on_failure=to_debug_log):
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        yield
