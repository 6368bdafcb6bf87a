"""Run a TFLite file on TensorFlow Lite for Microcontrollers' own interpreter, and find the smallest
tensor arena it runs in.

tflite-micro's Python `runtime.Interpreter` runs TFLM's reference kernels (those a board without
an optimized kernel library runs) over a tensor arena of a given size. numpy and tflite-micro
only (no TensorFlow, no LiteRT): `export.runtime.verify` runs TFLM files with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from export.errors import ArenaError, one_line
from export.runtime.metadata import read_tflite_metadata
from export.runtime.native_output import captured_native_output
from export.runtime.runtimes import InputInfo, dequantize, quantize
from export.tflm.ops import read_model, schema

log = logging.getLogger("export")

# The arena search (`smallest_arena`): from 1 KiB up to 64 MiB, to the byte. An arena of
# `ARENA_CEILING` bytes that does not run the file is an ArenaError.
ARENA_FLOOR = 1 << 10
ARENA_CEILING = 64 << 20
# The runner's arena: twice the smallest doubling of 1 MiB that runs the file.
RUN_ARENA = 1 << 20


def _interpreter():
    from tflite_micro import runtime  # lazy: the registry imports runners by name

    return runtime.Interpreter


class TflmFailure(RuntimeError):
    """TFLM refused the file or an arena size; the message is the last line it printed."""


def _load(data: bytes, arena: int):
    """A TFLM interpreter of `data` over `arena` bytes, its native messages captured; TflmFailure
    with TFLM's own last line when it cannot allocate or resolve the model."""
    printed: list[bytes] = []
    try:
        with captured_native_output((1, 2), on_failure=printed.append):
            return _interpreter().from_bytes(data, arena_size=arena)
    except Exception as e:
        lines = [ln.strip() for ln in b"".join(printed).decode("utf-8", "replace").splitlines()
                 if ln.strip()]
        raise TflmFailure(one_line(lines[-1] if lines else str(e))) from e


def _invoke(interpreter, arrays: list[np.ndarray], n_outputs: int) -> list[np.ndarray]:
    """Set the inputs (TFLM's order), invoke, copy the outputs out of the arena."""
    printed: list[bytes] = []
    try:
        with captured_native_output((1, 2), on_failure=printed.append):
            for i, array in enumerate(arrays):
                interpreter.set_input(array, i)
            interpreter.invoke()
            return [np.array(interpreter.get_output(i)) for i in range(n_outputs)]
    except Exception as e:
        text = b"".join(printed).decode("utf-8", "replace").strip().splitlines()
        raise TflmFailure(one_line(text[-1] if text else str(e))) from e


@dataclass
class TflmModel:
    """A TFLite file on TFLM: its bytes, its named inputs and outputs by position, and details."""

    data: bytes
    input_index: dict[str, int]
    output_index: dict[str, int]
    input_details: list[dict]
    output_details: list[dict]

    @classmethod
    def read(cls, data: bytes, arena: int = ARENA_CEILING) -> TflmModel:
        facts = read_model(data)
        interpreter = _load(data, arena)
        return cls(data, facts.inputs, facts.outputs,
                   [interpreter.get_input_details(i) for i in range(len(facts.inputs))],
                   [interpreter.get_output_details(i) for i in range(len(facts.outputs))])

    def zeros(self) -> list[np.ndarray]:
        """One all-zero array per input, in TFLM's order."""
        return [np.zeros(tuple(d["shape"]), d["dtype"]) for d in self.input_details]

    def allocates_in(self, arena: int) -> bool:
        """Whether TFLM allocates the file's tensors (and its kernels' scratch buffers, requested
        while preparing) in a tensor arena of `arena` bytes: all an invoke uses."""
        try:
            _load(self.data, arena)
        except TflmFailure as e:
            log.debug("tflm     arena %d bytes: %s", arena, e)
            return False
        return True

    def runs_in(self, arena: int) -> bool:
        """Whether TFLM allocates and invokes the file in a tensor arena of `arena` bytes."""
        try:
            _invoke(_load(self.data, arena), self.zeros(), len(self.output_details))
        except TflmFailure as e:
            log.debug("tflm     arena %d bytes: %s", arena, e)
            return False
        return True


def smallest_arena(data: bytes, *, floor: int = ARENA_FLOOR, ceiling: int = ARENA_CEILING) -> dict:
    """The smallest tensor arena (bytes) in which TFLM allocates and runs the file, by bisection.

    The file must run in `ceiling` bytes and, below the answer, fail (allocation is monotonic in
    the arena size); the search is to the byte: about log2(ceiling - floor) interpreters, each
    allocating only (TFLM allocates everything before the first invoke); the answer is then
    invoked on zero inputs.

    Returns:
        {"arena_bytes", "search": {"low", "high", "granularity", "tries"}}.

    Raises:
        ArenaError: the file does not run even in `ceiling` bytes.
    """
    model = TflmModel.read(data, ceiling)
    tries = 1
    if not model.runs_in(ceiling):
        raise ArenaError(f"TFLM cannot run the file even in a {ceiling:,}-byte tensor arena")
    low, high = floor - 1, ceiling  # runs_in(low) is False (or below the floor), runs_in(high) True
    if model.allocates_in(floor):
        high = floor
    tries += 1
    while high - low > 1:
        middle = (low + high) // 2
        tries += 1
        if model.allocates_in(middle):
            high = middle
        else:
            low = middle
    if not model.runs_in(high):
        raise ArenaError(f"TFLM allocates the file in {high:,} bytes but cannot invoke it there")
    return {"arena_bytes": high,
            "search": {"low": floor, "high": ceiling, "granularity": 1, "tries": tries}}


def tflm_function(path: str, threads: int | None = None):
    """The tflm format's runner: (run, reported inputs) of TFLM's interpreter on the file.

    TFLM has no threads (`threads` is ignored) and no input names: feeds are placed by the
    signature's names (export.tflm.ops.read_model). The arena is the first of 1, 2, 4 ... MiB
    that runs the file (the smallest one is the manifest's `deployment.arena_bytes`).
    """
    with open(path, "rb") as f:
        data = f.read()
    arena = RUN_ARENA
    model = TflmModel.read(data, ARENA_CEILING)
    while not model.runs_in(arena):
        if arena >= ARENA_CEILING:
            raise ArenaError(f"TFLM cannot run {path} even in a {ARENA_CEILING:,}-byte tensor arena")
        arena *= 2
    interpreter = _load(data, arena)
    inputs = sorted(model.input_index, key=model.input_index.get)
    outputs = sorted(model.output_index, key=model.output_index.get)

    def detail(d: dict) -> dict:
        # LiteRT's spelling, for runtimes.quantize/dequantize: (scale, zero point) per tensor.
        q = d["quantization_parameters"]
        scale = float(q["scales"][0]) if len(q["scales"]) else 0.0
        zero_point = int(q["zero_points"][0]) if len(q["zero_points"]) else 0
        return {"dtype": d["dtype"], "quantization": (scale, zero_point)}

    in_details = [detail(d) for d in model.input_details]
    out_details = [detail(d) for d in model.output_details]

    def run(feeds):
        arrays = [quantize(np.asarray(feeds[name]), in_details[model.input_index[name]])
                  for name in inputs]
        got = _invoke(interpreter, arrays, len(outputs))
        return {name: dequantize(got[model.output_index[name]], out_details[model.output_index[name]])
                for name in outputs}

    reported = []
    for name in inputs:
        d = model.input_details[model.input_index[name]]
        dtype = np.dtype(d["dtype"])
        shape = tuple(int(x) for x in d["shape"])
        if dtype.kind in "iu" and in_details[model.input_index[name]]["quantization"][0]:
            reported.append(InputInfo(name, shape, "float32", stored_dtype=dtype.name))
        else:
            reported.append(InputInfo(name, shape, dtype.name))
    return run, reported


def read_tflm_metadata(path: str) -> dict[str, str] | None:
    """The tflm format's metadata reader: as export.runtime.metadata.read_tflite_metadata, with
    the schema tflite-micro ships (a board's host may have no LiteRT)."""
    return read_tflite_metadata(path, schema())
