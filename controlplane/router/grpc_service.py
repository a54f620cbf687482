"""KServe v2 over gRPC: Triton's ``inference.GRPCInferenceService`` on grpc.aio."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
from google.protobuf.json_format import ParseDict
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from .core import Router, RouterError, kserve_dtype, np_dtype
from .backend import serialize_bytes
from .http import EXTENSIONS, SERVER_NAME, SERVER_VERSION, _deserialize_bytes, model_stats

_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _param(p: pb.InferParameter):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def decode_request(req: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise RouterError(400, f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs")
    if not req.inputs:
        raise RouterError(400, "request has no inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        if t.name in arrays:
            raise RouterError(400, f"input {t.name!r} given twice")
        shape = list(t.shape)
        if any(d < 0 for d in shape):
            raise RouterError(400, f"input {t.name!r}: negative dimension in shape {shape}")
        count = math.prod(shape)
        dt = np_dtype(t.datatype)
        if raw:
            buf = raw[i]
            if t.datatype == "BYTES":
                arr = _deserialize_bytes(buf)
                if arr.size != count:
                    raise RouterError(400, f"input {t.name!r}: {arr.size} elements, shape {shape} needs {count}")
            else:
                want = count * np.dtype(dt).itemsize
                if len(buf) != want:
                    raise RouterError(400, f"input {t.name!r}: {len(buf)} bytes of data, shape {shape} of "
                                           f"{t.datatype} needs {want}")
                arr = np.frombuffer(buf, dtype=dt)
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise RouterError(400, f"input {t.name!r}: {t.datatype} needs raw_input_contents")
            vals = list(getattr(t.contents, field))
            if t.datatype == "BYTES":
                arr = np.array(vals, dtype=np.object_)
            else:
                try:
                    with np.errstate(all="raise"):
                        arr = np.array(vals).astype(dt) if vals else np.zeros(0, dt)
                except (ValueError, OverflowError, FloatingPointError) as e:
                    raise RouterError(400, f"input {t.name!r}: {e}") from None
            if arr.size != count:
                raise RouterError(400, f"input {t.name!r}: {arr.size} values, shape {shape} needs {count}")
        arrays[t.name] = arr.reshape(shape)
    return arrays


def _timeout_ms(req: pb.ModelInferRequest) -> float | None:
    for key, scale in (("timeout", 1e-3), ("timeout_ms", 1.0)):
        if key in req.parameters:
            v = _param(req.parameters[key])
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v) * scale
            raise RouterError(400, f"parameter {key!r} must be a number")
    return None


def encode_response(model: str, version: str, req_id: str, result: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=req_id)
    for name, arr in result.items():
        dt = kserve_dtype(arr)
        resp.outputs.add(name=name, datatype=dt, shape=list(arr.shape))
        resp.raw_output_contents.append(serialize_bytes(arr) if dt == "BYTES" else np.ascontiguousarray(arr).tobytes())
    return resp


class InferenceService(pbg.GRPCInferenceServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def _abort(self, context, e: RouterError):
        await context.abort(e.grpc_code, e.message)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.router.ready())

    async def ModelReady(self, request, context):
        try:
            self.router.model(request.name, request.version)
        except RouterError as e:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.router.model_ready(request.name))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        try:
            m = self.router.model(request.name, request.version)
        except RouterError as e:
            await self._abort(context, e)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name, versions=[m.version], platform="python",
            inputs=[tm(name=t.name, datatype=t.datatype, shape=[-1, *t.shape]) for t in m.inputs],
            outputs=[tm(name=t.name, datatype=t.datatype, shape=[-1, *t.shape]) for t in m.outputs])

    async def ModelConfig(self, request, context):
        try:
            m = self.router.model(request.name, request.version)
        except RouterError as e:
            await self._abort(context, e)
        return pb.ModelConfigResponse(config=m.config)

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self.router.table.models)
        try:
            for n in names:
                self.router.model(n, request.version)
        except RouterError as e:
            await self._abort(context, e)
        d = {"model_stats": [model_stats(self.router, n) for n in names]}
        return ParseDict(d, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=n, version=m.version,
                                                  state="READY" if self.router.model_ready(n) else "UNAVAILABLE")
            for n, m in self.router.table.models.items()])

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        m = self.router.model(request.model_name, request.model_version)
        arrays = decode_request(request)
        outs = [o.name for o in request.outputs] or None
        for o in request.outputs:
            if "classification" in o.parameters:
                raise RouterError(400, "the classification extension is not supported by the router")
        result = await self.router.infer(m.name, arrays, outs, _timeout_ms(request), request.model_version)
        return encode_response(m.name, m.version, request.id, result)

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request)
        except RouterError as e:
            await self._abort(context, e)

    async def ModelStreamInfer(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()

        async def one(req):
            try:
                resp = await self._infer(req)
                await out.put(pb.ModelStreamInferResponse(infer_response=resp))
            except RouterError as e:
                await out.put(pb.ModelStreamInferResponse(
                    error_message=e.message,
                    infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id)))

        async def reader():
            async for req in request_iterator:
                t = asyncio.get_running_loop().create_task(one(req))
                pending.add(t)
                t.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*list(pending), return_exceptions=True)
            await out.put(None)

        rt = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
        finally:
            rt.cancel()
            for t in list(pending):
                t.cancel()


def add_to_server(server: grpc.aio.Server, router: Router) -> InferenceService:
    svc = InferenceService(router)
    pbg.add_GRPCInferenceServiceServicer_to_server(svc, server)
    return svc
