"""Latency tables through the serving path: what a gpu-let's tritonserver spends per batch.

Each share gets a gpu-let (all asked-for models) started by
:class:`~controlplane.runtime.process.ProcessRuntime` with the environment a
deployment gives it (MPS share on a GPU, pinned cores on the CPU). For each batch
size b, b clients send one-row requests in a closed loop and Triton's dynamic
batcher gathers them (no preferred sizes, a queue delay that lets the b requests
of a round meet, ``max_batch_size`` the largest b) into batches of b, as it does
for a deployment's single requests. The figure is Triton's own: the model
instance's time per batch of size b from its statistics (``batch_stats``:
compute_input + compute_infer + compute_output, summed per execution), the busy
time the planner budgets for — the in-process forward pass plus the serving
path (inputs through the python backend's shared memory, DLPack, outputs back).
Triton keeps sums, not distributions: p50 and p99 of a row are both the mean.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from controlplane.profiles import ProfileRow

from . import TOOL_VERSION
from .common import append_rows, device_name, existing_rows, row_key, today
from .latency import LatencyResult, Progress, check_mps, cores_for_share


def _client_inputs(info, batch: int):
    """One request's inputs: the zoo's example inputs for a zoo model (bert's token ids stay in its
    vocabulary), else random rows of every input the config names (a user's model, `repo add`)."""
    import tritonclient.grpc.aio as aio

    from controlplane import zoo
    from controlplane.model_add import example_inputs

    if not info.versions() and info.name in zoo.names():
        xs = [x.numpy() for x in zoo.example_inputs(info.name, batch)]
    else:
        xs = [x.numpy() for x in example_inputs(info.inputs, batch)]
    out = []
    for t, x in zip(info.inputs, xs):
        inp = aio.InferInput(t.name, list(x.shape), t.datatype)
        inp.set_data_from_numpy(x.astype(np.int64) if t.datatype == "INT64" and x.dtype != np.int64 else x)
        out.append(inp)
    return out


def batch_stats(url: str, model: str) -> dict[int, tuple[int, int]]:
    """Triton's executions per batch size of a model: {batch size: (executions, instance ns)}."""
    import httpx

    from controlplane.live import batch_stats as parse

    return parse(httpx.get(f"http://{url}/v2/models/{model}/stats", timeout=30).json()["model_stats"][0])


async def _closed_loop(grpc_url: str, model: str, info, clients: int, seconds: float, min_batches: int) -> None:
    """``clients`` one-row requests in flight at all times, for ``seconds`` (and at least ``min_batches`` rounds).

    Over gRPC: with the HTTP asyncio client (aiohttp), Triton's compute_output -- part of the figure --
    grew with the bytes of the outputs (crop's 600 KB: 20 ms of a 24 ms batch of 1 on the CPU, 0.6 ms
    over gRPC, 0.16 ms behind the router), i.e. it measured how fast this client read its answers."""
    import tritonclient.grpc.aio as aio

    c = aio.InferenceServerClient(grpc_url)
    inputs = _client_inputs(info, 1)
    end = time.perf_counter() + seconds
    try:
        async def one() -> None:
            k = 0
            while k < min_batches or time.perf_counter() < end:
                await c.infer(model, inputs)
                k += 1

        await asyncio.gather(*(one() for _ in range(clients)))
    finally:
        await c.close()


def _profiling_config(path: Path, max_batch: int, delay_us: int) -> None:
    """A model's config for profiling: batches as large as the requests waiting, gathered for up to ``delay_us``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    cfg.max_batch_size = max_batch
    cfg.dynamic_batching.ClearField("preferred_batch_size")
    cfg.dynamic_batching.max_queue_delay_microseconds = delay_us
    path.write_text(text_format.MessageToString(cfg))


def _launch(repo, g, work: Path, on_gpu: bool, cores: list[int] | None, delay_us: int, gpu_index: int,
            mps_pipe_dir: str | Path | None):
    """A profiling gpu-let's launch: its repository under ``work`` with batches gathered for ``delay_us``
    (:func:`_profiling_config`), the environment a deployment gives it (MPS share, or its cores)."""
    from controlplane.repository import write_gpulet_repository
    from controlplane.runtime.base import Launch, gpulet_env

    repo_dir = write_gpulet_repository(repo, g, work / g.id, on_gpu)
    for a in g.models:
        _profiling_config(repo_dir / a.model / "config.pbtxt", a.batch, delay_us)
    env = gpulet_env(g, gpu_index if on_gpu else None, cores, str(mps_pipe_dir) if mps_pipe_dir else None)
    return Launch(g, repo_dir, work / f"{g.id}.log", gpu_index=gpu_index if on_gpu else None, cores=cores, env=env)


def profile_serving(models: Sequence[str], device: str = "cpu", shares: Sequence[int] = (50, 100),
                    batches: Sequence[int] = (1, 8), out_csv: str | Path | None = None, runs: int = 50,
                    min_runs: int = 10, warmup: int = 3, point_budget_s: float = 1.0, delay_us: int | None = None,
                    mps_pipe_dir: str | Path | None = None, gpu_index: int = 0, device_label: str | None = None,
                    progress: Progress | None = None, tritonserver: str | None = None,
                    repository: str | Path | None = None) -> LatencyResult:
    """Measure the (model x share x batch) table through tritonserver; resumable like the in-process one.

    ``delay_us``: how long Triton holds a batch for the rest of a round's requests (default 20 ms on a
    GPU -- one client process sends a round of 32 600 KB images -- and 50 ms on the CPU); it is
    queueing, not part of the figure. A point whose batch never formed is left out (``skipped``).
    ``repository``: the source repository (default: the zoo's), e.g. a user's from `repo add`."""

    from controlplane.repository import SourceRepository, build_artifacts
    from controlplane.runtime.process import ProcessRuntime
    from controlplane.spec import Assignment, GpuLet

    on_gpu = device != "cpu"
    delay_us = delay_us if delay_us is not None else (20_000 if on_gpu else 50_000)
    dev_name = device_label or device_name("gpu" if on_gpu else "cpu", gpu_index)
    csv_path = Path(out_csv) if out_csv else Path("profiles") / "serving.csv"
    done = {row_key(r) for r in existing_rows(csv_path)}
    shares = sorted({int(s) for s in shares}, reverse=True)
    batches = sorted({int(b) for b in batches})
    todo = {s: [(m, b) for m in models for b in batches if (dev_name, m, s, b, "fp32") not in done] for s in shares}
    todo = {s: pts for s, pts in todo.items() if pts}
    total = sum(len(v) for v in todo.values())
    if progress:
        progress({"type": "plan", "total": total, "done": len(done), "csv": str(csv_path), "device": dev_name})
    res = LatencyResult(csv_path, dev_name)
    if not total:
        return res
    check_mps(list(todo), on_gpu, mps_pipe_dir)
    repo = SourceRepository(repository)
    build_artifacts(repo, list(models))
    work = Path(tempfile.mkdtemp(prefix="gpulet-serving-"))
    t_start = time.perf_counter()
    launches = []
    for s in todo:
        g = GpuLet(id=f"profile-s{s}", gpu=0, share=s,
                   models=[Assignment(model=m, batch=max(batches), rate=0) for m in models])
        launches.append(_launch(repo, g, work, on_gpu, None if on_gpu else cores_for_share(s), delay_us, gpu_index,
                                mps_pipe_dir))
    # Every share's server starts at once (start-up -- model loads, CUDA graph captures -- is most of a
    # share's time); they are timed one at a time, the others idle (an idle MPS client takes no SMs).
    rt = ProcessRuntime(tritonserver)
    try:
        eps = rt.start(launches)
        for s, launch in zip(todo, launches):
            ep = eps[launch.gpulet.id]
            if progress:
                progress({"type": "share", "share": s, "points": len(todo[s]), "cores": launch.cores})
            for m, b in todo[s]:
                info = repo[m]
                asyncio.run(_closed_loop(ep.grpc, m, info, b, 0.0, warmup))          # warm-up
                before = batch_stats(ep.http, m)
                asyncio.run(_closed_loop(ep.grpc, m, info, b, point_budget_s, min_runs))
                after = batch_stats(ep.http, m)
                n0, ns0 = before.get(b, (0, 0))
                n1, ns1 = after.get(b, (0, 0))
                if n1 - n0 < 1:
                    # The client did not get b requests into one batch window: leave the point out
                    # (the planner interpolates between the batches it has) rather than lose the rest.
                    seen = sorted(k for k in after if after[k][0] > before.get(k, (0, 0))[0])
                    res.skipped.append({"model": m, "share": s, "precision": "fp32",
                                        "reason": f"no batch of {b} formed (batch sizes seen: {seen})"})
                    continue
                mean_ms = round((ns1 - ns0) / (n1 - n0) / 1e6, 4)
                row = ProfileRow(dev_name, m, s, b, mean_ms, mean_ms, mean_ms, n1 - n0, info.memory_mb, "fp32",
                                 TOOL_VERSION + " (serving: tritonserver batch_stats)", today())
                append_rows(csv_path, [row])
                res.measured.append(row)
                if progress:
                    progress({"type": "row", "row": row})
    finally:
        rt.stop()
        shutil.rmtree(work, ignore_errors=True)
    res.seconds = time.perf_counter() - t_start
    return res


def compare(inprocess: Sequence[ProfileRow], serving: Sequence[ProfileRow]) -> dict:
    """How far the serving path is from the in-process table, over the points both have (p50)."""
    a = {(r.model, r.share, r.batch): r.p50_ms for r in inprocess if r.precision == "fp32"}
    pts = [(k, a[k], r.p50_ms) for r in serving for k in [(r.model, r.share, r.batch)] if k in a]
    if not pts:
        raise ValueError("no common (model, share, batch) points")
    diff = [sv - ip for _, ip, sv in pts]
    rel = [(sv - ip) / ip for _, ip, sv in pts]
    return {"points": len(pts), "mean_abs_gap_ms": float(np.mean(np.abs(diff))),
            "mean_gap_ms": float(np.mean(diff)), "mean_rel_gap": float(np.mean(rel)),
            "max_rel_gap": float(np.max(np.abs(rel))),
            "per_point": [{"model": k[0], "share": k[1], "batch": k[2], "inprocess_p50_ms": ip, "serving_p50_ms": sv}
                          for k, ip, sv in pts]}


# --------------------------------------------------------------------------- interference pairs


def _mean_batch_ms(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], b: int) -> float | None:
    """Triton's mean time per batch of size ``b`` between two readings of its statistics (None: none ran)."""
    n0, ns0 = before.get(b, (0, 0))
    n1, ns1 = after.get(b, (0, 0))
    return (ns1 - ns0) / (n1 - n0) / 1e6 if n1 > n0 else None


def measure_pairs_serving(configs: Sequence[tuple], device: str, out_csv: str | Path, on_gpu: bool,
                          mps_pipe_dir: str | Path | None = None, gpu_index: int = 0, seconds: float = 0.6,
                          min_batches: int = 5, warmup: int = 2, delay_us: int | None = None,
                          progress: Progress | None = None, tritonserver: str | None = None,
                          repository: str | Path | None = None) -> list[dict]:
    """Interference pairs through the serving path; append rows to ``out_csv`` (resumable); return the new rows.

    Each split's two sides are gpu-let tritonservers, started as a deployment starts them (MPS share on
    a GPU, their own cores on the CPU), each holding the models of its side. For a pair (model A at
    batch a on one side, B at batch b on the other) each side's closed loop runs alone, then both at
    once; a side's slowdown is Triton's mean time per batch together over alone. Unlike the in-process
    pairs (CUDA graphs replayed back to back), this is what a python-backend instance does: on the
    H200 the in-process 100/100 pairs said 1.1-4.5x where a 100 % gpu-let's models served at about
    their profile alone, and at 20 % they said 1.23x where bert ran 1.34x (docs/benchmarks.md, run 15).
    A pair whose batches never formed is left out, said through ``progress``."""
    from controlplane.repository import SourceRepository, build_artifacts
    from controlplane.runtime.base import cpu_cores_for
    from controlplane.runtime.process import ProcessRuntime
    from controlplane.spec import Assignment, GpuLet

    from .interference import append_pair, pending

    out_csv = Path(out_csv)
    by_split = pending(configs, device, out_csv, progress)
    if not by_split:
        return []
    check_mps([s for split in by_split for s in split], on_gpu, mps_pipe_dir)
    delay_us = delay_us if delay_us is not None else (20_000 if on_gpu else 50_000)
    repo = SourceRepository(repository)
    build_artifacts(repo, sorted({m for cs in by_split.values() for c in cs for m in (c[2], c[4])}))
    work = Path(tempfile.mkdtemp(prefix="gpulet-pairs-"))
    new: list[dict] = []
    for (sa, sb), cs in by_split.items():
        sides = []
        for side, share, models in (("a", sa, sorted({c[2] for c in cs})), ("b", sb, sorted({c[4] for c in cs}))):
            mb = max(c[3] if side == "a" else c[5] for c in cs)
            sides.append(GpuLet(id=f"pair-{side}-s{share}", gpu=0, share=share,
                                models=[Assignment(model=m, batch=mb, rate=0) for m in models]))
        cores = None if on_gpu else cpu_cores_for(sides)       # side by side on the cores, as a deployment's
        launches = [_launch(repo, g, work, on_gpu, None if cores is None else cores[g.id], delay_us, gpu_index,
                            mps_pipe_dir) for g in sides]
        rt = ProcessRuntime(tritonserver)
        try:
            eps = rt.start(launches)
            ea, eb = eps[sides[0].id], eps[sides[1].id]
            warm: set[tuple[str, str, int]] = set()

            async def loops(runs: list[tuple]) -> None:
                await asyncio.gather(*(_closed_loop(ep.grpc, m, repo[m], b, seconds, min_batches)
                                       for ep, m, b in runs))

            def timed(runs: list[tuple]) -> list[float | None]:
                for ep, m, b in runs:
                    if (ep.http, m, b) not in warm:
                        asyncio.run(_closed_loop(ep.grpc, m, repo[m], b, 0.0, warmup))
                        warm.add((ep.http, m, b))
                before = [batch_stats(ep.http, m) for ep, m, _ in runs]
                asyncio.run(loops(runs))
                return [_mean_batch_ms(bf, batch_stats(ep.http, m), b) for bf, (ep, m, b) in zip(before, runs)]

            for (_, _, ma, ba, mb_, bb) in cs:
                (la,) = timed([(ea, ma, ba)])
                (lb,) = timed([(eb, mb_, bb)])
                ta, tb = timed([(ea, ma, ba), (eb, mb_, bb)])
                if None in (la, lb, ta, tb):
                    if progress:
                        progress({"type": "skipped", "model": f"{ma}/{ba}@{sa} + {mb_}/{bb}@{sb}", "precision": "fp32",
                                  "reason": "a batch of the asked size did not form"})
                    continue
                row = {"device": device, "model_a": ma, "share_a": sa, "batch_a": ba, "model_b": mb_, "share_b": sb,
                       "batch_b": bb, "slowdown_a": round(ta / la, 4), "slowdown_b": round(tb / lb, 4)}
                append_pair(out_csv, row)
                new.append(row)
                if progress:
                    progress({"type": "pair", "row": row, "alone_a_ms": la, "alone_b_ms": lb,
                              "together_a_ms": ta, "together_b_ms": tb})
        finally:
            rt.stop()
    shutil.rmtree(work, ignore_errors=True)
    return new
