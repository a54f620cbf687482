"""The router's engine: pass KServe v2 requests through to the gpu-lets of their model.

Triton does the serving work in C++: each gpu-let's tritonserver batches with its
dynamic batcher, configured from the plan (batches as large as the queue allows,
a queue delay from the SLO's slack). The router adds what one tritonserver cannot:

* **which gpu-let**: among a model's ready gpu-lets, the one with the fewest
  requests in flight per unit of planned throughput (the prototype's credits);
* **refusal of what cannot meet its SLO**: a gpu-let holds at most
  ``planned throughput x SLO x 1.5`` requests of a model (Little's law: more in
  flight means the average request takes longer than 1.5 SLOs); past that the
  request is answered 503 / UNAVAILABLE at once rather than late. (Triton's
  queue policy would do this in C++, but in Triton 2.51 any queue policy costs
  ~500 ms stalls to a few % of requests: controlplane.repository.gpulet_config);
* **one entry**: KServe v2 over HTTP and gRPC, the model's metadata, health;
* **what re-planning needs**: arrivals, answers, SLO attainment and latency per
  model (Prometheus ``/metrics``) and Triton's statistics summed over gpu-lets.

It never decodes a tensor. An HTTP infer body goes to the gpu-let as it came
(JSON or binary extension) and the answer comes back as Triton wrote it; a gRPC
``ModelInferRequest`` with raw tensors goes to the gpu-let as the same request
over HTTP (grpc.aio's client call would triple the router's CPU per request:
:mod:`.grpc_http`), with typed contents as the bytes received. Validation is
Triton's (the same 400s a client of Triton gets). The
first version batched and admitted in Python and served less than half of one
plain tritonserver on an H200 (issue 10; docs/benchmarks.md has the figures).

Failures: a gpu-let whose connection cannot be made or breaks before it answers
leaves the rotation (the health task brings it back once ready) and the request
is sent again to another gpu-let of the model; inference is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .clients import GrpcPassClient, HttpAnswer, HttpPassClient
from .control import RepositoryControl
from .errors import Dropped, GpuletUnhealthy, RouterError, is_deadline_reject, is_parse_error, is_stub_dead
from .table import GpuletRoute, ModelRoute, RoutingTable

log = logging.getLogger("controlplane.router")


#: requests of a model a gpu-let may hold, in SLOs' worth of its planned throughput
INFLIGHT_SLOS = 1.5


@dataclass(frozen=True)
class RouterOptions:
    health_interval_s: float = 0.5
    max_body_bytes: int = 64 * 1024 * 1024
    attempts: int = 3                     # gpu-lets tried per request when connections break
    processes: int = 1                    # router processes sharing the load: each holds its share of the limit
    control_dir: str | None = None        # the repository API's requests to the controller (None: the API is off)
    repository_dir: str | None = None     # the deployment's source repository (the index lists its models)


# --------------------------------------------------------------------------- metrics


class Metrics:
    """The router's Prometheus metrics.

    With several router processes (``RouterSpec.workers``) every process writes its values to
    files in ``multiprocess_dir`` (prometheus_client's multiprocess mode: create the metrics inside
    :func:`multiprocess_metrics`) and ``/metrics``, whichever process
    answers it, sums them all.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.extra_path: Path | None = None      # more metrics, already in text format (the controller's)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("router_requests", "requests received (arrivals)", ["model"], registry=r)
        self.success = Counter("router_success", "requests answered", ["model"], registry=r)
        self.drops = Counter("router_drops", "requests refused: could not meet their deadline",
                             ["model", "reason"], registry=r)
        self.failures = Counter("router_failures", "requests failed (not drops)", ["model"], registry=r)
        self.slo_met = Counter("router_slo_met", "answered within the SLO (attainment: slo_met / requests)",
                               ["model"], registry=r)
        self.latency = Histogram("router_request_latency_seconds", "latency at the router", ["model"], registry=r,
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.sent = Counter("router_gpulet_requests", "requests sent to a gpu-let", ["gpulet", "model"],
                            registry=r)
        self.inflight = Gauge("router_inflight", "requests in flight", ["gpulet"], registry=r,
                              multiprocess_mode="livesum")
        self.errors = Counter("router_gpulet_errors", "broken connections to a gpu-let", ["gpulet"], registry=r)
        self.ready = Gauge("router_gpulet_ready", "1 while the gpu-let is in the rotation", ["gpulet"], registry=r,
                           multiprocess_mode="livemin")

    def exposition(self) -> bytes:
        """The text format of every router process's metrics (this one's alone in single-process mode),
        then the controller's (``extra_path``)."""
        if self.multiprocess_dir is None:
            text = generate_latest(self.registry)
        else:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            text = generate_latest(registry)
        if self.extra_path is not None:
            try:
                text += self.extra_path.read_bytes()
            except FileNotFoundError:
                pass
        return text


@contextlib.contextmanager
def multiprocess_metrics(path: str):
    """Within the block, metrics created in this process write their values to files under ``path``
    (prometheus_client's multiprocess mode, which it otherwise picks once, at import, from the
    environment). Metric children must be created inside the block; the router creates all of its
    own when it starts."""
    from prometheus_client import values

    old_env, old_class = os.environ.get("PROMETHEUS_MULTIPROC_DIR"), values.ValueClass
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue()
    try:
        yield
    finally:
        values.ValueClass = old_class
        if old_env is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = old_env


class _ModelMetrics:
    """A model's metric children, looked up once (``labels()`` costs a lock and a dict per call)."""

    __slots__ = ("requests", "success", "failures", "slo_met", "latency", "deadline", "admission", "slo_s")

    def __init__(self, m: Metrics, model: ModelRoute) -> None:
        name = model.name
        self.requests = m.requests.labels(name)
        self.success = m.success.labels(name)
        self.failures = m.failures.labels(name)
        self.slo_met = m.slo_met.labels(name)
        self.latency = m.latency.labels(name)
        self.deadline = m.drops.labels(name, "deadline")
        self.admission = m.drops.labels(name, "admission")
        self.slo_s = model.slo_ms / 1000 if model.slo_ms else math.inf

    def done(self, t0: float, ok: bool, dropped: bool = False) -> None:
        if ok:
            dt = time.monotonic() - t0
            self.success.inc()
            self.latency.observe(dt)
            if dt <= self.slo_s:
                self.slo_met.inc()
        else:
            (self.deadline if dropped else self.failures).inc()


def merge_stats(a: Any, b: Any) -> Any:
    """Two ModelStatistics entries of one model (Triton's JSON) summed: counts and times add up,
    ``batch_stats`` merge by batch size, ``last_inference`` is the later one, names stay."""
    if a is None:
        return b
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            if k == "last_inference":
                out[k] = max(int(a.get(k, 0)), int(v))
            elif k == "batch_stats":
                by = {int(x["batch_size"]): x for x in a.get(k, [])}
                for x in v:
                    n = int(x["batch_size"])
                    by[n] = merge_stats(by.get(n), x)
                out[k] = [by[n] for n in sorted(by)]
            else:
                out[k] = merge_stats(a.get(k), v)
        return out
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a + b
    return a


# --------------------------------------------------------------------------- gpu-lets


class GpuletServer:
    """One gpu-let's tritonserver: its connections, readiness and requests in flight."""

    def __init__(self, route: GpuletRoute, metrics: Metrics) -> None:
        self.id = route.id
        self.endpoint = route.endpoint
        self.ready = False
        self.inflight = 0
        self.http = HttpPassClient(route.endpoint.http)
        self.grpc = GrpcPassClient(route.endpoint.grpc)
        self._metrics = metrics
        self._m_inflight = metrics.inflight.labels(route.id)
        self._m_errors = metrics.errors.labels(route.id)

    async def close(self) -> None:
        await self.http.close()
        await self.grpc.close()

    async def check(self) -> bool:
        try:
            ok = await asyncio.wait_for(self.http.ready(), 2.0)
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            ok = False
        self.set_ready(ok)
        return ok

    def set_ready(self, ok: bool) -> None:
        if ok != self.ready:
            log.warning("gpu-let %s %s the rotation", self.id, "joins" if ok else "leaves")
            self.ready = ok
            self._metrics.ready.labels(self.id).set(1 if ok else 0)


class _Target:
    """One (model, gpu-let) pair: where a request of the model may go, its share of the load, and how
    many of its requests may be in flight there (``limit``; None: no limit). ``credit`` is the
    smooth weighted round-robin's running count (see :meth:`Router.pick`)."""

    __slots__ = ("backend", "weight", "sent", "inflight", "limit", "credit")

    def __init__(self, backend: GpuletServer, route: GpuletRoute, model: ModelRoute, metrics: Metrics,
                 processes: int) -> None:
        self.backend = backend
        self.weight = route.weight
        self.sent = metrics.sent.labels(route.id, model.name)
        self.inflight = 0
        self.limit = inflight_limit(route.throughput, model.slo_ms, processes)
        self.credit = 0.0


def inflight_limit(throughput: float, slo_ms: float | None, processes: int = 1) -> int | None:
    """Requests one router process lets a gpu-let hold for a model; None without a throughput or SLO.

    The budget is planned throughput x SLO x 1.5 (Little's law), split over the router processes:
    n = that / processes. A process's count in flight is a random (Poisson-like) number whose mean
    is at most n, so the limit is n plus two standard deviations, ceil(n + 2 sqrt(n)), at least 1.
    Without that allowance small budgets refused requests at loads the gpu-let served: on the H200
    (2026-11-29, docs/benchmarks.md "Serving", run 8) the temporal plan's bert had a limit of 3 per
    process (351/s x 22 ms x 1.5 / 4) and 1.1 % of its requests were refused at the planned rate,
    while the same requests that got through took 8 ms at p99."""
    if not throughput or not slo_ms:
        return None
    n = throughput * slo_ms / 1000 * INFLIGHT_SLOS / max(1, processes)
    return max(1, math.ceil(n + 2 * math.sqrt(n)))


# --------------------------------------------------------------------------- router


def _infer_path(model: str, version: str) -> str:
    return f"/v2/models/{model}/versions/{version}/infer" if version else f"/v2/models/{model}/infer"


async def _post(be: GpuletServer, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> HttpAnswer:
    """An infer request to a gpu-let over HTTP; Triton's 500 for a request it cannot parse becomes 400."""
    ans = await be.http.post(path, headers, body)
    if ans.status != 200 and is_stub_dead(ans.error_message()):
        raise GpuletUnhealthy(ans.error_message())
    if ans.status == 500 and is_parse_error(ans.error_message()):
        return HttpAnswer(400, ans.headers, ans.body)
    return ans


#: what a load request's config override may set: the model's plan inputs (its SLO and the rate to
#: plan it for, as config parameters, and the largest batch); the rest of the config is the repository's
OVERRIDABLE = "max_batch_size, parameters.slo_ms, parameters.rate"


def config_override(raw: Any) -> dict:
    """A load request's ``config`` parameter (Triton's model config as JSON) reduced to what the plan takes:
    {"slo_ms", "rate", "max_batch"}; RouterError 400 naming any other field."""
    if raw is None:
        return {}
    try:
        cfg = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except ValueError:
        raise RouterError(400, "the load request's config is not JSON") from None
    if not isinstance(cfg, dict):
        raise RouterError(400, "the load request's config must be a JSON object (a model config)")
    out: dict = {}
    for k, v in cfg.items():
        if k == "name":
            continue
        if k == "max_batch_size" and isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            out["max_batch"] = v
        elif k == "parameters" and isinstance(v, dict) and set(v) <= {"slo_ms", "rate"}:
            for p, val in v.items():
                try:
                    x = float(val["string_value"] if isinstance(val, dict) else val)
                except (KeyError, TypeError, ValueError):
                    raise RouterError(400, f"config override parameters.{p}: a number (as string_value)") from None
                if x < 0 or (p == "slo_ms" and x == 0):
                    raise RouterError(400, f"config override parameters.{p}: must be positive")
                out[p] = x
        else:
            raise RouterError(400, f"config override {k!r} is not taken: a load may set {OVERRIDABLE}; the rest "
                                   "of a model's config is its repository's (`controlplane repo add`)")
    return out


class Router:
    """Routing of requests to the gpu-lets of a routing table. Create and use inside one event loop."""

    def __init__(self, table: RoutingTable, options: RouterOptions | None = None,
                 metrics_dir: str | None = None) -> None:
        """``metrics_dir``: create the metrics inside :func:`multiprocess_metrics` (``metrics_dir``) and
        ``start`` (which makes the per-gpu-let ones) too; None: this process's metrics alone."""
        self.table = table
        self.options = options or RouterOptions()
        self.metrics = Metrics(metrics_dir)
        self._metrics_dir = metrics_dir
        self.servers: dict[str, GpuletServer] = {}
        self.targets: dict[str, list[_Target]] = {}
        self._mm = {name: _ModelMetrics(self.metrics, m) for name, m in table.models.items()}
        self._health_task: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._started = False
        self.control = None
        if self.options.control_dir is not None and self.options.repository_dir is not None:
            self.control = RepositoryControl(self.options.control_dir, self.options.repository_dir)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.set_table(self.table)          # every gpu-let new: made and health-checked
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="router-health")

    async def set_table(self, table: RoutingTable) -> None:
        """Route by ``table`` (a new plan) from now on, without dropping a request.

        gpu-lets new to the table are health-checked before they get requests; those it no longer
        has get no new ones and are closed once their requests in flight are answered. A (model,
        gpu-let) pair in both tables keeps its in-flight count; its weight and limit follow the new plan.
        """
        old = self.servers
        servers: dict[str, GpuletServer] = {}
        targets: dict[str, list[_Target]] = {}
        fresh: list[GpuletServer] = []
        with multiprocess_metrics(self._metrics_dir) if self._metrics_dir else contextlib.nullcontext():
            for m in table.models.values():
                prev = {t.backend.id: t for t in self.targets.get(m.name, ())}
                ts = []
                for g in m.gpulets:
                    be = servers.get(g.id)
                    if be is None:
                        be = old.get(g.id)
                        if be is None or be.endpoint != g.endpoint:
                            be = GpuletServer(g, self.metrics)
                            self.metrics.ready.labels(g.id).set(0)
                            fresh.append(be)
                        servers[g.id] = be
                    t = prev.get(g.id)
                    if t is not None and t.backend is be:
                        t.weight = g.weight
                        t.limit = inflight_limit(g.throughput, m.slo_ms, self.options.processes)
                    else:
                        t = _Target(be, g, m, self.metrics, self.options.processes)
                    ts.append(t)
                targets[m.name] = ts
                if m.name not in self._mm:
                    self._mm[m.name] = _ModelMetrics(self.metrics, m)
            for a in table.apps.values():
                if a.name not in self._mm:
                    self._mm[a.name] = _ModelMetrics(self.metrics, a)
        await asyncio.gather(*(b.check() for b in fresh))
        self.table, self.servers, self.targets = table, servers, targets
        for be in old.values():
            if servers.get(be.id) is not be:
                task = asyncio.get_running_loop().create_task(self._retire(be))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def _retire(self, be: GpuletServer) -> None:
        """Close a gpu-let's connections once the requests it holds are answered."""
        while be.inflight > 0:
            await asyncio.sleep(0.05)
        await be.close()

    async def close(self) -> None:
        if self._health_task:
            self._health_task.cancel()
            try:
                await self._health_task
            except (asyncio.CancelledError, Exception):
                pass
        for be in self.servers.values():
            await be.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            await asyncio.gather(*(b.check() for b in self.servers.values()), return_exceptions=True)

    # ------------------------------------------------------------------ state

    def ready(self) -> bool:
        return bool(self.servers) and all(b.ready for b in self.servers.values())

    def model_ready(self, model: str) -> bool:
        return any(t.backend.ready for t in self.targets.get(model, []))

    def app(self, name: str, version: str = ""):
        """The app of this name (an AppRoute), or None when it is not an app."""
        a = self.table.apps.get(name)
        if a is not None and version not in ("", a.version):
            raise RouterError(404, f"app {name!r} has no version {version!r} (only {a.version!r})")
        return a

    def app_ready(self, name: str) -> bool:
        return all(self.model_ready(m) for m in self.table.apps[name].steps)

    def model(self, name: str, version: str = "") -> ModelRoute:
        m = self.table.models.get(name)
        if m is None:
            if name in self.table.apps:
                raise RouterError(404, f"{name!r} is an app: it has metadata, readiness and infer; its models "
                                       f"({', '.join(self.table.apps[name].steps)}) have the rest")
            raise RouterError(404, f"unknown model {name!r}; served models: "
                                   f"{', '.join([*self.table.models, *self.table.apps])}")
        if version not in ("", m.version):
            raise RouterError(404, f"model {name!r} has no version {version!r} (only {m.version!r})")
        return m

    # ------------------------------------------------------------------ repository API

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        """``/v2/repository/index``: the models served (state from their gpu-lets' readiness) and, with
        the repository API on, every other model of the repository as UNAVAILABLE with the reason."""
        rows = [{"name": n, "version": m.version, "state": "READY" if self.model_ready(n) else "UNAVAILABLE"}
                for n, m in self.table.models.items()]
        rows += [{"name": n, "version": a.version, "state": "READY" if self.app_ready(n) else "UNAVAILABLE"}
                 for n, a in self.table.apps.items()]
        if self.control is not None:
            rows += [{"name": n, "state": "UNAVAILABLE", "reason": "not loaded"}
                     for n in self.control.models() if n not in self.table.models]
        rows.sort(key=lambda r: r["name"])
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    async def repository_change(self, action: str, model: str, parameters: Any = None) -> str:
        """Load or unload a model of the deployment's repository: the controller re-plans and starts or
        stops gpu-lets (as ``controlplane apply`` does); returns when the change serves."""
        if self.control is None:
            raise RouterError(403, "the repository API is off: set `router: {repository_api: true}` in the "
                                   "deployment to load and unload models through the router",
                              grpc.StatusCode.PERMISSION_DENIED)
        params = dict(parameters or {})
        files = [k for k in params if str(k).startswith("file:")]
        if files:
            raise RouterError(400, f"{action} of {model!r}: model files in the request ({', '.join(sorted(files))}) "
                                   "are not taken; add the model to the deployment's repository with "
                                   "`controlplane repo add`, then load it")
        override = config_override(params.get("config")) if action == "load" else {}
        return await self.control.request(action, model, override)

    def pick(self, model: str, tried: tuple[GpuletServer, ...] = ()) -> _Target:
        """The model's next gpu-let in the plan's split: smooth weighted round-robin (nginx's) over the ready
        gpu-lets below their in-flight limit, so each gets its planned rate, its requests spread evenly in time.

        Why not the fewest requests in flight: one router process (of several) sees 0 or 1 of a model's
        requests in flight most of the time, so that rule sent nearly every request to the gpu-let of the
        largest weight. On the H200 bert's batches through the router were 1.5x those of clients sending
        by the plan's split, its Triton queue 1.5 ms longer, and the router served 0.89x of direct
        (docs/benchmarks.md, "Serving on two GPUs"). A slow or stuck gpu-let still gets no more than its
        in-flight limit."""
        best, total, full = None, 0.0, 0
        for t in self.targets.get(model, ()):
            be = t.backend
            if not be.ready or be in tried:
                continue
            if t.limit is not None and t.inflight >= t.limit:
                full += 1
                continue
            t.credit += t.weight
            total += t.weight
            if best is None or t.credit > best.credit:
                best = t
        if best is not None:
            best.credit -= total
        if best is None:
            if full:
                self._mm[model].admission.inc()
                slo = self.table.models[model].slo_ms
                raise Dropped(503, f"model {model!r} cannot be answered within its SLO ({slo:g} ms): its gpu-lets "
                                   f"hold as many requests as they can finish in that time")
            raise RouterError(503, f"no ready gpu-let for model {model!r}")
        return best

    # ------------------------------------------------------------------ requests

    async def _send(self, model: str, call) -> Any:
        """Run ``call(backend)`` on a gpu-let of the model; on a broken connection, on another one."""
        tried: tuple[GpuletServer, ...] = ()
        last: Exception | None = None
        for _ in range(self.options.attempts):
            try:
                t = self.pick(model, tried)
            except RouterError:
                if last is None:
                    raise
                break
            be = t.backend
            t.sent.inc()
            t.inflight += 1
            be.inflight += 1
            be._m_inflight.set(be.inflight)
            try:
                return await call(be)
            except GpuletUnhealthy as e:
                # the server is up but cannot run the model (the controller restarts it): not this one again
                last = e
                be._m_errors.inc()
                tried += (be,)
            except (OSError, asyncio.TimeoutError) as e:
                # a broken connection: the gpu-let leaves the rotation unless it still answers its health check
                # (a transient error of one connection must not take a whole gpu-let out)
                last = e
                be._m_errors.inc()
                if not await be.check():
                    tried += (be,)
            finally:
                t.inflight -= 1
                be.inflight -= 1
                be._m_inflight.set(be.inflight)
        raise RouterError(503, f"no gpu-let of model {model!r} could be reached: {last}")

    async def infer_http(self, model: str, version: str, headers: list[tuple[bytes, bytes]],
                         body: bytes) -> HttpAnswer:
        """Forward one HTTP infer request (its KServe headers and body as received); Triton's answer."""
        t0 = time.monotonic()
        self.model(model, version)
        mm = self._mm[model]
        mm.requests.inc()
        path = _infer_path(model, version)
        try:
            ans: HttpAnswer = await self._send(model, lambda be: _post(be, path, headers, body))
        except Dropped:
            raise                       # counted where it was refused
        except RouterError:
            mm.done(t0, False)
            raise
        dropped = ans.status != 200 and is_deadline_reject(ans.error_message())
        mm.done(t0, ans.status == 200, dropped)
        return ans

    async def infer_grpc(self, model: str, version: str, request: bytes) -> bytes:
        """Forward one serialized ModelInferRequest; the serialized ModelInferResponse."""
        t0 = time.monotonic()
        self.model(model, version)
        mm = self._mm[model]
        mm.requests.inc()
        try:
            framed = to_http(request)
            if framed is None:       # typed contents: to the gpu-let over gRPC, as it came
                out = await self._send(model, lambda be: be.grpc.infer(request))
            else:                    # raw tensors: the same request over HTTP (a third of the router's CPU)
                _, headers, body = framed
                path = _infer_path(model, version)

                async def call(be: GpuletServer) -> bytes:
                    return to_grpc(await _post(be, path, headers, body))

                out = await self._send(model, call)
        except Dropped:
            raise                       # counted where it was refused
        except RouterError as e:
            mm.done(t0, False, e.grpc_code == grpc.StatusCode.UNAVAILABLE and is_deadline_reject(e.message))
            raise
        mm.done(t0, True)
        return out

    async def model_stats(self, name: str) -> dict:
        """Triton's statistics of a model (requests, queue and compute times, per batch size too),
        summed over its gpu-lets; a gpu-let that does not answer is left out."""
        m = self.table.models[name]
        total = None
        for t in self.targets.get(name, ()):
            try:
                ans = await asyncio.wait_for(t.backend.http.request(b"GET", f"/v2/models/{name}/stats"), 5.0)
                if ans.status == 200:
                    for entry in json.loads(ans.body).get("model_stats", []):
                        total = merge_stats(total, entry)
            except (OSError, asyncio.TimeoutError, ValueError):
                continue
        if total is None:
            total = {"inference_count": 0, "execution_count": 0, "inference_stats": {}, "batch_stats": []}
        total.update(name=name, version=m.version)
        return total


# at the end: grpc_http builds on RouterError above
from .grpc_http import to_grpc, to_http  # noqa: E402
