"""One worker process of the embedded engine: uvicorn (httptools, uvloop) on an inherited socket.

Started by `export.serve.embedded` as `python -m export.serve.worker FD STATE INDEX` with the
models and options pickled on stdin. It answers the Open Inference Protocol through
`export.serve.endpoint` (the code the Ray engine runs too) from a raw ASGI callable (no router
framework: a request is one dict lookup away from its model), one runtime session per model,
inference in the event loop for small requests (the layer runs in ~0.06 ms; a thread hop costs
more than that) and in a thread above `THREAD_ABOVE` elements.

STATE is a small file shared (mmap) by the supervisor and every worker: byte INDEX is this
worker's state (0 loading, 1 warm, 2 stopped listening), the last byte the supervisor's. The
server is ready when every worker is warm; on SIGTERM a worker stops listening, waits until
everyone has (so a client told `Connection: close` cannot reconnect to a worker still
accepting), then answers what arrives with `Connection: close` and exits when its connections
are done: no accepted request is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import mmap
import os
import pickle
import signal
import socket
import sys
import threading
import time

from export.serve.endpoint import (
    HEADER_LENGTH,
    ModelEndpoint,
    Reply,
    RootEndpoint,
    check_declared_size,
    error_reply,
    guarded,
    too_large,
)
from export.serve.protocol import RequestError, refuse_by_hand

log = logging.getLogger("export.serve")

LOADING, WARM, STOPPED = 0, 1, 2
# Requests with more input elements than this run in a thread, so one long request does not
# hold the event loop (health checks, other connections) for its whole run.
THREAD_ABOVE = 1 << 16
# While draining: a worker whose connections sent nothing for this long closes them.
IDLE_GRACE_S = 0.5
# How long a draining worker waits for the others to stop listening (only a hung worker makes
# it wait that long).
BARRIER_TIMEOUT_S = 5.0
# Test hook: warm-up waits until this file exists (tests see /v2/health/ready answer 503 first).
HOLD_ENV = "XATTN_SERVE_WARMUP_HOLD"

_HEADER = HEADER_LENGTH.lower().encode()


class SharedState:
    """The mmap'd state bytes: one per worker, the last one the supervisor's."""

    def __init__(self, path: str, workers: int):
        self.workers = workers
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), workers + 1)

    def set(self, index: int, value: int) -> None:
        self.map[index] = value

    def all_at_least(self, value: int, *, supervisor: bool = False) -> bool:
        n = self.workers + (1 if supervisor else 0)
        return all(b >= value for b in self.map[:n])


class App:
    """The raw ASGI callable: `/v2/...` to `RootEndpoint` or a `ModelEndpoint`."""

    def __init__(self, endpoints: dict[str, ModelEndpoint], root: RootEndpoint, state, index,
                 max_body: int):
        self.endpoints = endpoints
        self.root = root
        self.state = state
        self.index = index
        self.max_body = max_body
        self.draining = False
        self.inflight = 0
        self.last_request = time.monotonic()

    def ready(self) -> bool:
        return not self.draining and self.state.all_at_least(WARM)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        self.inflight += 1
        self.last_request = time.monotonic()
        try:
            reply = await self._handle(scope, receive)
            if reply is not None:
                await self._send(send, reply)
        finally:
            self.inflight -= 1
            self.last_request = time.monotonic()

    async def _handle(self, scope, receive) -> Reply | None:
        path, method = scope["path"], scope["method"]
        if path.startswith("/v2/models/"):
            name = path[11:].split("/", 1)[0]
            endpoint = self.endpoints.get(name)
            if endpoint is not None:
                what = guarded(lambda: endpoint.route(method, path), log, name)
                if what != "infer":
                    return what
                return await self._infer(endpoint, scope, receive)
        return guarded(lambda: self.root.reply(method, path, self.ready()), log, "/v2")

    async def _infer(self, endpoint: ModelEndpoint, scope, receive) -> Reply | None:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        try:
            check_declared_size(None if declared is None else declared.decode("latin-1"),
                                self.max_body)
        except RequestError as e:  # answered before the body is read
            return error_reply(e)
        message = await receive()
        body = message.get("body", b"")
        if message.get("more_body"):
            chunks, total = [body], len(body)
            while message.get("more_body"):
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > self.max_body:
                    return error_reply(too_large(self.max_body))
            body = b"".join(chunks)
        elif message["type"] == "http.disconnect":
            return None
        if len(body) > self.max_body:
            return error_reply(too_large(self.max_body))
        length = headers.get(_HEADER)
        encoding = headers.get(b"content-encoding")
        length = None if length is None else length.decode("latin-1")
        encoding = None if encoding is None else encoding.decode("latin-1")

        def decode():
            return endpoint.decode(body, length, encoding)

        decoded = guarded(decode, log, endpoint.name)
        if isinstance(decoded, Reply):
            return decoded
        request, feeds = decoded
        if sum(math.prod(a.shape) for a in feeds.values()) <= THREAD_ABOVE:
            return guarded(lambda: endpoint.encode(request, endpoint.run(feeds)), log,
                           endpoint.name)
        return await asyncio.to_thread(
            guarded, lambda: endpoint.encode(request, endpoint.run(feeds)), log, endpoint.name
        )

    async def _send(self, send, reply: Reply) -> None:
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                   for k, v in reply.headers.items()]
        headers.append((b"content-length", str(len(reply.body)).encode()))
        if self.draining:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


def _server_class():
    import uvicorn  # lazy: imported in the worker process only

    class DrainingServer(uvicorn.Server):
        """uvicorn, with SIGTERM draining as described in the module docstring."""

        app: App
        drain_seconds: float
        grpc = None  # the KServe V2 gRPC server, with --grpc-port

        @contextlib.contextmanager
        def capture_signals(self):
            # Ctrl-C reaches the whole process group: the supervisor alone decides.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "should_exit", True))
            yield

        async def shutdown(self, sockets=None):
            app = self.app
            grpc_done = None if self.grpc is None else self.grpc.stop(grace=self.drain_seconds)
            for server in self.servers:
                server.close()
            app.state.set(app.index, STOPPED)
            deadline = time.monotonic() + min(BARRIER_TIMEOUT_S, self.drain_seconds)
            while (not app.state.all_at_least(STOPPED, supervisor=True)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.01)
            app.draining = True
            deadline = time.monotonic() + self.drain_seconds
            while self.server_state.connections and time.monotonic() < deadline:
                idle = time.monotonic() - app.last_request
                if app.inflight == 0 and idle > IDLE_GRACE_S:
                    break
                await asyncio.sleep(0.01)
            await super().shutdown(sockets=None)
            if grpc_done is not None:
                await asyncio.to_thread(grpc_done.wait, self.drain_seconds)

    return DrainingServer


def _warm_up(endpoints: dict[str, ModelEndpoint], state: SharedState, index: int) -> None:
    hold = os.environ.get(HOLD_ENV)
    while hold and not os.path.exists(hold):
        time.sleep(0.05)
    for endpoint in endpoints.values():
        endpoint.warm_up()
    state.set(index, WARM)


def serve_worker(fd: int, state_path: str, index: int, config: dict) -> None:
    import uvicorn  # lazy: imported in the worker process only

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    options = config["options"]
    state = SharedState(state_path, config["workers"])
    state.set(index, LOADING)
    endpoints = {
        m.name: ModelEndpoint(m, threads=options.threads, max_body=options.max_body_bytes,
                              max_batch=options.max_batch)
        for m in config["models"]
    }
    app = App(endpoints, RootEndpoint(list(endpoints), config["version"]), state, index,
              options.max_body_bytes)
    sock = socket.socket(fileno=fd)
    server = _server_class()(uvicorn.Config(
        app, loop="uvloop", http="httptools", lifespan="off", access_log=False,
        log_level="warning", server_header=False, date_header=False, proxy_headers=False,
    ))
    server.app = app
    server.drain_seconds = options.drain_seconds
    if options.grpc_port:
        from export.serve.grpc_service import build_server  # lazy: only with --grpc-port

        server.grpc = build_server(app, options.grpc_port, options.host, options.max_body_bytes)
    threading.Thread(target=_warm_up, args=(endpoints, state, index), daemon=True).start()
    server.run(sockets=[sock])




def main() -> int:
    refuse_by_hand("python -m export.serve.worker",
                   "a worker process that `python -m export.serve` starts "
                   "(a socket, a state file, models on stdin)")
    fd, state_path, index = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    config = pickle.load(sys.stdin.buffer)
    serve_worker(fd, state_path, index, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
