"""Temporal sharing only, on whole GPUs (Nexus' squishy bin packing): each model gets as many
saturated full GPUs as its rate fills, and the residues are packed first-fit-decreasing (by the GPU
time they occupy) onto GPUs that serve several models with a common duty cycle.

A baseline, and one of the plans the gpu-let heuristic's portfolio tries (so it lives apart from
both)."""

from __future__ import annotations

from .core import EPS, Ctx, Gpu, Let, SchedulingError, schedule, try_gpu


def temporal(ctx: Ctx, max_gpus: int | None = None, *, max_models: int | None = None) -> list[Gpu]:
    """Nexus-style squishy bin packing on whole GPUs (any number of models per GPU,
    unless the context's max_models is 1, which turns temporal sharing off everywhere)."""
    full = 100 if 100 in ctx.shares else max(ctx.shares)
    old = ctx.max_models
    ctx.max_models = max_models or (max(old, len(ctx.models)) if old > 1 else 1)
    try:
        gpus: list[Gpu] = []
        residues: list[tuple[float, str, float]] = []
        for m in ctx.models:
            r = ctx.rates[m]
            if r <= EPS:
                continue
            c, _ = ctx.cap(m, full)
            if c <= 0:
                raise SchedulingError(f"model {m!r}: no batch meets its SLO on a whole GPU")
            n = int(r // c) if r > c * (1 + 1e-9) else 0
            for _ in range(n):
                g = Gpu()
                got = try_gpu(ctx, g, [Let(full, {m: c})])
                if got is None:  # pragma: no cover - a saturated let alone always fits
                    raise SchedulingError(f"model {m!r}: saturated GPU infeasible")
                g.lets = got
                gpus.append(g)
            rem = r - n * c
            if rem > 1e-6:
                sch = schedule(ctx, full, {m: rem})
                if sch is None:
                    raise SchedulingError(f"model {m!r}: residue {rem:.1f} req/s infeasible on a whole GPU")
                d, bs = sch
                occ = ctx.lat(m, full, bs[m]) / d
                residues.append((occ, m, rem))
        for _, m, rem in sorted(residues, key=lambda x: (-x[0], x[1])):
            placed = False
            for g in gpus:
                if len(g.lets) != 1 or m in g.lets[0].rates or len(g.lets[0].rates) >= ctx.max_models:
                    continue
                cand = Let(full, {**g.lets[0].rates, m: rem})
                got = try_gpu(ctx, g, [cand], replace=0)
                if got is not None:
                    g.lets = got
                    placed = True
                    break
            if not placed:
                g = Gpu()
                got = try_gpu(ctx, g, [Let(full, {m: rem})])
                if got is None:
                    raise SchedulingError(f"model {m!r}: residue does not fit a whole GPU (memory?)")
                g.lets = got
                gpus.append(g)
        if max_gpus is not None and len(gpus) > max_gpus:
            raise SchedulingError(f"temporal-only sharing needs {len(gpus)} GPUs, only {max_gpus} available")
        return gpus
    finally:
        ctx.max_models = old
