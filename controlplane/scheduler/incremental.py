"""Incremental re-planning: move only the models whose load changed (GPU-let's frontend tries this first).

A running plan's gpu-lets are servers that are up and warm; a full re-plan of a changed workload
may reshuffle all of them (the planners order models by demand, so one rate change can move
every later model), and each gpu-let whose server changes is started anew and the old one
drained. :func:`incremental` keeps every gpu-let whose models all keep their SLO and planned
latency and at least their rate, plans the rest alone (a grown model's increase, the models
whose rate fell or SLO changed, new ones, and the unchanged models that shared a gpu-let with
one of those), and fits those gpu-lets into the kept GPUs' free share first, then onto new GPUs. :func:`controlplane.scheduler.plan` takes it when it fits the
GPU limit and needs no more GPUs than a full plan; else the full plan.

Pure: the previous plan and a planning context in, planned GPUs out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..spec import Plan
from .core import Ctx, Gpu, Let, SchedulingError, settle, try_gpu


def _unchanged(ctx: Ctx, previous: Plan) -> set[str]:
    """Models whose gpu-lets can stay: the SLO the previous plan was made for, and at least its rate
    (a grown rate keeps its gpu-lets and only the increase is planned anew)."""
    out = set()
    for m, s in previous.models.items():
        if m in ctx.rates and ctx.rates[m] >= s.rate * (1 - 1e-6) and \
                abs(s.slo_ms - (ctx.slos[m] + ctx.overhead_ms)) <= 1e-6:
            out.add(m)
    return out


def _kept_let(ctx: Ctx, g, same: set[str]) -> Let | None:
    """The previous gpu-let as a :class:`Let`, or None when one of its models changed (rate, SLO, or a
    profile now slower than its planned latency, which includes any interference slowdown)."""
    if not g.models or any(a.model not in same for a in g.models):
        return None
    for a in g.models:
        if a.batch > ctx.max_batch.get(a.model, 0) or ctx.lat(a.model, g.share, a.batch) > a.latency_ms + 1e-3:
            return None
    # the plan's rates are rounded to 6 decimals, and a saturated gpu-let's rate is its capacity: rounded
    # up, it would not schedule again when a new gpu-let joins its GPU
    # up, it would not schedule again when a new gpu-let joins its GPU. The slowdown the plan had from its
    # neighbours is its planned latency over the profile's.
    return Let(g.share, {a.model: a.rate * (1 - 1e-9) for a in g.models}, g.duty_cycle_ms,
               {a.model: a.batch for a in g.models},
               {a.model: max(1.0, a.latency_ms / ctx.lat(a.model, g.share, a.batch)) for a in g.models},
               {a.model: a.duty_cycle_ms for a in g.models if a.duty_cycle_ms > 0})


def incremental(ctx: Ctx, previous: Plan, algorithm: Callable[[Ctx, int | None], list[Gpu]],
                limit: int | None) -> list[Gpu] | None:
    """The previous plan's GPUs with only the changed models re-planned (module doc), or None when
    nothing of it can be kept or the result does not fit ``limit`` GPUs."""
    same = _unchanged(ctx, previous)
    gpus = [Gpu() for _ in range(previous.gpus)]
    kept = False
    for g in previous.gpulets:
        let = _kept_let(ctx, g, same)
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
