"""Pass-through clients from the router to one gpu-let's tritonserver (the router's hot path).

Neither client decodes a tensor:

- :class:`HttpPassClient`: KServe v2 over HTTP/1.1 keep-alive connections that
  are plain :class:`asyncio.Protocol` objects; a request goes out as the
  client's body and KServe headers, the answer comes back as Triton's status,
  headers and body (tritonclient's aiohttp client costs the router more per
  request than everything else it does).
- :class:`GrpcPassClient`: ``ModelInfer`` on one ``grpc.aio`` channel with no
  (de)serializers: the serialized request in, the serialized response out.

Both raise :class:`OSError` (or :class:`asyncio.TimeoutError`) when the server
cannot be reached or the connection breaks before it answers; the router takes
that as "gpu-let down" and tries another. Triton's own answers, errors included,
are returned (HTTP) or raised as :class:`~controlplane.router.core.RouterError`
with Triton's code and message (gRPC).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from .errors import GpuletUnhealthy, RouterError, is_deadline_reject, is_parse_error, is_stub_dead

#: request headers a client may send that Triton's infer endpoint reads; all others stay at the router
FORWARD_HEADERS = frozenset({b"content-type", b"inference-header-content-length", b"content-encoding",
                             b"accept-encoding"})
#: response headers of Triton's that the client needs
ANSWER_HEADERS = frozenset({b"content-type", b"inference-header-content-length", b"content-encoding"})


@dataclass(slots=True)
class HttpAnswer:
    status: int
    headers: list[tuple[bytes, bytes]]    # the ANSWER_HEADERS Triton sent (lower-case names)
    body: bytes

    def outputs(self) -> tuple[dict, list[tuple[dict, bytes | None]]]:
        """An infer answer's JSON header and each output with its binary data (None where it came as JSON)."""
        hlen = next((int(v) for k, v in self.headers if k == b"inference-header-content-length"), len(self.body))
        head = json.loads(self.body[:hlen])
        off, out = hlen, []
        for o in head.get("outputs", []):
            size = (o.get("parameters") or {}).get("binary_data_size")
            out.append((o, None if size is None else self.body[off:off + size]))
            off += size or 0
        return head, out

    def error_message(self) -> str:
        try:
            return str(json.loads(self.body).get("error", ""))
        except (ValueError, AttributeError):
            return self.body[:200].decode(errors="replace")


# --------------------------------------------------------------------------- HTTP/1.1


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    __slots__ = ("transport", "buf", "waiter", "closed", "_status", "_headers", "_clen", "_keep")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
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
            w.set_result(HttpAnswer(self._status, self._headers, body))

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self._status = int(lines[0].split(b" ", 2)[1])
        self._headers = []
        self._clen = -1
        self._keep = True
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            k = k.strip().lower()
            v = v.strip()
            if k == b"content-length":
                self._clen = int(v)
            elif k in ANSWER_HEADERS:
                self._headers.append((k, v))
            elif k == b"connection" and v.lower() == b"close":
                self._keep = False
            elif k == b"transfer-encoding":
                raise ValueError("chunked responses are not supported")
        if self._clen < 0:
            raise ValueError("response without Content-Length")

    async def request(self, parts: list) -> HttpAnswer:
        self.waiter = asyncio.get_running_loop().create_future()
        self._clen = -1
        self.transport.writelines(parts)
        try:
            return await self.waiter
        finally:
            self.waiter = None


class HttpPassClient:
    """HTTP/1.1 to one tritonserver over a pool of keep-alive connections."""

    def __init__(self, url: str, max_idle: int = 256, connect_timeout: float = 2.0) -> None:
        host, _, port = url.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._hosthdr = url.encode()
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(_Conn, self.host, self.port), self._connect_timeout)
        return conn

    async def request(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]] = (),
                      body: bytes = b"") -> HttpAnswer:
        head = [method, b" ", path.encode(), b" HTTP/1.1\r\nHost: ", self._hosthdr,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for k, v in headers:
            head += (k, b": ", v, b"\r\n")
        head.append(b"\r\n")
        parts = [b"".join(head), body] if body else [b"".join(head)]
        while True:
            reused = False
            conn = None
            while self._idle:
                c = self._idle.pop()
                if not c.closed:
                    conn, reused = c, True
                    break
            if conn is None:
                conn = await self._connect()
            ok = False
            try:
                ans = await conn.request(parts)
                ok = True
            except ConnectionResetError:
                if reused:       # the server closed an idle keep-alive connection: not a failure, try a new one
                    continue
                raise
            finally:
                if not ok or conn.closed or not conn._keep or len(self._idle) >= self._max_idle:
                    if not conn.closed:
                        conn.transport.close()
                else:
                    self._idle.append(conn)
            return ans

    async def post(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> HttpAnswer:
        return await self.request(b"POST", path, headers, body)

    async def ready(self) -> bool:
        return (await self.request(b"GET", "/v2/health/ready")).status == 200

    async def close(self) -> None:
        for c in self._idle:
            if not c.closed:
                c.transport.close()
        self._idle.clear()


# --------------------------------------------------------------------------- gRPC

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


class GrpcPassClient:
    """``ModelInfer`` to one tritonserver with serialized messages, on one grpc.aio channel (made on first use)."""

    def __init__(self, url: str, max_message: int = 256 * 1024 * 1024) -> None:
        self.url = url
        self._max = max_message
        self._channel = None
        self._infer = None

    def _open(self) -> None:
        import grpc

        self._channel = grpc.aio.insecure_channel(self.url, options=[
            ("grpc.max_receive_message_length", self._max), ("grpc.max_send_message_length", self._max)])
        self._infer = self._channel.unary_unary(INFER_METHOD)   # no (de)serializers: bytes in, bytes out

    async def infer(self, request: bytes, timeout: float | None = None) -> bytes:
        import grpc

        if self._infer is None:
            self._open()
        try:
            return await self._infer(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and not is_deadline_reject(details):
                raise ConnectionResetError(f"tritonserver unreachable: {details}") from None
            if is_stub_dead(details):
                raise GpuletUnhealthy(details) from None
            if code == grpc.StatusCode.INTERNAL and is_parse_error(details):
                code = grpc.StatusCode.INVALID_ARGUMENT
            raise RouterError.from_grpc(code, details or str(code)) from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
