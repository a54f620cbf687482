"""The planner: deployment + profiles -> Plan, with the fewest GPUs.

One entry point, :func:`plan` (pure: no I/O). Algorithms by name
(:data:`ALGORITHMS`):

* ``gpulet`` — the paper's elastic partitioning with temporal sharing and
  interference checks, run as a small portfolio (paper order, smallest-share policy,
  temporal-only packing) whose best plan goes through a consolidation pass that
  empties lightly loaded GPUs by growing or re-partitioning the others' gpu-lets;
  milliseconds, the default;
* ``gpulet-paper`` — the paper's heuristic alone: one order (rate x SLO), no portfolio,
  no consolidation;
* ``temporal`` — temporal sharing on whole GPUs (Nexus squishy bin packing);
* ``greedy`` — spatial partitioning without temporal sharing;
* ``ideal`` — the exact optimum of the same planning problem (temporal
  sharing, shares, gpu-lets per GPU, margin, interference and memory as per-GPU
  checks): a column integer program solved by HiGHS (:mod:`.optimum`);
* ``ideal-prototype`` — the prototype's exhaustive space only (fixed per-GPU splits,
  one model per gpu-let at its saturated batch, no temporal sharing): not an optimum;
* ``best`` — ``gpulet`` refined by the exact optimum within a time budget; where the
  optimum is too large, the better of ``gpulet`` and ``ideal-prototype``: for when a GPU
  saved matters more than seconds of planning (large deployments with interference);
* ``trivial`` — each model alone on a whole GPU.

Example (what ``controlplane plan`` does)::

    from controlplane.profiles import ProfileStore
    from controlplane.scheduler import plan, render_table
    p = plan(deployment, ProfileStore.load("profiles/h100"), algorithm="gpulet", gpus=4)
    print(render_table(p)); print(p.model_dump_json(indent=2))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from ..profiles import ProfileStore
from ..spec import Deployment, Plan
from .baselines import MilpColumns, best, greedy, ideal_prototype, milp_columns, solve_milp, trivial
from .core import (TURNS_ONLY, Ctx, Gpu, SchedulingError, check_slo_reachable, is_concurrent, lower_bound, to_plan,
                   validate_plan)
from .gpulet import gpulet
from .optimum import OptimumInfo, OptimumTooLarge, ideal, optimum
from .temporal import temporal
from ..interference import (
    FittedInterference,
    InterferenceModel,
    LinearUtilInterference,
    NoInterference,
    fit_pairs,
    load_interference,
    prediction_errors,
)
from ..interference import by_name as interference_by_name

Algorithm = Callable[[Ctx, "int | None"], list[Gpu]]


def _gpulet_paper(ctx: Ctx, max_gpus: int | None = None) -> list[Gpu]:
    return gpulet(ctx, max_gpus, orders=["rate_slo"])


ALGORITHMS: dict[str, Algorithm] = {
    "gpulet": gpulet,
    "gpulet-paper": _gpulet_paper,
    "temporal": temporal,
    "greedy": greedy,
    "ideal": ideal,
    "ideal-prototype": ideal_prototype,
    "best": best,
    "trivial": trivial,
}


def register(name: str, fn: Algorithm) -> None:
    """Add a planner: ``fn(ctx, max_gpus) -> list[Gpu]``, raising SchedulingError when impossible."""
    ALGORITHMS[name] = fn


def burst_pad(rate: float, slo_ms: float, pct: float) -> float:
    """``rate`` padded to the ``pct`` quantile of Poisson arrivals within half of ``slo_ms``, per second.

    In a gpu-let a request waits for the batch in flight and then runs in the next one (duty cycle +
    batch latency <= SLO), so each batch must hold what arrives in about half an SLO; arrivals over
    that window are Poisson(rate x window), whose spread is relatively largest for short windows."""
    if rate <= 0 or pct <= 0 or slo_ms <= 0:
        return rate
    from scipy.stats import poisson

    window = slo_ms / 2000.0
    return max(rate, float(poisson.ppf(pct, rate * window)) / window)


def poisson_pad(rate: float, pct: float = 0.99) -> float:
    """Rate padded to the Poisson ``pct`` quantile of arrivals in one second (the prototype's
    hard-wired padding, 100 -> ~124, 200 -> ~234; here an explicit option)."""
    if rate <= 0:
        return 0.0
    from scipy.stats import poisson

    return float(poisson.ppf(pct, rate))


def resolve_interference(deployment: Deployment, profiles: ProfileStore,
                         interference: InterferenceModel | str | bool | None) -> InterferenceModel:
    """None -> deployment.scheduler.interference decides: the profile's own fitted model
    (``profiles.interference``, if the loader set one) else the paper's 2080 Ti model."""
    if isinstance(interference, str):
        return interference_by_name(interference)
    if interference is None:
        interference = deployment.scheduler.interference
    if interference is False:
        return NoInterference()
    if interference is True:
        own = getattr(profiles, "interference", None)
        return own if own is not None else LinearUtilInterference()
    return interference


def make_ctx(deployment: Deployment, profiles: ProfileStore, *, interference: InterferenceModel | str | bool | None = None,
             pad_rates: bool = False, max_models: int = 3, max_lets_per_gpu: int | None = None, memory_check: bool = True,
             pct: str = "p99", algorithm: str | None = None) -> Ctx:
    """The planners' context; ``algorithm`` (default: the deployment's) decides ``colocation: auto``."""
    sch = deployment.scheduler
    missing = [m.name for m in deployment.models if not profiles.has(m.name)]
    if missing:
        raise SchedulingError(
            f"no profile on {profiles.device} for model(s) {', '.join(missing)}; "
            f"profiled: {', '.join(profiles.models()) or 'none'} (run `controlplane profile`)"
        )
    tight = [m.name for m in deployment.models if m.slo_ms <= sch.overhead_ms]
    if tight:
        raise SchedulingError(f"scheduler.overhead_ms ({sch.overhead_ms:g}) leaves no time within the SLO of "
                              f"{', '.join(tight)}")
    rates = {m.name: burst_pad(poisson_pad(m.rate) if pad_rates else m.rate, m.slo_ms - sch.overhead_ms,
                               sch.burst_pct) for m in deployment.models}
    mb = {m.name: min(m.max_batch or sch.max_batch, sch.max_batch if m.max_batch is None else m.max_batch)
          for m in deployment.models}
    return Ctx(rates=rates, slos={m.name: m.slo_ms - sch.overhead_ms for m in deployment.models}, max_batch=mb,
               profiles=profiles, overhead_ms=sch.overhead_ms,
               shares=sorted(sch.shares), margin=sch.latency_margin,
               interference=resolve_interference(deployment, profiles, interference),
               max_models=max_models,
               max_lets_per_gpu=sch.gpulets_per_gpu if max_lets_per_gpu is None else max_lets_per_gpu, memory_check=memory_check, pct=pct,
               trivial_batch={m.name: m.max_batch or 1 for m in deployment.models},
               concurrent=is_concurrent(sch.colocation, profiles.device, algorithm or sch.algorithm))


def gpu_limit(deployment: Deployment, gpus: int | None) -> int | None:
    if gpus is not None:
        return gpus
    if deployment.scheduler.gpus is not None:
        return deployment.scheduler.gpus
    if isinstance(deployment.devices, list):
        return len(deployment.devices)
    return None


def plan(deployment: Deployment, profiles: ProfileStore, *, algorithm: str | None = None, gpus: int | None = None,
         interference: InterferenceModel | str | bool | None = None, previous: Plan | None = None,
         **options) -> Plan:
    """Plan ``deployment`` on the device ``profiles`` describes, with the fewest GPUs.

    ``gpus`` caps the GPUs (default: ``scheduler.gpus``, else the number of listed
    devices, else no cap). ``interference``: a model, a name ('none',
    'linear-2080ti', a fitted JSON path), True/False, or None for the
    deployment's setting. ``previous``: the running plan; its gpu-lets whose models
    did not change are kept where that needs no more GPUs than a full plan
    (:func:`.incremental.incremental`). ``options``: pad_rates, max_models, max_lets_per_gpu,
    memory_check, pct. Raises SchedulingError saying what is impossible and why.
    """
    name = algorithm or deployment.scheduler.algorithm
    if name not in ALGORITHMS:
        raise SchedulingError(f"unknown scheduling algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}")
    if deployment.scheduler.colocation == "concurrent" and name in TURNS_ONLY:
        raise SchedulingError(f"{name} plans a gpu-let's models taking turns; scheduler.colocation: concurrent "
                              f"is planned by {', '.join(a for a in ALGORITHMS if a not in TURNS_ONLY)}")
    ctx = make_ctx(deployment, profiles, interference=interference, algorithm=name, **options)
    limit = gpu_limit(deployment, gpus)
    fn = ALGORITHMS[name]
    if name != "trivial":
        check_slo_reachable(ctx)
        try:
            out = fewer_lets(fn, ctx, limit)
        except SchedulingError as e:
            if limit is None:
                raise
            try:
                needed = len(fn(ctx, None))
            except SchedulingError:
                raise e from None
            raise SchedulingError(
                f"{name}: not enough GPUs: the plan needs {needed} GPU(s), only {limit} available "
                f"(lower bound {math.ceil(lower_bound(ctx) - 1e-9)})"
            ) from None
        if limit is not None and len(out) > limit:
            raise SchedulingError(f"{name}: not enough GPUs: the plan needs {len(out)} GPU(s), only {limit} available")
        if previous is not None:
            from .incremental import incremental

            inc = incremental(ctx, previous, fn, limit)
            if inc is not None and sum(1 for g in inc if g.lets) <= len(out):
                out = inc
    else:
        out = fn(ctx, limit)
    return to_plan(ctx, out, deployment.name, name)


def fewer_lets(fn: Algorithm, ctx: Ctx, limit: int | None) -> list:
    """``fn(ctx, limit)``; where that fails (or needs more than ``limit`` GPUs), the same with fewer gpu-lets
    allowed per GPU, the most first: a limit is a most, and a heuristic planner's packing is not
    monotonic in it (on the H200, bert-heavy fits x2.77 with 3 gpu-lets a GPU and only x2.56 with 5)."""
    try:
        out, err = fn(ctx, limit), None
        if limit is None or len(out) <= limit:
            return out
    except SchedulingError as e:
        out, err = None, e
    for k in range(ctx.max_lets_per_gpu - 1, 0, -1):
        try:
            alt = fn(dataclasses.replace(ctx, max_lets_per_gpu=k), limit)
        except SchedulingError:
            continue
        if limit is None or len(alt) <= limit:
            return alt
    if err is not None:
        raise err               # what the deployment's own limit ran into
    return out


def gpu_lower_bound(deployment: Deployment, profiles: ProfileStore) -> int:
    """Fewest GPUs any plan could use (see core.lower_bound)."""
    ctx = make_ctx(deployment, profiles, interference=False)
    lb = lower_bound(ctx)
    return math.ceil(lb - 1e-9) if math.isfinite(lb) else -1


def render_table(plan: Plan) -> str:
    """Plain-text table of a plan: one line per (gpu-let, model), then per-model summaries."""
    lines = [f"plan {plan.deployment!r}: {plan.gpus} GPU(s) on {plan.device}, algorithm {plan.algorithm}", ""]
    hdr = f"{'gpu-let':<10} {'gpu':>3} {'share':>5} {'duty ms':>8}  {'model':<16} {'batch':>5} {'rate':>9} {'thr':>9} {'lat ms':>8}"
    lines += [hdr, "-" * len(hdr)]
    for g in plan.gpulets:
        for i, a in enumerate(g.models):
            head = f"{g.id:<10} {g.gpu:>3} {g.share:>4}% {g.duty_cycle_ms:>8.2f}" if i == 0 else " " * 30
            lines.append(f"{head}  {a.model:<16} {a.batch:>5} {a.rate:>9.1f} {a.throughput:>9.1f} {a.latency_ms:>8.2f}")
    lines += ["", f"{'model':<16} {'rate':>9} {'thr':>9} {'worst ms':>9} {'slo ms':>8}  ok"]
    for m, s in plan.models.items():
        ok = "yes" if s.throughput >= s.rate - 1e-6 and s.worst_latency_ms <= s.slo_ms + 1e-6 else "NO"
        lines.append(f"{m:<16} {s.rate:>9.1f} {s.throughput:>9.1f} {s.worst_latency_ms:>9.2f} {s.slo_ms:>8.1f}  {ok}")
    gpus = sorted({g.gpu for g in plan.gpulets})
    lines.append("")
    lines.append("used share: " + ", ".join(f"gpu{i} {plan.used_share(i)}%" for i in gpus))
    return "\n".join(lines)


__all__ = [
    "ALGORITHMS", "Ctx", "FittedInterference", "InterferenceModel", "LinearUtilInterference", "MilpColumns",
    "NoInterference", "OptimumInfo", "OptimumTooLarge", "SchedulingError", "ideal", "optimum", "fit_pairs", "gpu_lower_bound", "load_interference", "lower_bound",
    "make_ctx", "milp_columns", "plan", "poisson_pad", "prediction_errors", "register", "render_table",
    "solve_milp", "validate_plan",
]
