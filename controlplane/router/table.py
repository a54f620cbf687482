"""What the router knows: per model its KServe metadata, SLO and gpu-lets.

Built from the scheduler's :class:`~controlplane.spec.Plan`, the endpoints the
runtime started (one tritonserver per gpu-let), the source repository (tensor
names, dtypes, shapes) and the deployment (SLOs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2 as mc

from ..repository import SourceRepository, TensorInfo
from ..runtime.base import Endpoint
from .apps import AppRoute
from ..spec import Deployment, Plan


@dataclass(frozen=True)
class GpuletRoute:
    """One gpu-let serving one model: where it is and what the plan promised."""

    id: str
    endpoint: Endpoint
    batch: int                   # planned batch = the tritonserver's max_batch_size for the model
    duty_cycle_ms: float = 0.0
    rate: float = 0.0            # requests/s the plan assigned
    throughput: float = 0.0      # predicted requests/s
    latency_ms: float = 0.0      # predicted latency of one batch
    share: int = 100

    @property
    def weight(self) -> float:
        """This gpu-let's part of the model's load: the rate the plan gave it, as clients splitting by the
        plan would send (else its predicted throughput, else its batch x share)."""
        return self.rate or self.throughput or float(self.batch * self.share)


@dataclass
class ModelRoute:
    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_batch_size: int          # what clients may send in one request (the model's own limit)
    slo_ms: float | None
    gpulets: list[GpuletRoute]
    config: mc.ModelConfig = field(default_factory=mc.ModelConfig, repr=False)
    version: str = "1"

    def __getstate__(self) -> dict:
        # protobuf messages of tritonclient's generated modules do not pickle; router workers get the bytes
        return {**self.__dict__, "config": self.config.SerializeToString()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, config=mc.ModelConfig.FromString(state["config"]))

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorInfo | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass
class RoutingTable:
    models: dict[str, ModelRoute]
    apps: dict[str, AppRoute] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: Plan, endpoints: dict[str, Endpoint], repo: SourceRepository,
                  deployment: Deployment | None = None) -> "RoutingTable":
        models: dict[str, ModelRoute] = {}
        for name in plan.model_names():
            info = repo[name]
            slo = None
            if deployment is not None:
                try:
                    slo = deployment.model(name).slo_ms
                except KeyError:
                    slo = None
            if slo is None and name in plan.models:
                slo = plan.models[name].slo_ms
            if slo is None:
                slo = info.slo_ms
            routes = []
            for g in plan.gpulets_for(name):
                if g.id not in endpoints:
                    raise KeyError(f"no endpoint for gpu-let {g.id!r} (serving {name!r})")
                a = g.assignment(name)
                assert a is not None
                routes.append(GpuletRoute(
                    id=g.id, endpoint=endpoints[g.id], batch=a.batch, duty_cycle_ms=g.duty_cycle_ms,
                    rate=a.rate, throughput=a.throughput, latency_ms=a.latency_ms, share=g.share,
                ))
            cfg = mc.ModelConfig()
            cfg.CopyFrom(info.config)
            cfg.name = name
            max_batch = info.max_batch_size if info.max_batch_size > 0 else max(r.batch for r in routes)
            cfg.max_batch_size = max_batch
            cfg.ClearField("instance_group")
            cfg.ClearField("dynamic_batching")
            models[name] = ModelRoute(name=name, inputs=list(info.inputs), outputs=list(info.outputs),
                                      max_batch_size=max_batch, slo_ms=slo, gpulets=routes, config=cfg,
                                      version=info.version)
        return cls(models, _apps(deployment, repo, models) if deployment is not None else {})


def _apps(dep: Deployment, repo: SourceRepository, models: dict[str, ModelRoute]) -> dict[str, AppRoute]:
    """The deployment's apps as the router runs them (their models must be routed)."""
    from ..apps import check_app, levels

    out = {}
    for i, a in enumerate(dep.apps):
        ins, outs, rows = check_app(a, repo, f"apps[{i}]")
        unrouted = [st.model for st in a.steps if st.model not in models]
        if unrouted:
            raise KeyError(f"app {a.name!r}: no gpu-let serves {', '.join(unrouted)}")
        out[a.name] = AppRoute(name=a.name, inputs=ins, outputs=outs, sources=dict(a.outputs),
                               steps={st.model: dict(st.inputs) for st in a.steps}, levels=levels(a),
                               slo_ms=a.slo_ms, fan_out=rows,
                               max_batch_size=min(models[st.model].max_batch_size for st in a.steps
                                                  if st.model not in rows))
    return out
