"""Latency tables, in-process: one worker process per share times every (model, batch).

``profile_latency`` is resumable: the rows already in the CSV (same device,
model, share, batch, precision) are not measured again, and each new row is
appended (and fsync'ed) as soon as it is measured, so an interrupted run loses
at most the point in flight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.profiles import ProfileRow

from . import TOOL_VERSION
from .common import (DEFAULT_BATCHES, DEFAULT_SHARES, append_rows, device_name, existing_rows, profile_dir,
                     row_key, today)
from controlplane.runtime.mps import MPSNotActive, status as mps_status

REPO_ROOT = Path(__file__).resolve().parent.parent

Progress = Callable[[dict], None]


class ProfileRunError(RuntimeError):
    """A worker failed; the message carries its log tail."""


@dataclass
class LatencyResult:
    csv: Path
    device: str
    measured: list[ProfileRow] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)   # (model, precision) that could not run (e.g. fp16)
    seconds: float = 0.0
    per_model_s: dict[str, float] = field(default_factory=dict)


def cores_for_share(share: int, available: Sequence[int] | None = None) -> list[int]:
    """The cores a CPU gpu-let of ``share`` % gets (the runtime's mapping, offset 0)."""
    from controlplane.runtime.base import cpu_cores_for
    from controlplane.spec import Assignment, GpuLet

    g = GpuLet(id="profile", gpu=0, share=share, models=[Assignment(model="m", batch=1, rate=0)])
    return cpu_cores_for([g], list(available) if available is not None else None)["profile"]


def worker_env(share: int, on_gpu: bool, gpu_index: int = 0, mps_pipe_dir: str | Path | None = None,
               cores: list[int] | None = None) -> dict[str, str]:
    """Environment of a worker: the same share variables a gpu-let's tritonserver gets."""
    from controlplane.runtime.base import gpulet_env
    from controlplane.spec import Assignment, GpuLet

    g = GpuLet(id="profile", gpu=0, share=share, models=[Assignment(model="m", batch=1, rate=0)])
    env = dict(os.environ)
    env.update(gpulet_env(g, gpu_index if on_gpu else None, cores, str(mps_pipe_dir) if mps_pipe_dir else None))
    if on_gpu and share >= 100 and not mps_pipe_dir:
        env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
    env["PYTHONPATH"] = f"{REPO_ROOT}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_mps(shares: Iterable[int], on_gpu: bool, mps_pipe_dir: str | Path | None) -> None:
    """Refuse GPU shares < 100 unless an MPS daemon answers (CUDA would ignore the share)."""
    low = sorted(s for s in shares if s < 100)
    if not on_gpu or not low:
        return
    if not mps_pipe_dir:
        raise MPSNotActive(f"shares {low} need MPS, but no MPS pipe directory was given "
                           "(use --start-mps or --mps-pipe-dir)")
    st = mps_status(mps_pipe_dir)
    if not st.active:
        raise MPSNotActive(f"shares {low} need MPS: {st.reason}")


class Worker:
    """A running ``profiler.worker`` process; iterate over its JSON messages."""

    def __init__(self, job: dict, env: dict[str, str], python: str = sys.executable, interactive: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gpulet-profile-"))
        self.job_path = self.dir / "job.json"
        self.job_path.write_text(json.dumps(job))
        self.log_path = self.dir / "stderr.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [python, "-m", "profiler.worker", str(self.job_path)], env=env, cwd=str(REPO_ROOT),
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
            stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
        )

    def messages(self):
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                yield json.loads(line[3:])

    def next(self) -> dict:
        for msg in self.messages():
            return msg
        raise ProfileRunError(f"worker exited (code {self.proc.wait()}):\n{self.log_tail()}")

    def send(self, obj: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return self.next()

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self, timeout: float = 30) -> int:
        if self.proc.stdin:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


def profile_latency(models: Sequence[str], device: str = "cpu", shares: Sequence[int] = DEFAULT_SHARES,
                    batches: Sequence[int] = DEFAULT_BATCHES, precisions: Sequence[str] = ("fp32",),
                    out_csv: str | Path | None = None, profiles_root: str | Path = "profiles",
                    runs: int = 100, min_runs: int = 20, warmup: int = 5, point_budget_s: float = 1.0,
                    source: str = "zoo", mps_pipe_dir: str | Path | None = None, gpu_index: int = 0,
                    progress: Progress | None = None, python: str = sys.executable, repository: str | None = None,
                    device_label: str | None = None, parallel_start: bool = True) -> LatencyResult:
    """Measure what is missing of the (model x share x batch x precision) table; return what was measured.

    ``device``: 'cpu' (core shares) or 'gpu' (MPS shares on GPU ``gpu_index``).
    """
    on_gpu = device != "cpu"
    dev_name = device_label or device_name("cpu" if not on_gpu else "gpu", gpu_index)
    csv_path = Path(out_csv) if out_csv else profile_dir(profiles_root, dev_name) / "latency.csv"
    done = {row_key(r) for r in existing_rows(csv_path)}
    shares = sorted({int(s) for s in shares}, reverse=True)
    batches = sorted({int(b) for b in batches})
    precisions = list(precisions)
    if not on_gpu and "fp16" in precisions:
        precisions.remove("fp16")
    todo = {s: [(m, p, b) for p in precisions for m in models for b in batches
                if (dev_name, m, s, b, p) not in done] for s in shares}
    total = sum(len(v) for v in todo.values())
    if progress:
        progress({"type": "plan", "total": total, "done": len(done), "csv": str(csv_path), "device": dev_name})
    res = LatencyResult(csv_path, dev_name)
    if total == 0:
        return res
    check_mps([s for s in shares if todo[s]], on_gpu, mps_pipe_dir)
    t_start = time.perf_counter()
    # Start every share's worker at once (start-up, model loading and warm-up overlap), then let
    # them time one after the other: a worker waiting for "go" is idle on the device.
    workers: dict[int, Worker] = {}
    try:
        for s in shares:
            if not todo[s]:
                continue
            want = set(todo[s])
            skip = [[m, p, b] for p in precisions for m in models for b in batches if (m, p, b) not in want]
            cores = None if on_gpu else cores_for_share(s)
            job = {"mode": "table", "device": "gpu" if on_gpu else "cpu", "share": s, "models": list(models),
                   "batches": batches, "precisions": precisions, "skip": skip, "runs": runs,
                   "min_runs": min_runs, "warmup": warmup, "point_budget_s": point_budget_s, "source": source,
                   "repository": repository, "cores": cores, "gate": parallel_start, "preload_all": on_gpu}
            workers[s] = Worker(job, worker_env(s, on_gpu, gpu_index, mps_pipe_dir, cores), python=python,
                                interactive=parallel_start)
            if not parallel_start:
                _drain(workers.pop(s), s, want, batches, csv_path, dev_name, source, res, progress, cores)
        for s, w in list(workers.items()):
            msg = w.next()
            while "ready" not in msg:
                _check_fatal(msg, w, s)
                msg = w.next()
        for s in list(workers):
            w = workers.pop(s)
            w.proc.stdin.write("go\n")
            w.proc.stdin.flush()
            _drain(w, s, set(todo[s]), batches, csv_path, dev_name, source, res, progress,
                   None if on_gpu else cores_for_share(s))
    finally:
        for w in workers.values():
            w.close(timeout=5)
    res.seconds = time.perf_counter() - t_start
    return res


def _check_fatal(msg: dict, w: Worker, share: int) -> None:
    if "fatal" in msg:
        w.close(timeout=5)
        if "MPSNotActive" in msg["fatal"]:
            raise MPSNotActive(msg["fatal"])
        raise ProfileRunError(f"worker at share {share} failed: {msg['fatal']}\n{w.log_tail()}")


def _drain(w: Worker, s: int, want: set, batches: list[int], csv_path: Path, dev_name: str, source: str,
           res: LatencyResult, progress: Progress | None, cores: list[int] | None) -> None:
    """Read one worker's rows to the end; append each to the CSV as it comes."""
    if progress:
        progress({"type": "share", "share": s, "points": len(want), "cores": cores})
    t_model = time.perf_counter()
    for msg in w.messages():
        _check_fatal(msg, w, s)
        if "loaded" in msg:
            t_model = time.perf_counter() - msg["loaded"]["load_s"]
        if "skipped" in msg:
            res.skipped.append(msg["skipped"])
            if progress:
                n = sum(1 for m, p, _ in want if (m, p) == (msg["skipped"]["model"], msg["skipped"]["precision"]))
                progress({"type": "skipped", "n": n, **msg["skipped"]})
        if "row" in msg:
            r = msg["row"]
            row = ProfileRow(dev_name, r["model"], s, int(r["batch"]), round(r["p50_ms"], 4),
                             round(max(r["p99_ms"], r["p50_ms"]), 4), round(r["mean_ms"], 4), int(r["runs"]),
                             r["memory_mb"], r["precision"], TOOL_VERSION + f" ({source}, in-process)", today())
            append_rows(csv_path, [row])
            res.measured.append(row)
            last = max(b for m, p, b in want if (m, p) == (r["model"], r["precision"]))
            if r["batch"] == last:
                key = f"{r['model']}/{r['precision']}"
                res.per_model_s[key] = res.per_model_s.get(key, 0.0) + time.perf_counter() - t_model
                t_model = time.perf_counter()
            if progress:
                progress({"type": "row", "row": row, "wall_s": r.get("wall_s", 0.0)})
    rc = w.close()
    if rc != 0:
        raise ProfileRunError(f"worker at share {s} exited with code {rc}:\n{w.log_tail()}")
