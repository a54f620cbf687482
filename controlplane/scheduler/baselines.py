"""Baselines behind the same interface as the gpu-let heuristic.

* :func:`temporal` (in :mod:`.temporal`, which the heuristic also runs) — temporal
  sharing only, whole GPUs.
* :func:`greedy` — greedy spatial partitioning without temporal sharing: each
  model takes the smallest share that carries its whole rate (else full GPUs),
  best-fit onto GPUs, one model per gpu-let.
* :func:`ideal_prototype` — the exact optimum over per-GPU configurations (the space the
  prototype searched exhaustively: a GPU is whole or split into two shares
  a + b <= 100, each gpu-let serving one model at its saturated batch, with
  interference between the two halves). An integer program,
  ``min sum x_c`` s.t. ``sum_c cap[c, m] x_c >= rate_m``, solved by HiGHS through
  ``scipy.optimize.milp``. Capacities do not depend on rates, so the columns
  are computed once per context (:class:`MilpColumns`) and reused across mixes.
  Temporal sharing is outside this space, so the heuristic can beat it on light
  loads; the benchmark reports both directions.
* :func:`trivial` — each model alone on its own whole GPU (a smoke-test plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .core import EPS, Ctx, Gpu, Let, SchedulingError, memory_ok, settle
from .gpulet import gpulet


def greedy(ctx: Ctx, max_gpus: int | None = None) -> list[Gpu]:
    """Spatial partitioning without temporal sharing (one model per gpu-let)."""
    return gpulet(ctx, max_gpus, orders=["rate_slo"], temporal=False, share_policy="smallest")


def trivial(ctx: Ctx, max_gpus: int | None = None) -> list[Gpu]:
    """Each model on its own 100 % gpu-let at its max batch (ModelSpec.max_batch) or 1; no checks."""
    gpus = []
    for m in ctx.models:
        b = ctx.trivial_batch.get(m, 1)
        try:
            d = ctx.lat(m, 100, b)
        except Exception:  # no profile: still a runnable plan
            d = 0.0
        gpus.append(Gpu([Let(100, {m: ctx.rates[m]}, d, {m: b}, {m: 1.0})]))
    return gpus


# --------------------------------------------------------------------------- MILP


def _pairs(shares: list[int]) -> list[tuple[int, int]]:
    """Maximal splits a + b <= 100 (a >= b) from the allowed shares."""
    out = []
    for a in shares:
        for b in shares:
            if b > a or a + b > 100:
                continue
            if any(c > b and a + c <= 100 for c in shares if c <= a):
                continue  # a bigger second share fits: this split is dominated
            out.append((a, b))
    return out


@dataclass
class MilpColumns:
    """Per-GPU configurations and their capacities: each is a list of (model, share, cap)."""

    configs: list[list[tuple[str, int, float]]]


def milp_columns(ctx: Ctx, models: list[str] | None = None) -> MilpColumns:
    models = models or list(ctx.models)
    full = max(ctx.shares)
    configs: list[list[tuple[str, int, float]]] = []
    for m in models:
        c, _ = ctx.cap(m, full)
        if c > 0 and memory_ok(ctx, [Let(full, {m: c})]):
            configs.append([(m, full, c)])
    if ctx.max_lets_per_gpu >= 2:
        for a, b in _pairs(ctx.shares):
            for i, m1 in enumerate(models):
                for j, m2 in enumerate(models):
                    if a == b and j < i:
                        continue
                    c1, _ = ctx.cap(m1, a)
                    c2, _ = ctx.cap(m2, b)
                    if c1 <= 0 or c2 <= 0:
                        continue
                    caps = _pair_caps(ctx, m1, a, c1, m2, b, c2)
                    if caps is not None:
                        configs.append([(m1, a, caps[0]), (m2, b, caps[1])])
    return MilpColumns(configs)


def _pair_caps(ctx: Ctx, m1: str, a: int, c1: float, m2: str, b: int, c2: float) -> tuple[float, float] | None:
    """Capacities of two saturated gpu-lets on one GPU under interference (shrinking until it holds)."""
    for f in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        lets = [Let(a, {m1: c1 * f}), Let(b, {m2: c2 * f})]
        if not memory_ok(ctx, lets):
            return None
        if settle(ctx, lets) is not None:
            return c1 * f, c2 * f
    return None


def solve_milp(ctx: Ctx, cols: MilpColumns, max_gpus: int | None = None, time_limit: float = 30.0
               ) -> list[tuple[list[tuple[str, int, float]], int]]:
    """Solve the covering integer program; returns (config, count) pairs."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    need = [m for m in ctx.models if ctx.rates[m] > EPS]
    if not need:
        return []
    row = {m: i for i, m in enumerate(need)}
    useful = [c for c in cols.configs if any(m in row for m, _, _ in c)]
    if not useful:
        raise SchedulingError("no GPU configuration can serve these models")
    A = np.zeros((len(need), len(useful)))
    for j, cfg in enumerate(useful):
        for m, _, cap in cfg:
            if m in row:
                A[row[m], j] += cap
    rates = np.array([ctx.rates[m] for m in need])
    cons = [LinearConstraint(A, lb=rates, ub=np.inf)]
    if max_gpus is not None:
        cons.append(LinearConstraint(np.ones((1, len(useful))), lb=0, ub=max_gpus))
    ub = np.array([math.ceil(max(rates) / max(min(A[:, j][A[:, j] > 0]), 1e-9)) + 1 for j in range(len(useful))], dtype=float)
    res = milp(c=np.ones(len(useful)), constraints=cons, integrality=np.ones(len(useful)),
               bounds=Bounds(0, ub), options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        lim = f" within {max_gpus} GPU(s)" if max_gpus is not None else ""
        raise SchedulingError(f"no feasible set of GPU configurations{lim} ({res.message})")
    x = np.round(res.x).astype(int)
    return [(useful[j], int(x[j])) for j in range(len(useful)) if x[j] > 0]


def ideal_prototype(ctx: Ctx, max_gpus: int | None = None, *, cols: MilpColumns | None = None) -> list[Gpu]:
    """Exact optimum over per-GPU configurations, turned into a schedulable plan."""
    cols = cols or milp_columns(ctx, [m for m in ctx.models if ctx.rates[m] > EPS])
    sol = solve_milp(ctx, cols, max_gpus)
    total = {m: 0.0 for m in ctx.models}
    for cfg, n in sol:
        for m, _, cap in cfg:
            total[m] += cap * n
    gpus: list[Gpu] = []
    for cfg, n in sol:
        for _ in range(n):
            lets = []
            for m, s, cap in cfg:
                r = ctx.rates[m] * cap / total[m] if ctx.rates[m] > EPS else 0.0
                if r > EPS:
                    lets.append(Let(s, {m: r}))
            if not lets:
                continue
            got = settle(ctx, lets)
            if got is None:  # pragma: no cover - assigned rates never exceed capacities
                raise SchedulingError("internal: MILP configuration infeasible after rate split")
            gpus.append(Gpu(got))
    return gpus


def best(ctx: Ctx, max_gpus: int | None = None, *, time_limit: float = 5.0) -> list[Gpu]:
    """The gpu-let heuristic refined by the exact optimum (:func:`.optimum.optimum`): the
    heuristic's plan is the upper bound; the LP bound often proves it optimal at once,
    otherwise an integer program (HiGHS, at most ``time_limit`` s) looks for a plan with
    fewer GPUs. When the optimum is beyond its limits (many models at high rates with
    interference: too many GPU configurations) the prototype's fixed-split integer program
    (:func:`ideal_prototype`, saturated single-model gpu-lets in pairs, interference applied) is tried
    too and the plan with fewer GPUs wins: at scale it can beat the heuristic.

    When to use which: ``gpulet`` is the default (milliseconds, optimal on the benchmark
    mixes); ``best`` when a GPU saved matters more than a few seconds of planning (large
    deployments with interference); ``ideal`` to insist on the proven optimum (it raises
    OptimumTooLarge instead of falling back)."""
    from .optimum import OptimumTooLarge, optimum

    try:
        upper = gpulet(ctx, max_gpus)
    except SchedulingError:
        upper = None
    try:
        return optimum(ctx, max_gpus, upper=upper, time_limit=time_limit)
    except OptimumTooLarge:
        pass
    plans = [upper] if upper is not None else []
    try:
        plans.append(ideal_prototype(ctx, max_gpus))
    except SchedulingError:
        pass
    if not plans:
        raise SchedulingError("best: neither the heuristic nor the fixed-split program found a plan"
                              + (f" within {max_gpus} GPU(s)" if max_gpus is not None else ""))
    return min(plans, key=len)
