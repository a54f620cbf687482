"""`plan(deployment, profiles) -> Plan`: the one door to the scheduler.

The scheduler proper lives in :mod:`controlplane.scheduler` (pure: workload and
profiles in, plan out). This module only picks the algorithm and the GPU count
from the deployment and the devices it resolved to.
"""

from __future__ import annotations

from .spec import Assignment, Deployment, GpuLet, ModelSummary, Plan


def trivial_plan(deployment: Deployment, device: str = "cpu", max_batch: dict[str, int] | None = None) -> Plan:
    """Each model alone on a full-share gpu-let of its own (the baseline of one Triton per model)."""
    gpulets, models = [], {}
    for i, m in enumerate(deployment.models):
        batch = min(m.max_batch or deployment.scheduler.max_batch, (max_batch or {}).get(m.name) or 1024)
        gpulets.append(GpuLet(id=f"gpu{i}-a", gpu=i, share=100, duty_cycle_ms=0.0,
                              models=[Assignment(model=m.name, batch=batch, rate=m.rate)]))
        models[m.name] = ModelSummary(rate=m.rate, slo_ms=m.slo_ms, throughput=0.0, worst_latency_ms=0.0)
    return Plan(deployment=deployment.name, device=device, algorithm="trivial", gpus=len(gpulets),
                gpulets=gpulets, models=models)


def plan(deployment: Deployment, profiles=None, *, device: str = "cpu", gpus: int | None = None,
         algorithm: str | None = None, max_batch: dict[str, int] | None = None) -> Plan:
    """Plan a deployment; without profiles only the trivial algorithm can run."""
    algorithm = algorithm or deployment.scheduler.algorithm
    if algorithm == "trivial" or profiles is None:
        return trivial_plan(deployment, device, max_batch)
    from . import scheduler

    return scheduler.plan(deployment, profiles, algorithm=algorithm, gpus=gpus or deployment.scheduler.gpus)
