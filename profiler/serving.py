"""Latency tables through the serving path: one tritonserver per share, timed from a client.

Each share gets a gpu-let (all asked-for models, the largest batch as the
preferred one; written without SLOs, so Triton's batcher neither holds a request
for more nor times one out: each request is timed as the batch it is) started by
the lead's :class:`~controlplane.runtime.process.ProcessRuntime` with the same
environment a deployment would give it (MPS share on a GPU, pinned cores on the
CPU). The client (``tritonclient.http``) times each request with the host clock
from send to response: request serialisation, HTTP, the python backend's DLPack
hand-over and the TorchScript forward pass. The gap to the in-process table is
the serving overhead the scheduler should budget for.
"""

from __future__ import annotations

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
    import tritonclient.http as http

    from controlplane import zoo

    x = zoo.example_input(info.name, batch).numpy()
    t = info.inputs[0]
    inp = http.InferInput(t.name, list(x.shape), t.datatype)
    inp.set_data_from_numpy(x.astype(np.int64 if t.datatype == "INT64" else np.float32))
    return [inp]


def profile_serving(models: Sequence[str], device: str = "cpu", shares: Sequence[int] = (50, 100),
                    batches: Sequence[int] = (1, 8), out_csv: str | Path | None = None, runs: int = 50,
                    min_runs: int = 10, warmup: int = 3, point_budget_s: float = 1.0,
                    mps_pipe_dir: str | Path | None = None, gpu_index: int = 0, device_label: str | None = None,
                    progress: Progress | None = None, tritonserver: str | None = None) -> LatencyResult:
    """Measure the (model x share x batch) table through tritonserver; resumable like the in-process one."""
    import tritonclient.http as http

    from controlplane.repository import SourceRepository, build_artifacts, write_gpulet_repository
    from controlplane.runtime.base import Launch, gpulet_env
    from controlplane.runtime.process import ProcessRuntime
    from controlplane.spec import Assignment, GpuLet

    on_gpu = device != "cpu"
    dev_name = device_label or device_name("gpu" if on_gpu else "cpu", gpu_index)
    csv_path = Path(out_csv) if out_csv else Path("profiles") / "serving.csv"
    done = {row_key(r) for r in existing_rows(csv_path)}
    shares = sorted({int(s) for s in shares}, reverse=True)
    batches = sorted({int(b) for b in batches})
    todo = {s: [(m, b) for m in models for b in batches if (dev_name, m, s, b, "fp32") not in done] for s in shares}
    total = sum(len(v) for v in todo.values())
    if progress:
        progress({"type": "plan", "total": total, "done": len(done), "csv": str(csv_path), "device": dev_name})
    res = LatencyResult(csv_path, dev_name)
    if not total:
        return res
    check_mps([s for s in shares if todo[s]], on_gpu, mps_pipe_dir)
    repo = SourceRepository()
    build_artifacts(repo, list(models))
    work = Path(tempfile.mkdtemp(prefix="gpulet-serving-"))
    t_start = time.perf_counter()
    for s in shares:
        if not todo[s]:
            continue
        cores = None if on_gpu else cores_for_share(s)
        g = GpuLet(id=f"profile-s{s}", gpu=0, share=s,
                   models=[Assignment(model=m, batch=max(batches), rate=0) for m in models])
        repo_dir = write_gpulet_repository(repo, g, work / g.id, on_gpu)
        env = gpulet_env(g, gpu_index if on_gpu else None, cores, str(mps_pipe_dir) if mps_pipe_dir else None)
        launch = Launch(g, repo_dir, work / f"{g.id}.log", gpu_index=gpu_index if on_gpu else None,
                        cores=cores, env=env)
        if progress:
            progress({"type": "share", "share": s, "points": len(todo[s]), "cores": cores})
        rt = ProcessRuntime(tritonserver)
        try:
            ep = rt.start([launch])[g.id]
            client = http.InferenceServerClient(ep.http, network_timeout=600, connection_timeout=600)
            for m, b in todo[s]:
                info = repo[m]
                inputs = _client_inputs(info, b)
                for _ in range(warmup):
                    client.infer(m, inputs)
                times: list[float] = []
                t0 = time.perf_counter()
                while len(times) < runs:
                    t = time.perf_counter()
                    client.infer(m, inputs)
                    times.append((time.perf_counter() - t) * 1000.0)
                    if len(times) >= min_runs and time.perf_counter() - t0 > point_budget_s:
                        break
                a = np.asarray(times)
                row = ProfileRow(dev_name, m, s, b, round(float(np.percentile(a, 50)), 4),
                                 round(float(np.percentile(a, 99)), 4), round(float(a.mean()), 4), len(times),
                                 info.memory_mb, "fp32", TOOL_VERSION + " (serving: tritonserver + http client)", today())
                append_rows(csv_path, [row])
                res.measured.append(row)
                if progress:
                    progress({"type": "row", "row": row})
            client.close()
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
