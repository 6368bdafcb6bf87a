"""Serve verified artifacts, speaking the Open Inference Protocol (KServe V2), on two engines.

`load_models(path)` verifies every ONNX and TFLite artifact under PATH with `export.runtime.verify`
(a failing one refuses the whole set) and reads the verified bytes; `start(models, options)`
serves them at `/v2/models/<name>` plus `/v2` (health, server metadata); `stop(server)` drains
and takes them down. Engines (`options.engine`), both answering through `export.runtime.serve.endpoint`:
`embedded` (default, one machine: uvicorn worker processes on one socket, `export.runtime.serve.embedded`)
and `ray` (Ray Serve, one application per artifact; the way past one machine). SavedModel is not
served (TensorFlow Serving serves it; this package never imports TensorFlow). Ray and uvicorn
come with the `serve` extra (`pip install -e '.[serve]'`), imported only when a server starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field

from export.errors import ExportError, ManifestError, UsageError, first_line
from export.formats import REGISTRY, format_of_manifest, get_format
from export.runtime.serve.protocol import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_READ_TIMEOUT_S,
)
from export.runtime.verify import find_manifests, verify_path

__all__ = [
    "ENGINES", "SERVED_FORMATS", "ServeError", "ServeOptions", "ServedModel", "Server", "deploy",
    "check_options", "load_models", "model_name", "start", "stop",
]

log = logging.getLogger("export")

# The formats served: those whose registry record names a platform to report.
SERVED_FORMATS = tuple(name for name, fmt in REGISTRY.items() if fmt.serve_platform)
ROOT_APP = "xattn_v2"
# fullmatch: `$` would also match before a final newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,159}")


class ServeError(ExportError):
    """Ray Serve failed to deploy an application (a replica that cannot start, ...)."""

    exit_code = 1


ENGINES = ("embedded", "ray")


@dataclass(frozen=True)
class ServeOptions:
    """How to serve. `max_batch` counts rows; 1 turns dynamic batching off (Ray engine).

    `workers` is the embedded engine's process count (default: one per core). `replica_cpus`
    is the CPU count Ray reserves per replica: 0 packs any number of replicas on one machine; on
    a cluster, reserving `threads` CPUs spreads them over the nodes. `drain_seconds` bounds the
    drain on stop (SIGTERM, Ctrl-C).
    """

    engine: str = "embedded"
    grpc_port: int | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    drain_seconds: float = 10.0
    replicas: int = 1
    threads: int = 1
    max_batch: int = 32
    batch_wait_ms: float = 2.0
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    replica_cpus: float = 0.0
    # Embedded engine: a request line and headers larger than this get 431 and a close; a
    # connection that has not sent its whole head within `read_timeout_s` of starting it (or of
    # connecting), or sends no body byte for that long, is closed; so is one whose body is not
    # complete `body_timeout_s` after its head, however steadily it trickles.
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # Embedded engine: open connections per worker; one more gets 503 and is closed.
    max_connections: int = DEFAULT_MAX_CONNECTIONS


@dataclass(frozen=True)
class ServedModel:
    """One verified artifact, with the bytes that were verified (replicas get these bytes)."""

    name: str
    format: str
    artifact: str
    manifest: dict
    data: bytes = field(repr=False)


@dataclass
class Server:
    """A running server; `url` is the `/v2` root. `embedded` is the embedded engine's handle."""

    names: list[str]
    url: str
    owns_ray: bool = False
    owns_serve: bool = False
    embedded: object = None

    @property
    def engine(self) -> str:
        return "ray" if self.embedded is None else "embedded"


def model_name(manifest: dict) -> str:
    """`<artifact without extension>_<format>`: an ONNX file and a TFLite file of one
    configuration share a stem, so the format is part of the name."""
    stem, suffix = manifest["artifact"], get_format(manifest["format"]).suffix
    if stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    return f"{stem}_{manifest['format']}"


def load_models(path: str) -> tuple[list[ServedModel], list[str]]:
    """Verify and read every servable artifact under PATH -> (models, notes on what is skipped).

    Raises ManifestError (exit 1) when any artifact fails verification: nothing is served;
    UsageError (exit 2) when there is nothing servable or its runtime is missing.
    """
    models, notes = [], []
    for manifest_path in find_manifests(path):
        record = format_of_manifest(os.path.basename(manifest_path))
        if record is not None and record.runtime_module == "tensorflow":
            # Verifying it would need TensorFlow, which the runtime half never imports.
            notes.append(
                f"- {os.path.basename(manifest_path)}  not served: {record.title} (its runtime "
                f"is {record.runtime_label}; this server runs "
                f"{' and '.join(REGISTRY[f].title for f in SERVED_FORMATS)})"
            )
            continue
        (result,) = verify_path(manifest_path)
        if result.status == "failed":
            raise ManifestError(f"refusing to serve {result.name}: {result.reason}")
        if result.status != "passed":
            raise UsageError(f"cannot serve {result.name}: {result.reason}")
        if result.format not in SERVED_FORMATS:
            notes.append(f"- {result.name}  not served: format {result.format}")
            continue
        models.append(_read_verified(manifest_path, result.name))
    if not models:
        raise UsageError(f"nothing to serve in {path}: no ONNX or TFLite artifact")
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"two artifacts would both be served as {', '.join(duplicates)}")
    return models, notes


def _read_verified(manifest_path: str, shown: str) -> ServedModel:
    with open(manifest_path, "rb") as f:
        manifest = json.loads(f.read().decode("utf-8"))
    folder = os.path.dirname(os.path.abspath(manifest_path))
    with open(os.path.join(folder, manifest["artifact"]), "rb") as f:
        data = f.read()
    # The file could have changed since it was verified: the bytes served must be those.
    if hashlib.sha256(data).hexdigest() != manifest["sha256"].lower():
        raise ManifestError(f"refusing to serve {shown}: it changed after verification")
    name = model_name(manifest)
    if not _NAME.fullmatch(name):
        raise UsageError(f"cannot serve {shown}: {name!r} is not a usable model name")
    return ServedModel(name, manifest["format"], manifest["artifact"], manifest, data)


# gRPC's message size limits are C ints: a body limit past them raised OverflowError in a worker.
GRPC_MAX_BODY_BYTES = (1 << 31) - 1
# Past these a timer overflows (threading, asyncio: OverflowError in a thread on SIGTERM).
MAX_DRAIN_SECONDS = 24 * 3600.0
MAX_BATCH_WAIT_MS = 60_000.0
# A worker's file descriptors run out long before this.
MAX_CONNECTIONS = 1 << 20


def check_options(options: ServeOptions) -> None:
    """UsageError (exit 2) naming the option when `options` cannot be served as given; run
    before anything is verified, bound or started."""
    if options.grpc_port and options.grpc_port == options.port:
        raise UsageError(f"--grpc-port must differ from --port (HTTP listens there). Received: "
                         f"--port {options.port} --grpc-port {options.grpc_port}")
    if options.max_body_bytes < 1024:
        raise UsageError(f"--max-body-mb must allow at least 1 KiB. Received: "
                         f"{options.max_body_bytes} bytes")
    if options.grpc_port and options.max_body_bytes > GRPC_MAX_BODY_BYTES:
        raise UsageError(f"--max-body-mb with --grpc-port must be below 2048 (gRPC's message size "
                         f"is a 32-bit int). Received: {options.max_body_bytes / (1 << 20):g} MiB")
    if not 0 < options.drain_seconds <= MAX_DRAIN_SECONDS:
        raise UsageError(f"--drain-seconds must be in (0, {MAX_DRAIN_SECONDS:g}]. Received: "
                         f"{options.drain_seconds:g}")
    if not 0 < options.read_timeout_s <= MAX_DRAIN_SECONDS:
        raise UsageError(f"--read-timeout must be in (0, {MAX_DRAIN_SECONDS:g}]. Received: "
                         f"{options.read_timeout_s:g}")
    if not 0 < options.body_timeout_s <= MAX_DRAIN_SECONDS:
        raise UsageError(f"--body-timeout must be in (0, {MAX_DRAIN_SECONDS:g}]. Received: "
                         f"{options.body_timeout_s:g}")
    if not 1 <= options.max_connections <= MAX_CONNECTIONS:
        raise UsageError(f"--max-connections must be in [1, {MAX_CONNECTIONS}]. Received: "
                         f"{options.max_connections}")
    if not 1024 <= options.max_header_bytes <= GRPC_MAX_BODY_BYTES:
        raise UsageError(f"--max-header-kb must be at least 1 and below 2 GiB. Received: "
                         f"{options.max_header_bytes / 1024:g} KiB")
    if not 0 < options.batch_wait_ms <= MAX_BATCH_WAIT_MS:
        raise UsageError(f"--batch-wait-ms must be in (0, {MAX_BATCH_WAIT_MS:g}]. Received: "
                         f"{options.batch_wait_ms:g}")


def start(models: list[ServedModel], options: ServeOptions) -> Server:
    """Start the engine `options.engine`; returns when every model is warm and answering."""
    check_options(options)
    if options.engine not in ENGINES:
        raise UsageError(f"unknown engine {options.engine!r}; choose {' or '.join(ENGINES)}")
    if options.engine == "embedded":
        if options.address is not None:
            raise UsageError("--address joins a Ray cluster: it needs --engine ray")
        if options.grpc_port:
            _check_port_free(options.host, options.grpc_port)
        from export.runtime.serve import embedded  # lazy: uvicorn loads only in its workers

        handle = embedded.start(models, options, _version())
        return Server(handle.names, handle.url, embedded=handle)
    if options.grpc_port:
        raise UsageError("--grpc-port (KServe V2 gRPC) needs --engine embedded")
    return _start_ray(models, options)


def _start_ray(models: list[ServedModel], options: ServeOptions) -> Server:
    """Start (or join, with `options.address`) Ray, then deploy one application per model."""
    try:
        # Lazy: Ray is an optional extra, and the refusal path must not wait for it.
        import ray  # lazy: Ray takes seconds to import; --help and the Triton writer need none of it
        from ray import serve
    except ImportError as e:
        raise UsageError(f"Ray Serve is not installed ({e}); pip install -e '.[serve]'") from e
    from export.runtime.serve.deployments import ServerRoot  # lazy: the deployments import Ray at the top

    owns_ray = not ray.is_initialized()
    if owns_ray:
        if options.address is None:
            _check_port_free(options.host, options.port)
        try:
            ray.init(
                address=options.address or "local", include_dashboard=False,
                logging_level=logging.WARNING, log_to_driver=False,
            )
        except Exception as e:
            where = f" at {options.address}" if options.address else ""
            raise UsageError(f"cannot start or join Ray{where}: {first_line(e)}") from e
    owns_serve = options.address is None
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        for model in models:
            deploy(model, options)
        root = serve.deployment(ServerRoot).options(
            name="ServerRoot", ray_actor_options={"num_cpus": 0},
        )
        serve.run(root.bind([m.name for m in models], _version()), name=ROOT_APP,
                  route_prefix="/v2")
    except ExportError:
        raise
    except Exception as e:
        raise ServeError(f"Ray Serve could not deploy: {first_line(e)}") from e
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    return Server([m.name for m in models], f"http://{host}:{options.port}/v2", owns_ray,
                  owns_serve)


def deploy(model: ServedModel, options: ServeOptions) -> None:
    """(Re)deploy one model's application with `options`; returns once it runs them."""
    from ray import serve  # lazy: Ray takes seconds to import; --help and the Triton writer need none of it

    from export.runtime.serve.deployments import ModelServer  # lazy: the deployments import Ray at the top

    deployment = serve.deployment(ModelServer).options(
        name=model.name,
        num_replicas=options.replicas,
        max_ongoing_requests=max(64, 2 * options.max_batch),
        ray_actor_options={"num_cpus": options.replica_cpus},
        graceful_shutdown_timeout_s=options.drain_seconds,
    )
    serve.run(deployment.bind(model, options), name=model.name,
              route_prefix=f"/v2/models/{model.name}")


def stop(server: Server) -> None:
    """Drain and take the server down; shut Ray down if `start` started it."""
    if server.embedded is not None:
        from export.runtime.serve import embedded  # lazy: see start

        embedded.stop(server.embedded)
        return
    import ray  # lazy: Ray takes seconds to import; --help and the Triton writer need none of it
    from ray import serve  # lazy: Ray takes seconds to import; --help and the Triton writer need none of it

    if server.owns_serve:
        serve.shutdown()
    else:
        for name in [*server.names, ROOT_APP]:
            serve.delete(name)
    if server.owns_ray:
        ray.shutdown()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As a server binds: a port in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # lazy: read once, for the server metadata

    try:
        return version("xattn")
    except PackageNotFoundError:
        return "0"
