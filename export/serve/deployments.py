"""The Ray Serve deployments: one `ModelServer` per artifact, and `ServerRoot` for `/v2` itself.

Each ModelServer is its own application at `/v2/models/<name>`, so a request goes from Ray's
HTTP proxy straight to a replica of its model (no router hop). The replica decodes the request
(`export.serve.protocol`), checks it, and queues its rows for `@serve.batch`; one batch at a
time runs in a worker thread, so the event loop keeps decoding the next requests meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import threading

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from export.errors import InputError, first_line
from export.serve.protocol import (
    HEADER_LENGTH,
    RequestError,
    TensorSpec,
    decode_infer_request,
    encode_infer_response,
    error_body,
    read_content_encoding,
)

log = logging.getLogger("ray.serve")

PLATFORM = {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
SERVER_NAME = "xattn"


def _json(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


def _error(error, status: int = 400) -> Response:
    return _json(error_body(error), status)


def _rows(items: list) -> int:
    """@serve.batch measures a batch in rows, not in requests: --max-batch is rows."""
    return sum(len(next(iter(feeds.values()))) for feeds in items)


class ModelServer:
    """One artifact behind `/v2/models/<name>`: metadata, readiness, inference."""

    def __init__(self, model, options):
        from export import runtimes  # lazy: the runtimes load only where a model is served

        self.name = model.name
        self.format = model.format
        self.manifest = model.manifest
        self.max_body = options.max_body_bytes
        self.max_batch = options.max_batch
        self.inputs = [TensorSpec.from_manifest(t) for t in model.manifest["inputs"]]
        self.outputs = [TensorSpec.from_manifest(t) for t in model.manifest["outputs"]]
        first = model.manifest["inputs"][0]["shape"]
        self.fixed_batch = first[0] if first and first[0] is not None else None
        # The bytes were verified in the driver; a replica may run on another machine, so it
        # gets them through Ray and checks them again before a runtime sees them.
        digest = hashlib.sha256(model.data).hexdigest()
        if digest != model.manifest["sha256"].lower():
            raise RuntimeError(f"{model.artifact}: sha256 {digest[:12]}... is not the manifest's")
        suffix = os.path.splitext(model.artifact)[1]
        with tempfile.TemporaryDirectory(prefix="xattn-serve-") as folder:
            path = os.path.join(folder, "model" + suffix)
            with open(path, "wb") as f:
                f.write(model.data)
            self.runner = runtimes.load_runner(
                model.format, path, batch=self.fixed_batch, threads=options.threads,
                inputs=model.manifest["inputs"],
            )
        # LiteRT interpreters are not thread-safe; batches and lone requests take turns.
        self._lock = threading.Lock()
        batching = options.max_batch > 1
        if batching:
            self._batched.set_max_batch_size(options.max_batch)
            self._batched.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)
        self.batching = batching
        self._metadata = self._model_metadata()

    def _model_metadata(self) -> bytes:
        parameters = {
            "artifact": self.model_artifact, "sha256": self.manifest["sha256"],
            "format": self.format, "max_batch": self.max_batch,
        }
        if self.fixed_batch and self.fixed_batch > 1:
            parameters["batch_multiple"] = self.fixed_batch
        return json.dumps({
            "name": self.name, "versions": ["1"], "platform": PLATFORM[self.format],
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
            "parameters": parameters,
        }).encode()

    def process_id(self) -> int:
        """This replica's process id (the load benchmark kills one)."""
        return os.getpid()

    @property
    def model_artifact(self) -> str:
        return self.manifest["artifact"]

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except InputError as e:
            return _error(e)
        except Exception as e:  # noqa: BLE001 - the server never dies of a request
            log.exception("request to %s failed", self.name)
            return _error(f"internal error: {type(e).__name__}: {first_line(e)}", 500)

    async def _route(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        prefix = f"/v2/models/{self.name}"
        rest = path[len(prefix):] if path.startswith(prefix) else path
        if rest.startswith("/versions/"):
            version, _, tail = rest[len("/versions/"):].partition("/")
            if version != "1":
                raise RequestError(f"model {self.name} has version 1 only; received {version!r}")
            rest = "/" + tail if tail else ""
        method = request.method
        if rest == "" and method == "GET":
            return _json(self._metadata)
        if rest == "/ready" and method == "GET":
            return Response(status_code=200)
        if rest == "/infer":
            if method != "POST":
                raise RequestError("inference takes POST")
            return await self._infer(request)
        raise RequestError(f"no route {method} {path} for model {self.name}")

    async def _infer(self, request: Request) -> Response:
        body = await self._read_body(request)
        body = read_content_encoding(body, request.headers.get("content-encoding"), self.max_body)
        decoded = decode_infer_request(
            body, request.headers.get(HEADER_LENGTH), self.inputs, self.outputs
        )
        feeds = self.runner.check_feeds(decoded.feeds)
        rows = decoded.rows
        if self.fixed_batch and rows % self.fixed_batch:
            raise RequestError(
                f"{self.model_artifact} takes batches of {self.fixed_batch}; send a multiple of "
                f"{self.fixed_batch} rows, not {rows}"
            )
        if self.batching and rows <= self.max_batch:
            results = await self._batched(feeds)
        else:
            results = await asyncio.to_thread(self._run, feeds)
        content, headers = encode_infer_response(self.name, decoded, results, self.outputs)
        return Response(content, status_code=200, headers=headers)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError("Content-Length is not an integer") from None
            if size > self.max_body:
                raise RequestError(
                    f"request body is {size} bytes; this server takes at most {self.max_body}"
                )
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_body:
                raise RequestError(f"request body exceeds {self.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self.runner.run(feeds)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=_rows)
    async def _batched(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if len(batch) == 1:
            return [await asyncio.to_thread(self._run, batch[0])]
        merged = {k: np.concatenate([feeds[k] for feeds in batch]) for k in batch[0]}
        results = await asyncio.to_thread(self._run, merged)
        bounds = np.cumsum([len(next(iter(feeds.values()))) for feeds in batch])[:-1]
        split = {k: np.split(v, bounds) for k, v in results.items()}
        return [{k: parts[i] for k, parts in split.items()} for i in range(len(batch))]


class ServerRoot:
    """`/v2`: server metadata and health; a request for a model not served lands here too."""

    def __init__(self, names: list[str], version: str):
        self.names = sorted(names)
        self.version = version

    async def __call__(self, request: Request) -> Response:
        try:
            path = request.url.path.rstrip("/")
            if path == "/v2" and request.method == "GET":
                return _json(json.dumps({
                    "name": SERVER_NAME, "version": self.version,
                    "extensions": ["binary_tensor_data"],
                }).encode())
            if path in ("/v2/health/ready", "/v2/health/live") and request.method == "GET":
                return Response(status_code=200)
            if path.startswith("/v2/models/"):
                name = path[len("/v2/models/"):].split("/")[0]
                return _error(
                    f"unknown model {name[:80]!r}; this server serves {', '.join(self.names)}"
                )
            return _error(f"no route {request.method} {path[:80]}")
        except Exception as e:  # noqa: BLE001 - the server never dies of a request
            return _error(f"internal error: {type(e).__name__}: {first_line(e)}", 500)
