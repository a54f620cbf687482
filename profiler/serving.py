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

    from controlplane.repository import SourceRepository, build_artifacts, write_gpulet_repository
    from controlplane.runtime.base import Launch, gpulet_env
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
        cores = None if on_gpu else cores_for_share(s)
        g = GpuLet(id=f"profile-s{s}", gpu=0, share=s,
                   models=[Assignment(model=m, batch=max(batches), rate=0) for m in models])
        repo_dir = write_gpulet_repository(repo, g, work / g.id, on_gpu)
        for m in models:
            _profiling_config(repo_dir / m / "config.pbtxt", max(batches), delay_us)
        env = gpulet_env(g, gpu_index if on_gpu else None, cores, str(mps_pipe_dir) if mps_pipe_dir else None)
        launches.append(Launch(g, repo_dir, work / f"{g.id}.log", gpu_index=gpu_index if on_gpu else None,
                               cores=cores, env=env))
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
