"""Lean clients from the router to a gpu-let's tritonserver (the router's hot path).

tritonclient's asyncio clients cost the router more per request than the rest
of its work together (InferInput/InferResult objects, aiohttp, grpc.aio call
objects and their polling), so the router speaks to tritonservers itself:

- :class:`HttpBackendClient` (the default): KServe v2 over HTTP/1.1 with Triton's
  binary tensor extension, on a small pool of keep-alive connections that are
  plain :class:`asyncio.Protocol` objects. Inputs go out as the client's raw
  bytes (``writelines`` of memoryviews, no copy), outputs come back as
  ``np.frombuffer`` views of the response body.
- :class:`GrpcBackendClient`: one ``grpc.aio`` channel and a bare unary stub with
  ``service_pb2`` messages (raw_input_contents / raw_output_contents).

Both raise :class:`BackendError` for answers of the server (with the HTTP status)
and :class:`ConnectionError` / :class:`OSError` when the server cannot be reached
or the connection breaks; the router takes the latter as "gpu-let down".
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

_NP: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
_KS = {np.dtype(v).str: k for k, v in _NP.items()}


def kserve_dtype(arr: np.ndarray) -> str:
    if arr.dtype == np.object_ or arr.dtype.kind in "SU":
        return "BYTES"
    return _KS[arr.dtype.str]


def serialize_bytes(arr: np.ndarray) -> bytes:
    out = bytearray()
    for x in arr.reshape(-1):
        b = x if isinstance(x, bytes) else str(x).encode()
        out += len(b).to_bytes(4, "little") + b
    return bytes(out)


def deserialize_bytes(buf) -> np.ndarray:
    items = []
    off = 0
    buf = bytes(buf)
    while off < len(buf):
        if off + 4 > len(buf):
            raise ValueError("malformed BYTES tensor: truncated length prefix")
        n = int.from_bytes(buf[off:off + 4], "little")
        off += 4
        if off + n > len(buf):
            raise ValueError("malformed BYTES tensor: element runs past the end")
        items.append(buf[off:off + n])
        off += n
    return np.array(items, dtype=np.object_)


def raw(arr: np.ndarray):
    """The array's bytes without a copy where it is contiguous (a memoryview), else a copy."""
    if arr.dtype == np.object_:
        return serialize_bytes(arr)
    if arr.flags.c_contiguous:
        return memoryview(arr).cast("B") if arr.ndim else arr.tobytes()
    return np.ascontiguousarray(arr).tobytes()


class BackendError(Exception):
    """The tritonserver answered with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- HTTP/1.1


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    __slots__ = ("transport", "buf", "waiter", "closed", "_status", "_hlen", "_clen", "_keep")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self._status = 0
        self._hlen: int | None = None
        self._clen = -1
        self._keep = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError(f"connection to tritonserver lost: {exc or 'closed'}"))

    def eof_received(self):
        return None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None or w.done():
            return
        if self._clen < 0:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            try:
                self._parse_head(bytes(self.buf[:i]))
            except Exception as e:  # noqa: BLE001
                w.set_exception(ConnectionResetError(f"bad HTTP response from tritonserver: {e}"))
                return
            del self.buf[:i + 4]
        if len(self.buf) >= self._clen:
            body = bytes(self.buf[:self._clen])
            del self.buf[:self._clen]
            w.set_result((self._status, self._hlen, body))

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self._status = int(lines[0].split(b" ", 2)[1])
        self._hlen = None
        self._clen = -1
        self._keep = True
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                self._clen = int(v)
            elif k == b"inference-header-content-length":
                self._hlen = int(v)
            elif k == b"connection" and v.strip().lower() == b"close":
                self._keep = False
            elif k == b"transfer-encoding":
                raise ValueError("chunked responses are not supported")
        if self._clen < 0:
            raise ValueError("response without Content-Length")

    async def request(self, head: bytes, parts: list) -> tuple[int, int | None, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        self._clen = -1
        self.transport.writelines([head, *parts])
        try:
            return await self.waiter
        finally:
            self.waiter = None


class HttpBackendClient:
    """KServe v2 infer over HTTP/1.1 keep-alive connections to one tritonserver."""

    def __init__(self, url: str, max_idle: int = 8) -> None:
        host, _, port = url.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._hosthdr = url
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._heads: dict[tuple, bytes] = {}

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(_Conn, self.host, self.port), 2.0)
        return conn

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        parts = [raw(a) for a in inputs.values()]
        key = (model, tuple((n, a.dtype.str, a.shape) for n, a in inputs.items()), tuple(outputs),
               tuple(len(p) if a.dtype == np.object_ else 0 for p, a in zip(parts, inputs.values())))
        jhead = self._heads.get(key)
        if jhead is None:
            jhead = json.dumps({
                "inputs": [{"name": n, "shape": list(a.shape), "datatype": kserve_dtype(a),
                            "parameters": {"binary_data_size": len(p) if a.dtype == np.object_ else a.nbytes}}
                           for (n, a), p in zip(inputs.items(), parts)],
                "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
            }, separators=(",", ":")).encode()
            if len(self._heads) > 1024:
                self._heads.clear()
            self._heads[key] = jhead
        size = len(jhead) + sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {self._hosthdr}\r\n"
                f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(jhead)}\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()
        conn = None
        while self._idle:
            c = self._idle.pop()
            if not c.closed:
                conn = c
                break
        if conn is None:
            conn = await self._connect()
        ok = False
        try:
            status, hlen, body = await conn.request(head, [jhead, *parts])
            ok = True
        finally:
            if not ok or conn.closed or not conn._keep or len(self._idle) >= self._max_idle:
                if not conn.closed:
                    conn.transport.close()
            else:
                self._idle.append(conn)
        if status != 200:
            try:
                msg = json.loads(body).get("error", body.decode(errors="replace"))
            except (ValueError, AttributeError):
                msg = body.decode(errors="replace")
            raise BackendError(status, msg)
        return _decode_http(body, hlen, outputs)

    async def close(self) -> None:
        for c in self._idle:
            if not c.closed:
                c.transport.close()
        self._idle.clear()


def _decode_http(body: bytes, hlen: int | None, wanted: list[str]) -> dict[str, np.ndarray]:
    head = json.loads(body[:hlen] if hlen is not None else body)
    off = hlen or 0
    out: dict[str, np.ndarray] = {}
    for o in head.get("outputs", []):
        shape = o["shape"]
        dt = o["datatype"]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if dt == "BYTES":
                arr = deserialize_bytes(body[off:off + size])
            else:
                npdt = np.dtype(_NP[dt])
                arr = np.frombuffer(body, npdt, size // npdt.itemsize, off)
            off += size
        elif dt == "BYTES":
            arr = np.array([x.encode() if isinstance(x, str) else x for x in o.get("data", [])], dtype=np.object_)
        else:
            arr = np.array(o.get("data", []), dtype=_NP[dt])
        out[o["name"]] = arr.reshape(shape)
    missing = [n for n in wanted if n not in out]
    if missing:
        raise BackendError(502, f"tritonserver's answer lacks outputs {missing}")
    return out


# --------------------------------------------------------------------------- gRPC


class GrpcBackendClient:
    """KServe v2 ModelInfer over one grpc.aio channel with a bare stub."""

    def __init__(self, url: str, max_message: int = 256 * 1024 * 1024) -> None:
        import grpc
        from tritonclient.grpc import service_pb2 as pb

        self._pb = pb
        self._channel = grpc.aio.insecure_channel(url, options=[
            ("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message)])
        self._infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        import grpc

        pb = self._pb
        req = pb.ModelInferRequest(model_name=model)
        for name, a in inputs.items():
            req.inputs.add(name=name, datatype=kserve_dtype(a), shape=a.shape)
            r = raw(a)
            req.raw_input_contents.append(r if isinstance(r, bytes) else bytes(r))
        for o in outputs:
            req.outputs.add(name=o)
        try:
            resp = await self._infer(req)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise ConnectionResetError(f"tritonserver unreachable: {e.details()}") from None
            raise BackendError(400 if code == grpc.StatusCode.INVALID_ARGUMENT else 502,
                               e.details() or str(code)) from None
        out: dict[str, np.ndarray] = {}
        for i, o in enumerate(resp.outputs):
            buf = resp.raw_output_contents[i]
            if o.datatype == "BYTES":
                arr = deserialize_bytes(buf)
            else:
                arr = np.frombuffer(buf, _NP[o.datatype])
            out[o.name] = arr.reshape(tuple(o.shape))
        missing = [n for n in outputs if n not in out]
        if missing:
            raise BackendError(502, f"tritonserver's answer lacks outputs {missing}")
        return out

    async def close(self) -> None:
        await self._channel.close()
