"""`python -m export.bench serve [PATH]` (alias `python -m export.serve.loadbench`): serving load.

Bounded and on 127.0.0.1 only. Verifies and serves the ONNX artifact under PATH on each engine
(`--engines embedded,ray`) and measures requests and rows per second, p50/p99 latency at 1, 8 and
32 concurrent keep-alive clients, JSON and binary tensors, 1 row per request and batch-32
requests; beside the ceiling measured in the same run: onnxruntime `session.run` on the same
inputs, in-process, in 1 process and in as many processes as the server has workers. The clients
are `export.runtime.serve.loadgen` processes (raw asyncio streams on uvloop, requests encoded once,
responses decoded); their CPU share is reported, as they run on the same cores as the server.
Then, for the Ray engine (unless `--no-fault`), kills one of two replicas with SIGKILL under load.
Every cell runs for `--duration` seconds; nothing else runs longer than `--fault-timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from export.errors import UsageError
from export.flags import OneLineParser, path_arg, positive_float, positive_int, positive_int_list
from export.reporting import report_failures
from export.runtime.serve.loadgen import build_request
from export.runtime.serve.protocol import HEADER_LENGTH

PROG = "python -m export.serve.loadbench"


@dataclass
class Cell:
    """One measured configuration."""

    setup: str
    encoding: str
    rows: int
    clients: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    client_cpu: float = 0.0  # the load generator's CPU, in cores (0 for in-process)

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.rows


async def _post_once(session, url: str, body: bytes, headers: dict) -> bool:
    """One inference request; True when it came back 200 with a response that decodes."""
    import aiohttp  # lazy: only the load clients use it

    try:
        async with session.post(url, data=body, headers=headers) as response:
            content = await response.read()
            if response.status != 200:
                return False
            _decode(content, response.headers)
            return True
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="artifacts", metavar="PATH",
                        help="folder or manifest holding an ONNX artifact (default artifacts/)")
    parser.add_argument("--engines", type=_engines, default=["embedded", "ray"],
                        help="engines to measure (default embedded,ray)")
    parser.add_argument("--clients", type=positive_int_list, default=[1, 8, 32],
                        help="concurrent clients (default 1,8,32)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help=f"embedded engine workers (default: cores, {os.cpu_count()})")
    parser.add_argument("--replicas", type=positive_int, default=1,
                        help="Ray engine replicas (default 1)")
    parser.add_argument("--max-batch", type=positive_int, default=1,
                        help="Ray engine dynamic batching, rows per batch (default 1: off)")
    parser.add_argument("--batch-rows", type=positive_int, default=32,
                        help="rows per request in the batch rows (default 32)")
    parser.add_argument("--no-grpc", action="store_true",
                        help="skip the embedded engine's gRPC rows")
    parser.add_argument("--client-processes", type=positive_int, default=2,
                        help="load generator processes at most (default 2)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="onnxruntime threads per worker/replica and in-process (default 1)")
    parser.add_argument("--duration", type=positive_float, default=3.0,
                        help="seconds per cell (default 3)")
    parser.add_argument("--port", type=int, default=0,
                        help="HTTP port on 127.0.0.1 (default 0: a free one)")
    parser.add_argument("--fault-timeout", type=positive_float, default=60.0,
                        help="longest the fault run waits for the replica (default 60 s)")
    parser.add_argument("--no-fault", action="store_true", help="skip the kill -9 run")
    parser.add_argument("--json", type=path_arg, metavar="PATH", help="also write the figures as JSON")
    return parser


def _engines(text: str) -> list[str]:
    engines = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in engines if e not in ("embedded", "ray")]
    if bad or not engines:
        raise argparse.ArgumentTypeError(f"engines are embedded and ray; received {text!r}")
    return engines


# -- clients --------------------------------------------------------------------------------------


def _bodies(feeds: dict[str, np.ndarray]) -> dict[str, tuple[bytes, dict]]:
    tensors = [{"name": n, "shape": list(a.shape), "datatype": "FP32"} for n, a in feeds.items()]
    as_json = json.dumps({
        "inputs": [{**t, "data": feeds[t["name"]].reshape(-1).tolist()} for t in tensors],
    }).encode()
    header = json.dumps({
        "inputs": [{**t, "parameters": {"binary_data_size": feeds[t["name"]].nbytes}}
                   for t in tensors],
        "parameters": {"binary_data_output": True},
    }).encode()
    binary = header + b"".join(a.tobytes() for a in feeds.values())
    return {
        "json": (as_json, {"Content-Type": "application/json"}),
        "binary": (binary, {"Content-Type": "application/octet-stream",
                            HEADER_LENGTH: str(len(header))}),
    }


def _decode(body: bytes, headers) -> np.ndarray:
    """What a client does with a response: the output as an array."""
    length = headers.get(HEADER_LENGTH)
    if length is None:
        out = json.loads(body)["outputs"][0]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    header = json.loads(body[:int(length)])
    out = header["outputs"][0]
    return np.frombuffer(body[int(length):], np.float32).reshape(out["shape"])


def _jobs(args, job: dict, processes: int, connections: int) -> list[dict]:
    """Split `connections` over at most `processes` generator processes."""
    n = max(1, min(processes, connections))
    sizes = [connections // n + (1 if i < connections % n else 0) for i in range(n)]
    return [{**job, "connections": c, "warmup": min(0.5, args.duration),
             "duration": args.duration} for c in sizes]


def _run_generators(jobs: list[dict]) -> list[dict]:
    """Each job in its own `export.runtime.serve.loadgen` process, all at once; their JSON results."""
    procs = [subprocess.Popen([sys.executable, "-m", "export.runtime.serve.loadgen"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in jobs]
    for proc, job in zip(procs, jobs):
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
    results = []
    for proc in procs:
        out = proc.stdout.read()
        if proc.wait() != 0:
            raise UsageError(f"a load generator exited {proc.returncode}")
        results.append(json.loads(out))
    return results


def _cell(setup: str, encoding: str, rows: int, clients: int, results: list[dict],
          duration: float, count_cpu: bool = True) -> Cell:
    lat = np.concatenate([r["latencies"] for r in results]) * 1000
    errors = sum(r["errors"] + r["lost"] for r in results)
    cpu = sum(r["cpu_seconds"] / r["wall_seconds"] for r in results) if count_cpu else 0.0
    return Cell(
        setup, encoding, rows, clients, len(lat), errors, len(lat) / duration,
        float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        float(np.percentile(lat, 99)) if len(lat) else float("nan"), cpu,
    )


# -- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from export.runtime.serve import (  # lazy: verification, only for a run
        ServeOptions,
        load_models,
        start,
        stop,
    )

    models, _ = load_models(args.path)
    onnx = [m for m in models if m.format == "onnx"]
    if not onnx:
        raise UsageError(f"no ONNX artifact in {args.path} to load-test")
    model = onnx[0]
    rng = np.random.default_rng(0)
    requests = {}
    for rows in (1, args.batch_rows):
        feeds = {t["name"]: rng.normal(size=[rows, *t["shape"][1:]]).astype(np.float32)
                 for t in model.manifest["inputs"]}
        requests[rows] = (feeds, _bodies(feeds))
    cells: list[Cell] = []
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as folder:  # the verified bytes
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(model.data)
        for processes in sorted({1, args.workers}):
            for rows in (1, args.batch_rows):
                job = {"model": path, "rows": rows, "threads": args.threads,
                       "warmup": min(0.5, args.duration), "duration": args.duration}
                results = _run_generators([job] * processes)
                setup = f"in-process, {processes} process{'es' if processes > 1 else ''}"
                cells.append(_cell(setup, "-", rows, processes, results, args.duration, False))
                _print_cell(cells[-1])

    fault = None
    if not args.port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            args.port = probe.getsockname()[1]
    for engine in args.engines:
        grpc_port = None
        if engine == "embedded" and not args.no_grpc:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                grpc_port = probe.getsockname()[1]
        options = ServeOptions(engine=engine, port=args.port, grpc_port=grpc_port,
                               threads=args.threads,
                               workers=args.workers, replicas=args.replicas,
                               max_batch=args.max_batch)
        setup = (f"embedded, {args.workers} workers" if engine == "embedded" else
                 f"ray, {args.replicas} replica{'s' if args.replicas > 1 else ''}"
                 + (f", batch<={args.max_batch}" if args.max_batch > 1 else ""))
        server = start([model], options)
        try:
            url = f"http://127.0.0.1:{args.port}/v2/models/{model.name}/infer"
            feeds, bodies = requests[1]
            from export.runtime import runtimes  # lazy: the runtimes load only where a model runs

            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "model.onnx")
                with open(path, "wb") as f:
                    f.write(model.data)
                runner = runtimes.load_runner("onnx", path, inputs=model.manifest["inputs"])
            expected = runner.run(feeds)[model.manifest["outputs"][0]["name"]]
            _check_answer(url, bodies["binary"], expected)
            path = f"/v2/models/{model.name}/infer"
            for rows, encodings in ((1, ("json", "binary")), (args.batch_rows, ("binary",))):
                for encoding in encodings:
                    body, headers = requests[rows][1][encoding]
                    job = {"host": "127.0.0.1", "port": args.port, "rows": rows,
                           "request": build_request(path, body, headers).decode("latin-1")}
                    for clients in args.clients:
                        results = _run_generators(
                            _jobs(args, job, args.client_processes, clients))
                        cells.append(_cell(setup, encoding, rows, clients, results,
                                           args.duration))
                        _print_cell(cells[-1])
            if grpc_port:
                job = {"host": "127.0.0.1", "grpc_port": grpc_port, "rows": 1,
                       "grpc_request": _grpc_request(model.name, requests[1][0])}
                for clients in args.clients:
                    results = _run_generators(_jobs(args, job, args.client_processes, clients))
                    cells.append(_cell(setup, "grpc", 1, clients, results, args.duration))
                    _print_cell(cells[-1])
            if engine == "ray" and not args.no_fault:
                from export.runtime.serve import deploy  # lazy: Ray only

                deploy(model, replace(options, replicas=2, max_batch=32))
                fault = _fault(model.name, url, requests[1][1]["binary"], clients=8,
                               timeout=args.fault_timeout)
        finally:
            stop(server)
    return {"cells": [{**asdict(c), "rows_per_s": c.rows_per_s} for c in cells],
            "fault": fault, "model": model.name, "threads": args.threads,
            "workers": args.workers, "cpus": os.cpu_count(), "load_before": load_before,
            "load_after": os.getloadavg()[0], "duration": args.duration}


def _grpc_request(name: str, feeds: dict) -> str:
    """A KServe V2 ModelInferRequest with raw tensors, serialized once (base64 for the job)."""
    import base64  # lazy: only for the gRPC rows

    from tritonclient.grpc import service_pb2  # lazy: only for the gRPC rows

    request = service_pb2.ModelInferRequest(model_name=name)
    for input_name, array in feeds.items():
        request.inputs.add(name=input_name, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return base64.b64encode(request.SerializeToString()).decode()


def _check_answer(url: str, request: tuple[bytes, dict], expected: np.ndarray) -> None:
    import urllib.request  # lazy: only the health probe uses it

    body, headers = request
    with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=30) as r:
        got = _decode(r.read(), r.headers)
    if not np.allclose(got, expected, atol=1e-5):
        raise UsageError("the served model does not answer what onnxruntime does in-process")


def _fault(name: str, url: str, request: tuple[bytes, dict], *, clients: int,
           timeout: float) -> dict:
    """SIGKILL one of two replicas 2 s into a load of `clients`; until a new one answers."""
    from ray import serve  # lazy: Ray takes seconds to import; --help and the Triton writer need none of it

    handle = serve.get_app_handle(name)

    def replica_pids(tries: int = 12) -> set[int]:
        pids = set()
        for _ in range(tries):
            try:
                pids.add(handle.process_id.remote().result(timeout_s=5))
            except Exception:  # noqa: BLE001 - a call routed to the dead replica
                pass
        return pids

    before = replica_pids()
    if len(before) < 2:
        raise UsageError(f"expected 2 replicas answering, found {len(before)}")
    victim = min(before)
    events: dict = {}

    async def killer():
        await asyncio.sleep(2.0)
        os.kill(victim, signal.SIGKILL)
        events["killed"] = time.perf_counter()
        while time.perf_counter() - events["killed"] < timeout:
            pids = await asyncio.to_thread(replica_pids, 6)
            if pids - before:
                events["back"] = time.perf_counter()
                break
            await asyncio.sleep(0.1)

    body, headers = request
    start = time.perf_counter()
    # The load runs 2 s before the kill and until the timeout; the tally stops 2 s after the
    # replica is back (the remainder of the load is not waited for: see `duration` below).
    result = asyncio.run(_load_until(url, body, headers, clients, killer, events, timeout))
    back = events.get("back")
    return {
        "clients": clients,
        "requests": len(result["latencies"]),
        "errors_before_retry": result["errors"],
        "failed_after_retry": result["failed"],
        "seconds_until_back": None if back is None else round(back - events["killed"], 2),
        "load_seconds": round(time.perf_counter() - start, 1),
    }


async def _load_until(url, body, headers, clients, killer, events, timeout) -> dict:
    """Load with one retry per request until 2 s after the replica is back (or the timeout)."""
    import aiohttp  # lazy: only the load clients use it

    latencies, errors, failed = [], 0, 0
    deadline = time.perf_counter() + 2.0 + timeout + 2.0
    timeout_ = aiohttp.ClientTimeout(total=30)

    def done() -> bool:
        back = events.get("back")
        return time.perf_counter() > (deadline if back is None else back + 2.0)

    async def once(session) -> bool:
        return await _post_once(session, url, body, headers)

    async def client(session):
        nonlocal errors, failed
        while not done():
            start = time.perf_counter()
            ok = await once(session)
            if not ok:
                errors += 1
                ok = await once(session)
                if not ok:
                    failed += 1
                    continue
            latencies.append(time.perf_counter() - start)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=timeout_) as session:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(client(session) for _ in range(clients)))
        await kill_task
    return {"latencies": latencies, "errors": errors, "failed": failed}


# -- output ---------------------------------------------------------------------------------------

HEADER = (f"{'setup':<26} {'tensors':<7} {'rows':>4} {'clients':>7} {'req/s':>8} "
          f"{'rows/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'client CPU':>10}")


def _print_cell(cell: Cell) -> None:
    if not getattr(_print_cell, "started", False):
        print(HEADER)
        print("-" * len(HEADER))
        _print_cell.started = True
    errors = f"  ({cell.errors} errors)" if cell.errors else ""
    cpu = f"{cell.client_cpu:.2f} cores" if cell.client_cpu else "-"
    print(f"{cell.setup:<26} {cell.encoding:<7} {cell.rows:>4} {cell.clients:>7} "
          f"{cell.rps:>8.0f} {cell.rows_per_s:>8.0f} {cell.p50_ms:>8.2f} {cell.p99_ms:>8.2f} "
          f"{cpu:>10}{errors}", flush=True)


GOALS = "goals (issue 23), embedded engine"


def goals(figures: dict, batch_rows: int) -> list[str]:
    """The issue's goal rows, judged on this run: one line each."""
    cells = figures["cells"]
    emb = [c for c in cells if c["setup"].startswith("embedded")]
    if not emb:
        return []
    top = max(c["clients"] for c in emb)

    def one(encoding, rows):
        found = [c for c in emb if c["encoding"] == encoding and c["rows"] == rows
                 and c["clients"] == top]
        return found[0] if found else None

    lines = []
    binary, as_json, batch = one("binary", 1), one("json", 1), one("binary", batch_rows)
    ceiling = [c for c in cells if c["setup"].startswith("in-process") and c["rows"] == batch_rows
               and c["clients"] == figures["workers"]]
    if binary:
        ok = binary["rps"] >= 1500 and binary["p99_ms"] <= 50
        lines.append(f"binary, {top} clients: {binary['rps']:.0f} req/s, p99 "
                     f"{binary['p99_ms']:.1f} ms (goal >= 1500, p99 <= 50): "
                     + ("met" if ok else "NOT met"))
    if as_json:
        lines.append(f"JSON, {top} clients: {as_json['rps']:.0f} req/s (goal >= 800): "
                     + ("met" if as_json["rps"] >= 800 else "NOT met"))
    if batch and ceiling:
        best = max(c["rows_per_s"] for c in emb if c["rows"] == batch_rows)
        ratio = ceiling[0]["rows_per_s"] / best
        lines.append(f"batch-{batch_rows} requests: {best:.0f} rows/s, in-process "
                     f"{ceiling[0]['rows_per_s']:.0f} rows/s in {figures['workers']} process"
                     f"{'es' if figures['workers'] > 1 else ''}, "
                     f"{ratio:.1f}x (goal <= 3x): " + ("met" if ratio <= 3 else "NOT met"))
    return lines


def _print_fault(fault: dict) -> None:
    back = fault["seconds_until_back"]
    print(
        f"\nkill -9 of 1 of 2 replicas under {fault['clients']} clients (binary, batching on): "
        f"{fault['requests']} requests in {fault['load_seconds']} s, "
        f"{fault['errors_before_retry']} failed once, "
        f"{fault['failed_after_retry']} failed after one retry; "
        + (f"a new replica answered {back:.1f} s after the kill" if back is not None
           else "no new replica answered within the timeout")
    )


def _check_writable(path: str) -> None:
    """`--json PATH` can be written: its folder exists and PATH is not a folder; UsageError if not."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write --json {path}: "
                         + ("it is a folder" if os.path.isdir(path) else f"no writable folder {folder}"))


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def go():
        if args.json:  # before minutes of measuring, not after
            _check_writable(args.json)
        figures = run(args)
        if figures["fault"]:
            _print_fault(figures["fault"])
        print(f"\n{figures['cpus']} CPUs shared by the load generators and the server (load "
              f"average {figures['load_before']:.1f} before, {figures['load_after']:.1f} after); "
              f"{args.threads} onnxruntime thread(s) per worker/replica; {args.duration:g} s per "
              f"cell; client CPU: the generators' CPU time per second of wall time")
        lines = goals(figures, args.batch_rows)
        if lines:
            print(f"{GOALS}:")
            for line in lines:
                print(f"  {line}")
        if args.json:
            try:
                with open(args.json, "w") as f:
                    json.dump(figures, f, indent=2)
            except OSError as e:
                raise UsageError(f"cannot write --json {args.json}: {e.strerror or e}") from e
        return figures

    _, code = report_failures(prog, go)
    return code


if __name__ == "__main__":
    sys.exit(main())

