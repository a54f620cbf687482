"""The router's engine, independent of the wire protocol.

Per model, the plan's gpu-lets; per (gpu-let, model) a :class:`Batcher` queue;
per gpu-let a :class:`Backend` that forms batches from its queues, sends each as
one request to the gpu-let's tritonserver (through the lean clients of
:mod:`.backend`) and scatters the outputs back. A gpu-let is picked per request
by its planned capacity and current load (rows queued and in flight per unit of
predicted throughput, as the prototype's credits of 1/throughput). Each request
carries a deadline (its model's SLO, or the request's ``timeout`` parameter);
with dropping on, a request that can no longer finish in time is refused at
admission or when its batch forms, with a :class:`Dropped` error the front ends
turn into HTTP 503 / gRPC UNAVAILABLE (429 / RESOURCE_EXHAUSTED for a full queue).

Batching and the duty cycle
---------------------------
A gpu-let runs at most ``RouterOptions.max_inflight`` batches at a time (1: the
plan's latencies are those of one batch with the gpu-let to itself). Whenever it
is free it takes the next batch from its models' queues **in turn**
(round-robin over the models that have requests waiting): one batch per model per
turn, of the oldest request's input shapes (shapes are never mixed), up to that
model's planned batch size. This is the plan's duty cycle of temporal sharing:
within one cycle every model on the gpu-let gets one batch of up to its planned
size, so a model with a flood of requests cannot starve the others; their wait
is bounded by one batch of each other model, which is what the planner's duty
cycle (the sum of the models' batch latencies) assumes. The router is
work-conserving: it never holds a batch back to fill it (on a gpu-let that is
free a single request goes at once, and it is sent from the request's own task
without a hop through the queue); batches grow by themselves while the gpu-let is
busy. Admission control uses the same policy: a request's expected wait is its
model's batches ahead of it times one round (its own batch time plus one batch
of every other model with requests waiting); batch times are measured per
(gpu-let, model, batch size) as moving averages (a size not yet seen is bounded
from the sizes seen), taken from the plan (the batch's predicted latency, else
the duty cycle) until measured.

Health
------
A health task polls every gpu-let (``/v2/health/ready``); a gpu-let that is not
ready (or whose connection breaks mid-batch) leaves the rotation, its queued and
failed requests move to the model's other gpu-lets, and it comes back once ready
again.
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
    backend_protocol: str = "http"          # how the router talks to tritonservers: http | grpc
    max_inflight: int = 1                   # batches in flight per gpu-let (its models take turns)
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


@dataclass(slots=True)
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
    if len(inputs) == 1:
        for k, v in inputs.items():
            return ((k, v.dtype.str, v.shape[1:]),)
    return tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))


def _concat(arrs: list[np.ndarray]) -> np.ndarray:
    return arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0)


# --------------------------------------------------------------------------- backends


class Backend:
    """One gpu-let's tritonserver: its client, readiness, and the turn-taking of its models' batches."""

    def __init__(self, gpulet: str, route: GpuletRoute, router: "Router") -> None:
        self.id = gpulet
        self.endpoint = route.endpoint
        self.router = router
        self.protocol = router.options.backend_protocol
        self.metrics = router.metrics
        self.max_inflight = max(1, router.options.max_inflight)
        self.ready = False
        self.inflight = 0
        self.queued = 0                       # requests queued over all its batchers
        self.batchers: list[Batcher] = []
        self._turn = 0
        self._client = None
        self._health = None
        self._tasks: set[asyncio.Task] = set()
        self._m_inflight = self.metrics.inflight.labels(gpulet)
        self._m_errors = self.metrics.errors.labels(gpulet)

    async def open(self) -> None:
        import tritonclient.http.aio as httpclient

        from .backend import GrpcBackendClient, HttpBackendClient

        self._health = httpclient.InferenceServerClient(self.endpoint.http, conn_timeout=2.0)
        if self.protocol == "grpc":
            self._client = GrpcBackendClient(self.endpoint.grpc)
        elif self.protocol == "http":
            self._client = HttpBackendClient(self.endpoint.http)
        else:
            raise ValueError(f"backend_protocol must be http or grpc, not {self.protocol!r}")

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
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
        if ok == self.ready:
            return
        log.warning("gpu-let %s %s the rotation", self.id, "joins" if ok else "leaves")
        self.ready = ok
        self.metrics.ready.labels(self.id).set(1 if ok else 0)
        if ok:
            self.kick()
            return
        for b in self.batchers:               # its queued requests go to the model's other gpu-lets
            items = list(b.queue)
            b.queue.clear()
            b.queued_rows = 0
            self.queued -= len(items)
            b._qgauge.set(0)
            for it in items:
                self.router._reroute(it, exclude=self.id)

    def idle(self) -> bool:
        """Ready, a batch slot free and nothing queued: a request can go at once."""
        return self.ready and self.inflight < self.max_inflight and not self.queued

    def kick(self) -> None:
        """Fill the free batch slots with batches of its models, in turn (the duty cycle)."""
        bs = self.batchers
        n = len(bs)
        while self.ready and self.queued and self.inflight < self.max_inflight:
            for k in range(n):
                b = bs[(self._turn + k) % n]
                if not b.queue:
                    continue
                items = b.take()
                if items:
                    self._turn = (self._turn + k + 1) % n
                    self._launch(b, items)
                    break
            else:
                break

    def _launch(self, b: "Batcher", items: list[Item]) -> None:
        self.inflight += 1
        t = asyncio.get_running_loop().create_task(b.run(items))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return await self._client.infer(model, inputs, outputs)


def _is_connection_error(e: Exception) -> bool:
    return isinstance(e, (OSError, asyncio.TimeoutError))


# --------------------------------------------------------------------------- batching


class Batcher:
    """Requests of one model on one gpu-let: its queue, batch formation and the sending of a batch."""

    def __init__(self, router: "Router", model: ModelRoute, route: GpuletRoute, backend: Backend) -> None:
        self.router = router
        self.model = model
        self.route = route
        self.backend = backend
        self.batch = max(1, route.batch)
        self.queue: collections.deque[Item] = collections.deque()
        self.queued_rows = 0
        self.inflight_rows = 0
        self.outputs = [o.name for o in model.outputs]
        # measured service time (s) per batch size, moving averages; see estimate()
        self._svc: dict[int, float] = {}
        self._qgauge = router.metrics.queue.labels(route.id, model.name)
        self._m_batch = router.metrics.batch.labels(route.id, model.name)

    def stop(self) -> None:
        for it in self.queue:
            if not it.future.done():
                it.future.set_exception(RouterError(503, "router is shutting down"))
        self.backend.queued -= len(self.queue)
        self.queue.clear()

    @property
    def available(self) -> bool:
        return self.backend.ready

    def load(self, extra: int) -> float:
        return (self.queued_rows + self.inflight_rows + extra) / self.route.weight

    def observe(self, rows: int, dt: float) -> None:
        old = self._svc.get(rows)
        self._svc[rows] = dt if old is None else 0.8 * old + 0.2 * dt

    def relax(self) -> None:
        """Shrink the measured batch times after a drop on an idle gpu-let.

        Estimates change only when batches run; without this, one slow outlier (a cold
        start, a hiccup) would make every later request look hopeless, so the gpu-let would
        never run a batch again to prove otherwise. Each such drop shrinks the estimates by
        10 %, so a probe gets through soon and is measured.
        """
        for k in self._svc:
            self._svc[k] *= 0.9

    def estimate(self, rows: int) -> float | None:
        """Seconds one batch of ``rows`` takes: measured for that size, else from the nearest larger
        size measured, else scaled up linearly from the largest smaller one (an upper bound; see
        wait_estimate for why that stays close to measured sizes), else the plan's predicted batch
        latency, else the duty cycle; None when nothing is known."""
        rows = min(max(rows, 1), self.batch)
        svc = self._svc
        t = svc.get(rows)
        if t is not None:
            return t
        if svc:
            larger = [k for k in svc if k > rows]
            if larger:
                return svc[min(larger)]
            k = max(svc)
            return svc[k] * rows / k
        if self.route.latency_ms > 0:
            return self.route.latency_ms / 1000
        d = self.route.duty_cycle_ms
        return d / 1000 if d > 0 else None

    @property
    def service_s(self) -> float | None:
        """Estimated time of one full (planned-size) batch."""
        return self.estimate(self.batch)

    def _batch_s(self) -> float | None:
        return self.estimate(self.batch)

    def wait_estimate(self, n: int = 1) -> float | None:
        """Seconds until a request of ``n`` rows queued now would complete (models of the gpu-let
        taking turns).

        The batches ahead are costed at the sizes they will have (full planned batches, then the
        rest), not all at the planned size: sizes not yet measured are only extrapolated one step
        beyond what has run, so a queue can grow into larger batches (which then get measured)
        instead of being refused on a guess about a size that never ran.
        """
        rows = self.queued_rows + n
        full, rest = divmod(rows, self.batch)
        own_full = self.estimate(self.batch) if full else 0.0
        own_rest = self.estimate(rest) if rest else 0.0
        if own_full is None or own_rest is None:
            return None
        other = 0.0                           # one batch of every other model with requests waiting
        for o in self.backend.batchers:
            if o is not self and o.queue:
                other += o.estimate(o.queued_rows) or 0.0
        batches = full + (1 if rest else 0)
        own = own_full if full else own_rest
        running = 0.5 * own if self.backend.inflight else 0.0
        return full * own_full + own_rest + batches * other + running

    def put(self, it: Item) -> None:
        it.enqueued = time.monotonic()
        self.queue.append(it)
        self.queued_rows += it.n
        self.backend.queued += 1
        self._qgauge.set(len(self.queue))
        self.backend.kick()

    def take(self) -> list[Item]:
        """The next batch: oldest request's shape, up to the planned batch rows, FIFO otherwise."""
        q = self.queue
        be = self.backend
        drop = self.router.options.drop
        est = (self.estimate(self.queued_rows) or 0.0) if drop else 0.0
        now = time.monotonic()
        batch: list[Item] = []
        rows = 0
        key = None
        keep: collections.deque[Item] | None = None
        while q:
            it = q.popleft()
            if it.future.done():             # client went away
                self.queued_rows -= it.n
                be.queued -= 1
                continue
            if drop and it.deadline is not None and now + est > it.deadline:
                self.queued_rows -= it.n
                be.queued -= 1
                self.router._drop(it, "deadline", f"dropped: cannot finish within its deadline "
                                  f"({(it.deadline - it.arrival) * 1000:.1f} ms) on gpu-let {self.route.id}")
                continue
            if key is None:
                key = it.key
            if it.key == key and (rows + it.n <= self.batch or not batch):
                batch.append(it)
                rows += it.n
                self.queued_rows -= it.n
                be.queued -= 1
                if rows >= self.batch:
                    break
            else:
                if keep is None:
                    keep = collections.deque()
                keep.append(it)
        if keep:
            keep.extend(q)
            self.queue = keep
        self._qgauge.set(len(self.queue))
        return batch

    async def run(self, items: list[Item]) -> None:
        """Send one batch (the caller has taken a batch slot on the backend) and scatter the results."""
        be = self.backend
        rows = items[0].n if len(items) == 1 else sum(i.n for i in items)
        self.inflight_rows += rows
        be._m_inflight.set(be.inflight)
        self._m_batch.observe(rows)
        t0 = time.monotonic()
        try:
            if len(items) == 1:
                merged = items[0].inputs
            else:
                merged = {n: np.concatenate([it.inputs[n] for it in items]) for n in items[0].inputs}
            outs = self.outputs
            if rows <= self.batch:
                result = await be.infer(self.model.name, merged, outs)
            else:  # one request larger than the planned batch: send it in chunks
                parts = await asyncio.gather(*(
                    be.infer(self.model.name, {n: a[s:s + self.batch] for n, a in merged.items()}, outs)
                    for s in range(0, rows, self.batch)))
                result = {o: np.concatenate([p[o] for p in parts]) for o in outs}
            dt = time.monotonic() - t0
            if rows <= self.batch:
                self.observe(rows, dt)
            st = self.router.stats[self.model.name]
            st.execution_count += 1
            st.compute_ns += int(dt * 1e9)
            if len(items) == 1:
                if not items[0].future.done():
                    items[0].future.set_result(result)
            else:
                off = 0
                for it in items:
                    if not it.future.done():
                        it.future.set_result({o: a[off:off + it.n] for o, a in result.items()})
                    off += it.n
        except asyncio.CancelledError:
            for it in items:
                if not it.future.done():
                    it.future.cancel()
            raise
        except Exception as e:  # noqa: BLE001
            be._m_errors.inc()
            if _is_connection_error(e):
                be.set_ready(False)
                for it in items:
                    self.router._reroute(it, exclude=be.id)
            else:
                from .backend import BackendError

                status = e.status if isinstance(e, BackendError) and e.status == 400 else 502
                err = RouterError(status, f"gpu-let {be.id}: {e}")
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(err)
        finally:
            be.inflight -= 1
            self.inflight_rows -= rows
            be._m_inflight.set(be.inflight)
            be.kick()


# --------------------------------------------------------------------------- router


class _ModelMetrics:
    """A model's metric children, looked up once (``labels()`` costs a lock and a dict per call)."""

    __slots__ = ("requests", "success", "failures", "slo_met", "attainment", "latency", "n_req", "n_met")

    def __init__(self, m: Metrics, model: str) -> None:
        self.requests = m.requests.labels(model)
        self.success = m.success.labels(model)
        self.failures = m.failures.labels(model)
        self.slo_met = m.slo_met.labels(model)
        self.attainment = m.slo_attainment.labels(model)
        self.latency = m.latency.labels(model)
        self.n_req = 0
        self.n_met = 0


class Router:
    """Dispatch of requests to the gpu-lets of a routing table. Create and use inside one event loop."""

    def __init__(self, table: RoutingTable, options: RouterOptions | None = None) -> None:
        self.table = table
        self.options = options or RouterOptions()
        self.metrics = Metrics()
        self.stats: dict[str, ModelStats] = {m: ModelStats() for m in table.models}
        self.backends: dict[str, Backend] = {}
        self.batchers: dict[str, list[Batcher]] = {}
        self._mm = {m: _ModelMetrics(self.metrics, m) for m in table.models}
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
                    be = self.backends[g.id] = Backend(g.id, g, self)
                    self.metrics.ready.labels(g.id).set(0)
                    await be.open()
                b = Batcher(self, m, g, be)
                be.batchers.append(b)
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
                b.stop()
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
        if len(inputs) != len(m.inputs) or any(t.name not in inputs for t in m.inputs):
            names = {t.name for t in m.inputs}
            extra = set(inputs) - names
            if extra:
                raise RouterError(400, f"model {m.name!r} has no input {sorted(extra)[0]!r}; "
                                       f"inputs: {sorted(names)}")
        n = None
        for t in m.inputs:
            a = inputs.get(t.name)
            if a is None:
                raise RouterError(400, f"missing input {t.name!r} of model {m.name!r}")
            dt = kserve_dtype(a)
            if dt != t.datatype:
                raise RouterError(400, f"input {t.name!r}: datatype {dt} but model {m.name!r} expects {t.datatype}")
            shape = a.shape
            if len(shape) != len(t.shape) + 1 or any(w != -1 and w != s for w, s in zip(t.shape, shape[1:])):
                raise RouterError(400, f"input {t.name!r}: shape {list(shape)} but model {m.name!r} expects "
                                       f"[batch, {', '.join(map(str, t.shape))}]")
            if n is None:
                n = shape[0]
            elif shape[0] != n:
                raise RouterError(400, f"input {t.name!r}: batch size {shape[0]} differs from other inputs ({n})")
        if not n:
            raise RouterError(400, "batch size must be at least 1")
        if n > m.max_batch_size:
            raise RouterError(400, f"batch size {n} exceeds max_batch_size {m.max_batch_size} of model {m.name!r}")
        return n

    def _pick(self, model: str, n: int, exclude: str | None = None) -> Batcher | None:
        bs = self.batchers.get(model)
        if not bs:
            return None
        if len(bs) == 1:
            b = bs[0]
            return b if b.backend.ready and b.route.id != exclude else None
        best, score = None, math.inf
        for b in bs:
            if not b.backend.ready or b.route.id == exclude:
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

    def _queued(self, model: str) -> int:
        return sum(len(x.queue) for x in self.batchers[model])

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
                    timeout_ms: float | None = None, version: str = "") -> dict[str, np.ndarray]:
        """Run one request (arrays with the batch dimension first); return the requested outputs."""
        arrival = time.monotonic()
        m = self.model(model, version)
        mm = self._mm[model]
        mm.requests.inc()
        mm.n_req += 1
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
            be = b.backend
            fut = asyncio.get_running_loop().create_future()
            it = Item(model, inputs, n, _key(inputs), arrival, deadline, fut)
            if be.idle():
                # fast path: the gpu-let is free and nothing waits; send this request now, from this task
                # (no queue, no task switch). Deadline: it starts now, so only the batch time counts.
                est = b.estimate(n) if self.options.drop and deadline is not None else None
                if est is not None and arrival + est > deadline:
                    self.metrics.drops.labels(model, "admission").inc()
                    b.relax()
                    raise Dropped(503, f"dropped: model {model!r} cannot answer within {budget:.1f} ms "
                                       f"(one batch takes {est * 1000:.1f} ms)")
                be.inflight += 1
                be._turn = (be.batchers.index(b) + 1) % len(be.batchers)
                await b.run([it])
            else:
                if self._queued(model) >= self.options.max_queue:
                    self.metrics.drops.labels(model, "queue_full").inc()
                    raise Dropped(429, f"model {model!r}: queue full ({self.options.max_queue} requests)")
                if self.options.drop and deadline is not None:
                    est = b.wait_estimate(n)
                    if est is not None and arrival + est > deadline:
                        self.metrics.drops.labels(model, "admission").inc()
                        raise Dropped(503, f"dropped: model {model!r} cannot answer within {budget:.1f} ms now "
                                           f"(estimated {est * 1000:.1f} ms)")
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
                mm.failures.inc()
            st.fail_count += 1
            st.fail_ns += int(dt * 1e9)
            mm.attainment.set(mm.n_met / mm.n_req)
            raise
        dt = time.monotonic() - arrival
        mm.success.inc()
        mm.latency.observe(dt)
        if m.slo_ms is None or dt * 1000 <= m.slo_ms:
            mm.slo_met.inc()
            mm.n_met += 1
        mm.attainment.set(mm.n_met / mm.n_req)
        st.inference_count += n
        st.success_count += 1
        st.success_ns += int(dt * 1e9)
        st.last_inference_ms = int(time.time() * 1000)
        if outputs:
            return {o: result[o] for o in outputs}
        return result
