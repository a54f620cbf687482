"""KServe v2 over HTTP (FastAPI), with Triton's binary tensor extension.

Every error answers with a KServe body ``{"error": "..."}``: 400 for bad
requests, 404 for unknown models/versions, 413 for bodies over the limit, 503
(or 429 when the queue is full) for requests dropped because they cannot meet
their deadline.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import zlib
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backend import deserialize_bytes, serialize_bytes
from .core import Router, RouterError, RouterOptions, kserve_dtype, np_dtype
from .table import ModelRoute, RoutingTable

SERVER_NAME = "gpulet-router"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification_unsupported", "binary_tensor_data", "statistics", "model_repository(index)"]
HEADER_LEN = "Inference-Header-Content-Length"
log = logging.getLogger("controlplane.router")


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def _prod(shape) -> int:
    return int(math.prod(shape)) if shape else 1


def _deserialize_bytes(buf) -> np.ndarray:
    """A BYTES tensor of a request; malformed input is the client's error (400)."""
    try:
        return deserialize_bytes(buf)
    except ValueError as e:
        raise RouterError(400, str(e)) from None


def parse_infer(body: bytes, header_len: int | None) -> tuple[dict, dict[str, np.ndarray]]:
    """Decode a KServe v2 infer body (JSON, optionally followed by binary tensors)."""
    if header_len is not None:
        if header_len < 0 or header_len > len(body):
            raise RouterError(400, f"{HEADER_LEN} {header_len} is outside the body ({len(body)} bytes)")
        head, binary = body[:header_len], memoryview(body)[header_len:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise RouterError(400, f"malformed JSON: {e}") from None
    if not isinstance(req, dict):
        raise RouterError(400, "request must be a JSON object")
    ins = req.get("inputs")
    if not isinstance(ins, list) or not ins:
        raise RouterError(400, "request has no 'inputs' list")
    arrays: dict[str, np.ndarray] = {}
    off = 0
    for i, inp in enumerate(ins):
        if not isinstance(inp, dict):
            raise RouterError(400, f"inputs[{i}] must be an object")
        name, shape, dt = inp.get("name"), inp.get("shape"), inp.get("datatype")
        if not isinstance(name, str):
            raise RouterError(400, f"inputs[{i}].name missing")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise RouterError(400, f"input {name!r}: shape must be a list of non-negative integers")
        if not isinstance(dt, str):
            raise RouterError(400, f"input {name!r}: datatype missing")
        if name in arrays:
            raise RouterError(400, f"input {name!r} given twice")
        npdt = np_dtype(dt)
        count = _prod(shape)
        params = inp.get("parameters") or {}
        if not isinstance(params, dict):
            raise RouterError(400, f"input {name!r}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RouterError(400, f"input {name!r}: binary_data_size must be a non-negative integer")
            if off + size > len(binary):
                raise RouterError(400, f"input {name!r}: binary_data_size {size} runs past the body")
            chunk = binary[off:off + size]
            off += size
            if dt == "BYTES":
                arr = _deserialize_bytes(chunk)
                if arr.size != count:
                    raise RouterError(400, f"input {name!r}: {arr.size} elements, shape {shape} needs {count}")
            else:
                want = count * np.dtype(npdt).itemsize
                if size != want:
                    raise RouterError(400, f"input {name!r}: {size} bytes of data, shape {shape} of {dt} "
                                           f"needs {want}")
                arr = np.frombuffer(chunk, dtype=npdt)
            arrays[name] = arr.reshape(shape)
        else:
            if "data" not in inp:
                raise RouterError(400, f"input {name!r}: no 'data' and no binary_data_size")
            data = inp["data"]
            try:
                if dt == "BYTES":
                    flat = np.array(data, dtype=np.object_).reshape(-1)
                    arr = np.array([x.encode() if isinstance(x, str) else x for x in flat], dtype=np.object_)
                    if not all(isinstance(x, bytes) for x in arr):
                        raise ValueError("BYTES data must be strings")
                else:
                    if isinstance(data, (str, bytes, dict)):
                        raise ValueError("data must be a list of numbers")
                    arr = np.array(data)
                    if arr.dtype == np.object_ or arr.dtype.kind in "SUV":
                        raise ValueError("data must be a (nested) list of numbers")
                    if dt == "BOOL" and arr.size and arr.dtype != np.bool_:
                        raise ValueError("BOOL data must be true/false")
                    if dt != "BOOL" and arr.dtype == np.bool_ and arr.size:
                        raise ValueError(f"{dt} data must be numbers, not booleans")
                    if np.dtype(npdt).kind in "iu" and arr.dtype.kind == "f":
                        raise ValueError(f"{dt} data must be integers")
                    with np.errstate(all="raise"):
                        conv = arr.astype(npdt) if arr.size else np.zeros(0, npdt)
                    if np.dtype(npdt).kind in "iu" and arr.size and not np.array_equal(conv, arr):
                        raise ValueError(f"values out of range for {dt}")
                    arr = conv
            except (ValueError, TypeError, OverflowError, FloatingPointError) as e:
                raise RouterError(400, f"input {name!r}: bad data for {dt}: {e}") from None
            if arr.size != count:
                raise RouterError(400, f"input {name!r}: {arr.size} values, shape {shape} needs {count}")
            arrays[name] = arr.reshape(shape)
    if off != len(binary):
        raise RouterError(400, f"{len(binary) - off} bytes of binary data not claimed by any input")
    return req, arrays


def _outputs(req: dict, model: ModelRoute) -> tuple[list[str] | None, dict[str, bool]]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise RouterError(400, "parameters must be an object")
    default_bin = bool(params.get("binary_data_output", False))
    outs = req.get("outputs")
    if outs is None:
        return None, {t.name: default_bin for t in model.outputs}
    if not isinstance(outs, list):
        raise RouterError(400, "'outputs' must be a list")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for i, o in enumerate(outs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise RouterError(400, f"outputs[{i}] needs a name")
        op = o.get("parameters") or {}
        if not isinstance(op, dict):
            raise RouterError(400, f"outputs[{i}].parameters must be an object")
        if op.get("classification"):
            raise RouterError(400, "the classification extension is not supported by the router")
        names.append(o["name"])
        binary[o["name"]] = bool(op.get("binary_data", default_bin))
    return names, binary


def _timeout_ms(params: Any) -> float | None:
    if not isinstance(params, dict):
        return None
    if "timeout" in params:           # Triton's request timeout, in microseconds
        try:
            return float(params["timeout"]) / 1000
        except (TypeError, ValueError):
            raise RouterError(400, "parameter 'timeout' must be a number (microseconds)") from None
    if "timeout_ms" in params:
        try:
            return float(params["timeout_ms"])
        except (TypeError, ValueError):
            raise RouterError(400, "parameter 'timeout_ms' must be a number") from None
    return None


def encode_infer_raw(model: ModelRoute, req_id: Any, result: dict[str, np.ndarray],
                     binary: dict[str, bool]) -> tuple[bytes, int | None]:
    """The body of an infer response and its JSON header's length (None when there is no binary part)."""
    outs = []
    chunks: list[bytes] = []
    for name, arr in result.items():
        dt = kserve_dtype(arr)
        o: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary.get(name):
            b = serialize_bytes(arr) if dt == "BYTES" else np.ascontiguousarray(arr).tobytes()
            o["parameters"] = {"binary_data_size": len(b)}
            chunks.append(b)
        elif dt == "BYTES":
            o["data"] = [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        else:
            o["data"] = arr.reshape(-1).tolist()
        outs.append(o)
    body: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outs}
    if req_id not in (None, ""):
        body["id"] = req_id
    head = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def encode_infer(model: ModelRoute, req_id: Any, result: dict[str, np.ndarray], binary: dict[str, bool]) -> Response:
    body, hlen = encode_infer_raw(model, req_id, result, binary)
    if hlen is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LEN: str(hlen)})


async def handle_infer(router: Router, max_body: int, model: str, version: str, headers, chunks) -> tuple[bytes, int | None]:
    """One infer request: ``headers`` maps lower-case names to values (str), ``chunks`` yields the body.

    Returns the response body and its JSON header's length; raises :class:`RouterError`.
    """
    m = router.model(model, version)
    clen = headers.get("content-length")
    if clen is not None and clen.isdigit() and int(clen) > max_body:
        raise RouterError(413, f"request body of {clen} bytes exceeds the limit of {max_body}")
    parts = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body:
            raise RouterError(413, f"request body exceeds the limit of {max_body} bytes")
        parts.append(chunk)
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    enc = headers.get("content-encoding")
    if enc:
        enc = enc.lower()
        if enc in ("gzip", "deflate"):
            try:
                d = zlib.decompressobj(wbits=47 if enc == "gzip" else 15)
                body = d.decompress(body, max_body + 1)
                if len(body) > max_body or d.unconsumed_tail:
                    raise RouterError(413, f"decompressed body exceeds the limit of {max_body} bytes")
            except (zlib.error, gzip.BadGzipFile) as e:
                raise RouterError(400, f"cannot decompress body ({enc}): {e}") from None
        elif enc != "identity":
            raise RouterError(400, f"unsupported Content-Encoding {enc!r}")
    hl = headers.get("inference-header-content-length")
    if hl is not None:
        try:
            hl_i = int(hl)
        except ValueError:
            raise RouterError(400, f"{HEADER_LEN} must be an integer") from None
    else:
        hl_i = None
    req, arrays = parse_infer(body, hl_i)
    names, binary = _outputs(req, m)
    result = await router.infer(model, arrays, names, _timeout_ms(req.get("parameters")), version)
    return encode_infer_raw(m, req.get("id"), result, binary)


class RouterApp(FastAPI):
    """FastAPI (OpenAPI docs, every other endpoint), with the infer endpoint answered as plain ASGI.

    FastAPI's routing, middleware and dependency resolution cost about as much as
    the rest of an inference through the router; ``POST /v2/models/{model}[/versions/{v}]/infer``
    skips them (the FastAPI route of the same path stays, for the docs, and runs the same code).
    """

    infer_router: Router
    infer_max_body: int

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
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        gone = False

        async def chunks():
            nonlocal gone
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    gone = True
                    raise RouterError(400, "client disconnected")
                yield msg.get("body", b"")
                if not msg.get("more_body"):
                    return

        hlen = None
        try:
            body, hlen = await handle_infer(self.infer_router, self.infer_max_body, model, version, headers, chunks())
            status = 200
        except RouterError as e:
            status, body = e.status, json.dumps({"error": e.message}).encode()
        except Exception as e:  # noqa: BLE001 - a bug must not take the connection down
            log.exception("infer failed")
            status, body = 500, json.dumps({"error": f"internal error: {e}"}).encode()
        if gone:
            return
        if hlen is None:
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        else:
            hdrs = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode()),
                    (b"inference-header-content-length", str(hlen).encode())]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})


def _metadata(m: ModelRoute) -> dict:
    return {
        "name": m.name, "versions": [m.version], "platform": "python",
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": [-1, *t.shape]} for t in m.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": [-1, *t.shape]} for t in m.outputs],
    }


def model_stats(router: Router, name: str) -> dict:
    m = router.table.models[name]
    s = router.stats[name]
    return {
        "name": name, "version": m.version, "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {
            "success": {"count": s.success_count, "ns": s.success_ns},
            "fail": {"count": s.fail_count, "ns": s.fail_ns},
            "queue": {"count": s.success_count, "ns": max(0, s.success_ns - s.compute_ns)},
            "compute_input": {"count": 0, "ns": 0},
            "compute_infer": {"count": s.execution_count, "ns": s.compute_ns},
            "compute_output": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
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
            options = RouterOptions(drop=spec.drop, max_body_bytes=spec.max_body_bytes) if spec else RouterOptions()
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
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    @app.get("/v2/models/stats", summary="statistics of every model")
    async def all_stats():
        return {"model_stats": [model_stats(router, n) for n in router.table.models]}

    @app.post("/v2/repository/index", summary="models served")
    async def repo_index():
        return [{"name": n, "version": m.version, "state": "READY" if router.model_ready(n) else "UNAVAILABLE"}
                for n, m in router.table.models.items()]

    @app.get("/v2/models/{model}", summary="model metadata")
    @app.get("/v2/models/{model}/versions/{version}", summary="model metadata (version)")
    async def model_metadata(model: str, version: str = ""):
        return _metadata(router.model(model, version))

    @app.get("/v2/models/{model}/ready", summary="model ready: at least one of its gpu-lets ready")
    @app.get("/v2/models/{model}/versions/{version}/ready", summary="model ready (version)")
    async def model_ready(model: str, version: str = ""):
        router.model(model, version)
        return Response(status_code=200 if router.model_ready(model) else 503)

    @app.get("/v2/models/{model}/config", summary="model configuration")
    @app.get("/v2/models/{model}/versions/{version}/config", summary="model configuration (version)")
    async def model_config(model: str, version: str = ""):
        m = router.model(model, version)
        return MessageToDict(m.config, preserving_proto_field_name=True)

    @app.get("/v2/models/{model}/stats", summary="model statistics")
    @app.get("/v2/models/{model}/versions/{version}/stats", summary="model statistics (version)")
    async def stats(model: str, version: str = ""):
        router.model(model, version)
        return {"model_stats": [model_stats(router, model)]}

    @app.post("/v2/models/{model}/infer", summary="inference", openapi_extra=_INFER_DOC)
    @app.post("/v2/models/{model}/versions/{version}/infer", summary="inference (version)", openapi_extra=_INFER_DOC)
    async def infer(model: str, request: Request, version: str = ""):
        # normally answered by RouterApp.__call__ before FastAPI; the same code here
        try:
            headers = {k.lower(): v for k, v in request.headers.items()}
            body, hlen = await handle_infer(router, max_body, model, version, headers, request.stream())
        except RouterError as e:
            return _error(e.status, e.message)
        if hlen is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream", headers={HEADER_LEN: str(hlen)})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
