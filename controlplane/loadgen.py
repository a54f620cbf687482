"""Open-loop load generator for a KServe v2 endpoint (the router, or a tritonserver directly).

Per model, requests arrive as a Poisson process (or at a constant rate) at the
given rate for the given duration, independent of how fast answers come back
(open loop), over HTTP or gRPC with tritonclient's asyncio clients. Inputs are
random tensors shaped from the model's metadata. The result holds, per model,
throughput, latency percentiles, SLO attainment and drops; ``render_table``,
``write_json`` and ``write_cdf_png`` present it.

One asyncio loop in one process tops out at some hundreds of requests/s (or
~150 MB/s of tensors); past that the numbers measure the client, not the
server. So the load is spread over ``workers`` independent processes, each an
open-loop stream at 1/k of a model's rate (merged independent Poisson streams
are Poisson; constant streams are phase-shifted so their merge is constant
again), and their raw samples are merged. With at least one worker per model,
each worker sends one model only, and a model gets workers in proportion to
the load it offers: as with real clients, a tight-SLO model's requests never
wait in a process that is busy sending another model's 600 KB images. Every model's result also
says whether the client kept its schedule (``behind``): how late requests left
against their scheduled time, the rate actually sent against the offered one,
and how many arrivals had to wait for the cap on outstanding requests.

    from controlplane import loadgen
    res = loadgen.run("127.0.0.1:8000", {"lenet": 100, "mobilenet_v2": 20}, duration_s=10)
    rich.print(loadgen.render_table(res))
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np



def _np_dtype(datatype: str):
    """The numpy type loadgen fills a KServe datatype with (tritonclient's map), None when it cannot
    (BYTES, BF16)."""
    from tritonclient.utils import triton_to_np_dtype

    dt = triton_to_np_dtype(datatype)
    return dt if dt is not None and np.dtype(dt).kind in "biuf" and datatype != "BF16" else None

# What one worker process sends comfortably; the default worker count keeps each below both.
WORKER_REQ_PER_S = 400.0
WORKER_BYTES_PER_S = 150e6
GRPC_CONNECTIONS = 4           # gRPC connections per stream
LAG_LIMIT_MS = 10.0            # p99 send lag above this: the client, not the server, set the pace
_SETUP_S = 120.0               # time a worker gets to import, connect and build inputs


@dataclass
class ModelResult:
    model: str
    rate: float                      # offered requests/s (what was asked for)
    slo_ms: float | None
    sent: int = 0
    ok: int = 0
    dropped: int = 0                 # refused by the server as unable to meet the deadline / overloaded
    errors: int = 0                  # anything else, client timeouts included
    throughput: float = 0.0          # successful requests/s
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    slo_attainment: float | None = None  # share of sent requests answered within the SLO
    sent_rate: float = 0.0           # requests/s actually sent, over the send window (>= the duration)
    lag_p99_ms: float | None = None  # actual minus scheduled send time, 99th percentile
    lag_max_ms: float | None = None
    cap_waits: int = 0               # arrivals that waited because max_outstanding requests were in flight
    behind: bool = False             # the client missed its schedule: these numbers partly measure the client
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    error_samples: list[str] = field(default_factory=list, repr=False)


@dataclass
class LoadResult:
    url: str
    protocol: str
    arrival: str
    duration_s: float
    models: dict[str, ModelResult]
    workers: int = 1

    @property
    def behind(self) -> bool:
        return any(m.behind for m in self.models.values())

    def to_dict(self, latencies: bool = False) -> dict:
        d = asdict(self)
        if not latencies:
            for m in d["models"].values():
                m.pop("latencies_ms", None)
        return d


@dataclass
class _Tally:
    """One stream's raw counts and samples for one model; workers send these back to be merged."""
    sent: int = 0
    ok: int = 0
    dropped: int = 0
    errors: int = 0
    cap_waits: int = 0
    last_send_s: float = 0.0         # when the last request left, from the stream's start
    latencies_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg)


_Spec = tuple[str, list[int], str]   # an input: name, shape, datatype


def _arrivals(rate: float, duration: float, kind: str, rng: np.random.Generator,
              part: int = 0, parts: int = 1) -> np.ndarray:
    """Arrival times of stream ``part`` of ``parts`` that together make one stream at ``rate``."""
    if rate <= 0:
        return np.zeros(0)
    if kind == "constant":   # request k at k/rate, k < rate x duration; part p sends k = p, p + parts, ...
        return np.arange(part, math.ceil(rate * duration - 1e-9), parts) / rate
    rate = rate / parts
    n = int(rate * duration * 1.5) + 20
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    while t[-1] < duration:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return t[t < duration]


def _is_drop(status: str | None, message: str) -> bool:
    s = (status or "").upper()
    return s in ("503", "429") or "UNAVAILABLE" in s or "RESOURCE_EXHAUSTED" in s or "dropped" in message.lower()


def _client(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc.aio as client
    elif protocol == "http":
        import tritonclient.http.aio as client
    else:
        raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
    return client


async def _describe(url: str, protocol: str, models: list[str], batch: int,
                    slo_ms: dict[str, float]) -> dict[str, list[_Spec]]:
    """Input specs per model from its metadata; fills in ``slo_ms`` from model configs where not given.
    Done once, up front, so that a bad model or URL fails here and not in N workers."""
    client = _client(protocol)
    c = client.InferenceServerClient(url)
    try:
        specs: dict[str, list[_Spec]] = {}
        for model in models:
            md = await c.get_model_metadata(model)
            md_inputs = md["inputs"] if isinstance(md, dict) else [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in md.inputs]
            specs[model] = []
            for t in md_inputs:
                if _np_dtype(t["datatype"]) is None:
                    raise ValueError(f"{model}: input {t['name']} of type {t['datatype']} is not supported by loadgen")
                shape = [batch if i == 0 and d == -1 else (1 if d == -1 else int(d)) for i, d in enumerate(t["shape"])]
                specs[model].append((t["name"], shape, t["datatype"]))
            if model not in slo_ms:
                cfg = await c.get_model_config(model)
                params = cfg.get("parameters", {}) if isinstance(cfg, dict) else {
                    k: {"string_value": v.string_value} for k, v in cfg.config.parameters.items()}
                try:
                    slo_ms[model] = float(params["slo_ms"]["string_value"])
                except (KeyError, TypeError, ValueError):
                    pass
        return specs
    finally:
        await c.close()


Slices = dict[str, tuple[int, int]]   # model -> (part, parts): which part of the model's stream one worker sends


def _assign(n: int, rates: dict[str, float], weights: dict[str, float]) -> list[Slices]:
    """What each of ``n`` workers sends. With a worker per model or more, each sends one model and a model gets
    workers in proportion to its ``weights`` (at least one); with fewer, each sends 1/n of every model."""
    active = [m for m, r in rates.items() if r > 0]
    if n < len(active) or not active:
        return [{m: (i, n) for m in rates} for i in range(n)]
    total = sum(weights[m] for m in active) or 1.0
    k = {m: max(1, math.floor(n * weights[m] / total)) for m in active}
    while sum(k.values()) > n:                      # the at-least-one rule overshot: take from the best served
        m = max((m for m in active if k[m] > 1), key=lambda m: k[m] / max(weights[m], 1e-12))
        k[m] -= 1
    while sum(k.values()) < n:                      # then give the rest to the least served
        m = max(active, key=lambda m: weights[m] / k[m])
        k[m] += 1
    return [{m: (i, k[m])} for m in active for i in range(k[m])]


async def _stream(url: str, protocol: str, specs: dict[str, list[_Spec]], rates: dict[str, float],
                  duration_s: float, arrival: str, rng: np.random.Generator, slices: Slices,
                  timeout_s: float, max_outstanding: int,
                  gate: Callable[[], None] | None = None) -> dict[str, _Tally]:
    """One open-loop stream: of each model in ``slices``, part ``part`` of ``parts``; ``gate`` blocks until
    every stream is ready to start."""
    client = _client(protocol)
    from tritonclient.utils import InferenceServerException

    if protocol == "http":   # aiohttp opens up to conn_limit connections by itself
        clients = [client.InferenceServerClient(url, conn_limit=max_outstanding, conn_timeout=timeout_s)]
    else:                    # one channel is one TCP connection: open several, as a busy client would, so a
        # server with several processes on one port (SO_REUSEPORT) sees the load spread over them
        opts = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.use_local_subchannel_pool", 1)]
        clients = [client.InferenceServerClient(url, channel_args=opts) for _ in range(GRPC_CONNECTIONS)]
    c = clients[0]
    try:
        inputs: dict[str, list] = {}
        for model, spec in specs.items():
            if model not in slices:
                continue
            ins = []
            for name, shape, datatype in spec:
                dt = _np_dtype(datatype)
                arr = (rng.integers(0, 1000, shape) if np.dtype(dt).kind in "iu" else rng.random(shape)).astype(dt)
                i = client.InferInput(name, shape, datatype)
                i.set_data_from_numpy(arr)
                ins.append(i)
            inputs[model] = ins
        tallies = {m: _Tally() for m in rates if m in slices}
        schedule = sorted((float(t), m) for m, (part, parts) in slices.items()
                          for t in _arrivals(rates[m], duration_s, arrival, rng, part, parts))
        sem = asyncio.Semaphore(max_outstanding)
        timeout_msg = f"timeout: no answer within {timeout_s:g} s"

        async def one(model: str, due: float) -> None:
            tally = tallies[model]
            t0 = time.perf_counter()
            tally.lags_ms.append((t0 - due) * 1000)
            tally.last_send_s = max(tally.last_send_s, t0 - start)
            try:
                if protocol == "grpc":
                    await clients[tally.sent % len(clients)].infer(model, inputs[model], client_timeout=timeout_s)
                else:
                    await c.infer(model, inputs[model])
                tally.ok += 1
                tally.latencies_ms.append((time.perf_counter() - t0) * 1000)
            except InferenceServerException as e:
                if _is_drop(str(e.status()), e.message() or ""):
                    tally.dropped += 1
                else:
                    tally.error(timeout_msg if "DEADLINE_EXCEEDED" in str(e.status()) else str(e))
            except asyncio.TimeoutError:
                tally.error(timeout_msg)
            except asyncio.CancelledError:
                tally.error(timeout_msg)
                raise
            except Exception as e:  # noqa: BLE001
                tally.error(f"{type(e).__name__}: {e}")
            finally:
                sem.release()

        for cl in clients:                  # connect now, so that the first request does not pay for it
            try:
                await cl.is_server_live()
            except Exception:  # noqa: BLE001 - then the first request connects (and reports what is wrong)
                pass
        if gate is not None:
            gate()
        tasks = []
        start = time.perf_counter()
        for t, model in schedule:
            due = start + t
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem.locked():
                tallies[model].cap_waits += 1
            await sem.acquire()
            tallies[model].sent += 1
            tasks.append(asyncio.create_task(one(model, due)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s + 5)
            for task in pending:        # the client timeout should have ended these; count them as errors
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return tallies
    finally:
        for cl in clients:
            await cl.close()


def _worker(part: int, slices: Slices, seed: np.random.SeedSequence, barrier, results, url: str, protocol: str,
            specs: dict[str, list[_Spec]], rates: dict[str, float], duration_s: float, arrival: str,
            timeout_s: float, max_outstanding: int) -> None:
    """Worker ``part``: one stream; puts (part, tallies) or (part, error message) on ``results``."""
    try:
        out: dict[str, _Tally] | str = asyncio.run(_stream(
            url, protocol, specs, rates, duration_s, arrival, np.random.default_rng(seed), slices,
            timeout_s, max_outstanding, gate=lambda: barrier.wait(timeout=_SETUP_S)))
    except BaseException as e:  # noqa: BLE001 - the parent must hear of any failure
        barrier.abort()
        out = f"{type(e).__name__}: {e}"
    results.put((part, out))


def _spawn(n: int, seed: int, url: str, protocol: str, specs: dict[str, list[_Spec]], rates: dict[str, float],
           duration_s: float, arrival: str, timeout_s: float, max_outstanding: int) -> list[dict[str, _Tally]]:
    """Run ``n`` streams in ``n`` spawned processes that start together (:func:`_assign` says what each
    sends); return their tallies."""
    ctx = mp.get_context("spawn")          # no fork: the caller may hold threads (the router in tests) and event loops
    barrier, results = ctx.Barrier(n), ctx.Queue()
    cap = max(1, math.ceil(max_outstanding / n))
    plan = _assign(n, rates, _weights(rates, specs))
    procs = [ctx.Process(target=_worker, name=f"loadgen-{i}", daemon=True,
                         args=(i, plan[i], s, barrier, results, url, protocol, specs, rates, duration_s, arrival,
                               timeout_s, cap))
             for i, s in enumerate(np.random.SeedSequence(seed).spawn(n))]
    for p in procs:
        p.start()
    try:
        got: dict[int, dict[str, _Tally] | str] = {}
        deadline = time.monotonic() + _SETUP_S + duration_s + timeout_s + 30
        while len(got) < n:
            try:
                part, out = results.get(timeout=0.5)   # read before joining: a full pipe blocks a worker's exit
                got[part] = out
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if i not in got and p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    barrier.abort()
                    why = f"exited with {procs[dead[0]].exitcode}" if dead else "did not finish in time"
                    raise RuntimeError(f"loadgen worker {dead[0] if dead else '?'} {why}")
        errors = [f"worker {i}: {out}" for i, out in sorted(got.items()) if isinstance(out, str)]
        if errors:
            raise RuntimeError("loadgen " + "; ".join(errors))
        return [got[i] for i in range(n)]  # type: ignore[misc]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()


def _merge(rates: dict[str, float], slo_ms: dict[str, float], duration_s: float, arrival: str,
           parts: list[dict[str, _Tally]]) -> dict[str, ModelResult]:
    """Per model: counts summed, percentiles from the merged raw samples (never averaged percentiles)."""
    results = {}
    for model, rate in rates.items():
        ts = [p[model] for p in parts if model in p] or [_Tally()]
        r = ModelResult(model, rate, slo_ms.get(model))
        r.sent, r.ok, r.dropped, r.errors, r.cap_waits = (
            sum(getattr(t, k) for t in ts) for k in ("sent", "ok", "dropped", "errors", "cap_waits"))
        r.error_samples = [s for t in ts for s in t.error_samples][:5]
        lat = np.concatenate([np.asarray(t.latencies_ms, dtype=float) for t in ts])
        lag = np.concatenate([np.asarray(t.lags_ms, dtype=float) for t in ts])
        window = max([duration_s] + [t.last_send_s for t in ts])   # longer than asked when sending fell behind
        r.throughput = r.ok / window
        r.sent_rate = r.sent / window
        if lat.size:
            r.p50_ms, r.p99_ms = (float(v) for v in np.percentile(lat, [50, 99]))
            r.mean_ms = float(lat.mean())
        if lag.size:
            r.lag_p99_ms, r.lag_max_ms = float(np.percentile(lag, 99)), float(lag.max())
        if r.sent:
            within = int((lat <= r.slo_ms).sum()) if r.slo_ms else r.ok
            r.slo_attainment = within / r.sent
        r.latencies_ms = lat.tolist()
        r.behind = _behind(r, duration_s, arrival)
        results[model] = r
    return results


def _behind(r: ModelResult, duration_s: float, arrival: str) -> bool:
    """Did the client miss its schedule? Late sends, arrivals held back by the cap, or a sent rate short of
    the offered one (for Poisson only when the shortfall is beyond the count's own noise, 3 sigma)."""
    if r.cap_waits or (r.lag_p99_ms or 0.0) > LAG_LIMIT_MS:
        return True
    if r.rate <= 0:
        return False
    if arrival == "constant":
        return r.sent_rate < 0.97 * r.rate
    expected, got = r.rate * duration_s, r.sent_rate * duration_s
    return got < 0.95 * expected and expected - got > 3 * math.sqrt(expected)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load(rate: float, nbytes: int) -> float:
    """Workers one model's stream needs: at most WORKER_REQ_PER_S requests and WORKER_BYTES_PER_S bytes each."""
    return max(max(rate, 0.0) / WORKER_REQ_PER_S, max(rate, 0.0) * nbytes / WORKER_BYTES_PER_S)


def _request_bytes(specs: dict[str, list[_Spec]]) -> dict[str, int]:
    return {m: sum(int(np.prod(shape)) * np.dtype(_np_dtype(dt)).itemsize for _, shape, dt in s)
            for m, s in specs.items()}


def _weights(rates: dict[str, float], specs: dict[str, list[_Spec]]) -> dict[str, float]:
    nbytes = _request_bytes(specs)
    return {m: _load(r, nbytes.get(m, 0)) for m, r in rates.items()}


def default_workers(rates: dict[str, float], bytes_per_request: dict[str, int]) -> int:
    """Enough processes that none sends more than WORKER_REQ_PER_S or WORKER_BYTES_PER_S, and one per model
    where the CPUs allow (see :func:`_assign`); 1 to the CPU count."""
    need = sum(math.ceil(_load(r, bytes_per_request.get(m, 0))) for m, r in rates.items() if r > 0)
    return max(1, min(_cpus(), need))


def run(url: str, rates: dict[str, float], duration_s: float = 10.0, *, protocol: str = "http",
        arrival: str = "poisson", batch: int = 1, slo_ms: dict[str, float] | None = None, seed: int = 0,
        timeout_s: float = 30.0, max_outstanding: int = 1000, workers: int | None = None) -> LoadResult:
    """Send open-loop load and measure it.

    url: ``host:port`` of the HTTP or gRPC endpoint (matching ``protocol``).
    rates: requests/s per model. arrival: ``poisson`` or ``constant``.
    slo_ms: per-model SLO for attainment; default: the model config's ``slo_ms`` parameter.
    timeout_s: client timeout per request; a request without an answer by then is an error.
    max_outstanding: requests in flight at most, over all workers (a cap that keeps the client from
    exhausting itself; arrivals that wait for it are counted in ``cap_waits`` and make the result ``behind``).
    workers: processes sending the load, each with its own seed; 1 sends from this process;
    None: ``default_workers`` for the offered load, always in worker processes — several runs at once
    from threads of one process (benchmarks/serving.py's direct mode, one run per gpu-let) then do not
    share one interpreter: in run 10 they did where one worker sufficed, and fell behind at low loads.
    """
    if arrival not in ("poisson", "constant"):
        raise ValueError(f"arrival must be poisson or constant, not {arrival!r}")
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    if workers is not None and workers < 1:
        raise ValueError("workers must be at least 1")
    rates, slo_ms = dict(rates), dict(slo_ms or {})
    specs = asyncio.run(_describe(url, protocol, list(rates), batch, slo_ms))
    n = workers or default_workers(rates, _request_bytes(specs))
    if workers == 1:         # asked for: this process sends (one run at a time; a thread's run shares the GIL)
        parts = [asyncio.run(_stream(url, protocol, specs, rates, duration_s, arrival, np.random.default_rng(seed),
                                     {m: (0, 1) for m in rates}, timeout_s, max_outstanding))]
    else:
        parts = _spawn(n, seed, url, protocol, specs, rates, duration_s, arrival, timeout_s, max_outstanding)
    return LoadResult(url, protocol, arrival, duration_s, _merge(rates, slo_ms, duration_s, arrival, parts), n)


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def render_table(result: LoadResult):
    """A rich Table: per model offered and sent rate, throughput, p50/p99, SLO attainment, drops, errors,
    send lag, and BEHIND where the client could not keep its schedule."""
    from rich.table import Table

    t = Table(title=f"loadgen: {result.protocol} {result.arrival} {result.duration_s:g} s against {result.url}, "
                    f"{result.workers} worker{'s' if result.workers != 1 else ''}")
    for col in ("model", "offered/s", "sent/s", "sent", "ok", "throughput/s", "p50 ms", "p99 ms", "SLO ms",
                "SLO met", "dropped", "errors", "lag p99 ms", "client"):
        t.add_column(col, justify="left" if col in ("model", "client") else "right")
    for r in result.models.values():
        t.add_row(r.model, _fmt(r.rate), _fmt(r.sent_rate), str(r.sent), str(r.ok), _fmt(r.throughput),
                  _fmt(r.p50_ms, ".2f"), _fmt(r.p99_ms, ".2f"), _fmt(r.slo_ms, "g"),
                  "-" if r.slo_attainment is None else f"{r.slo_attainment * 100:.1f} %", str(r.dropped),
                  str(r.errors), _fmt(r.lag_p99_ms, ".2f"),
                  "[bold red]BEHIND[/]" + (f" ({r.cap_waits} waited for cap)" if r.cap_waits else "")
                  if r.behind else "kept up")
    if result.behind:
        t.caption = (f"[bold red]BEHIND[/]: the load generator missed its schedule (send lag p99 > "
                     f"{LAG_LIMIT_MS:g} ms, sent short of offered, or arrivals waited for the outstanding cap); "
                     "those rows measure the client too: use more --workers or less load")
    return t


def write_json(result: LoadResult, path: str | Path, latencies: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(latencies), indent=2))
    return path


def write_cdf_png(result: LoadResult, path: str | Path) -> Path:
    """Latency CDF per model (successful requests), with each model's SLO as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, r in enumerate(result.models.values()):
        color = f"C{k % 10}"
        if r.latencies_ms:
            lat = np.sort(np.array(r.latencies_ms))
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=f"{r.model} ({r.ok} ok)", color=color)
        if r.slo_ms:
            ax.axvline(r.slo_ms, color=color, linestyle="--", linewidth=0.8)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"latency CDF: {result.protocol}, {result.arrival}, {result.duration_s:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
