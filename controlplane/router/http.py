"""KServe v2 over HTTP (FastAPI); infer requests pass through to the gpu-lets as they came.

Every error answers with a KServe body ``{"error": "..."}``: the router's own
404 for unknown models/versions, 413 for bodies over the limit, 503 when no
gpu-let of the model can be reached, or when they hold as many requests as they
can finish within the SLO; the gpu-lets' answers as Triton gives them (400 for bad
requests; Triton 2.51's 500s for requests it cannot parse become 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import zlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .clients import FORWARD_HEADERS, HttpAnswer
from .core import Router, RouterOptions
from .errors import RouterError
from .table import ModelRoute, RoutingTable

SERVER_NAME = "gpulet-router"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification_unsupported", "binary_tensor_data", "statistics", "model_repository(index)"]


def extensions(router: Router) -> list[str]:
    """The KServe extensions this router speaks: the whole repository API where the deployment enables it."""
    return EXTENSIONS if router.control is None else [*EXTENSIONS[:-1], "model_repository"]
HEADER_LEN = "Inference-Header-Content-Length"
log = logging.getLogger("controlplane.router")


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


async def read_body(max_body: int, headers: dict[bytes, bytes], chunks) -> bytes:
    """The request body, refused with 413 past ``max_body`` bytes (before reading it where it says its length)."""
    clen = headers.get(b"content-length")
    if clen is not None and clen.isdigit() and int(clen) > max_body:
        raise RouterError(413, f"request body of {clen.decode()} bytes exceeds the limit of {max_body}")
    parts = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body:
            raise RouterError(413, f"request body exceeds the limit of {max_body} bytes")
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def handle_infer(router: Router, max_body: int, model: str, version: str,
                       headers: dict[bytes, bytes], chunks) -> HttpAnswer:
    """One infer request: ``headers`` maps lower-case names to values (bytes), ``chunks`` yields the body.

    The body goes to a gpu-let of the model as it came; returns Triton's answer, raises :class:`RouterError`
    for what the router itself refuses (unknown model, body too large, no gpu-let reachable)."""
    app = router.app(model, version)
    if app is not None:
        from .apps import run_app

        body = await read_body(max_body, headers, chunks)
        return await run_app(router, app, headers.get(b"inference-header-content-length"), body)
    router.model(model, version)
    body = await read_body(max_body, headers, chunks)
    fwd = [(k, v) for k, v in headers.items() if k in FORWARD_HEADERS]
    enc = headers.get(b"content-encoding", b"identity").lower()
    if enc in (b"gzip", b"deflate"):     # inflated here, within the size limit (Triton would inflate any size)
        body = await _off_loop(len(body), inflate, body, enc, max_body)
        fwd = [(k, v) for k, v in fwd if k != b"content-encoding"]
    ans = await router.infer_http(model, version, fwd, body)
    if ans.status == 500 and await _off_loop(len(body), request_problem, body,
                                              headers.get(b"inference-header-content-length")):
        ans = HttpAnswer(400, ans.headers, ans.body)
    return ans


#: bodies past this size are inflated and parsed in a worker thread: a 60 MB JSON body parsed on the
#: event loop held every other request of the router process for 3.7 s (issue 14)
OFF_LOOP_BYTES = 256 * 1024


async def _off_loop(size: int, fn, *args):
    """fn(*args), in a worker thread when the body is large (the event loop keeps serving others)."""
    return await asyncio.to_thread(fn, *args) if size > OFF_LOOP_BYTES else fn(*args)


async def _json_body(request: Request) -> dict:
    """A small JSON object body (repository requests); empty: {}; anything else: 400."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RouterError(400, "the request body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("parameters", {}), dict):
        raise RouterError(400, "the request body must be a JSON object, its 'parameters' an object")
    return body


def _scalar_params(p) -> bool:
    return isinstance(p, dict) and all(isinstance(k, str) and k and isinstance(v, (str, int, float, bool))
                                       for k, v in p.items())


def _count(data) -> int | None:
    """Elements of a (nested) JSON list, None when it holds something other than lists and scalars."""
    if isinstance(data, list):
        n = 0
        for x in data:
            c = _count(x)
            if c is None:
                return None
            n += c
        return n
    return 1 if isinstance(data, (int, float, bool, str)) else None


def request_problem(body: bytes, header_len: bytes | None) -> str | None:
    """What makes an infer request's JSON not a KServe v2 request, or None.

    Used only on the error path: Triton 2.51 answers some malformed requests HTTP 500 (its JSON
    reader's errors), and a 5xx tells a client to retry what cannot succeed; when this finds the
    request malformed, the router answers 400 with Triton's message."""
    try:
        head = body[:int(header_len)] if header_len is not None else body
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        return "the request is not JSON"
    except RecursionError:
        return "the request's JSON is nested too deeply"
    try:
        return _kserve_problem(req)
    except RecursionError:
        return "an input's data is nested too deeply"


#: Triton's limit on a tensor's dimensions (more answer HTTP 500 / gRPC UNKNOWN in 2.51)
MAX_DIMS = 32


def _kserve_problem(req) -> str | None:
    if not isinstance(req, dict):
        return "the request is not a JSON object"
    if "id" in req and not isinstance(req["id"], str):
        return "'id' is not a string"
    if "parameters" in req and not _scalar_params(req["parameters"]):
        return "'parameters' is not an object of scalars"
    ins = req.get("inputs")
    if not isinstance(ins, list) or not ins:
        return "'inputs' is not a non-empty list"
    for i in ins:
        if not isinstance(i, dict) or not isinstance(i.get("name"), str) or not isinstance(i.get("datatype"), str):
            return "an input lacks a name or datatype"
        shape = i.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return "an input's shape is not a list of non-negative integers"
        if len(shape) > MAX_DIMS:
            return f"an input's shape has {len(shape)} dimensions (at most {MAX_DIMS})"
        if "parameters" in i and not _scalar_params(i["parameters"]):
            return "an input's parameters are not an object of scalars"
        if "data" in i:
            n = _count(i["data"])
            if not isinstance(i["data"], list) or n is None or n != math.prod(shape):
                return "an input's data does not match its shape"
    outs = req.get("outputs", [])
    if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                             and _scalar_params(o.get("parameters", {})) for o in outs):
        return "'outputs' is not a list of named outputs"
    return None


def inflate(body: bytes, encoding: bytes, max_body: int) -> bytes:
    """A gzip or deflate body, decompressed; 413 past ``max_body`` bytes, 400 when it is not what it says."""
    d = zlib.decompressobj(wbits=47 if encoding == b"gzip" else 15)
    try:
        out = d.decompress(body, max_body + 1)
    except zlib.error as e:
        raise RouterError(400, f"cannot decompress body ({encoding.decode()}): {e}") from None
    if len(out) > max_body or d.unconsumed_tail:
        raise RouterError(413, f"decompressed body exceeds the limit of {max_body} bytes")
    return out


class RouterApp(FastAPI):
    """FastAPI (OpenAPI docs, every other endpoint), with the infer endpoint answered as plain ASGI.

    FastAPI's routing, middleware and dependency resolution cost about as much as
    the rest of an inference through the router; ``POST /v2/models/{model}[/versions/{v}]/infer``
    skips them (the FastAPI route of the same path stays, for the docs, and runs the same code).
    """

    infer_router: Router
    infer_max_body: int
    body_timeout_s: float = 30.0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                seg = path[11:-6].split("/")
                if len(seg) == 1 and seg[0]:
                    return await self._infer(scope, receive, send, seg[0], "")
                if len(seg) == 3 and seg[0] and seg[1] == "versions" and seg[2]:
                    return await self._infer(scope, receive, send, seg[0], seg[2])
        await super().__call__(scope, receive, send)

    async def _infer(self, scope, receive, send, model: str, version: str) -> None:
        headers = dict(scope["headers"])
        gone = False

        async def chunks():
            nonlocal gone
            while True:
                try:
                    msg = await asyncio.wait_for(receive(), self.body_timeout_s)
                except asyncio.TimeoutError:
                    raise RouterError(408, f"request body stalled: nothing received for {self.body_timeout_s:g} s") from None
                if msg["type"] == "http.disconnect":
                    gone = True
                    raise RouterError(400, "client disconnected")
                yield msg.get("body", b"")
                if not msg.get("more_body"):
                    return

        try:
            ans = await handle_infer(self.infer_router, self.infer_max_body, model, version, headers, chunks())
        except RouterError as e:
            ans = HttpAnswer(e.status, [(b"content-type", b"application/json")],
                             json.dumps({"error": e.message}).encode())
        except Exception as e:  # noqa: BLE001 - a bug must not take the connection down
            log.exception("infer failed")
            ans = HttpAnswer(500, [(b"content-type", b"application/json")],
                             json.dumps({"error": f"internal error: {e}"}).encode())
        if gone:
            return
        await send({"type": "http.response.start", "status": ans.status,
                    "headers": [*ans.headers, (b"content-length", str(len(ans.body)).encode())]})
        await send({"type": "http.response.body", "body": ans.body})


def _metadata(m: ModelRoute) -> dict:
    return {
        "name": m.name, "versions": [m.version], "platform": "python",
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": [-1, *t.shape]} for t in m.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": [-1, *t.shape]} for t in m.outputs],
    }


_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": {
                        "type": "object", "required": ["name", "shape", "datatype"],
                        "properties": {
                            "name": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "datatype": {"type": "string"},
                            "parameters": {"type": "object"},
                            "data": {"type": "array"},
                        }}},
                    "outputs": {"type": "array", "items": {
                        "type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
                }}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def create_app(table: RoutingTable | None = None, spec=None, *, router: Router | None = None,
               options: RouterOptions | None = None) -> FastAPI:
    """The HTTP side of the router.

    Give either a routing table (the app owns a :class:`Router`, started and
    closed with the app's lifespan) or an already created ``router`` (shared with
    the gRPC side; started here if needed, closed by its owner). ``spec`` is a
    :class:`~controlplane.spec.RouterSpec` (drop policy, body size limit).
    """
    if router is None:
        if table is None:
            raise ValueError("create_app needs a routing table or a router")
        if options is None:
            options = RouterOptions(max_body_bytes=spec.max_body_bytes) if spec else RouterOptions()
        router = Router(table, options)
        owns = True
    else:
        owns = False
    max_body = spec.max_body_bytes if spec is not None else router.options.max_body_bytes

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            if owns:
                await router.close()

    app = RouterApp(title="gpulet router", version=SERVER_VERSION, lifespan=lifespan,
                    description="KServe v2 inference protocol (Triton flavour) in front of the gpu-lets.")
    app.state.router = router
    app.infer_router = router
    app.infer_max_body = max_body
    if spec is not None:
        app.body_timeout_s = spec.body_timeout_s

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _val_exc(request: Request, exc: RequestValidationError):
        return _error(400, str(exc.errors()))

    @app.exception_handler(RouterError)
    async def _router_exc(request: Request, exc: RouterError):
        return _error(exc.status, exc.message)

    @app.get("/v2/health/live", summary="server live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", summary="server ready: every gpu-let ready")
    async def ready():
        return Response(status_code=200 if router.ready() else 503)

    @app.get("/v2", summary="server metadata")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": extensions(router)}

    @app.get("/v2/models/stats", summary="statistics of every model")
    async def all_stats():
        return {"model_stats": [await router.model_stats(n) for n in router.table.models]}

    @app.post("/v2/repository/index", summary="models of the repository: served ones READY")
    async def repo_index(request: Request):
        body = await _json_body(request)
        return router.repository_index(ready_only=bool(body.get("ready", False)))

    @app.post("/v2/repository/models/{model}/load", summary="serve a model of the repository (repository_api)")
    async def repo_load(model: str, request: Request):
        body = await _json_body(request)
        await router.repository_change("load", model, body.get("parameters"))
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload", summary="stop serving a model (repository_api)")
    async def repo_unload(model: str, request: Request):
        body = await _json_body(request)
        await router.repository_change("unload", model, body.get("parameters"))
        return Response(status_code=200)

    @app.get("/v2/models/{model}", summary="model metadata")
    @app.get("/v2/models/{model}/versions/{version}", summary="model metadata (version)")
    async def model_metadata(model: str, version: str = ""):
        app = router.app(model, version)
        return app.metadata() if app is not None else _metadata(router.model(model, version))

    @app.get("/v2/models/{model}/ready", summary="model ready: at least one of its gpu-lets ready")
    @app.get("/v2/models/{model}/versions/{version}/ready", summary="model ready (version)")
    async def model_ready(model: str, version: str = ""):
        if router.app(model, version) is not None:
            return Response(status_code=200 if router.app_ready(model) else 503)
        router.model(model, version)
        return Response(status_code=200 if router.model_ready(model) else 503)

    @app.get("/v2/models/{model}/config", summary="model configuration")
    @app.get("/v2/models/{model}/versions/{version}/config", summary="model configuration (version)")
    async def model_config(model: str, version: str = ""):
        app = router.app(model, version)
        if app is not None:
            return app.model_config()
        m = router.model(model, version)
        return MessageToDict(m.config, preserving_proto_field_name=True)

    @app.get("/v2/models/{model}/stats", summary="model statistics")
    @app.get("/v2/models/{model}/versions/{version}/stats", summary="model statistics (version)")
    async def stats(model: str, version: str = ""):
        router.model(model, version)
        return {"model_stats": [await router.model_stats(model)]}

    @app.post("/v2/models/{model}/infer", summary="inference", openapi_extra=_INFER_DOC)
    @app.post("/v2/models/{model}/versions/{version}/infer", summary="inference (version)", openapi_extra=_INFER_DOC)
    async def infer(model: str, request: Request, version: str = ""):
        # normally answered by RouterApp.__call__ before FastAPI; the same code here
        try:
            headers = {k.lower().encode("latin-1"): v.encode("latin-1") for k, v in request.headers.items()}
            ans = await handle_infer(router, max_body, model, version, headers, request.stream())
        except RouterError as e:
            return _error(e.status, e.message)
        return Response(ans.body, status_code=ans.status,
                        headers={k.decode("latin-1"): v.decode("latin-1") for k, v in ans.headers})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(router.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
