"""The router's engine, independent of the wire protocol.

Per model, the plan's gpu-lets; per (gpu-let, model) a :class:`Batcher` that
concatenates queued requests of the same input shapes into one batch of at most
the planned batch size, sends it to the gpu-let's tritonserver through
tritonclient's asyncio client and scatters the outputs back. A gpu-let is
picked per request by its planned capacity and current load (requests queued
and in flight per unit of predicted throughput, as the prototype's credits of
1/throughput). Each request carries a deadline (its model's SLO, or the
request's ``timeout`` parameter); with dropping on, a request that can no longer
finish in time is refused at admission or when its batch forms, with a
:class:`RouterError` the front ends turn into HTTP 503 / gRPC UNAVAILABLE.

A health task polls every gpu-let (``/v2/health/ready``); a gpu-let that is not
ready leaves the rotation, its queued requests move to the model's other
gpu-lets, and it comes back once ready again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .table import GpuletRoute, ModelRoute, RoutingTable

log = logging.getLogger("controlplane.router")

# KServe v2 datatype <-> numpy
_NP: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
_KS = {np.dtype(v).str: k for k, v in _NP.items() if k != "BYTES"}


def np_dtype(datatype: str):
    try:
        return _NP[datatype]
    except KeyError:
        raise RouterError(400, f"unsupported datatype {datatype!r}") from None


def kserve_dtype(arr: np.ndarray) -> str:
    if arr.dtype == np.object_ or arr.dtype.kind in "SU":
        return "BYTES"
    return _KS[arr.dtype.str]


class RouterError(Exception):
    """An error to return to the client: HTTP status, gRPC code and a message."""

    _GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
             413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
             503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
             502: grpc.StatusCode.INTERNAL, 500: grpc.StatusCode.INTERNAL}

    def __init__(self, status: int, message: str, grpc_code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.grpc_code = grpc_code or self._GRPC.get(status, grpc.StatusCode.INTERNAL)


class Dropped(RouterError):
    """Refused because it cannot meet its deadline (or the queue is full)."""


@dataclass(frozen=True)
class RouterOptions:
    drop: bool = True                       # drop requests early that cannot meet their SLO
    backend_protocol: str = "grpc"          # how the router talks to tritonservers: grpc | http
    max_inflight: int = 1                   # batches in flight per (gpu-let, model)
    max_queue: int = 4096                   # queued requests per model before 429
    health_interval_s: float = 0.5
    max_body_bytes: int = 64 * 1024 * 1024


# --------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("router_requests", "requests received", ["model"], registry=r)
        self.success = Counter("router_success", "requests answered", ["model"], registry=r)
        self.drops = Counter("router_drops", "requests dropped early", ["model", "reason"], registry=r)
        self.failures = Counter("router_failures", "requests failed (not drops)", ["model"], registry=r)
        self.slo_met = Counter("router_slo_met", "answered within the SLO", ["model"], registry=r)
        self.slo_attainment = Gauge("router_slo_attainment", "share of requests answered within the SLO",
                                    ["model"], registry=r)
        self.latency = Histogram("router_request_latency_seconds", "latency at the router", ["model"], registry=r,
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.batch = Histogram("router_batch_size", "requests' batch rows per dispatched batch", ["gpulet", "model"],
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue = Gauge("router_queue_depth", "requests queued", ["gpulet", "model"], registry=r)
        self.inflight = Gauge("router_inflight", "batches in flight", ["gpulet"], registry=r)
        self.errors = Counter("router_gpulet_errors", "failed batches", ["gpulet"], registry=r)
        self.ready = Gauge("router_gpulet_ready", "1 while the gpu-let is in the rotation", ["gpulet"], registry=r)


@dataclass
class ModelStats:
    """Counters for ModelStatistics (Triton's statistics extension), in ns."""

    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_inference_ms: int = 0


# --------------------------------------------------------------------------- requests


@dataclass
class Item:
    """One client request waiting for a batch."""

    model: str
    inputs: dict[str, np.ndarray]
    n: int                                   # batch rows
    key: tuple
    arrival: float
    deadline: float | None
    future: asyncio.Future
    enqueued: float = 0.0
    attempts: int = 0


def _key(inputs: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))


def _concat(arrs: list[np.ndarray]) -> np.ndarray:
    return arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0)


# --------------------------------------------------------------------------- backends


class Backend:
    """One gpu-let's tritonserver: a tritonclient asyncio client and its readiness."""

    def __init__(self, gpulet: str, route: GpuletRoute, protocol: str, metrics: Metrics) -> None:
        self.id = gpulet
        self.endpoint = route.endpoint
        self.protocol = protocol
        self.metrics = metrics
        self.ready = False
        self.inflight = 0
        self.batchers: list[Batcher] = []
        self._client = None
        self._health = None

    async def open(self) -> None:
        import tritonclient.http.aio as httpclient

        self._health = httpclient.InferenceServerClient(self.endpoint.http, conn_timeout=2.0)
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as grpcclient

            self._client = grpcclient.InferenceServerClient(self.endpoint.grpc)
        else:
            self._client = httpclient.InferenceServerClient(self.endpoint.http, conn_limit=64)

    async def close(self) -> None:
        for c in (self._client, self._health):
            if c is not None:
                try:
                    await c.close()
                except Exception:  # pragma: no cover - closing best effort
                    pass

    async def check(self) -> bool:
        try:
            ok = bool(await asyncio.wait_for(self._health.is_server_ready(), 2.0))
        except Exception:
            ok = False
        self.set_ready(ok)
        return ok

    def set_ready(self, ok: bool) -> None:
        if ok != self.ready:
            log.warning("gpu-let %s %s the rotation", self.id, "joins" if ok else "leaves")
            self.ready = ok
            self.metrics.ready.labels(self.id).set(1 if ok else 0)
            for b in self.batchers:
                b.wake()

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as c

            ins = []
            for name, arr in inputs.items():
                i = c.InferInput(name, list(arr.shape), kserve_dtype(arr))
                i.set_data_from_numpy(arr)
                ins.append(i)
            res = await self._client.infer(model, ins, outputs=[c.InferRequestedOutput(o) for o in outputs])
        else:
            import tritonclient.http.aio as c

            ins = []
            for name, arr in inputs.items():
                i = c.InferInput(name, list(arr.shape), kserve_dtype(arr))
                i.set_data_from_numpy(arr, binary_data=True)
                ins.append(i)
            res = await self._client.infer(model, ins, outputs=[c.InferRequestedOutput(o, binary_data=True)
                                                                for o in outputs])
        return {o: res.as_numpy(o) for o in outputs}


def _is_connection_error(e: Exception) -> bool:
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        st = str(e.status() or "")
        return "UNAVAILABLE" in st or "Socket closed" in str(e) or "failed to connect" in str(e).lower()
    return isinstance(e, (OSError, asyncio.TimeoutError)) or type(e).__name__.startswith(
        ("ClientConnector", "ServerDisconnected", "ClientOSError", "ClientPayload"))


# --------------------------------------------------------------------------- batching


class Batcher:
    """Requests of one model on one gpu-let: forms batches and sends them."""

    def __init__(self, router: "Router", model: ModelRoute, route: GpuletRoute, backend: Backend) -> None:
        self.router = router
        self.model = model
        self.route = route
        self.backend = backend
        self.batch = max(1, route.batch)
        self.queue: collections.deque[Item] = collections.deque()
        self.queued_rows = 0
        self.inflight = 0
        self.inflight_rows = 0
        # estimated service time of one batch (s); the plan's prediction until measured
        self.service_s: float | None = route.latency_ms / 1000 if route.latency_ms > 0 else None
        self._event = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._qgauge = router.metrics.queue.labels(route.id, model.name)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.route.id}-{self.model.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for t in list(self._tasks):
            t.cancel()
        for it in self.queue:
            if not it.future.done():
                it.future.set_exception(RouterError(503, "router is shutting down"))
        self.queue.clear()

    def wake(self) -> None:
        self._event.set()

    @property
    def available(self) -> bool:
        return self.backend.ready

    def load(self, extra: int) -> float:
        return (self.queued_rows + self.inflight_rows + extra) / self.route.weight

    def wait_estimate(self) -> float | None:
        """Seconds until a request queued now would complete."""
        if self.service_s is None:
            return None
        batches = math.ceil(self.queued_rows / self.batch) if self.queued_rows else 0
        running = min(self.inflight, 1) * 0.5
        return (batches + running + 1) * self.service_s

    def put(self, it: Item) -> None:
        it.enqueued = time.monotonic()
        self.queue.append(it)
        self.queued_rows += it.n
        self._qgauge.set(len(self.queue))
        self._event.set()

    def _take(self) -> list[Item]:
        """The next batch: oldest request's shape, up to the planned batch rows, FIFO otherwise."""
        now = time.monotonic()
        drop = self.router.options.drop
        est = self.service_s or 0.0
        batch: list[Item] = []
        rows = 0
        key = None
        keep: collections.deque[Item] = collections.deque()
        while self.queue:
            it = self.queue.popleft()
            if it.future.done():             # client went away
                self.queued_rows -= it.n
                continue
            if drop and it.deadline is not None and now + est > it.deadline:
                self.queued_rows -= it.n
                self.router._drop(it, "deadline", f"dropped: cannot finish within its deadline "
                                  f"({(it.deadline - it.arrival) * 1000:.1f} ms) on gpu-let {self.route.id}")
                continue
            if key is None:
                key = it.key
            if it.key == key and (rows + it.n <= self.batch or not batch):
                batch.append(it)
                rows += it.n
                self.queued_rows -= it.n
                if rows >= self.batch:
                    break
            else:
                keep.append(it)
        keep.extend(self.queue)
        self.queue = keep
        self._qgauge.set(len(self.queue))
        return batch

    async def _loop(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            if not self.backend.ready:
                if self.queue:
                    items = list(self.queue)
                    self.queue.clear()
                    self.queued_rows = 0
                    self._qgauge.set(0)
                    for it in items:
                        self.router._reroute(it, exclude=self.route.id)
                continue
            while self.queue and self.inflight < self.router.options.max_inflight and self.backend.ready:
                items = self._take()
                if not items:
                    break
                self.inflight += 1
                rows = sum(i.n for i in items)
                self.inflight_rows += rows
                t = asyncio.get_running_loop().create_task(self._run(items, rows))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[Item], rows: int) -> None:
        m = self.router.metrics
        be = self.backend
        be.inflight += 1
        m.inflight.labels(be.id).set(be.inflight)
        m.batch.labels(be.id, self.model.name).observe(rows)
        t0 = time.monotonic()
        try:
            names = list(items[0].inputs)
            merged = {n: _concat([it.inputs[n] for it in items]) for n in names}
            outs = [o.name for o in self.model.outputs]
            if rows <= self.batch:
                result = await be.infer(self.model.name, merged, outs)
            else:  # one request larger than the planned batch: send it in chunks
                parts = await asyncio.gather(*(
                    be.infer(self.model.name, {n: a[s:s + self.batch] for n, a in merged.items()}, outs)
                    for s in range(0, rows, self.batch)))
                result = {o: np.concatenate([p[o] for p in parts]) for o in outs}
            dt = time.monotonic() - t0
            self.service_s = dt if self.service_s is None else 0.8 * self.service_s + 0.2 * dt
            st = self.router.stats[self.model.name]
            st.execution_count += 1
            st.compute_ns += int(dt * 1e9)
            off = 0
            for it in items:
                if not it.future.done():
                    it.future.set_result({o: a[off:off + it.n] for o, a in result.items()})
                off += it.n
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            m.errors.labels(be.id).inc()
            if _is_connection_error(e):
                be.set_ready(False)
                for it in items:
                    self.router._reroute(it, exclude=be.id)
            else:
                from tritonclient.utils import InferenceServerException

                status = 502
                if isinstance(e, InferenceServerException) and "INVALID_ARG" in str(e.status() or "").upper():
                    status = 400
                err = RouterError(status, f"gpu-let {be.id}: {e}")
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(err)
        finally:
            be.inflight -= 1
            self.inflight -= 1
            self.inflight_rows -= rows
            m.inflight.labels(be.id).set(be.inflight)
            self._event.set()


# --------------------------------------------------------------------------- router


class Router:
    """Dispatch of requests to the gpu-lets of a routing table. Create and use inside one event loop."""

    def __init__(self, table: RoutingTable, options: RouterOptions | None = None) -> None:
        self.table = table
        self.options = options or RouterOptions()
        self.metrics = Metrics()
        self.stats: dict[str, ModelStats] = {m: ModelStats() for m in table.models}
        self.backends: dict[str, Backend] = {}
        self.batchers: dict[str, list[Batcher]] = {}
        self._health_task: asyncio.Task | None = None
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for m in self.table.models.values():
            bs = []
            for g in m.gpulets:
                be = self.backends.get(g.id)
                if be is None:
                    be = self.backends[g.id] = Backend(g.id, g, self.options.backend_protocol, self.metrics)
                    self.metrics.ready.labels(g.id).set(0)
                    await be.open()
                b = Batcher(self, m, g, be)
                be.batchers.append(b)
                b.start()
                bs.append(b)
            self.batchers[m.name] = bs
        await asyncio.gather(*(b.check() for b in self.backends.values()))
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="router-health")

    async def close(self) -> None:
        if self._health_task:
            self._health_task.cancel()
            try:
                await self._health_task
            except (asyncio.CancelledError, Exception):
                pass
        for bs in self.batchers.values():
            for b in bs:
                await b.stop()
        for be in self.backends.values():
            await be.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            await asyncio.gather(*(b.check() for b in self.backends.values()), return_exceptions=True)

    # ------------------------------------------------------------------ state

    def ready(self) -> bool:
        return bool(self.backends) and all(b.ready for b in self.backends.values())

    def model_ready(self, model: str) -> bool:
        return any(b.available for b in self.batchers.get(model, []))

    def model(self, name: str, version: str = "") -> ModelRoute:
        m = self.table.models.get(name)
        if m is None:
            raise RouterError(404, f"unknown model {name!r}; served models: {', '.join(self.table.models)}")
        if version not in ("", m.version):
            raise RouterError(404, f"model {name!r} has no version {version!r} (only {m.version!r})")
        return m

    # ------------------------------------------------------------------ requests

    def validate(self, m: ModelRoute, inputs: dict[str, np.ndarray]) -> int:
        """Check names, dtypes and shapes against the model; return the batch rows."""
        names = {t.name for t in m.inputs}
        extra = set(inputs) - names
        if extra:
            raise RouterError(400, f"model {m.name!r} has no input {sorted(extra)[0]!r}; inputs: {sorted(names)}")
        n = None
        for t in m.inputs:
            a = inputs.get(t.name)
            if a is None:
                raise RouterError(400, f"missing input {t.name!r} of model {m.name!r}")
            dt = kserve_dtype(a)
            if dt != t.datatype:
                raise RouterError(400, f"input {t.name!r}: datatype {dt} but model {m.name!r} expects {t.datatype}")
            want = (-1, *t.shape)
            if a.ndim != len(want) or any(w != -1 and w != s for w, s in zip(want[1:], a.shape[1:])):
                raise RouterError(400, f"input {t.name!r}: shape {list(a.shape)} but model {m.name!r} expects "
                                       f"[batch, {', '.join(map(str, t.shape))}]")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise RouterError(400, f"input {t.name!r}: batch size {a.shape[0]} differs from other inputs ({n})")
        if not n:
            raise RouterError(400, "batch size must be at least 1")
        if n > m.max_batch_size:
            raise RouterError(400, f"batch size {n} exceeds max_batch_size {m.max_batch_size} of model {m.name!r}")
        return n

    def _pick(self, model: str, n: int, exclude: str | None = None) -> Batcher | None:
        best, score = None, math.inf
        for b in self.batchers.get(model, []):
            if not b.available or b.route.id == exclude:
                continue
            s = b.load(n)
            if s < score:
                best, score = b, s
        return best

    def _drop(self, it: Item, reason: str, msg: str, status: int = 503) -> None:
        self.metrics.drops.labels(it.model, reason).inc()
        if not it.future.done():
            it.future.set_exception(Dropped(status, msg))

    def _reroute(self, it: Item, exclude: str | None) -> None:
        if it.future.done():
            return
        it.attempts += 1
        b = self._pick(it.model, it.n, exclude=exclude) if it.attempts <= 3 else None
        if b is None:
            it.future.set_exception(RouterError(503, f"no ready gpu-let for model {it.model!r}"))
            return
        b.put(it)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
                    timeout_ms: float | None = None, version: str = "") -> dict[str, np.ndarray]:
        """Run one request (arrays with the batch dimension first); return the requested outputs."""
        arrival = time.monotonic()
        m = self.model(model, version)
        self.metrics.requests.labels(model).inc()
        st = self.stats[model]
        try:
            if outputs:
                for o in outputs:
                    if m.output(o) is None:
                        raise RouterError(400, f"model {model!r} has no output {o!r}; outputs: "
                                               f"{[t.name for t in m.outputs]}")
            n = self.validate(m, inputs)
            budget = timeout_ms if timeout_ms is not None and timeout_ms > 0 else m.slo_ms
            deadline = arrival + budget / 1000 if budget else None
            b = self._pick(model, n)
            if b is None:
                raise RouterError(503, f"no ready gpu-let for model {model!r}")
            if sum(len(x.queue) for x in self.batchers[model]) >= self.options.max_queue:
                self.metrics.drops.labels(model, "queue_full").inc()
                raise Dropped(429, f"model {model!r}: queue full ({self.options.max_queue} requests)")
            if self.options.drop and deadline is not None:
                est = b.wait_estimate()
                if est is not None and arrival + est > deadline:
                    self.metrics.drops.labels(model, "admission").inc()
                    raise Dropped(503, f"dropped: model {model!r} cannot answer within {budget:.1f} ms now "
                                       f"(estimated {est * 1000:.1f} ms)")
            fut = asyncio.get_running_loop().create_future()
            it = Item(model, inputs, n, _key(inputs), arrival, deadline, fut)
            b.put(it)
            try:
                result = await fut
            except asyncio.CancelledError:
                if not fut.done():
                    fut.cancel()
                raise
        except RouterError as e:
            dt = time.monotonic() - arrival
            if not isinstance(e, Dropped):
                self.metrics.failures.labels(model).inc()
            st.fail_count += 1
            st.fail_ns += int(dt * 1e9)
            self._attainment(model)
            raise
        dt = time.monotonic() - arrival
        self.metrics.success.labels(model).inc()
        self.metrics.latency.labels(model).observe(dt)
        if m.slo_ms is None or dt * 1000 <= m.slo_ms:
            self.metrics.slo_met.labels(model).inc()
        self._attainment(model)
        st.inference_count += n
        st.success_count += 1
        st.success_ns += int(dt * 1e9)
        st.last_inference_ms = int(time.time() * 1000)
        if outputs:
            return {o: result[o] for o in outputs}
        return result

    def _attainment(self, model: str) -> None:
        req = self.metrics.requests.labels(model)._value.get()
        met = self.metrics.slo_met.labels(model)._value.get()
        self.metrics.slo_attainment.labels(model).set(met / req if req else 1.0)
