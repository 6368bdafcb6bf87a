"""The TFLite (LiteRT) builder: builtin ops only, static shapes, signature `serving_default`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator

import tensorflow as tf

from export.errors import ConversionError, SpecError, first_line
from export.formats import Built
from export.runtime.metadata import add_tflite_metadata
from export.runtime.native_output import captured_native_output
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
            (`export.runtime.metadata`).

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
    source = tempfile.mkdtemp(prefix=".tflite-src-", dir=workdir)
    try:
        path, fallbacks = _convert(spec, fn, workdir, source, configure, calibration, metadata)
    finally:
        # The folder this call created, never one derived from the name.
        shutil.rmtree(source, ignore_errors=True)
    facts = {"io_quantization": tflite_io_quantization(path)} if spec.int8_io else {}
    if fallbacks:
        facts["converter_fallbacks"] = fallbacks
    return Built(path, facts)


def _convert(spec, fn, workdir: str, source: str, configure, calibration, metadata
             ) -> tuple[str, list[dict]]:
    """The SavedModel in `source`, converted into the `.tflite` file in `workdir`: its path and
    the converter fallbacks it took."""
    saved = build_savedmodel(spec, fn, source).path
    keys = list(fn) if isinstance(fn, dict) else ["serving_default"]
    converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=keys)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if configure is None and spec.quantize != "none":
        configure = configure_tflite(spec, calibration)
    if configure is not None:
        configure(converter)
    flatbuffer, fallbacks = _convert_with_fallbacks(converter, spec)
    if metadata:
        flatbuffer = add_tflite_metadata(flatbuffer, metadata)
    path = os.path.join(workdir, spec.artifact_name("tflite"))
    with open(path, "wb") as f:
        f.write(flatbuffer)
    if spec.lengths:
        alias_signature(path, "serving_default", bucket_key(spec.query_len, spec.kv_len))
    return path, fallbacks


# Converter options tried, in order, when a conversion fails with the error they address:
# (option, what in the error calls for it, why). A user's SavedModel (export.saved_model_reference)
# needs them; the lone layer and --model graphs convert without.
FALLBACKS = (
    ("_experimental_default_to_single_batch_in_tensor_list_ops",
     ("TensorListReserve", "element_shape to be static"),
     "an LSTM/RNN loop's tensor lists need a static element shape: batch 1 in them"),
    ("_experimental_disable_fuse_mul_and_fc",
     ("num_elements % ", "tfl.fully_connected"),
     "fusing a Mul into a FULLY_CONNECTED gave a kernel of an impossible shape"),
)


def _convert_with_fallbacks(converter, spec) -> tuple[bytes, list[dict]]:
    """The flatbuffer, and the fallback options it took ([] when none was needed)."""
    taken: list[dict] = []
    while True:
        try:
            with _calibration_chatter_dropped(converter):
                return convert_tflite(converter, spec), taken
        except Exception as e:
            text = str(e)
            fallback = next((f for f in FALLBACKS if not getattr(converter, f[0], False)
                             and any(m in text for m in f[1])), None)
            if fallback is None:
                raise ConversionError(f"TFLite conversion failed: {first_line(e)}") from e
            option, _, why = fallback
            log.info("fallback tflite     %s=True (%s)", option, why)
            setattr(converter, option, True)
            taken.append({"option": option, "value": True, "reason": why})


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
