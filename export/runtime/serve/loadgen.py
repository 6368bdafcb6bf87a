"""A cheap HTTP/1.1 load generator for the serving benchmark (one process of it).

`python -m export.runtime.serve.loadgen` reads a JSON job on stdin (host, port, the whole request as
latin-1 text, connections, warm-up and measured seconds, which tensors to expect), keeps that many
keep-alive connections busy (one request at a time each, no pipelining) with raw asyncio streams
on uvloop, decodes every response as a client would (the binary extension with `np.frombuffer`,
JSON with `json.loads`), and prints JSON: latencies, errors, its own CPU seconds. The request
bytes are built once, so the generator spends its CPU on sockets and decoding, not on encoding;
`export.runtime.serve.loadbench` runs several of these processes and adds them up. With a `model` path
in the job it measures the ceiling instead: onnxruntime `session.run` in a loop, same inputs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

from export.runtime.serve.protocol import HEADER_LENGTH, refuse_by_hand

_LENGTH = HEADER_LENGTH.lower().encode()


def build_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def decode_response(head: bytes, body: bytes) -> tuple[int, int]:
    """(status, rows of the first output); raises on a response a client could not use."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    if status != 200:
        return status, 0
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == _LENGTH:
            length = int(value)
    if length is None:
        out = json.loads(body)["outputs"][0]
        array = np.asarray(out["data"], np.float32).reshape(out["shape"])
    else:
        out = json.loads(body[:length])["outputs"][0]
        array = np.frombuffer(body, np.float32, offset=length).reshape(out["shape"])
    return status, len(array)


async def _connection(job: dict, request: bytes, start: float, stop: float, results: dict):
    host, port = job["host"], job["port"]
    reader = writer = None
    while time.perf_counter() < stop:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                results["refused"] += 1
                if job.get("stop_when_refused"):
                    return
                await asyncio.sleep(0.01)
                continue
        sent = time.perf_counter()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            size = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    size = int(value)
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            body = await reader.readexactly(size)
            status, rows = decode_response(head, body)
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
            results["lost"] += 1
            writer.close()
            reader = writer = None
            continue
        now = time.perf_counter()
        if status != 200 or rows != job["rows"]:
            results["errors"] += 1
        elif sent >= start:
            results["latencies"].append(now - sent)
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _grpc_client(job: dict, call, request: bytes, start: float, stop: float,
                       results: dict):
    """One client of a shared HTTP/2 channel: ModelInfer with the request serialized once."""
    import grpc  # lazy: only gRPC jobs
    from tritonclient.grpc import service_pb2  # lazy: only gRPC jobs

    while time.perf_counter() < stop:
        sent = time.perf_counter()
        try:
            reply = service_pb2.ModelInferResponse.FromString(await call(request))
            out = reply.outputs[0]
            rows = len(np.frombuffer(reply.raw_output_contents[0], np.float32)
                       .reshape(tuple(out.shape)))
        except grpc.aio.AioRpcError:
            results["lost"] += 1
            continue
        now = time.perf_counter()
        if rows != job["rows"]:
            results["errors"] += 1
        elif sent >= start:
            results["latencies"].append(now - sent)


async def _run_grpc(job: dict, start: float, stop: float, results: dict) -> None:
    import base64  # lazy: only gRPC jobs

    import grpc  # lazy: only gRPC jobs

    request = base64.b64decode(job["grpc_request"])
    async with grpc.aio.insecure_channel(f"{job['host']}:{job['grpc_port']}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        await asyncio.gather(*(_grpc_client(job, call, request, start, stop, results)
                               for _ in range(job["connections"])))


async def run_job(job: dict) -> dict:
    if job.get("grpc_request"):
        begin = time.perf_counter()
        results = {"latencies": [], "errors": 0, "lost": 0, "refused": 0}
        cpu = time.process_time()
        await _run_grpc(job, begin + job["warmup"], begin + job["warmup"] + job["duration"],
                        results)
        results["cpu_seconds"] = time.process_time() - cpu
        results["wall_seconds"] = time.perf_counter() - begin
        return results
    request = job["request"].encode("latin-1")
    begin = time.perf_counter()
    start = begin + job["warmup"]
    stop = start + job["duration"]
    results = {"latencies": [], "errors": 0, "lost": 0, "refused": 0}
    cpu = time.process_time()
    await asyncio.gather(*(_connection(job, request, start, stop, results)
                           for _ in range(job["connections"])))
    results["cpu_seconds"] = time.process_time() - cpu
    results["wall_seconds"] = time.perf_counter() - begin
    return results


def run_in_process(job: dict) -> dict:
    """The ceiling: onnxruntime `session.run` on the same inputs, one thread, in a tight loop."""
    import onnxruntime as ort  # lazy: only the in-process mode runs a session

    options = ort.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.normal(size=(job["rows"], *i.shape[1:])).astype(np.float32)
             for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    cpu = time.process_time()
    begin = time.perf_counter()
    start = begin + job["warmup"]
    stop = start + job["duration"]
    latencies = []
    now = begin
    while now < stop:
        sent = now
        session.run(names, feeds)
        now = time.perf_counter()
        if sent >= start:
            latencies.append(now - sent)
    return {"latencies": latencies, "errors": 0, "lost": 0, "refused": 0,
            "cpu_seconds": time.process_time() - cpu, "wall_seconds": now - begin}




def main() -> int:
    refuse_by_hand("python -m export.runtime.serve.loadgen",
                   "the load generator process that `python -m export.bench serve` starts "
                   "(its job as JSON on stdin)")
    import uvloop  # lazy: the generator's loop (installed with uvicorn, the serve extra)

    job = json.load(sys.stdin)
    if job.get("model"):
        results = run_in_process(job)
    elif job.get("grpc_request"):  # grpc.aio on the standard event loop
        results = asyncio.run(run_job(job))
    else:
        results = uvloop.run(run_job(job))
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
