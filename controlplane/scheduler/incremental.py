"""Incremental re-planning: move only the models whose load changed (GPU-let's frontend tries this first).

A running plan's gpu-lets are servers that are up and warm; a full re-plan of a changed workload
may reshuffle all of them (the planners order models by demand, so one rate change can move
every later model), and each gpu-let whose server changes is started anew and the old one
drained. :func:`incremental` keeps every gpu-let whose models all keep their SLO and planned
latency and at least their rate, plans the rest alone (a grown model's increase, the models
whose rate fell or SLO changed, new ones, and the unchanged models that shared a gpu-let with
one of those), and fits those gpu-lets into the kept GPUs' free share first, then onto new GPUs. A model
whose rate fell keeps the gpu-lets it still needs and gives back the others (:func:`_dropping`: a step back
starts no server) unless planning it again uses less share. :func:`controlplane.scheduler.plan` takes the
result when it fits the GPU limit and needs no more GPUs than a full plan; else the full plan.

Pure: the previous plan and a planning context in, planned GPUs out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..spec import Plan
from .core import Ctx, Gpu, Let, SchedulingError, settle, try_gpu


def _same_slo(ctx: Ctx, m: str, s) -> bool:
    """Whether model m's SLO is the one the previous plan (its summary s) was made for."""
    return abs(s.slo_ms - (ctx.slos[m] + ctx.overhead_ms)) <= 1e-6


def _unchanged(ctx: Ctx, previous: Plan) -> set[str]:
    """Models whose gpu-lets can stay: the SLO the previous plan was made for, and at least its rate
    (a grown rate keeps its gpu-lets and only the increase is planned anew)."""
    return {m for m, s in previous.models.items()
            if m in ctx.rates and ctx.rates[m] >= s.rate * (1 - 1e-6) and _same_slo(ctx, m, s)}


def _fallen(ctx: Ctx, previous: Plan) -> set[str]:
    """Models whose rate fell, with the SLO the previous plan was made for."""
    return {m for m, s in previous.models.items()
            if 0 < ctx.rates.get(m, 0.0) < s.rate * (1 - 1e-6) and _same_slo(ctx, m, s)}


def _kept_let(ctx: Ctx, g, rates: dict[str, float]) -> Let | None:
    """The previous gpu-let as a :class:`Let` carrying ``rates`` (its models' rates, or less), or None when
    one of its models now profiles slower than its planned latency (which includes any interference
    slowdown)."""
    for a in g.models:
        if a.batch > ctx.max_batch.get(a.model, 0) or ctx.lat(a.model, g.share, a.batch) > a.latency_ms + 1e-3:
            return None
    # the plan's rates are rounded to 6 decimals, and a saturated gpu-let's rate is its capacity: rounded
    # up, it would not schedule again when a new gpu-let joins its GPU. The slowdown the plan had from its
    # neighbours is its planned latency over the profile's.
    return Let(g.share, {a.model: rates[a.model] * (1 - 1e-9) for a in g.models}, g.duty_cycle_ms,
               {a.model: a.batch for a in g.models},
               {a.model: max(1.0, a.latency_ms / ctx.lat(a.model, g.share, a.batch)) for a in g.models},
               {a.model: a.duty_cycle_ms for a in g.models if a.duty_cycle_ms > 0})


def _kept(ctx: Ctx, previous: Plan, same: set[str]) -> dict[int, dict[str, float]]:
    """The previous gpu-lets (by index) whose models all stay as they were, each with its rates."""
    return {i: {a.model: a.rate for a in g.models} for i, g in enumerate(previous.gpulets)
            if g.models and all(a.model in same for a in g.models)}


def _dropping(ctx: Ctx, previous: Plan, same: set[str], kept: dict[int, dict[str, float]]
              ) -> dict[int, dict[str, float]]:
    """``kept`` (:func:`_kept`), plus the gpu-lets of models whose rate fell, less the largest of them that the rest can
    do without: a model's rate falling frees whole gpu-lets and starts nothing, where planning the model
    again starts new servers (a re-plan's transition, mostly tritonserver's start: 4-6 s on the H200).
    The kept ones share the fallen model's new rate in proportion to what each was planned for (each
    still has the capacity it had: Triton batches what is queued, so less load only means smaller batches).
    Empty when nothing can be dropped."""
    fallen = _fallen(ctx, previous)
    ok = same | fallen
    theirs = {i: g for i, g in enumerate(previous.gpulets)
              if g.models and all(a.model in ok for a in g.models) and any(a.model in fallen for a in g.models)}
    cap = {m: sum(a.rate for g in theirs.values() for a in g.models if a.model == m) for m in fallen}
    dropped = set()
    for i, g in sorted(theirs.items(), key=lambda kv: -kv[1].share):
        if all(a.model in fallen and cap[a.model] - a.rate >= ctx.rates[a.model] for a in g.models):
            dropped.add(i)
            for a in g.models:
                cap[a.model] -= a.rate
    if not dropped:
        return {}
    out = dict(kept)
    for i, g in theirs.items():
        if i not in dropped:   # a fallen model's new rate, spread; one its gpu-lets cannot carry alone keeps them full
            out[i] = {a.model: a.rate * min(1.0, ctx.rates[a.model] / cap[a.model]) if a.model in fallen else a.rate
                      for a in g.models}
    return out


def incremental(ctx: Ctx, previous: Plan, algorithm: Callable[[Ctx, int | None], list[Gpu]],
                limit: int | None) -> list[Gpu] | None:
    """The previous plan's GPUs with only the changed models re-planned (module doc), or None when
    nothing of it can be kept or the result does not fit ``limit`` GPUs. Where a model's rate fell and
    dropping some of its gpu-lets serves the new rate (:func:`_dropping`), that is taken unless planning
    the model again uses less share."""
    same = _unchanged(ctx, previous)
    kept = _kept(ctx, previous, same)
    best = None
    for keep in (_dropping(ctx, previous, same, kept), kept):
        got = _with_kept(ctx, previous, keep, algorithm, limit) if keep else None
        if got is not None and (best is None or _share(got) < _share(best)):
            best = got
    return best


def _share(gpus: list[Gpu]) -> int:
    return sum(g.used for g in gpus)


def _with_kept(ctx: Ctx, previous: Plan, keep: dict[int, dict[str, float]],
               algorithm: Callable[[Ctx, int | None], list[Gpu]], limit: int | None) -> list[Gpu] | None:
    """The previous gpu-lets in ``keep`` (index -> the rates each carries) and the rest planned alone."""
    gpus = [Gpu() for _ in range(previous.gpus)]
    kept = False
    for i, g in enumerate(previous.gpulets):
        let = _kept_let(ctx, g, keep[i]) if i in keep else None
        if let is not None and g.gpu < len(gpus):
            gpus[g.gpu].lets.append(let)
            kept = True
    if not kept:
        return None
    # what the kept gpu-lets do not carry: a model split over several gpu-lets may keep some of them
    carried = {m: 0.0 for m in ctx.rates}
    for gpu in gpus:
        for let in gpu.lets:
            for m, r in let.rates.items():
                carried[m] += r
    rest = {m: r - carried[m] for m, r in ctx.rates.items() if r - carried[m] > 1e-6 * max(1.0, r)}
    if rest:
        try:
            planned = algorithm(dataclasses.replace(ctx, rates=rest), None)
        except SchedulingError:
            return None
        new = sorted((let for g in planned for let in g.lets), key=lambda x: -x.share)
        for let in new:
            for gpu in gpus:
                got = try_gpu(ctx, gpu, [let])
                if got is not None:
                    gpu.lets = got
                    break
            else:
                if (got := settle(ctx, [let])) is None:
                    return None
                gpus.append(Gpu(got))
    if limit is not None and sum(1 for g in gpus if g.lets) > limit:
        return None
    return gpus     # a GPU left empty is dropped by to_plan (those after it are renumbered)
