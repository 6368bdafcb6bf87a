"""Run an artifact in the runtime it is deployed to: onnxruntime, the LiteRT interpreter, TensorFlow.

numpy plus the runtime only; TensorFlow is imported for SavedModel alone, and lazily, so that
`export.verify` works in a container that has only numpy and one runtime.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Mapping

import numpy as np

RUNTIME_MODULE = {"onnx": "onnxruntime", "tflite": "ai_edge_litert", "savedmodel": "tensorflow"}
RUNTIME_NAME = {"onnx": "onnxruntime", "tflite": "ai-edge-litert", "savedmodel": "tensorflow"}


class RuntimeMissing(RuntimeError):
    """The runtime a format needs is not installed here."""


def runtime_available(fmt: str) -> bool:
    return importlib.util.find_spec(RUNTIME_MODULE[fmt]) is not None


class Runner:
    """A loaded artifact: `run(feeds)` maps input name -> array to output name -> array."""

    def __init__(self, fn: Callable[[dict], dict], batch: int | None):
        self._fn = fn
        self.batch = batch

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run every row of `feeds`, in chunks of the artifact's fixed batch if it has one."""
        rows = len(next(iter(feeds.values())))
        step = self.batch or rows
        if rows % step:
            raise ValueError(
                f"The artifact takes batches of {step}; {rows} rows cannot be split into them."
            )
        chunks = [
            self._fn({k: np.ascontiguousarray(v[i:i + step]) for k, v in feeds.items()})
            for i in range(0, rows, step)
        ]
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def load_runner(fmt: str, path: str, *, batch: int | None = None, threads: int | None = None) -> Runner:
    """Load `path` in the runtime of `fmt`. `batch` is the artifact's fixed batch (None: dynamic)."""
    if not runtime_available(fmt):
        raise RuntimeMissing(f"{RUNTIME_NAME[fmt]} is not installed")
    if fmt == "onnx":
        return Runner(_onnx_fn(path, threads), batch)
    if fmt == "tflite":
        return Runner(_tflite_fn(path, threads), batch)
    if fmt == "savedmodel":
        return Runner(_savedmodel_fn(path), batch)
    raise ValueError(f"Unknown format {fmt!r}")


def onnx_session(path: str, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _onnx_fn(path: str, threads: int | None):
    session = onnx_session(path, threads)
    names = [o.name for o in session.get_outputs()]

    def run(feeds):
        return dict(zip(names, session.run(names, dict(feeds))))

    return run


def tflite_interpreter(path: str, threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    with _drop_litert_banner():
        interpreter = Interpreter(model_path=path, num_threads=threads)
        # Delegates are applied here (not at the first run), so the banner is too.
        interpreter.allocate_tensors()
    return interpreter


# LiteRT's C++ logger writes this to fd 2 the first time it applies XNNPACK: noise on a CLI's
# stderr, and it breaks --quiet. Python's sys.stderr cannot filter it, so fd 2 is captured.
_LITERT_BANNER = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


@contextlib.contextmanager
def _drop_litert_banner():
    """Capture fd 2 meanwhile, then pass on everything written there except LiteRT's banner.

    Exceptions propagate untouched; any other native message (an error) still reaches stderr.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a daemon): nothing to filter
        yield
        return
    if sys.stderr is not None:
        sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            if sys.stderr is not None:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True)
                    if line.strip() != _LITERT_BANNER]
            if kept:
                os.write(2, b"".join(kept))


def _tflite_fn(path: str, threads: int | None):
    interpreter = tflite_interpreter(path, threads)
    runner = interpreter.get_signature_runner("serving_default")
    input_details = runner.get_input_details()
    output_details = runner.get_output_details()

    def run(feeds):
        quantized = {
            name: quantize(np.asarray(feeds[name]), detail)
            for name, detail in input_details.items()
        }
        outputs = runner(**quantized)
        return {name: dequantize(outputs[name], output_details[name]) for name in outputs}

    return run


def quantize(array: np.ndarray, detail: dict) -> np.ndarray:
    """Float input -> the tensor's dtype, using its (scale, zero point) when it is integer."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu" and array.dtype.kind == "f":
        scale, zero_point = detail["quantization"]
        info = np.iinfo(dtype)
        q = np.round(array / scale) + zero_point
        return np.clip(q, info.min, info.max).astype(dtype)
    return array.astype(dtype, copy=False)


def dequantize(array: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu":
        scale, zero_point = detail["quantization"]
        return ((array.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return array


def _savedmodel_fn(path: str):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    signature = loaded.signatures["serving_default"]

    def run(feeds):
        outputs = signature(**{k: tf.constant(v) for k, v in feeds.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    # Keep the loaded object alive as long as the function.
    run.loaded = loaded
    return run
