"""Open-loop load generator for a KServe v2 endpoint (the router, or a tritonserver directly).

Per model, requests arrive as a Poisson process (or at a constant rate) at the
given rate for the given duration, independent of how fast answers come back
(open loop), over HTTP or gRPC with tritonclient's asyncio clients. Inputs are
random tensors shaped from the model's metadata. The result holds, per model,
throughput, latency percentiles, SLO attainment and drops; ``render_table``,
``write_json`` and ``write_cdf_png`` present it.

    from controlplane import loadgen
    res = loadgen.run("127.0.0.1:8000", {"lenet": 100, "mobilenet_v2": 20}, duration_s=10)
    rich.print(loadgen.render_table(res))
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_NP = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
       "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


@dataclass
class ModelResult:
    model: str
    rate: float                      # offered requests/s
    slo_ms: float | None
    sent: int = 0
    ok: int = 0
    dropped: int = 0                 # refused by the server as unable to meet the deadline / overloaded
    errors: int = 0                  # anything else
    throughput: float = 0.0          # successful requests/s
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    slo_attainment: float | None = None  # share of sent requests answered within the SLO
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    error_samples: list[str] = field(default_factory=list, repr=False)


@dataclass
class LoadResult:
    url: str
    protocol: str
    arrival: str
    duration_s: float
    models: dict[str, ModelResult]

    def to_dict(self, latencies: bool = False) -> dict:
        d = asdict(self)
        if not latencies:
            for m in d["models"].values():
                m.pop("latencies_ms", None)
        return d


def _arrivals(rate: float, duration: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    if rate <= 0:
        return np.zeros(0)
    if kind == "constant":
        return np.arange(0.0, duration, 1.0 / rate)
    n = int(rate * duration * 1.5) + 20
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    while t[-1] < duration:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return t[t < duration]


def _is_drop(status: str | None, message: str) -> bool:
    s = (status or "").upper()
    return s in ("503", "429") or "UNAVAILABLE" in s or "RESOURCE_EXHAUSTED" in s or "dropped" in message.lower()


async def _run(url: str, rates: dict[str, float], duration_s: float, protocol: str, arrival: str, batch: int,
               slo_ms: dict[str, float], seed: int, timeout_s: float, max_outstanding: int) -> LoadResult:
    if protocol == "grpc":
        import tritonclient.grpc.aio as client
    elif protocol == "http":
        import tritonclient.http.aio as client
    else:
        raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
    from tritonclient.utils import InferenceServerException

    kw = {"conn_limit": max_outstanding} if protocol == "http" else {}
    c = client.InferenceServerClient(url, **kw)
    rng = np.random.default_rng(seed)
    try:
        inputs: dict[str, list] = {}
        for model in rates:
            md = await c.get_model_metadata(model)
            md_inputs = md["inputs"] if isinstance(md, dict) else [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in md.inputs]
            ins = []
            for t in md_inputs:
                shape = [batch if i == 0 and d == -1 else (1 if d == -1 else d) for i, d in enumerate(t["shape"])]
                dt = _NP.get(t["datatype"])
                if dt is None:
                    raise ValueError(f"{model}: input {t['name']} of type {t['datatype']} is not supported by loadgen")
                arr = (rng.integers(0, 1000, shape) if np.dtype(dt).kind in "iu" else rng.random(shape)).astype(dt)
                i = client.InferInput(t["name"], shape, t["datatype"])
                i.set_data_from_numpy(arr)
                ins.append(i)
            inputs[model] = ins
            if model not in slo_ms:
                cfg = await c.get_model_config(model)
                params = cfg.get("parameters", {}) if isinstance(cfg, dict) else {
                    k: {"string_value": v.string_value} for k, v in cfg.config.parameters.items()}
                try:
                    slo_ms[model] = float(params["slo_ms"]["string_value"])
                except (KeyError, TypeError, ValueError):
                    pass

        results = {m: ModelResult(m, r, slo_ms.get(m)) for m, r in rates.items()}
        schedule = sorted((t, m) for m, r in rates.items() for t in _arrivals(r, duration_s, arrival, rng))
        sem = asyncio.Semaphore(max_outstanding)
        tasks = []

        async def one(model: str) -> None:
            res = results[model]
            t0 = time.perf_counter()
            try:
                if protocol == "grpc":
                    await c.infer(model, inputs[model], client_timeout=timeout_s)
                else:
                    await c.infer(model, inputs[model])
                res.ok += 1
                res.latencies_ms.append((time.perf_counter() - t0) * 1000)
            except InferenceServerException as e:
                if _is_drop(str(e.status()), e.message() or ""):
                    res.dropped += 1
                else:
                    res.errors += 1
                    if len(res.error_samples) < 5:
                        res.error_samples.append(str(e))
            except Exception as e:  # noqa: BLE001
                res.errors += 1
                if len(res.error_samples) < 5:
                    res.error_samples.append(f"{type(e).__name__}: {e}")
            finally:
                sem.release()

        start = time.perf_counter()
        for t, model in schedule:
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await sem.acquire()
            results[model].sent += 1
            tasks.append(asyncio.create_task(one(model)))
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s + 5)
        elapsed = max(duration_s, 1e-9)
        for r in results.values():
            lat = np.array(r.latencies_ms)
            r.throughput = r.ok / elapsed
            if lat.size:
                r.p50_ms, r.p99_ms = (float(v) for v in np.percentile(lat, [50, 99]))
                r.mean_ms = float(lat.mean())
            if r.sent:
                within = int((lat <= r.slo_ms).sum()) if r.slo_ms else r.ok
                r.slo_attainment = within / r.sent
        return LoadResult(url, protocol, arrival, duration_s, results)
    finally:
        await c.close()


def run(url: str, rates: dict[str, float], duration_s: float = 10.0, *, protocol: str = "http",
        arrival: str = "poisson", batch: int = 1, slo_ms: dict[str, float] | None = None, seed: int = 0,
        timeout_s: float = 30.0, max_outstanding: int = 1000) -> LoadResult:
    """Send open-loop load and measure it.

    url: ``host:port`` of the HTTP or gRPC endpoint (matching ``protocol``).
    rates: requests/s per model. arrival: ``poisson`` or ``constant``.
    slo_ms: per-model SLO for attainment; default: the model config's ``slo_ms`` parameter.
    max_outstanding: requests in flight at most (a cap that keeps the client from exhausting itself).
    """
    if arrival not in ("poisson", "constant"):
        raise ValueError(f"arrival must be poisson or constant, not {arrival!r}")
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    return asyncio.run(_run(url, dict(rates), duration_s, protocol, arrival, batch, dict(slo_ms or {}), seed,
                            timeout_s, max_outstanding))


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def render_table(result: LoadResult):
    """A rich Table: per model offered rate, throughput, p50/p99, SLO attainment, drops, errors."""
    from rich.table import Table

    t = Table(title=f"loadgen: {result.protocol} {result.arrival} {result.duration_s:g} s against {result.url}")
    for col in ("model", "rate/s", "sent", "ok", "throughput/s", "p50 ms", "p99 ms", "SLO ms", "SLO met",
                "dropped", "errors"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result.models.values():
        t.add_row(r.model, _fmt(r.rate), str(r.sent), str(r.ok), _fmt(r.throughput), _fmt(r.p50_ms, ".2f"),
                  _fmt(r.p99_ms, ".2f"), _fmt(r.slo_ms, "g"),
                  "-" if r.slo_attainment is None else f"{r.slo_attainment * 100:.1f} %", str(r.dropped),
                  str(r.errors))
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
