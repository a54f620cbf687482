"""Shared fixtures for the router tests: real tritonservers for a small plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from controlplane.repository import SourceRepository, build_artifacts, write_gpulet_repositories
from controlplane.runtime.base import Endpoint, Launch, gpulet_env
from controlplane.spec import Assignment, Deployment, GpuLet, ModelSpec, Plan

MODELS = ["lenet", "mobilenet_v2"]


MAX_BODY = 4 * 1024 * 1024   # the `server` fixture's body limit (conftest.py)


def one_gpulet_plan(batches: dict[str, int] | None = None, gid: str = "cpu0-a") -> Plan:
    """One CPU gpu-let serving lenet and mobilenet_v2 (the tests' server)."""
    batches = batches or {"lenet": 8, "mobilenet_v2": 4}
    return Plan(gpus=1, gpulets=[GpuLet(id=gid, gpu=0, share=100, duty_cycle_ms=20.0,
                                        models=[Assignment(model=m, batch=b, rate=100.0, throughput=200.0)
                                                for m, b in batches.items()])])


def deployment(slo: dict[str, float] | None = None) -> Deployment:
    slo = slo or {"lenet": 2000.0, "mobilenet_v2": 5000.0}
    return Deployment(models=[ModelSpec(name=m, rate=10, slo_ms=s) for m, s in slo.items()])


def start_servers(plan: Plan, tmp: Path, slo_ms: dict[str, float] | None = None):
    """Start one tritonserver per gpu-let of the plan; return (runtime, endpoints, repo).

    The repositories are written as `up` writes them for a deployment with these SLOs
    (default: :func:`deployment`'s, generous, so that Triton's queue policy does not time out
    the tests' bursts on a small shared CPU)."""
    from controlplane.runtime.process import ProcessRuntime

    repo = SourceRepository()
    build_artifacts(repo, plan.model_names())
    slo_ms = slo_ms if slo_ms is not None else {m.name: m.slo_ms for m in deployment().models}
    repos = write_gpulet_repositories(repo, plan, tmp / "repos", on_gpu=False, slo_ms=slo_ms)
    rt = ProcessRuntime(startup_timeout_s=180)
    launches = [Launch(gpulet=g, repository=repos[g.id], log_path=tmp / "logs" / f"{g.id}.log",
                       env=gpulet_env(g, None, None, None)) for g in plan.gpulets]
    endpoints = rt.start(launches)
    return rt, endpoints, repo


def reference(repo: SourceRepository, model: str, x: np.ndarray) -> np.ndarray:
    """The same TorchScript run in-process."""
    import torch

    m = _loaded.get(model)
    if m is None:
        m = _loaded[model] = torch.jit.load(str(repo[model].artifact())).eval()
    with torch.inference_mode():
        return m(torch.from_numpy(np.ascontiguousarray(x))).numpy()


_loaded: dict = {}


def example(model: str, batch: int = 1, seed: int = 0) -> np.ndarray:
    from controlplane import zoo

    return zoo.example_input(model, batch, seed).numpy()


def free_endpoint() -> Endpoint:
    from controlplane.runtime.base import free_ports

    return Endpoint("127.0.0.1", *free_ports(3))
