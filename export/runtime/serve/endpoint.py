"""The server's requests, engine-neutral: both engines (embedded, Ray) answer through this code.

`ModelEndpoint` is one verified artifact behind `/v2/models/<name>`: metadata, readiness and
inference (decode with `export.runtime.serve.protocol`, check, run, encode). `RootEndpoint` is `/v2`
itself: server metadata, health, and the error for a model that is not served. An engine only
moves bytes: it hands over (method, path, headers, body) and sends back a `Reply`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from export.errors import InputError, first_line
from export.formats import get_format
from export.runtime.serve.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    BodyTooLarge,
    RequestError,
    TensorSpec,
    decode_infer_request,
    encode_infer_response,
    error_body,
    read_content_encoding,
)

SERVER_NAME = "xattn"
JSON = "application/json"


@dataclass
class Reply:
    """What an engine sends back: status, body, headers (Content-Type included)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(body: bytes, status: int = 200) -> Reply:
    return Reply(status, body, {"Content-Type": JSON})


def error_reply(error, status: int | None = None) -> Reply:
    if status is None:
        status = getattr(error, "status", 400)
    return json_reply(error_body(error), status)


def encoded_slash(raw_path: bytes | None, method: str) -> Reply | None:
    """404 for a path holding an encoded slash (`%2F`, or `%5C`): servers decode the path first,
    and `/v2/models/x%2Finfer` would be routed as `/v2/models/x/infer`. None for any other."""
    raw = (raw_path or b"").lower()
    if b"%2f" in raw or b"%5c" in raw:
        return error_reply(f"no route {method} {raw_path[:80].decode('latin-1')}: an encoded "
                           "slash is not part of any path here", 404)
    return None


def check_declared_size(declared: str | None, limit: int) -> None:
    """A Content-Length above `limit` is refused before the body is read (413)."""
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise RequestError(f"Content-Length must be an integer; received {declared[:40]!r}") from None
    if size > limit:
        raise BodyTooLarge(
            f"request body is {size} bytes; this server takes at most {limit} (--max-body-mb)"
        )


def single_header(values: list[str], name: str) -> str | None:
    """The one value of header `name` (None if absent); RequestError if it is sent twice. The
    engines read a repeated header differently (the embedded one the last, Starlette the first):
    one request would mean two things."""
    if len(values) > 1:
        raise RequestError(f"header {name} is sent {len(values)} times; send it once")
    return values[0] if values else None


def too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body exceeds {limit} bytes, this server's limit (--max-body-mb)")


def load_runner(model, threads: int):
    """The runtime for one `ServedModel`, from its verified bytes (checked once more here: an
    engine's worker may run in another process or on another machine)."""
    from export.runtime import runtimes  # lazy: the runtimes load only where a model is served

    digest = hashlib.sha256(model.data).hexdigest()
    if digest != model.manifest["sha256"].lower():
        raise RuntimeError(f"{model.artifact}: sha256 {digest[:12]}... is not the manifest's")
    first = model.manifest["inputs"][0]["shape"]
    fixed = first[0] if first and first[0] is not None else None
    suffix = os.path.splitext(model.artifact)[1]
    with tempfile.TemporaryDirectory(prefix="xattn-serve-") as folder:
        path = os.path.join(folder, "model" + suffix)
        with open(path, "wb") as f:
            f.write(model.data)
        return runtimes.load_runner(model.format, path, batch=fixed, threads=threads,
                                    inputs=model.manifest["inputs"])


class Statistics:
    """What `/v2/models/<name>/stats` reports (Triton's statistics extension, in its shape): the
    requests answered, the rows inferred, the runs of the runtime, and the runs by batch size. A
    batch that the engine merged from several requests (the Ray engine, `--max-batch`) is one run
    of its rows. Counted per process (an embedded worker, a Ray replica): the one that answers
    reports its own. Its own lock: a report never waits for a run of the runtime (the route answers
    on the engine's event loop)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.last_ms = 0
        self.by_batch: dict[int, list[int]] = {}  # rows -> [runs, ns]; the totals derive from it

    def answered(self) -> None:
        with self.lock:
            self.requests += 1

    def count(self, rows: int, ns: int) -> None:
        with self.lock:
            self.last_ms = int(time.time() * 1000)
            seen = self.by_batch.setdefault(rows, [0, 0])
            seen[0] += 1
            seen[1] += ns

    def report(self, name: str) -> bytes:
        with self.lock:
            batches = sorted(self.by_batch.items())
            requests, last_ms = self.requests, self.last_ms
        return json.dumps({"model_stats": [{
            "name": name, "version": "1", "last_inference": last_ms,
            "inference_count": sum(rows * runs for rows, (runs, _) in batches),
            "execution_count": sum(runs for _, (runs, _) in batches),
            "inference_stats": {
                "success": {"count": requests},
                "compute_infer": {"count": sum(runs for _, (runs, _) in batches),
                                  "ns": sum(ns for _, (_, ns) in batches)},
            },
            "batch_stats": [
                {"batch_size": rows, "compute_infer": {"count": runs, "ns": ns}}
                for rows, (runs, ns) in batches
            ],
        }]}).encode()


class ModelEndpoint:
    """One artifact: `route(method, rest)` -> what to do; `infer(body, headers)` -> Reply."""

    def __init__(self, model, *, threads: int = 1, max_body: int, max_batch: int):
        self.name = model.name
        self.format = model.format
        self.manifest = model.manifest
        self.max_body = max_body
        self.max_batch = max_batch
        self.inputs = [TensorSpec.from_manifest(t) for t in model.manifest["inputs"]]
        self.outputs = [TensorSpec.from_manifest(t) for t in model.manifest["outputs"]]
        first = model.manifest["inputs"][0]["shape"]
        self.fixed_batch = first[0] if first and first[0] is not None else None
        self.runner = load_runner(model, threads)
        # LiteRT interpreters are not thread-safe; batches and lone requests take turns.
        self.lock = threading.Lock()
        self.statistics = Statistics()
        self.metadata = self._metadata()
        self.prefix = f"/v2/models/{self.name}"

    @property
    def artifact(self) -> str:
        return self.manifest["artifact"]

    def _metadata(self) -> bytes:
        parameters = {
            "artifact": self.artifact, "sha256": self.manifest["sha256"],
            "format": self.format, "max_batch": self.max_batch,
        }
        if self.fixed_batch and self.fixed_batch > 1:
            parameters["batch_multiple"] = self.fixed_batch
        return json.dumps({
            "name": self.name, "versions": ["1"], "platform": get_format(self.format).serve_platform,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
            "parameters": parameters,
        }).encode()

    def warm_up(self) -> None:
        """One request of zeros through the runtime (the first run allocates its buffers)."""
        rows = self.fixed_batch or 1
        feeds = {
            t.name: np.zeros((rows, *[max(d, 1) for d in t.shape[1:]]),
                             DATATYPES[t.datatype].newbyteorder("="))
            for t in self.inputs
        }
        with self.lock:  # not counted in the statistics: no client asked for it
            self.runner.run_checked(self.runner.check_feeds(feeds))

    def route(self, method: str, path: str) -> str | Reply:
        """'infer' for an inference request, else the Reply (metadata, ready, or an error)."""
        method = "GET" if method == "HEAD" else method  # HEAD: GET's status and headers
        rest = path.rstrip("/")[len(self.prefix):]
        if rest.startswith("/versions/"):
            version, _, tail = rest[len("/versions/"):].partition("/")
            if version != "1":
                raise RequestError(f"model {self.name} has version 1 only; received {version!r}")
            rest = "/" + tail if tail else ""
        if rest == "/infer":
            if method != "POST":
                raise RequestError("inference takes POST")
            return "infer"
        if rest == "" and method == "GET":
            return json_reply(self.metadata)
        if rest == "/ready" and method == "GET":
            return Reply(200)
        if rest == "/stats" and method == "GET":
            return json_reply(self.statistics.report(self.name))
        raise RequestError(f"no route {method} {path[:80]} for model {self.name}")

    def decode(self, body: bytes, header_length: str | None, encoding: str | None):
        """Body -> (decoded request, checked feeds); RequestError when it does not fit."""
        body = read_content_encoding(body, encoding, self.max_body)
        decoded = decode_infer_request(body, header_length, self.inputs, self.outputs)
        feeds = self.runner.check_feeds(decoded.feeds)
        if self.fixed_batch and decoded.rows % self.fixed_batch:
            raise RequestError(
                f"{self.artifact} takes batches of {self.fixed_batch}; send a multiple of "
                f"{self.fixed_batch} rows, not {decoded.rows}"
            )
        return decoded, feeds

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds from `decode` (checked) -> outputs."""
        rows = len(next(iter(feeds.values()))) if feeds else 0
        with self.lock:
            started = time.perf_counter_ns()
            results = self.runner.run_checked(feeds)
            elapsed = time.perf_counter_ns() - started
        self.statistics.count(rows, elapsed)
        return results

    def encode(self, decoded, results) -> Reply:
        content, headers = encode_infer_response(self.name, decoded, results, self.outputs)
        self.statistics.answered()
        return Reply(200, content, headers)

    def infer(self, body: bytes, header_length: str | None, encoding: str | None) -> Reply:
        """The whole request in the calling thread (the embedded engine's path)."""
        decoded, feeds = self.decode(body, header_length, encoding)
        return self.encode(decoded, self.run(feeds))


class RootEndpoint:
    """`/v2`: server metadata and health; a request for a model not served lands here too."""

    def __init__(self, names: list[str], version: str):
        self.names = sorted(names)
        self.metadata = json.dumps({
            "name": SERVER_NAME, "version": version, "extensions": ["binary_tensor_data"],
        }).encode()

    def reply(self, method: str, path: str, ready: bool = True) -> Reply:
        path = path.rstrip("/")
        method = "GET" if method == "HEAD" else method  # HEAD: GET's status and headers
        if path == "/v2" and method == "GET":
            return json_reply(self.metadata)
        if path == "/v2/health/live" and method == "GET":
            return Reply(200)
        if path == "/v2/health/ready" and method == "GET":
            return Reply(200) if ready else json_reply(
                error_body("not ready: warming up or draining"), 503)
        if path.startswith("/v2/models/"):
            name = path[len("/v2/models/"):].split("/")[0]
            return error_reply(
                f"unknown model {name[:80]!r}; this server serves {', '.join(self.names)}"
            )
        return error_reply(f"no route {method} {path[:80]}")


def guarded(fn, log, what: str):
    """Run `fn()` -> Reply; a RequestError or InputError is its 4xx, anything else a 500."""
    try:
        return fn()
    except InputError as e:
        return error_reply(e)
    except Exception as e:  # noqa: BLE001 - the server never dies of a request
        log.exception("request to %s failed", what)
        return error_reply(f"internal error: {type(e).__name__}: {first_line(e)}", 500)


__all__ = ["HEADER_LENGTH", "ModelEndpoint", "Reply", "RootEndpoint", "Statistics",
           "check_declared_size",
           "encoded_slash",
           "error_reply", "guarded", "json_reply", "load_runner", "single_header", "too_large"]
