"""Run an artifact in the runtime it is deployed to: onnxruntime, the LiteRT interpreter, TensorFlow.

numpy plus the runtime only. Each runtime is imported where it is first used, never at the top:
`export.runtime.verify` works in a container that has only numpy and one runtime (TensorFlow, for
SavedModel, is the one a device never has). Which function opens which format is the format
registry's `runner` (export.formats).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from export.errors import InputError
from export.formats import get_format
from export.runtime.native_output import captured_native_output, without_lines


class RuntimeMissing(RuntimeError):
    """The runtime a format needs is not installed here."""


def runtime_available(fmt: str) -> bool:
    """Whether the runtime of format `fmt` is installed here (without importing it)."""
    return importlib.util.find_spec(get_format(fmt).runtime_module) is not None


@dataclass(frozen=True)
class InputInfo:
    """What `Runner.run` accepts for one input. Axis 0 is the batch axis; None is any size.

    `dtype` is what a caller passes; `stored_dtype` is the tensor's own integer dtype when the
    runner quantizes floats into it (int8-io TFLite), and arrays of that dtype pass as they are.
    """

    name: str
    shape: tuple
    dtype: str | None
    stored_dtype: str | None = None

    @classmethod
    def of(cls, info) -> InputInfo:
        """From an InputInfo, a `export.spec.TensorInfo` or a manifest dict {name, shape, dtype}."""
        if isinstance(info, InputInfo):
            return info
        if isinstance(info, Mapping):
            name, shape, dtype = info["name"], info["shape"], info.get("dtype")
            if info.get("quantization") and dtype and np.dtype(dtype).kind in "iu":
                # An int8-io input (export.quantize): floats are quantized with its scale.
                return cls(str(name), _dims(shape), "float32", stored_dtype=np.dtype(dtype).name)
        else:
            name, shape, dtype = info.name, info.shape, info.dtype
        return cls(str(name), _dims(shape), None if dtype is None else np.dtype(dtype).name)

    def describe(self) -> str:
        # Axis 0 is always B: the runner splits any multiple of a fixed batch into chunks.
        dims = ", ".join(
            "B" if i == 0 else "?" if d is None else str(d) for i, d in enumerate(self.shape)
        )
        dtype = self.dtype or "any dtype"
        if self.stored_dtype:
            dtype += f" (or {self.stored_dtype})"
        text = f"{dtype} of shape ({dims}{',' if len(self.shape) == 1 else ''})"
        if self.shape and self.shape[0] not in (None, 1):
            text += f" with B a multiple of {self.shape[0]}"
        return text


def _dims(shape) -> tuple:
    # Runtimes spell a dynamic axis -1, None or a symbol ('unk__36', 'batch').
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape)


class Runner:
    """A loaded artifact: `run(feeds)` maps input name -> array to output name -> array.

    `inputs` (a list of InputInfo) are checked before anything reaches the runtime: a missing,
    extra or misshapen input raises `InputError` naming it, instead of the runtime's own error
    (or, in LiteRT, a silent resize of the input tensor).
    """

    def __init__(self, fn: Callable[[dict], dict], batch: int | None,
                 inputs: list | None = None):
        self._fn = fn
        self.batch = batch
        self.inputs = None if inputs is None else [InputInfo.of(i) for i in inputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run every row of `feeds`, in chunks of the artifact's fixed batch if it has one."""
        feeds = self.check_feeds(feeds)
        rows = len(next(iter(feeds.values())))
        step = self.batch or self._fixed_batch() or rows
        if rows % step:
            raise InputError(
                f"The artifact takes batches of {step}; {rows} rows cannot be split into them."
            )
        chunks = [
            self._fn({k: np.ascontiguousarray(v[i:i + step]) for k, v in feeds.items()})
            for i in range(0, rows, step)
        ]
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def run_checked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run` for feeds that `check_feeds` already returned (a server checks each request
        once): one call when the rows fit the artifact's batch, else `run`."""
        step = self.batch or self._fixed_batch()
        if step is None or len(next(iter(feeds.values()))) == step:
            return self._fn(feeds)
        return self.run(feeds)

    def _fixed_batch(self) -> int | None:
        if not self.inputs or not self.inputs[0].shape:
            return None
        return self.inputs[0].shape[0]

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`feeds` as arrays of the expected dtypes; InputError on anything that does not fit."""
        arrays = {str(k): np.asarray(v) for k, v in feeds.items()}
        if not arrays:
            raise InputError("no inputs given")
        if self.inputs is None:
            return arrays
        expected = {i.name: i for i in self.inputs}
        takes = ", ".join(f"`{i.name}` {i.describe()}" for i in self.inputs)
        missing = [n for n in expected if n not in arrays]
        if missing:
            raise InputError(
                f"missing input(s) {', '.join(f'`{n}`' for n in missing)}; the artifact takes "
                f"{takes}. Received: {sorted(arrays)}"
            )
        extra = sorted(set(arrays) - set(expected))
        if extra:
            raise InputError(
                f"unexpected input(s) {', '.join(f'`{n}`' for n in extra)}; the artifact takes "
                f"{takes}"
            )
        rows = None
        checked = {}
        for name, info in expected.items():
            array = arrays[name]
            received = f"Received: {name} of shape {array.shape}, dtype {array.dtype}"
            fits = array.ndim == len(info.shape) and all(
                e is None or s == e for i, (s, e) in enumerate(zip(array.shape, info.shape))
                if i > 0
            )
            if not fits:
                raise InputError(f"`{name}` must be {info.describe()}. {received}")
            if not _dtype_fits(array.dtype, info):
                raise InputError(f"`{name}` must be {info.describe()}. {received}")
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                sizes = {n: arrays[n].shape[0] for n in expected}
                raise InputError(f"every input must have the same batch size. Received: {sizes}")
            if info.dtype and np.dtype(info.dtype).kind == "f" and array.dtype.kind == "f":
                array = array.astype(info.dtype, copy=False)
            checked[name] = array
        return checked


def _dtype_fits(dtype: np.dtype, info: InputInfo) -> bool:
    if info.dtype is None:
        return True
    want = np.dtype(info.dtype)
    if info.stored_dtype and dtype == np.dtype(info.stored_dtype):
        return True
    if want.kind == "f":
        # float64 is cast down; ints and bools into a float input are a caller's mistake.
        return dtype.kind == "f"
    return dtype == want


def load_runner(fmt: str, path: str, *, batch: int | None = None, threads: int | None = None,
                inputs: list | None = None, signature: str | None = None) -> Runner:
    """Load an artifact in the runtime of its format.

    Args:
        fmt: the format's name (export.formats).
        path: the artifact's file (or folder).
        batch: the artifact's fixed batch; None for a dynamic batch axis.
        threads: the runtime's threads; None leaves the runtime's default.
        inputs: what `run` checks feeds against (TensorInfo, manifest dicts or InputInfo); by
            default the inputs the runtime reports for the file.
        signature: the signature to run (`len_64`) in a format with signatures; None runs
            `serving_default` (the file's only graph in formats without).

    Returns:
        A Runner whose `run(feeds)` maps input name -> array to output name -> array.

    Raises:
        SpecError: an unknown format. RuntimeMissing: its runtime is not installed here.
        Whatever the runtime raises for a file it cannot load.
    """
    record = get_format(fmt)
    if not runtime_available(fmt):
        raise RuntimeMissing(f"{record.runtime} is not installed")
    fn, reported = record.open_runner(path, threads, signature)
    if inputs is None:
        expected = reported
    else:
        # The caller's shapes and dtypes; the runtime adds what it stores (int8-io TFLite).
        stored = {i.name: i.stored_dtype for i in reported}
        expected = [
            dataclasses.replace(i, stored_dtype=stored.get(i.name))
            for i in (InputInfo.of(x) for x in inputs)
        ]
    runner = Runner(fn, batch, expected)
    runner.runtime_inputs = reported
    # A file that keeps state between calls, and how the runner resets it before each (or None).
    runner.state = getattr(fn, "state", None)
    return runner


def onnx_session(path: str, threads: int | None = None):
    import onnxruntime as ort  # lazy: a device may have LiteRT only

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_function(path: str, threads: int | None):
    """The onnx format's runner: (run, reported inputs) of an onnxruntime session."""
    session = onnx_session(path, threads)
    names = [o.name for o in session.get_outputs()]

    def run(feeds):
        return dict(zip(names, session.run(names, dict(feeds))))

    reported = [
        InputInfo(i.name, _dims(i.shape), _ONNX_DTYPES.get(i.type)) for i in session.get_inputs()
    ]
    return run, reported


_ONNX_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(bool)": "bool", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(int32)": "int32", "tensor(int64)": "int64",
}


def tflite_interpreter(path: str | None, threads: int | None = None, *,
                       content: bytes | None = None):
    """A LiteRT interpreter of the file at `path` (or of its bytes, `content`), tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter  # lazy: a server may have onnxruntime only

    source = {"model_path": path} if content is None else {"model_content": content}
    with captured_native_output((2,), keep=without_lines(_LITERT_BANNER)):
        interpreter = Interpreter(**source, num_threads=threads)
        # Delegates are applied here (not at the first run), so the banner is too.
        interpreter.allocate_tensors()
    return interpreter


def tflite_signature_keys(path: str) -> list[str]:
    """The tflite format's signature reader: the signature keys a file holds (`len_16`, ...)."""
    return list(tflite_interpreter(path).get_signature_list())


# LiteRT's C++ logger writes this to fd 2 the first time it applies XNNPACK: noise on a CLI's
# stderr, and it breaks --quiet. Any other native message still reaches stderr.
_LITERT_BANNER = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def tflite_function(path: str, threads: int | None, signature: str = "serving_default"):
    """The tflite format's runner: (run, reported inputs) of one signature (`serving_default`).

    A failed invoke replaces the interpreter: LiteRT's error reporter never empties its buffer,
    so each later error's text held every earlier one (another client's, on a server), and the
    buffer grew with each failure. A fresh interpreter's first error is that request's alone.
    """
    with open(path, "rb") as f:
        content = f.read()
    current = {}

    def load():
        interpreter = tflite_interpreter(None, threads, content=content)
        current["interpreter"] = interpreter
        current["runner"] = interpreter.get_signature_runner(signature)

    load()
    input_details = current["runner"].get_input_details()
    output_details = current["runner"].get_output_details()
    stateful = stateful_ops(current["interpreter"])

    def run(feeds):
        quantized = {
            name: quantize(np.asarray(feeds[name]), detail)
            for name, detail in input_details.items()
        }
        if stateful:
            # A converted LSTM keeps its state in variable tensors between invokes: each call
            # starts from zero state, as the reference does.
            current["interpreter"].reset_all_variables()
        try:
            outputs = current["runner"](**quantized)
        except RuntimeError:
            load()
            raise
        return {name: dequantize(outputs[name], output_details[name]) for name in outputs}

    if stateful:
        run.state = {"stateful": True, "ops": stateful, "reset": TFLITE_RESET}

    reported = [_tflite_input(name, detail) for name, detail in input_details.items()]
    return run, reported


# Builtin ops whose tensors keep values from one invoke() to the next (variable tensors).
TFLITE_STATEFUL_OPS = frozenset({
    "UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM", "UNIDIRECTIONAL_SEQUENCE_RNN",
    "BIDIRECTIONAL_SEQUENCE_RNN", "SVDF", "VAR_HANDLE", "ASSIGN_VARIABLE", "READ_VARIABLE",
})
# What a device must call, as the manifest's `state.reset` says it.
TFLITE_RESET = "interpreter.reset_all_variables() before each invoke()"


def stateful_ops(interpreter) -> list[str]:
    """The ops of a loaded LiteRT interpreter that keep state between invokes (sorted, once)."""
    return sorted({op["op_name"] for op in interpreter._get_ops_details()} & TFLITE_STATEFUL_OPS)


def _tflite_input(name: str, detail: dict) -> InputInfo:
    dtype = np.dtype(detail["dtype"])
    shape = _dims(detail.get("shape_signature", detail["shape"]))
    if dtype.kind in "iu" and detail["quantization"][0]:
        # A quantized input: the runner quantizes float arrays with the tensor's scale.
        return InputInfo(name, shape, "float32", stored_dtype=dtype.name)
    return InputInfo(name, shape, dtype.name)


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


def savedmodel_function(path: str, threads: int | None = None,
                        signature: str = "serving_default"):
    """The savedmodel format's runner (TensorFlow's own threads; `threads` is not applied)."""
    import tensorflow as tf  # lazy: never on a device, and verify must run without it

    loaded = tf.saved_model.load(path)
    signature = loaded.signatures[signature]

    def run(feeds):
        outputs = signature(**{k: tf.constant(v) for k, v in feeds.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    # Keep the loaded object alive as long as the function.
    run.loaded = loaded
    _, specs = signature.structured_input_signature
    reported = [
        InputInfo(name, _dims(s.shape.as_list()), s.dtype.name) for name, s in specs.items()
    ]
    return run, reported
