"""KServe v2 over gRPC: Triton's ``inference.GRPCInferenceService`` on grpc.aio.

``ModelInfer`` and ``ModelStreamInfer`` are registered without a request
deserializer: the router reads the model's name and version from the front of
the serialized ``ModelInferRequest``; the request then reaches the gpu-let
re-framed as HTTP (raw tensors; :mod:`.grpc_http`) or as the bytes received
(typed contents), and the answer comes back as a ``ModelInferResponse`` equal to
the gpu-let's own. The other methods (health, metadata, config, statistics,
index) are answered by the router from its routing table.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.json_format import ParseDict
from tritonclient.grpc import service_pb2 as pb

from .core import Router
from .errors import RouterError
from .http import SERVER_NAME, SERVER_VERSION, extensions

SERVICE = "inference.GRPCInferenceService"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def model_of(request: bytes) -> tuple[str, str]:
    """``model_name`` and ``model_version`` of a serialized ModelInferRequest, without parsing its tensors.

    They are fields 1 and 2; serializers write fields in number order, so they lead the message. Anything
    else (an unusual encoder, a malformed message) falls back to a full parse.
    """
    name = version = None
    i = 0
    try:
        while i < len(request):
            tag, j = _varint(request, i)
            field, wire = tag >> 3, tag & 7
            if wire != 2 or field > 2:
                break
            n, j = _varint(request, j)
            value = request[j:j + n].decode()
            if field == 1:
                name = value
            else:
                version = value
            i = j + n
    except (ValueError, UnicodeDecodeError):
        name = None
    if name is None:
        try:
            req = pb.ModelInferRequest.FromString(request)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise RouterError(400, f"malformed ModelInferRequest: {e}") from None
        return req.model_name, req.model_version
    return name, version or ""


log = logging.getLogger("controlplane.router")


class InferenceService:
    def __init__(self, router: Router) -> None:
        self.router = router

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.router.ready())

    async def ModelReady(self, request, context):
        try:
            if self.router.app(request.name, request.version) is not None:
                return pb.ModelReadyResponse(ready=self.router.app_ready(request.name))
            self.router.model(request.name, request.version)
        except RouterError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.router.model_ready(request.name))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=extensions(self.router))

    async def ModelMetadata(self, request, context):
        try:
            app = self.router.app(request.name, request.version)
            if app is not None:
                return ParseDict(app.metadata(), pb.ModelMetadataResponse())
            m = self.router.model(request.name, request.version)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name, versions=[m.version], platform="python",
            inputs=[tm(name=t.name, datatype=t.datatype, shape=[-1, *t.shape]) for t in m.inputs],
            outputs=[tm(name=t.name, datatype=t.datatype, shape=[-1, *t.shape]) for t in m.outputs])

    async def ModelConfig(self, request, context):
        try:
            app = self.router.app(request.name, request.version)
            if app is not None:
                from tritonclient.grpc import model_config_pb2 as mc

                return pb.ModelConfigResponse(config=ParseDict(app.model_config(), mc.ModelConfig()))
            m = self.router.model(request.name, request.version)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)
        return pb.ModelConfigResponse(config=m.config)

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self.router.table.models)
        try:
            for n in names:
                self.router.model(n, request.version)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)
        d = {"model_stats": [await self.router.model_stats(n) for n in names]}
        return ParseDict(d, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=r["name"], version=r.get("version", ""),
                                                  state=r.get("state", ""), reason=r.get("reason", ""))
            for r in self.router.repository_index(ready_only=request.ready)])

    async def _repository_change(self, action: str, request, context) -> None:
        try:
            params = {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
                      for k, v in request.parameters.items()}
            await self.router.repository_change(action, request.model_name, params)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)

    async def RepositoryModelLoad(self, request, context):
        await self._repository_change("load", request, context)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._repository_change("unload", request, context)
        return pb.RepositoryModelUnloadResponse()

    async def _infer(self, request: bytes) -> bytes:
        model, version = model_of(request)
        app = self.router.app(model, version)
        if app is not None:
            from .apps import run_app
            from .grpc_http import to_grpc, to_http

            framed = to_http(request)
            if framed is None:
                raise RouterError(400, f"app {model!r} takes its tensors as raw_input_contents (what tritonclient sends)")
            _, headers, body = framed
            return to_grpc(await run_app(self.router, app, dict(headers).get(b"inference-header-content-length"), body))
        return await self.router.infer_grpc(model, version, request)

    async def ModelInfer(self, request: bytes, context) -> bytes:
        try:
            return await self._infer(request)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)

    async def ModelStreamInfer(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()

        async def one(req: bytes):
            """Every request of the stream gets its own answer: a response, or an error message."""
            try:
                resp = pb.ModelInferResponse.FromString(await self._infer(req))
                await out.put(pb.ModelStreamInferResponse(infer_response=resp))
                return
            except RouterError as e:
                message = e.message
            except Exception as e:  # noqa: BLE001 - a stream must not swallow a request unanswered
                log.exception("stream request failed")
                message = f"router error: {type(e).__name__}: {e}"
            try:
                head = model_of(req)
            except RouterError:
                head = ("", "")
            await out.put(pb.ModelStreamInferResponse(
                error_message=message, infer_response=pb.ModelInferResponse(model_name=head[0])))

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
    """Register the service; infer methods take and give serialized messages (no protobuf parse)."""
    svc = InferenceService(router)
    unary = {
        "ServerLive": pb.ServerLiveRequest, "ServerReady": pb.ServerReadyRequest,
        "ModelReady": pb.ModelReadyRequest, "ServerMetadata": pb.ServerMetadataRequest,
        "ModelMetadata": pb.ModelMetadataRequest, "ModelConfig": pb.ModelConfigRequest,
        "ModelStatistics": pb.ModelStatisticsRequest, "RepositoryIndex": pb.RepositoryIndexRequest,
        "RepositoryModelLoad": pb.RepositoryModelLoadRequest, "RepositoryModelUnload": pb.RepositoryModelUnloadRequest,
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(svc, name), request_deserializer=req.FromString,
                                                  response_serializer=lambda m: m.SerializeToString())
        for name, req in unary.items()
    }
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(svc.ModelInfer)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        svc.ModelStreamInfer, response_serializer=lambda m: m.SerializeToString())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return svc
