"""The Open Inference Protocol (KServe V2) on the wire: requests to numpy feeds, outputs to bytes.

numpy and the standard library only (orjson when installed: the same results, faster; no Ray, no
runtime), so every decoding rule is testable on its own. JSON tensors and the binary tensor data
extension (`Inference-Header-Content-Length`) both ways; a request that does not fit raises
`RequestError` with a one-line message, which the server answers with 400 `{"error": message}`
(413 for `BodyTooLarge`). An input whose manifest entry holds a `range` (ids that feed an
Embedding) takes values in [low, high) only.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np

from export.errors import InputError, first_line

try:
    # The serve extra brings orjson: ~5x faster on JSON tensors both ways (profiled: the
    # standard library's loads and dumps were 60% of a JSON request's time).
    import orjson
except ImportError:  # pragma: no cover - the standard library does the same, slower
    orjson = None


def _loads(data):
    return orjson.loads(data) if orjson is not None else json.loads(data)


def _dumps(value) -> bytes:
    if orjson is not None:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(value, separators=(",", ":"), default=lambda a: a.tolist()).encode()

# V2 datatype <-> numpy, little-endian on the wire (binary extension) as Triton sends it.
DATATYPES = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
HEADER_LENGTH = "Inference-Header-Content-Length"
# Request bodies larger than this are refused before they are read (CLI: --max-body-mb).
DEFAULT_MAX_BODY_BYTES = 32 << 20
# The embedded engine's bounds on a request's head (request line + headers: 431 past it) and on
# a connection that stalls while sending its head or body (closed; CLI: --read-timeout).
DEFAULT_MAX_HEADER_BYTES = 64 << 10
DEFAULT_READ_TIMEOUT_S = 15.0
# ...and on a body that keeps making progress, too slowly: its whole body must arrive within this
# many seconds of its head (1 byte every 14 s kept a 32 MB body open for months; --body-timeout).
DEFAULT_BODY_TIMEOUT_S = 60.0
# Open connections one worker holds; one more is answered 503 and closed (--max-connections).
DEFAULT_MAX_CONNECTIONS = 512


class RequestError(InputError):
    """A request the server cannot act on: answered with `status` (400) and this one line."""

    status = 400


class BodyTooLarge(RequestError):
    """A request body (declared, sent or inflated) above the server's limit: 413."""

    status = 413


def datatype_of(dtype) -> str:
    """numpy dtype (or its name) -> V2 datatype name."""
    want = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    for name, np_dtype in DATATYPES.items():
        if np_dtype == want:
            return name
    raise ValueError(f"no Open Inference Protocol datatype for {np.dtype(dtype).name}")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as served: name, V2 datatype, shape with -1 for a variable axis, and
    for ids that feed an Embedding the values taken, `range` = (low, high): [low, high)."""

    name: str
    datatype: str
    shape: tuple
    range: tuple[int, int] | None = None

    @classmethod
    def from_manifest(cls, entry: dict, *, batch_axis_variable: bool = True) -> TensorSpec:
        # Axis 0 is served as -1 even for a fixed-batch file: the server feeds it in chunks.
        shape = tuple(
            -1 if d is None or (i == 0 and batch_axis_variable) else int(d)
            for i, d in enumerate(entry["shape"])
        )
        bounds = entry.get("range")
        return cls(entry["name"], datatype_of(entry.get("dtype") or "float32"), shape,
                   None if bounds is None else (int(bounds[0]), int(bounds[1])))

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferRequest:
    """A decoded request: feeds by input name, and how each output is to be returned."""

    id: str | None
    feeds: dict[str, np.ndarray]
    # Output name -> True for binary; None means every output, all in `binary_default`.
    outputs: dict[str, bool] | None = None
    binary_default: bool = False
    parameters: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(next(iter(self.feeds.values())))


def read_content_encoding(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A body sent with Content-Encoding gzip or deflate (tritonclient's request compression)."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        # Bounded: a small compressed body must not inflate past the body limit.
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise RequestError(f"body is not valid {encoding} data: {e}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge(
            f"request body inflates to more than {limit} bytes (the server's limit); refusing it"
        )
    return out


def decode_infer_request(body: bytes, header_length: str | None,
                         inputs: list[TensorSpec], outputs: list[TensorSpec]) -> InferRequest:
    """A V2 infer request body (JSON, or JSON + binary tensors) -> InferRequest.

    Checks everything the protocol defines (JSON shape of the request, datatypes, element counts,
    binary sizes, output names) against the served model's `inputs` and `outputs`. Missing or
    extra inputs and wrong shapes are named here; the runner checks them again.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        text = header_length.strip()
        # ASCII digits only: int() also takes `1_0`, `+5` and other scripts' digits.
        if not (text.isascii() and text.isdigit()):
            raise RequestError(
                f"{HEADER_LENGTH} must be an integer; received {header_length[:40]!r}")
        size = int(text)
        if not 0 < size <= len(body):
            raise RequestError(
                f"{HEADER_LENGTH} is {size}, but the body holds {len(body)} bytes"
            )
        header, binary = body[:size], memoryview(body)[size:]
    try:
        request = _loads(header)
    except UnicodeDecodeError as e:
        raise RequestError(f"request JSON is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(
            f"request body is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:
        raise RequestError("request JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise RequestError(f"request must be a JSON object, not a {type(request).__name__}")
    parameters = _object(request.get("parameters", {}), "parameters")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("request `id` must be a string")
    entries = request.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise RequestError("request must hold a non-empty `inputs` list")

    expected = {t.name: t for t in inputs}
    # Only a header that spells true/false can hold one inside a number list: the (slower) scan
    # for them runs then only.
    maybe_bools = (not isinstance(header, (bytes, bytearray))
                   or b"true" in header or b"false" in header)
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RequestError("every entry of `inputs` must be an object with a string `name`")
        name = entry["name"]
        if name in feeds:
            raise RequestError(f"input `{name}` is given twice")
        spec = expected.get(name)
        if spec is None:
            raise RequestError(
                f"unexpected input `{_short(name)}`; the model takes "
                f"{', '.join(f'`{n}`' for n in expected)}"
            )
        datatype = entry.get("datatype")
        if datatype != spec.datatype:
            raise RequestError(
                f"input `{name}` has datatype {spec.datatype}; received {_short(datatype)}"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise RequestError(f"input `{name}` shape must be a list of non-negative integers")
        _check_shape(name, shape, spec)
        count = math.prod(shape)
        dtype = DATATYPES[datatype]
        input_parameters = _object(entry.get("parameters", {}), f"input `{name}` parameters")
        binary_size = input_parameters.get("binary_data_size")
        if binary_size is not None:
            if "data" in entry:
                raise RequestError(f"input `{name}` has both `data` and binary_data_size")
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise RequestError(f"input `{name}` binary_data_size must be a non-negative integer")
            if binary_size != count * dtype.itemsize:
                raise RequestError(
                    f"input `{name}` of shape {shape} and datatype {datatype} takes "
                    f"{count * dtype.itemsize} bytes; binary_data_size says {binary_size}"
                )
            if offset + binary_size > len(binary):
                raise RequestError(
                    f"input `{name}` needs {binary_size} bytes of binary data; the body holds "
                    f"{len(binary) - offset} after the previous inputs"
                )
            array = np.frombuffer(binary[offset:offset + binary_size], dtype=dtype)
            if dtype.kind == "b":
                # Any non-zero byte is true: numpy keeps a 0x02 "true" byte as it is, and a graph
                # that casts the mask to float would compute with 2.0.
                array = array.view(np.uint8) != 0
            offset += binary_size
        else:
            if "data" not in entry:
                raise RequestError(f"input `{name}` has neither `data` nor binary_data_size")
            array = _json_data(name, entry["data"], count, dtype, maybe_bools)
        if spec.range is not None:
            _check_range(name, array, spec.range)
        feeds[name] = array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    if offset != len(binary):
        raise RequestError(
            f"the body holds {len(binary) - offset} bytes of binary data that no input claims"
        )
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise RequestError(
            f"missing input(s) {', '.join(f'`{n}`' for n in missing)}; the model takes "
            f"{', '.join(f'`{n}`' for n in expected)}"
        )
    rows = {n: a.shape[0] for n, a in feeds.items()}
    if len(set(rows.values())) > 1:
        raise RequestError(f"every input must have the same batch size; received {rows}")
    if not next(iter(rows.values())):
        raise RequestError("the batch axis is 0: send at least one row")

    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise RequestError("parameters.binary_data_output must be true or false")
    requested = None
    if "outputs" in request:
        wanted = request["outputs"]
        if not isinstance(wanted, list):
            raise RequestError("request `outputs` must be a list")
        known = {t.name for t in outputs}
        requested = {}
        for entry in wanted:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise RequestError("every entry of `outputs` must be an object with a `name`")
            if entry["name"] not in known:
                raise RequestError(
                    f"unknown output `{_short(entry['name'])}`; the model returns "
                    f"{', '.join(f'`{n}`' for n in known)}"
                )
            out_parameters = _object(entry.get("parameters", {}), "output parameters")
            if out_parameters.get("classification"):
                raise RequestError("the classification extension is not supported")
            binary = out_parameters.get("binary_data", binary_default)
            if not isinstance(binary, bool):
                raise RequestError("output parameters.binary_data must be true or false")
            requested[entry["name"]] = binary
        if not requested:
            requested = None
    return InferRequest(request_id, feeds, requested, binary_default, parameters)


def _check_shape(name: str, shape: list, spec: TensorSpec) -> None:
    fits = len(shape) == len(spec.shape) and all(
        e == -1 or s == e for s, e in zip(shape, spec.shape)
    )
    if not fits:
        raise RequestError(
            f"input `{name}` must have shape {list(spec.shape)} (-1: any size); received {shape}"
        )
    if 0 in shape[1:]:  # an empty sequence: the runtime's own error, answered 500, otherwise
        raise RequestError(f"input `{name}` has an axis of size 0 past the batch; received {shape}")


def _check_range(name: str, array: np.ndarray, bounds: tuple[int, int]) -> None:
    """Ids outside the manifest's [low, high) are the client's error: the runtimes answered an id
    past an Embedding with their own error (500) and wrapped -1 to the last row (ONNX Gather)."""
    low, high = bounds
    outside = (array < low) | (array >= high)
    if outside.any():
        raise RequestError(f"input `{name}` holds {array[outside].flat[0]}, outside "
                           f"[{low}, {high}) (the ids its Embedding takes)")


def _json_data(name: str, data, count: int, dtype: np.dtype, maybe_bools: bool = True) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(f"input `{name}` data must be a JSON list")
    if maybe_bools and dtype.kind != "b" and _holds_bool(data):
        # numpy takes [1.5, true] as [1.5, 1.0]: a true/false among numbers is refused.
        raise RequestError(f"input `{name}` data must be {_kind_word(dtype.kind)}; received a "
                           "true/false among them")
    try:
        # Without a dtype first: strings, nulls and ragged nesting must not be coerced.
        array = np.asarray(data)
    except (ValueError, OverflowError):
        raise RequestError(f"input `{name}` data is ragged or not numbers") from None
    kind = array.dtype.kind if array.size else dtype.kind
    allowed = {"b": "b", "f": "iuf", "i": "iu", "u": "iu"}[dtype.kind]
    if kind not in allowed:
        raise RequestError(
            f"input `{name}` data must be {_kind_word(dtype.kind)}; received "
            f"{_kind_word(kind)}"
        )
    if array.size != count:
        raise RequestError(
            f"input `{name}` shape holds {count} elements; data holds {array.size}"
        )
    try:
        with np.errstate(over="raise", invalid="raise"):
            converted = array.astype(dtype)
    except (FloatingPointError, OverflowError):
        raise RequestError(f"input `{name}` data does not fit {dtype.name}") from None
    if dtype.kind in "iu" and not np.array_equal(converted, array):
        raise RequestError(f"input `{name}` data does not fit {dtype.name}")
    return converted.reshape(-1)


def _holds_bool(data: list) -> bool:
    stack = [data]
    while stack:
        for item in stack.pop():
            if isinstance(item, bool):
                return True
            if isinstance(item, list):
                stack.append(item)
    return False


def _kind_word(kind: str) -> str:
    return {"b": "true/false", "f": "numbers", "i": "integers", "u": "integers",
            "U": "strings", "O": "mixed values"}.get(kind, "values of another type")


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object")
    return value


def _short(value, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def encode_infer_response(model_name: str, request: InferRequest, results: dict[str, np.ndarray],
                          outputs: list[TensorSpec]) -> tuple[bytes, dict[str, str]]:
    """Outputs -> (body, headers): JSON tensors, or JSON + binary where the request asked."""
    wanted = request.outputs or {t.name: request.binary_default for t in outputs}
    tensors, blobs = [], []
    for spec in outputs:
        if spec.name not in wanted:
            continue
        array = np.ascontiguousarray(results[spec.name], dtype=DATATYPES[spec.datatype])
        tensor = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if wanted[spec.name]:
            data = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                # JSON has no NaN or inf (orjson would write null): refused, not hidden.
                bad = int(array.size - np.isfinite(array).sum())
                raise RequestError(
                    f"output `{spec.name}` holds {bad} NaN/inf value(s), which JSON cannot carry; "
                    "ask for it as binary data (parameters.binary_data_output: true)")
            # orjson writes the array itself; float32 in its own shortest form.
            tensor["data"] = array.reshape(-1)
        tensors.append(tensor)
    response = {"model_name": model_name, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = _dumps(response)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {
        "Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header)),
    }


def error_body(error: BaseException | str) -> bytes:
    """The protocol's error object, one line."""
    text = error if isinstance(error, str) else first_line(error)
    return json.dumps({"error": " ".join(text.split())}).encode()


def refuse_by_hand(prog: str, what: str) -> None:
    """For the serving processes no one types (a worker, a load generator): `--help`, or a
    terminal on stdin, prints one line saying what the module is and exits (0 for --help, else 2)."""
    asked = bool({"-h", "--help"} & set(sys.argv[1:]))
    if asked or sys.stdin.isatty():
        print(f"usage: {prog} is internal: {what}; not a command to run by hand",
              file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
