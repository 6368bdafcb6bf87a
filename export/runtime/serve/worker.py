"""One worker process of the embedded engine: uvicorn (httptools, uvloop) on an inherited socket.

Started by `export.runtime.serve.embedded` as `python -m export.runtime.serve.worker FD STATE INDEX` with the
models and options as JSON on stdin (`encode_config`; no pickle). It answers the Open Inference
Protocol through
`export.runtime.serve.endpoint` (the code the Ray engine runs too) from a raw ASGI callable (no router
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
import base64
import contextlib
import dataclasses
import json
import logging
import math
import mmap
import os
import signal
import socket
import sys
import threading
import time

from export.runtime.serve.endpoint import (
    HEADER_LENGTH,
    ModelEndpoint,
    Reply,
    RootEndpoint,
    check_declared_size,
    encoded_slash,
    error_reply,
    guarded,
    single_header,
    too_large,
)
from export.runtime.serve.protocol import RequestError, error_body, refuse_by_hand

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


def _values(scope, name: bytes) -> list[str]:
    """Every value of header `name` (lower case) in an ASGI scope, in order."""
    return [v.decode("latin-1") for k, v in scope["headers"] if k == name]


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
        refused = encoded_slash(scope.get("raw_path"), method)
        if refused is not None:
            return refused
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

        def decode():
            length = single_header(_values(scope, _HEADER), HEADER_LENGTH)
            encoding = single_header(_values(scope, b"content-encoding"), "Content-Encoding")
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


def _protocol_class(max_header_bytes: int, read_timeout_s: float,
                    body_timeout_s: float = float("inf"), max_connections: int | None = None):
    """uvicorn's httptools protocol with two bounds it lacks (a 300 MB header grew a worker by
    300 MB; a client sending half a head, or 1 byte of a 100-byte body, held its connection for
    minutes): a request head over `max_header_bytes` is answered 431 and closed; a connection is
    closed when its head is not complete `read_timeout_s` after it started (or after connecting),
    or when its body makes no progress for that long, or is not complete `body_timeout_s` after
    its head (1 byte every 14 s kept a 32 MB body open for months); a connection past
    `max_connections` open ones is answered 503 and closed. The event loop keeps serving the
    others."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # lazy: worker only

    too_large = error_body(f"request line and headers over {max_header_bytes} bytes (the "
                           "server's limit)")
    answer_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                  b"content-type: application/json\r\ncontent-length: "
                  + str(len(too_large)).encode() + b"\r\nconnection: close\r\n\r\n" + too_large)
    full = error_body(f"this worker holds {max_connections} open connections (the server's "
                      "limit, --max-connections); retry later")
    answer_503 = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                  b"content-length: " + str(len(full)).encode()
                  + b"\r\nconnection: close\r\n\r\n" + full)

    class GuardedProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._in_head = True
            self._head_bytes = 0
            self._completed = False
            self._timer = None
            self._body_deadline = None
            if max_connections is not None and len(self.connections) > max_connections:
                transport.write(answer_503)
                transport.close()
                return
            self._arm()  # a connection that sends nothing at all is a stalled head too

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(read_timeout_s, self._stalled)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._body_deadline is not None:
                self._body_deadline.cancel()
                self._body_deadline = None

        def _stalled(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()  # the app, if it waits for the body, sees a disconnect

        def _too_slow(self) -> None:
            self._body_deadline = None
            self._disarm()
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            was_in_head, self._completed = self._in_head, False
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self._in_head:
                # Counted by whole chunks (the parser keeps a partial header in memory): only a
                # chunk spent entirely on one request's head, so a body never counts.
                if was_in_head and not self._completed:
                    self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    self._refuse_head()
            elif self._timer is not None:
                self._arm()  # the body made progress: its stall is counted from here

        def _refuse_head(self) -> None:
            self._disarm()
            self.transport.write(answer_431)
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0
            self._arm()

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self.transport.is_closing():
                return
            # A head that arrived within one chunk (with its body, or pipelined) is not counted
            # by data_received: count the parsed head itself, with its line ends.
            head = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
            if head > max_header_bytes:
                self._refuse_head()  # no request is started: the app never sees it
                return
            if math.isfinite(body_timeout_s):
                # Progress re-arms the stall timer; this one is not re-armed: the whole body.
                self._body_deadline = self.loop.call_later(body_timeout_s, self._too_slow)
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self.transport.is_closing():
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self.transport.is_closing():
                super().on_message_complete()
            self._in_head, self._head_bytes, self._completed = True, 0, True
            self._disarm()  # the request is read; keep-alive idling is uvicorn's own timeout

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedProtocol


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


def _uvicorn_config(app, http):
    """uvicorn's settings for a worker. `ws="none"`: this server has no WebSocket route, and an
    upgrade handed the connection to uvicorn's WebSocket protocol, which answered 500 (and left
    the head and stall bounds of `http`); the request is now plain HTTP."""
    import uvicorn  # lazy: imported in the worker process only

    return uvicorn.Config(
        app, loop="uvloop", http=http, ws="none", lifespan="off", access_log=False,
        log_level="warning", server_header=False, date_header=False, proxy_headers=False,
    )


def _warm_up(endpoints: dict[str, ModelEndpoint], state: SharedState, index: int) -> None:
    hold = os.environ.get(HOLD_ENV)
    while hold and not os.path.exists(hold):
        time.sleep(0.05)
    for endpoint in endpoints.values():
        endpoint.warm_up()
    state.set(index, WARM)


def serve_worker(fd: int, state_path: str, index: int, config: dict) -> None:

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
    http = _protocol_class(options.max_header_bytes, options.read_timeout_s,
                           options.body_timeout_s, options.max_connections)
    server = _server_class()(_uvicorn_config(app, http))
    server.app = app
    server.drain_seconds = options.drain_seconds
    if options.grpc_port:
        from export.runtime.serve.grpc_service import build_server  # lazy: only with --grpc-port

        try:
            server.grpc = build_server(app, options.grpc_port, options.host,
                                       options.max_body_bytes)
        except OSError as e:  # taken since the supervisor's check: one line, not a traceback
            print(f"python -m export.serve: error: --grpc-port {options.grpc_port}: {e}",
                  file=sys.stderr)
            sys.exit(2)
    threading.Thread(target=_warm_up, args=(endpoints, state, index), daemon=True).start()
    server.run(sockets=[sock])




def encode_config(models, options, version: str) -> bytes:
    """The worker's configuration as JSON (the artifact bytes base64): what `decode_config`
    reads on the worker's stdin. JSON, not pickle: nothing a worker reads can run code."""
    return json.dumps({
        "models": [{"name": m.name, "format": m.format, "artifact": m.artifact,
                    "manifest": m.manifest, "data": base64.b64encode(m.data).decode("ascii")}
                   for m in models],
        "options": dataclasses.asdict(options), "workers": options.workers, "version": version,
    }).encode()


def decode_config(data: bytes) -> dict:
    """`encode_config`'s JSON -> {"models": [ServedModel], "options": ServeOptions, ...}."""
    from export.runtime.serve import (  # lazy: the package imports this module's users
        ServedModel,
        ServeOptions,
    )

    config = json.loads(data)
    config["models"] = [ServedModel(m["name"], m["format"], m["artifact"], m["manifest"],
                                    base64.b64decode(m["data"], validate=True))
                        for m in config["models"]]
    config["options"] = ServeOptions(**config["options"])
    return config


def main() -> int:
    refuse_by_hand("python -m export.runtime.serve.worker",
                   "a worker process that `python -m export.serve` starts "
                   "(a socket, a state file, models on stdin)")
    fd, state_path, index = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    config = decode_config(sys.stdin.buffer.read())
    serve_worker(fd, state_path, index, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
