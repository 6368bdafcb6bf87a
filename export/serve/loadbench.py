"""`python -m export.serve.loadbench [PATH]`: load and faults on 127.0.0.1, bounded in time.

Serves the ONNX artifact under PATH on a local Ray instance and measures requests per second and
p50/p99 latency at 1, 8 and 32 concurrent clients (asyncio + aiohttp, keep-alive, one row per
request, responses decoded), JSON and binary tensors, dynamic batching off and on, 1 and 2
replicas; beside the same onnxruntime Runner called in-process from as many threads. Then kills
one of two replicas with SIGKILL under load: requests that fail after one client retry, and the
time until a new replica answers. Every cell runs for `--duration` seconds; nothing else runs
longer than `--fault-timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from export.cli import report_failures
from export.errors import UsageError
from export.flags import OneLineParser, _path, _positive_float, _positive_int, _positive_int_list
from export.serve.protocol import HEADER_LENGTH

PROG = "python -m export.serve.loadbench"


@dataclass
class Cell:
    """One measured configuration."""

    setup: str
    encoding: str
    clients: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


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
    parser.add_argument("--clients", type=_positive_int_list, default=[1, 8, 32],
                        help="concurrent clients (default 1,8,32)")
    parser.add_argument("--replicas", type=_positive_int_list, default=[1, 2],
                        help="replica counts (default 1,2)")
    parser.add_argument("--max-batch", type=_positive_int, default=32,
                        help="rows per batch with dynamic batching on (default 32)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="onnxruntime threads per replica and in-process (default 1)")
    parser.add_argument("--duration", type=_positive_float, default=3.0,
                        help="seconds per cell (default 3)")
    parser.add_argument("--port", type=_positive_int, default=8765,
                        help="HTTP port on 127.0.0.1 (default 8765)")
    parser.add_argument("--fault-timeout", type=_positive_float, default=60.0,
                        help="longest the fault run waits for the replica (default 60 s)")
    parser.add_argument("--no-fault", action="store_true", help="skip the kill -9 run")
    parser.add_argument("--json", type=_path, metavar="PATH", help="also write the figures as JSON")
    return parser


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


async def _load(url: str, body: bytes, headers: dict, clients: int, duration: float) -> dict:
    """`clients` keep-alive connections posting `body` for `duration` s: latencies and errors."""
    import aiohttp  # lazy: only the load clients use it

    latencies, errors = [], 0
    stop = time.perf_counter() + duration
    timeout = aiohttp.ClientTimeout(total=30)

    async def once(session) -> bool:
        return await _post_once(session, url, body, headers)

    async def client(session):
        nonlocal errors
        while time.perf_counter() < stop:
            start = time.perf_counter()
            if await once(session):
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return {"latencies": latencies, "errors": errors, "duration": duration}


def _cell(setup: str, encoding: str, clients: int, result: dict) -> Cell:
    lat = np.asarray(result["latencies"]) * 1000
    return Cell(
        setup, encoding, clients, len(lat), result["errors"],
        len(lat) / result["duration"],
        float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    )


def _in_process(runner, feeds: dict, clients: int, duration: float) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + duration

    def worker():
        mine = []
        while time.perf_counter() < stop:
            start = time.perf_counter()
            runner.run(feeds)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": 0, "duration": duration}


# -- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from export import runtimes  # lazy: the runtimes load only where a model is served
    from export.serve import ServeOptions, deploy, load_models, start, stop

    models, _ = load_models(args.path)
    onnx = [m for m in models if m.format == "onnx"]
    if not onnx:
        raise UsageError(f"no ONNX artifact in {args.path} to load-test")
    model = onnx[0]
    shapes = {t["name"]: [1, *t["shape"][1:]] for t in model.manifest["inputs"]}
    rng = np.random.default_rng(0)
    feeds = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    bodies = _bodies(feeds)
    cells: list[Cell] = []

    with tempfile.TemporaryDirectory() as folder:  # the verified bytes, as the replicas get them
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(model.data)
        runner = runtimes.load_runner("onnx", path, threads=args.threads,
                                      inputs=model.manifest["inputs"])
    expected = runner.run(feeds)[model.manifest["outputs"][0]["name"]]
    for clients in args.clients:
        _in_process(runner, feeds, clients, min(0.3, args.duration))  # warm-up
        cells.append(_cell("in-process onnxruntime", "-", clients,
                           _in_process(runner, feeds, clients, args.duration)))
        _print_cell(cells[-1])

    base = ServeOptions(port=args.port, threads=args.threads, max_batch=1)
    url = f"http://127.0.0.1:{args.port}/v2/models/{model.name}/infer"
    server = start([model], replace(base, replicas=args.replicas[0]))
    fault = None
    try:
        _check_answer(url, bodies["binary"], expected)
        for replicas in args.replicas:
            for max_batch in (1, args.max_batch):
                options = replace(base, replicas=replicas, max_batch=max_batch)
                deploy(model, options)
                setup = (f"serve {replicas} replica{'s' if replicas > 1 else ''}, "
                         + ("no batching" if max_batch == 1 else f"batch<={max_batch}"))
                for encoding in ("json", "binary"):
                    body, headers = bodies[encoding]
                    for clients in args.clients:
                        asyncio.run(_load(url, body, headers, clients, min(0.3, args.duration)))
                        result = asyncio.run(_load(url, body, headers, clients, args.duration))
                        cells.append(_cell(setup, encoding, clients, result))
                        _print_cell(cells[-1])
        if not args.no_fault:
            options = replace(base, replicas=2, max_batch=args.max_batch)
            deploy(model, options)
            fault = _fault(model.name, url, bodies["binary"], clients=8,
                           timeout=args.fault_timeout)
    finally:
        stop(server)
    return {"cells": [asdict(c) for c in cells], "fault": fault,
            "model": model.name, "threads": args.threads, "cpus": os.cpu_count()}


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

HEADER = f"{'setup':<34} {'tensors':<7} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"


def _print_cell(cell: Cell) -> None:
    if not getattr(_print_cell, "started", False):
        print(HEADER)
        print("-" * len(HEADER))
        _print_cell.started = True
    errors = f"  ({cell.errors} errors)" if cell.errors else ""
    print(f"{cell.setup:<34} {cell.encoding:<7} {cell.clients:>7} {cell.rps:>8.0f} "
          f"{cell.p50_ms:>8.2f} {cell.p99_ms:>8.2f}{errors}", flush=True)


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
        print(f"\n{figures['cpus']} CPUs shared by clients, proxy and replicas (load average "
              f"{os.getloadavg()[0]:.1f} at the end); {args.threads} onnxruntime thread(s) per "
              f"replica; {args.duration:g} s per cell; 1 row per request")
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

