"""`python -m export.serve PATH`: verify, then serve (Open Inference Protocol).

Engines: `embedded` (default: uvicorn worker processes, one machine) and `ray` (Ray Serve).
Exit codes: 0 served and stopped with Ctrl-C or SIGTERM, drained (or wrote --triton-repository);
1 an artifact failed verification (nothing served); 2 usage error (bad flag, nothing to serve,
port taken).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from export.errors import exit_codes_epilog, printable
from export.flags import OneLineParser, path_arg, positive_float, positive_int
from export.reporting import report_failures
from export.runtime.verify import MARKS

PROG = "python -m export.serve"


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Verify every ONNX and TFLite artifact under PATH with export.runtime.verify, then serve "
            "each at /v2/models/<artifact stem>_<format> with the Open Inference Protocol "
            "(KServe V2: JSON and binary tensors), on uvicorn worker processes (--engine "
            "embedded, one machine) or Ray Serve (--engine ray). Ctrl-C or SIGTERM drains and "
            "stops it."
        ),
        epilog=exit_codes_epilog((0, 1, 2), {
            0: "served, then stopped with Ctrl-C or SIGTERM (drained)",
            1: "an artifact failed verification (nothing served)", 2: "usage error"}),
    )
    parser.add_argument("path", metavar="PATH",
                        help="an output folder, a manifest (.json) or an artifact")
    parser.add_argument("--engine", choices=("embedded", "ray"), default="embedded",
                        help="embedded: uvicorn worker processes on this machine (default); "
                             "ray: Ray Serve (replicas, batching, clusters)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help=f"embedded: worker processes (default: cores, {os.cpu_count()})")
    parser.add_argument("--replicas", type=positive_int, default=1,
                        help="ray: replicas per artifact (default 1)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="runtime threads per worker or replica (default 1)")
    parser.add_argument("--max-batch", type=positive_int, default=32,
                        help="ray: dynamic batching, rows per batch at most; 1 turns it off "
                             "(default 32)")
    parser.add_argument("--batch-wait-ms", type=positive_float, default=2.0,
                        help="how long a batch waits to fill (default 2 ms, at most 60000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=_port, metavar="PORT",
                        help="embedded: also serve KServe V2 gRPC on PORT (Triton uses 8001); "
                             "default: no gRPC")
    parser.add_argument("--address", metavar="ADDR",
                        help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                             "starting a local one")
    parser.add_argument("--max-body-mb", type=positive_float, default=32.0,
                        help="largest request body accepted; larger ones get 413 "
                             "(default 32 MiB; below 2048 with --grpc-port)")
    parser.add_argument("--max-header-kb", type=positive_float, default=64.0,
                        help="embedded: largest request line + headers; larger ones get 431 and "
                             "the connection is closed (default 64 KiB)")
    parser.add_argument("--read-timeout", type=positive_float, default=15.0, metavar="SECONDS",
                        help="embedded: close a connection whose request head is not complete "
                             "this long after it started, or whose body sends nothing for this "
                             "long (default 15 s)")
    parser.add_argument("--body-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                        help="embedded: close a connection whose request body is not complete "
                             "this long after its head, however steadily it sends (default 60 s)")
    parser.add_argument("--max-connections", type=int, default=512, metavar="N",
                        help="embedded: open connections per worker; one more is answered 503 "
                             "and closed (default 512)")
    parser.add_argument("--drain-seconds", type=positive_float, default=10.0,
                        help="on Ctrl-C or SIGTERM, longest wait for requests in flight "
                             "(default 10 s, at most 86400)")
    parser.add_argument("--triton-repository", type=path_arg, metavar="DIR",
                        help="write a Triton model repository of the ONNX artifacts to DIR "
                             "instead of serving")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.runtime.serve import (  # lazy: imports Ray (see export.runtime.serve)
        ServeOptions,
        check_options,
        load_models,
        start,
        stop,
    )

    options = ServeOptions(
        engine=args.engine, workers=args.workers, drain_seconds=args.drain_seconds,
        grpc_port=args.grpc_port,
        replicas=args.replicas, threads=args.threads, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, host=args.host, port=args.port, address=args.address,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_header_bytes=int(args.max_header_kb * 1024), read_timeout_s=args.read_timeout,
        body_timeout_s=args.body_timeout, max_connections=args.max_connections,
    )
    _, code = report_failures(PROG, lambda: check_options(options))
    if code:
        return code
    loaded, code = report_failures(PROG, lambda: load_models(args.path))
    if code:
        return code
    models, notes = loaded
    for model in models:
        print(f"{MARKS['passed']} {model.artifact}  verified", flush=True)
    for note in notes:
        print(printable(note), flush=True)  # a note names an artifact as its manifest spells it

    if args.triton_repository:
        from export.runtime.serve.triton import write_repository  # lazy: only with --triton-repository

        def write():
            return write_repository(
                models, args.triton_repository, max_batch=args.max_batch,
                batch_wait_ms=args.batch_wait_ms, instances=args.replicas, threads=args.threads,
            )

        written, code = report_failures(PROG, write)
        if code:
            return code
        folders, skipped = written
        for note in skipped:
            print(note)
        for folder in folders:
            print(f"wrote {folder}/config.pbtxt and {folder}/1/model.onnx")
        return 0

    # SIGTERM stops the server the way Ctrl-C does (service managers, `kill`).
    signal.signal(signal.SIGTERM, _interrupt)
    server = None

    def serve_until_interrupted():
        nonlocal server
        server = start(models, options)
        # ray.init installs its own SIGTERM handler (it exits at once): ours again, to drain.
        signal.signal(signal.SIGTERM, _interrupt)
        for name in server.names:
            print(f"serving  {name}  at {server.url}/models/{name}", flush=True)
        if options.grpc_port:
            print(f"gRPC     KServe V2 on {options.host}:{options.grpc_port}", flush=True)
        if server.embedded is not None:
            shape = f"embedded engine, {options.workers} worker(s)"
        else:
            shape = f"ray engine, {options.replicas} replica(s) each, max batch {options.max_batch}"
        print(f"ready    {server.url}/health/ready  ({shape}); Ctrl-C stops", flush=True)
        if server.embedded is None:
            threading.Event().wait()
        from export.runtime.serve.embedded import watch  # lazy: the embedded engine only

        while True:
            watch(server.embedded)
            threading.Event().wait(0.5)

    try:
        _, code = report_failures(PROG, serve_until_interrupted, interrupted="shutting down")
    finally:
        if server is not None:
            stop(server)
        elif options.address is None:
            _stop_partial()
    if code == 130 and server is not None:
        print(f"{PROG}: stopped", file=sys.stderr)
        return 0
    return code


def _stop_partial() -> None:
    """Ctrl-C or an error during startup: whatever Ray started is taken down too."""
    if "ray" not in sys.modules:
        return
    try:
        import ray  # lazy: Ray takes seconds to import; --help and the Triton writer need none of it
    except ImportError:
        return
    if ray.is_initialized():
        try:
            # lazy: Ray takes seconds to import; --help and the Triton writer need none of it
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
