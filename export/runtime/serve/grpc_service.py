"""KServe V2 gRPC (`inference.GRPCInferenceService`) for the embedded engine's workers.

Opt-in with `--grpc-port`: each worker runs a gRPC server (a thread pool beside its event loop)
on that port, shared by the workers through SO_REUSEPORT (gRPC's default on Linux). The service
and message classes are the ones `tritonclient.grpc` ships (generated from KServe's
`grpc_service.proto`; importable with protobuf 7, though `tritonclient[grpc]` pins protobuf<7).
An infer request is turned into the HTTP form (a JSON header plus the raw tensors) and decoded by
`export.runtime.serve.endpoint`: both transports run the same checks and answer the same messages; a
request that does not fit is INVALID_ARGUMENT with that one line (413's case:
RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import json
import logging
import math
from concurrent import futures

import numpy as np

from export.errors import InputError, first_line
from export.formats import get_format
from export.runtime.serve.endpoint import SERVER_NAME
from export.runtime.serve.protocol import BodyTooLarge

log = logging.getLogger("export.serve")

_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def to_http_body(request) -> tuple[bytes, str]:
    """A ModelInferRequest as the HTTP protocol's body: (JSON header + raw tensors, its length)."""
    inputs, blobs = [], []
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    for i, tensor in enumerate(request.inputs):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        # Data in a place it is not read from was ignored silently (raw bytes won over contents;
        # int_contents beside an FP32 input's fp32_contents): refused, as Triton does.
        given = [f.name for f, _ in tensor.contents.ListFields()]
        stray = given if raw else [f for f in given if f != _CONTENTS.get(tensor.datatype)]
        if stray:
            where = "raw_input_contents are given" if raw else f"its datatype is {tensor.datatype[:20]}"
            raise InputError(f"input `{tensor.name[:80]}` has {', '.join(stray)}, but {where}")
        if raw:
            entry["parameters"] = {"binary_data_size": len(raw[i])}
            blobs.append(raw[i])
        else:
            field = _CONTENTS.get(tensor.datatype)
            entry["data"] = list(getattr(tensor.contents, field)) if field else []
            if field in ("fp32_contents", "fp64_contents"):
                bad = next((v for v in entry["data"] if not math.isfinite(v)), None)
                if bad is not None:  # JSON (the form decoded next) has no NaN or inf
                    raise InputError(
                        f"input `{tensor.name[:80]}` {field} holds {bad}; typed contents take "
                        "finite numbers (send NaN/inf in raw_input_contents)")
        inputs.append(entry)
    header = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        if any("classification" in o.parameters for o in request.outputs):
            raise InputError("the classification extension is not supported")  # as over HTTP
        header["outputs"] = [{"name": o.name, "parameters": {"binary_data": True}}
                             for o in request.outputs]
    else:
        header["parameters"] = {"binary_data_output": True}
    text = json.dumps(header).encode()
    return text + b"".join(blobs), str(len(text))


def build_server(app, port: int, host: str, max_body: int):
    """A started `grpc.Server` answering for the worker's `app` (its endpoints, readiness)."""
    import grpc  # lazy: only with --grpc-port
    from tritonclient.grpc import service_pb2, service_pb2_grpc  # lazy: only with --grpc-port

    class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return service_pb2.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return service_pb2.ServerReadyResponse(ready=app.ready())

        def ModelReady(self, request, context):
            ok = request.name in app.endpoints and request.version in ("", "1")
            return service_pb2.ModelReadyResponse(ready=ok)

        def ServerMetadata(self, request, context):
            meta = json.loads(app.root.metadata)
            return service_pb2.ServerMetadataResponse(
                name=SERVER_NAME, version=meta["version"], extensions=meta["extensions"])

        def ModelMetadata(self, request, context):
            endpoint = self._endpoint(request.name, request.version, context)
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=endpoint.name, versions=["1"], platform=get_format(endpoint.format).serve_platform,
                inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape)
                        for t in endpoint.inputs],
                outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape)
                         for t in endpoint.outputs],
            )

        def ModelInfer(self, request, context):
            endpoint = self._endpoint(request.model_name, request.model_version, context)
            try:
                body, length = to_http_body(request)
                decoded, feeds = endpoint.decode(body, length, None)
                results = endpoint.run(feeds)
            except BodyTooLarge as e:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, first_line(e))
            except InputError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, first_line(e))
            except Exception as e:  # noqa: BLE001 - the server never dies of a request
                log.exception("gRPC request to %s failed", endpoint.name)
                context.abort(grpc.StatusCode.INTERNAL,
                              f"internal error: {type(e).__name__}: {first_line(e)}")
            wanted = decoded.outputs or {t.name: True for t in endpoint.outputs}
            response = service_pb2.ModelInferResponse(
                model_name=endpoint.name, model_version="1", id=request.id)
            for spec in endpoint.outputs:
                if spec.name not in wanted:
                    continue
                array = np.ascontiguousarray(results[spec.name])
                response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
                response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<"),
                                                                 copy=False).tobytes())
            return response

        def _endpoint(self, name, version, context):
            endpoint = app.endpoints.get(name)
            if endpoint is None:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"unknown model {name[:80]!r}; this server serves "
                              f"{', '.join(app.root.names)}")
            if version not in ("", "1"):
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"model {name} has version 1 only; received {version[:20]!r}")
            return endpoint

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", max_body),
                 ("grpc.max_send_message_length", -1)],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Service(), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = "the port is taken"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises "Failed to bind to address ..." where it used to return 0
        bound, reason = 0, first_line(e)
    if not bound:
        server.stop(None)
        raise OSError(f"cannot listen for gRPC on {address}: {reason}")
    server.start()
    return server
