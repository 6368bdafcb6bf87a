"""`python -m export.serve PATH`: verify, then serve on Ray Serve (Open Inference Protocol).

Exit codes: 0 served and stopped with Ctrl-C (or wrote --triton-repository); 1 an artifact
failed verification (nothing served); 2 usage error (bad flag, nothing to serve, port taken).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from export.cli import report_failures
from export.flags import OneLineParser, _path, _positive_float, _positive_int
from export.verify import MARKS

PROG = "python -m export.serve"


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Verify every ONNX and TFLite artifact under PATH with export.verify, then serve "
            "each on Ray Serve at /v2/models/<artifact stem>_<format> with the Open Inference "
            "Protocol (KServe V2: JSON and binary tensors). Ctrl-C stops it."
        ),
        epilog="exit codes: 0 ok; 1 an artifact failed verification (nothing served); 2 usage",
    )
    parser.add_argument("path", metavar="PATH",
                        help="an output folder, a manifest (.json) or an artifact")
    parser.add_argument("--replicas", type=_positive_int, default=1,
                        help="replicas per artifact (default 1)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="runtime threads per replica (default 1)")
    parser.add_argument("--max-batch", type=_positive_int, default=32,
                        help="dynamic batching: rows per batch at most; 1 turns it off "
                             "(default 32)")
    parser.add_argument("--batch-wait-ms", type=_positive_float, default=2.0,
                        help="how long a batch waits to fill (default 2 ms)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--address", metavar="ADDR",
                        help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                             "starting a local one")
    parser.add_argument("--max-body-mb", type=_positive_float, default=32.0,
                        help="largest request body accepted (default 32 MiB)")
    parser.add_argument("--triton-repository", type=_path, metavar="DIR",
                        help="write a Triton model repository of the ONNX artifacts to DIR "
                             "instead of serving")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.serve import ServeOptions, load_models, start, stop  # lazy: imports Ray (see export.serve)

    options = ServeOptions(
        replicas=args.replicas, threads=args.threads, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, host=args.host, port=args.port, address=args.address,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
    )
    loaded, code = report_failures(PROG, lambda: load_models(args.path))
    if code:
        return code
    models, notes = loaded
    for model in models:
        print(f"{MARKS['passed']} {model.artifact}  verified", flush=True)
    for note in notes:
        print(note, flush=True)

    if args.triton_repository:
        from export.serve.triton import write_repository  # lazy: only with --triton-repository

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
        for name in server.names:
            print(f"serving  {name}  at {server.url}/models/{name}", flush=True)
        print(f"ready    {server.url}/health/ready  ({options.replicas} replica(s) each, "
              f"max batch {options.max_batch}); Ctrl-C stops", flush=True)
        threading.Event().wait()

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
