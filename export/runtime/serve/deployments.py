"""The Ray Serve deployments: one `ModelServer` per artifact, and `ServerRoot` for `/v2` itself.

Each ModelServer is its own application at `/v2/models/<name>`, so a request goes from Ray's
HTTP proxy straight to a replica of its model (no router hop). The replica decodes the request
with `export.runtime.serve.endpoint` (the code the embedded engine runs too), checks it, and queues its
rows for `@serve.batch`; one batch at a time runs in a worker thread, so the event loop keeps
decoding the next requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from export.errors import InputError, first_line
from export.runtime.serve.endpoint import (
    HEADER_LENGTH,
    ModelEndpoint,
    Reply,
    RootEndpoint,
    check_declared_size,
    encoded_slash,
    error_reply,
    single_header,
    too_large,
)

log = logging.getLogger("ray.serve")


def _response(reply: Reply) -> Response:
    return Response(reply.body, status_code=reply.status, headers=reply.headers)


def _rows(items: list) -> int:
    """@serve.batch measures a batch in rows, not in requests: --max-batch is rows."""
    return sum(len(next(iter(feeds.values()))) for feeds in items)


class ModelServer:
    """One artifact behind `/v2/models/<name>` (`ModelEndpoint`), with `@serve.batch`."""

    def __init__(self, model, options):
        self.endpoint = ModelEndpoint(model, threads=options.threads,
                                      max_body=options.max_body_bytes,
                                      max_batch=options.max_batch)
        self.name = model.name
        self.max_body = options.max_body_bytes
        self.max_batch = options.max_batch
        # Warm before Serve counts the replica healthy (so before /v2/health/ready answers).
        self.endpoint.warm_up()
        self.batching = options.max_batch > 1
        if self.batching:
            self._batched.set_max_batch_size(options.max_batch)
            self._batched.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)

    def process_id(self) -> int:
        """This replica's process id (the load benchmark kills one)."""
        return os.getpid()

    async def __call__(self, request: Request) -> Response:
        try:
            refused = encoded_slash(request.scope.get("raw_path"), request.method)
            if refused is not None:
                return _response(refused)
            what = self.endpoint.route(request.method, request.url.path)
            if isinstance(what, Reply):
                return _response(what)
            return _response(await self._infer(request))
        except InputError as e:
            return _response(error_reply(e))
        except Exception as e:  # noqa: BLE001 - the server never dies of a request
            log.exception("request to %s failed", self.name)
            return _response(error_reply(f"internal error: {type(e).__name__}: {first_line(e)}",
                                         500))

    async def _infer(self, request: Request) -> Reply:
        check_declared_size(request.headers.get("content-length"), self.max_body)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_body:
                raise too_large(self.max_body)
            chunks.append(chunk)
        decoded, feeds = self.endpoint.decode(
            b"".join(chunks), single_header(request.headers.getlist(HEADER_LENGTH), HEADER_LENGTH),
            single_header(request.headers.getlist("content-encoding"), "Content-Encoding"),
        )
        if self.batching and decoded.rows <= self.max_batch:
            results = await self._batched(feeds)
        else:
            results = await asyncio.to_thread(self.endpoint.run, feeds)
        return self.endpoint.encode(decoded, results)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=_rows)
    async def _batched(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if len(batch) == 1:
            return [await asyncio.to_thread(self.endpoint.run, batch[0])]
        merged = {k: np.concatenate([feeds[k] for feeds in batch]) for k in batch[0]}
        results = await asyncio.to_thread(self.endpoint.run, merged)
        bounds = np.cumsum([len(next(iter(feeds.values()))) for feeds in batch])[:-1]
        split = {k: np.split(v, bounds) for k, v in results.items()}
        return [{k: parts[i] for k, parts in split.items()} for i in range(len(batch))]


class ServerRoot:
    """`/v2` (`RootEndpoint`): server metadata and health; unknown models land here too."""

    def __init__(self, names: list[str], version: str):
        self.endpoint = RootEndpoint(names, version)

    async def __call__(self, request: Request) -> Response:
        try:
            refused = encoded_slash(request.scope.get("raw_path"), request.method)
            if refused is not None:
                return _response(refused)
            return _response(self.endpoint.reply(request.method, request.url.path))
        except Exception as e:  # noqa: BLE001 - the server never dies of a request
            return _response(error_reply(f"internal error: {type(e).__name__}: {e}", 500))
