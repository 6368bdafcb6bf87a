"""The embedded engine (the default): N uvicorn worker processes sharing one listening socket.

No Ray, one machine: the supervisor (this module, in the CLI's process) binds HOST:PORT, then
starts `--workers` processes (`export.runtime.serve.worker`, default: one per core) that inherit the
socket; the kernel hands each new connection to one of them. Each worker loads its own runtime
session per model (`--threads` intra-op threads, default 1) and answers through
`export.runtime.serve.endpoint`, the same code as the Ray engine. A worker that dies is restarted; the
server is ready when every worker has run one warm-up request through every model.
`stop` drains: the supervisor stops listening, SIGTERMs the workers, and waits for them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from export.errors import UsageError
from export.runtime.serve.worker import WARM, SharedState, encode_config

log = logging.getLogger("export")


@dataclass
class EmbeddedServer:
    """A running set of workers; `url` is the `/v2` root."""

    names: list[str]
    url: str
    sock: socket.socket | None
    state_path: str
    state: SharedState
    config: bytes = field(repr=False)
    processes: list = field(default_factory=list)
    restarts: int = 0
    drain_seconds: float = 10.0

    @property
    def ready(self) -> bool:
        return self.state.all_at_least(WARM)


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening socket, or UsageError (exit 2) when HOST:PORT cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def start(models, options, version: str, *, timeout: float = 120.0) -> EmbeddedServer:
    """Bind, start `options.workers` workers, return once every one is warm."""
    sock = bind(options.host, options.port)
    folder = tempfile.mkdtemp(prefix="xattn-serve-state-")
    state_path = os.path.join(folder, "state")
    with open(state_path, "wb") as f:
        f.write(b"\0" * (options.workers + 1))
    port = sock.getsockname()[1]
    host = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    config = encode_config(models, options, version)
    server = EmbeddedServer([m.name for m in models], f"http://{host}:{port}/v2", sock,
                            state_path, SharedState(state_path, options.workers), config,
                            drain_seconds=options.drain_seconds)
    try:
        server.processes = [_spawn(server, i) for i in range(options.workers)]
        deadline = time.monotonic() + timeout
        while not server.ready:
            for i, proc in enumerate(server.processes):
                if proc.poll() is not None:
                    raise UsageError(f"serve worker {i} exited {proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise UsageError(f"serve workers not warm after {timeout:g} s")
            time.sleep(0.02)
    except BaseException:
        stop(server)
        raise
    return server


def _spawn(server: EmbeddedServer, index: int) -> subprocess.Popen:
    fd = server.sock.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-m", "export.runtime.serve.worker", str(fd), server.state_path, str(index)],
        stdin=subprocess.PIPE, pass_fds=(fd,),
        # Its own session would survive the supervisor; the same group gets Ctrl-C (ignored).
    )
    proc.stdin.write(server.config)
    proc.stdin.close()
    return proc


def watch(server: EmbeddedServer) -> None:
    """Restart any worker that died (called by the CLI while it serves)."""
    for i, proc in enumerate(server.processes):
        if proc.poll() is not None:
            log.warning("serve worker %d (pid %d) exited %s; restarting it", i, proc.pid,
                        proc.returncode)
            server.state.set(i, 0)
            server.processes[i] = _spawn(server, i)
            server.restarts += 1


def stop(server: EmbeddedServer) -> None:
    """Drain: stop listening, SIGTERM every worker, wait for them (then kill what is left)."""
    if server.sock is not None:
        server.sock.close()
        server.sock = None
    server.state.set(server.state.workers, 2)  # the supervisor no longer holds the socket
    for proc in server.processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + server.drain_seconds + 10
    for proc in server.processes:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.remove(server.state_path)
        os.rmdir(os.path.dirname(server.state_path))
    except OSError:
        pass
