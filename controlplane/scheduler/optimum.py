"""The exact optimum ("ideal") of the planning problem the gpu-let heuristic solves.

Problem (the same one :mod:`.gpulet` attacks): GPUs hold at most
``max_lets_per_gpu`` gpu-lets whose shares (from ``ctx.shares``) sum to <= 100;
a gpu-let serves up to ``max_models`` models by temporal sharing with the
common duty-cycle rule of :mod:`.core` (``sum L_i <= D``, ``D + L_i <= SLO_i``,
``1000 b_i / D >= r_i``, latencies = profile x margin [x slowdown]); a model's
rate may be split over any number of gpu-lets. Minimise the number of GPUs.

Column formulation (exact):

* A **let column** is (share ``s``, model subset ``S``, batches ``b``). With the
  duty cycle at its least, ``D = sum_i L_i(s, b_i)``, model ``i`` gets
  ``t_i = 1000 b_i / D``; the column exists iff ``D + L_i <= SLO_i`` for all
  ``i``. Any feasible gpu-let (rates, batches, a longer duty cycle) is dominated
  by the column of its batches, so nothing is lost.
* Only ``min(t_i, r_i)`` matters for a given mix (capping), so columns are
  pruned per mix: a column whose model ``i`` already reaches ``r_i`` with
  ``b_i - 1`` is dominated (smaller batch: shorter cycle for every other model,
  same capped throughput for ``i``), duplicates go, and what is left is
  filtered for Pareto dominance (also across subsets, and a column on a smaller
  share dominates one on a bigger share, since a gpu-let may leave share idle).
* **Without interference** (and when memory cannot bind) GPUs only matter
  through their splits: integer ``y_p`` per split pattern ``p`` (a multiset of
  shares, sum <= 100), integer ``x_c`` per let column, and the nested
  slot constraints ``#columns with share >= s <= #slots with share >= s`` for
  every share level ``s`` (Hall's condition for "a column fits a slot at least
  as big"). ``min sum y`` s.t. ``sum_c x_c min(t_c, r) >= r``.
* **With interference** (or when the memory check may bind) the slowdowns and
  memory depend on what shares the GPU, so the columns are whole **GPU
  configurations**: one let column, or two whose shares fit (interference
  applied to both, as in :func:`.core.slowdowns`; memory checked). This is
  quadratic in the number of let columns; above ``max_pairs`` it raises
  :class:`OptimumTooLarge`. (Pruning by dominance assumes a smaller batch
  never disturbs its neighbour more, which holds for the paper's utilisation
  tables up to their noise.)

All rates-independent work (latency tables, the feasible batch grid of every
(share, subset)) is cached per profile/SLO/share setting (:func:`column_cache`),
so sweeping thousands of mixes solves only small integer programs
(``scipy.optimize.milp``, i.e. HiGHS).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .core import EPS, Ctx, Gpu, Let, SchedulingError, memory_ok, settle
from ..interference import NoInterference


class OptimumTooLarge(SchedulingError):
    """The exact optimum is too large to compute within the configured limits."""


# --------------------------------------------------------------------------- rates-independent cache


@dataclass
class _Grid:
    """Batch grid of one (share, subset) as a dense cube over each model's candidate batches
    (those with ``2 L(b) + others' fastest L <= SLO``, ascending): latencies per axis, the duty
    cycle ``D`` of every cell and whether the cell is feasible."""

    bat: list[np.ndarray]   # per axis: candidate batches (1-based), ascending
    lat: list[np.ndarray]   # per axis: their latencies
    prev: list[np.ndarray]  # per axis: latency of the previous candidate batch (inf for none)
    pbat: list[np.ndarray]  # per axis: the previous candidate batch (0 for none)
    D: np.ndarray           # cube
    ok: np.ndarray          # cube, bool
    dmax: float


@dataclass
class ColumnCache:
    ctx_key: tuple
    lat: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    grids: dict[tuple[int, tuple[str, ...]], _Grid | None] = field(default_factory=dict)


_CACHES: dict[tuple, ColumnCache] = {}


def _ctx_key(ctx: Ctx) -> tuple:
    return (id(ctx.profiles), ctx.profiles.device, ctx.margin, ctx.pct, tuple(ctx.shares),
            tuple(sorted(ctx.slos.items())), tuple(sorted(ctx.max_batch.items())))


def column_cache(ctx: Ctx) -> ColumnCache:
    """The cache of rates-independent column data for this profile/SLOs/shares/margin."""
    key = _ctx_key(ctx)
    c = _CACHES.get(key)
    if c is None:
        if len(_CACHES) > 64:
            _CACHES.clear()
        c = _CACHES[key] = ColumnCache(key)
    return c


def _lat(ctx: Ctx, cache: ColumnCache, m: str, s: int) -> np.ndarray:
    v = cache.lat.get((m, s))
    if v is None:
        v = np.array([ctx.lat(m, s, b) for b in range(1, ctx.max_batch[m] + 1)])
        cache.lat[(m, s)] = v
    return v


def _grid(ctx: Ctx, cache: ColumnCache, s: int, S: tuple[str, ...]) -> _Grid | None:
    key = (s, S)
    if key in cache.grids:
        return cache.grids[key]
    lats = [_lat(ctx, cache, m, s) for m in S]
    slo = np.array([ctx.slos[m] for m in S])
    # Measured profiles need not be monotone in batch (e.g. a slow batch 1 on a small share). A batch
    # with a larger batch that is no slower is dominated (more throughput, shorter cycle for everyone),
    # so each axis keeps only the batches faster than every larger one: along it latency increases.
    mono = []
    for x in lats:
        suffix = np.minimum.accumulate(x[::-1])[::-1]
        nxt = np.append(suffix[1:], np.inf)
        mono.append(np.nonzero(x < nxt)[0])
    # a model's own batch must satisfy 2 L <= SLO (D >= L), and the others' fastest batches add
    base = sum(float(x[c].min()) for x, c in zip(lats, mono))
    cand, prevb = [], []
    for x, c, m in zip(lats, mono, S):
        others = base - float(x[c].min())
        ok = 2 * x[c] + others <= ctx.slos[m] + 1e-7
        # every other model's SLO also bounds this latency: L_j(1) + D <= SLO_j
        cand.append(c[ok])
        prevb.append(np.concatenate([[-1], c[:-1]])[ok])  # previous undominated batch (0-based), -1: none
    if any(len(c) == 0 for c in cand):
        cache.grids[key] = None
        return None
    k = len(S)
    lat_ax = [lats[i][cand[i]] for i in range(k)]
    prev_ax = [np.where(prevb[i] >= 0, lats[i][np.maximum(prevb[i], 0)], np.inf) for i in range(k)]
    pbat_ax = [prevb[i] + 1 for i in range(k)]  # its batch (1-based), 0: none
    shape = [len(c) for c in cand]
    D = np.zeros(shape)
    for i in range(k):
        D = D + lat_ax[i].reshape([-1 if j == i else 1 for j in range(k)])
    ok = np.ones(shape, dtype=bool)
    for i in range(k):
        ok &= D + lat_ax[i].reshape([-1 if j == i else 1 for j in range(k)]) <= slo[i] + 1e-7
    if not ok.any():
        cache.grids[key] = None
        return None
    g = _Grid([c + 1 for c in cand], lat_ax, prev_ax, pbat_ax, D, ok, float(D[ok].max()))
    cache.grids[key] = g
    return g


# --------------------------------------------------------------------------- per-mix columns


@dataclass
class Columns:
    """Let columns for one mix: share, models, batches, duty, capped throughput over ``active``."""

    active: list[str]
    share: np.ndarray          # (n,)
    cap: np.ndarray            # (n, len(active)) capped throughput
    blk: np.ndarray            # (n,) index into blocks
    row: np.ndarray            # (n,) row in that block's batches
    duty: np.ndarray           # (n,)
    blocks: list[tuple[tuple[str, ...], np.ndarray]] = field(default_factory=list)  # (subset, batches)

    def subset(self, j: int) -> tuple[str, ...]:
        return self.blocks[self.blk[j]][0]

    def batches(self, j: int) -> tuple[int, ...]:
        return tuple(int(x) for x in self.blocks[self.blk[j]][1][self.row[j]])

    def take(self, idx: np.ndarray) -> "Columns":
        return Columns(self.active, self.share[idx], self.cap[idx], self.blk[idx], self.row[idx], self.duty[idx],
                       self.blocks)


def _pareto(P: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Indices of the rows of P not dominated by another row (>= everywhere, > somewhere;
    exact duplicates keep their first). Rows are sorted by sum, descending."""
    n = len(P)
    if n <= 1:
        return np.arange(n)
    order = np.argsort(-P.sum(1), kind="stable")
    Q = P[order]
    keep = np.ones(n, dtype=bool)
    tol = 1e-9
    idx = np.arange(n)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        blk = Q[lo:hi]
        cand_idx = np.nonzero(keep[:hi])[0]
        C = Q[cand_idx]
        ge = np.all(C[None, :, :] >= blk[:, None, :] - tol, axis=2)
        gt = np.any(C[None, :, :] > blk[:, None, :] + tol, axis=2)
        earlier = cand_idx[None, :] < idx[lo:hi, None]
        keep[lo:hi] &= ~np.any(ge & (gt | earlier), axis=1)
    return order[keep]


def mix_columns(ctx: Ctx, *, pareto: bool = True) -> Columns:
    """All undominated let columns for the current rates (see module doc)."""
    cache = column_cache(ctx)
    active = [m for m in ctx.models if ctx.rates[m] > EPS]
    pos = {m: i for i, m in enumerate(active)}
    rates = np.array([ctx.rates[m] for m in active])
    shares_l, caps_l, blk_l, row_l, duty_l, blocks = [], [], [], [], [], []
    for s in ctx.shares:
        for k in range(1, min(ctx.max_models, len(active)) + 1):
            for S in itertools.combinations(active, k):
                g = _grid(ctx, cache, s, S)
                if g is None:
                    continue
                R = rates[[pos[m] for m in S]]
                # no batch beyond the first that reaches the rate at the longest duty cycle can help
                lim = [int(np.searchsorted(g.bat[i], math.ceil(R[i] * g.dmax / 1000.0 - 1e-9), side="left")) + 2
                       for i in range(k)]
                sl = tuple(slice(0, max(1, x)) for x in lim)
                okc = g.ok[sl]
                if not okc.any():
                    continue
                nz = np.nonzero(okc)
                Dk0 = g.D[sl][nz]
                B = np.stack([g.bat[i][nz[i]] for i in range(k)], 1)
                lat = np.stack([g.lat[i][nz[i]] for i in range(k)], 1)
                prv = np.stack([g.prev[i][nz[i]] for i in range(k)], 1)
                pb = np.stack([g.pbat[i][nz[i]] for i in range(k)], 1)
                thr = 1000.0 * B / Dk0[:, None]
                # boundary rule: drop if some model already reaches its rate with its previous
                # (smaller and faster) candidate batch
                with np.errstate(invalid="ignore"):
                    thr_prev = np.nan_to_num(1000.0 * pb / (Dk0[:, None] - lat + prv))
                keep = ~np.any(thr_prev >= R[None, :] * (1 - 1e-12), axis=1)
                if not keep.any():
                    continue
                cap = np.minimum(thr[keep], R[None, :])
                # duplicates of the capped vector: keep the shortest duty cycle
                Dk = Dk0[keep]
                Bk = B[keep]
                o = np.lexsort((Dk,) + tuple(np.round(cap[:, i], 9) for i in range(k - 1, -1, -1)))
                cap, Dk, Bk = cap[o], Dk[o], Bk[o]
                _, first = np.unique(np.round(cap, 9), axis=0, return_index=True)
                cap, Dk, Bk = cap[first], Dk[first], Bk[first]
                if pareto and len(cap) > 1:
                    sel = _pareto(cap)
                    cap, Dk, Bk = cap[sel], Dk[sel], Bk[sel]
                full = np.zeros((len(cap), len(active)))
                full[:, [pos[m] for m in S]] = cap
                caps_l.append(full)
                shares_l.append(np.full(len(cap), s))
                duty_l.append(Dk)
                blk_l.append(np.full(len(cap), len(blocks)))
                row_l.append(np.arange(len(cap)))
                blocks.append((S, Bk))
    if not caps_l:
        z = np.zeros(0, dtype=int)
        return Columns(active, z, np.zeros((0, len(active))), z, z, np.zeros(0), [])
    cols = Columns(active, np.concatenate(shares_l), np.vstack(caps_l), np.concatenate(blk_l),
                   np.concatenate(row_l), np.concatenate(duty_l), blocks)
    if pareto and len(cols.share) > 1:
        # across subsets and shares: a smaller share dominates (slot nesting), so add -share as a criterion
        P = np.hstack([cols.cap, -cols.share[:, None].astype(float)])
        cols = cols.take(np.sort(_pareto(P)))
    return cols


# --------------------------------------------------------------------------- split patterns


def split_patterns(shares: list[int], max_lets: int) -> list[tuple[int, ...]]:
    """Undominated multisets of shares (sizes 1..max_lets, sum <= 100), largest first."""
    pats = set()
    for k in range(1, max_lets + 1):
        for p in itertools.combinations_with_replacement(sorted(shares, reverse=True), k):
            if sum(p) <= 100:
                pats.add(tuple(sorted(p, reverse=True)))
    pats_l = sorted(pats)

    def dominated(p: tuple[int, ...], q: tuple[int, ...]) -> bool:
        # q can host every gpu-let p can: as many slots, each at least as big (sorted)
        return p != q and len(q) >= len(p) and all(q[i] >= p[i] for i in range(len(p)))

    return [p for p in pats_l if not any(dominated(p, q) for q in pats_l)]


# --------------------------------------------------------------------------- solving


def _needs_pairs(ctx: Ctx, active: list[str]) -> bool:
    if not isinstance(ctx.interference, NoInterference) and ctx.max_lets_per_gpu > 1:
        return True
    total = ctx.profiles.memory_mb_total
    if not ctx.memory_check or not total:
        return False
    mems = sorted((ctx.memory(m) for m in active), reverse=True)
    return sum(mems[: ctx.max_lets_per_gpu * ctx.max_models]) > total


def _solve(c: np.ndarray, A_cov: np.ndarray, rates: np.ndarray, extra: list, ub: np.ndarray,
           time_limit: float) -> np.ndarray | None:
    from scipy.optimize import Bounds, LinearConstraint, milp

    cons = [LinearConstraint(A_cov, lb=rates * (1 - 1e-9), ub=np.inf)] + extra
    res = milp(c=c, constraints=cons, integrality=np.ones(len(c)), bounds=Bounds(0, ub),
               options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return None
    if res.status == 1:  # time limit with a solution: not proven optimal
        raise OptimumTooLarge(f"exact optimum not proven within {time_limit:g} s ({res.message})")
    return np.round(res.x).astype(int)


@dataclass
class _Model:
    """The split-pattern integer program of one mix (no interference), as arrays."""

    n: int
    pats: list[tuple[int, ...]]
    c: np.ndarray
    A_cov: np.ndarray
    A_nest: np.ndarray


def _model(ctx: Ctx, cols: Columns) -> _Model:
    pats = split_patterns(ctx.shares, ctx.max_lets_per_gpu)
    n, P = len(cols.share), len(pats)
    levels = sorted(set(ctx.shares))
    A_cov = np.hstack([cols.cap.T, np.zeros((len(cols.active), P))])
    A_nest = np.zeros((len(levels), n + P))
    for li, s in enumerate(levels):
        A_nest[li, :n] = cols.share >= s
        A_nest[li, n:] = [-sum(1 for x in p if x >= s) for p in pats]
    return _Model(n, pats, np.concatenate([np.zeros(n), np.ones(P)]), A_cov, A_nest)


def _lp_bound(mod: _Model, rates: np.ndarray, batch: int = 400) -> tuple[float, np.ndarray]:
    """LP relaxation by column generation: its value (a lower bound on GPUs) and the reduced
    costs of all let columns under the final (optimal, so dual-feasible) duals.

    The restricted LP starts from the single-model columns and the columns covering their
    whole subset; each round prices every column in one matrix product and adds the most
    negative ones, until none is left."""
    from scipy.optimize import linprog

    n = mod.n
    P = len(mod.pats)
    cov = mod.A_cov[:, :n]          # (models, n)
    nest = mod.A_nest[:, :n]        # (levels, n)
    full = np.all((cov >= rates[:, None] * (1 - 1e-9)) | (cov == 0), axis=0)
    single = (cov > 0).sum(0) == 1
    inl = np.zeros(n, dtype=bool)
    inl[np.nonzero(full | single)[0]] = True
    if inl.sum() > 4 * batch:  # keep the start small: the best columns per model
        inl[:] = False
        for i in range(len(rates)):
            inl[np.argsort(-cov[i])[:batch // 2]] = True
    for _ in range(200):
        idx = np.nonzero(inl)[0]
        A = np.vstack([np.hstack([-cov[:, idx], -mod.A_cov[:, n:]]), np.hstack([nest[:, idx], mod.A_nest[:, n:]])])
        b = np.concatenate([-rates * (1 - 1e-9), np.zeros(len(nest))])
        c = np.concatenate([np.zeros(len(idx)), np.ones(P)])
        r = linprog(c, A_ub=A, b_ub=b, bounds=(0, None), method="highs")
        if r.status != 0:
            raise SchedulingError(f"ideal: LP relaxation failed ({r.message})")
        mu = np.asarray(r.ineqlin.marginals)  # <= 0
        rc = mu[: len(rates)] @ cov - mu[len(rates):] @ nest
        neg = np.nonzero((rc < -1e-9) & ~inl)[0]
        if len(neg) == 0:
            return float(r.fun), np.maximum(rc, 0.0)
        inl[neg[np.argsort(rc[neg])[:batch]]] = True
    raise SchedulingError("ideal: LP column generation did not converge")  # pragma: no cover


@dataclass
class OptimumInfo:
    """How :func:`optimum` decided: the LP bound, columns generated and kept, and the method."""

    gpus: int = 0
    lp_bound: float = 0.0
    columns: int = 0
    kept: int = 0
    method: str = ""   # "lp-bound" (heuristic proven optimal by the LP bound), "milp", "milp-pairs"


def optimum(ctx: Ctx, max_gpus: int | None = None, *, upper: list[Gpu] | None = None, time_limit: float = 20.0,
            max_pairs: int = 400_000, max_columns: int = 5000, info: OptimumInfo | None = None) -> list[Gpu]:
    """The fewest-GPU plan of the planning problem (see module doc), as GPUs with lets.

    ``upper``: a known feasible plan (e.g. the heuristic's). When the LP bound
    proves it optimal it is returned as is; otherwise only a plan with fewer
    GPUs is searched for, and every let column whose LP reduced cost exceeds
    ``len(upper) - 1 - LP`` is dropped first (it cannot be in such a plan).
    Raises SchedulingError when no plan fits ``max_gpus``, OptimumTooLarge
    when the instance is beyond the limits."""
    info = info if info is not None else OptimumInfo()
    cols = mix_columns(ctx, pareto=False)
    active = cols.active
    if not active:
        return []
    rates = np.array([ctx.rates[m] for m in active])
    covered = cols.cap.sum(0) if len(cols.cap) else np.zeros(len(active))
    for i, m in enumerate(active):
        if covered[i] <= 0:
            raise SchedulingError(f"model {m!r}: no gpu-let can serve it within its SLO")
    if upper is not None and max_gpus is not None and len(upper) > max_gpus:
        upper = None
    if upper is not None and len(upper) <= 1:
        info.gpus, info.method = len(upper), "trivial"
        return upper
    mod = _model(ctx, cols)
    lp, rc = _lp_bound(mod, rates)
    info.lp_bound, info.columns = lp, mod.n
    need = math.ceil(lp - 1e-6)
    if upper is not None and need >= len(upper):
        info.gpus, info.kept, info.method = len(upper), 0, "lp-bound"
        return upper
    target = len(upper) - 1 if upper is not None else max_gpus
    if max_gpus is not None and target is not None:
        target = min(target, max_gpus)
    if target is not None and need > target:
        if upper is not None:
            info.gpus, info.method = len(upper), "lp-bound"
            return upper
        raise SchedulingError(f"ideal: no plan exists within {target} GPU(s) (LP bound {lp:.3f})")
    keep = np.arange(mod.n) if target is None else np.nonzero(rc <= target - lp + 1e-6)[0]
    info.kept = len(keep)
    if len(keep) > max_columns:
        raise OptimumTooLarge(f"exact optimum: {len(keep)} let columns left after LP reduced-cost fixing "
                              f"(limit {max_columns}; LP bound {lp:.3f})")
    sub = cols.take(keep)
    if _needs_pairs(ctx, active):
        info.method = "milp-pairs"
        got = _optimum_pairs(ctx, sub, rates, target, time_limit, max_pairs)
    else:
        info.method = "milp"
        got = _optimum_patterns(ctx, sub, rates, target, time_limit)
    if got is None:
        if upper is not None:
            info.gpus = len(upper)
            return upper
        raise SchedulingError(f"ideal: no plan exists within {target} GPU(s)")
    info.gpus = len(got)
    return got


def _optimum_patterns(ctx: Ctx, cols: Columns, rates: np.ndarray, bound: int | None,
                      time_limit: float) -> list[Gpu] | None:
    from scipy.optimize import LinearConstraint

    if len(cols.share) == 0:
        return None
    mod = _model(ctx, cols)
    n, pats, P = mod.n, mod.pats, len(mod.pats)
    if np.any(mod.A_cov.sum(1) < rates * (1 - 1e-9)):
        return None  # pruned columns cannot cover some model: nothing better than the bound
    extra = [LinearConstraint(mod.A_nest, lb=-np.inf, ub=0)]
    if bound is not None:
        extra.append(LinearConstraint(mod.c[None, :], lb=0, ub=bound))
    with np.errstate(divide="ignore"):
        need = np.where(cols.cap > 0, np.ceil(rates[None, :] / np.maximum(cols.cap, 1e-12) - 1e-9), np.inf).min(1)
    big = bound if bound is not None else int(sum(need.clip(max=1e6)) + 1)
    ub = np.concatenate([np.minimum(need, big * ctx.max_lets_per_gpu), np.full(P, big)]).astype(float)
    x = _solve(mod.c, mod.A_cov, rates, extra, ub, time_limit)
    if x is None:
        return None
    # slots (largest first) and columns (largest share first): the k-th column goes to the k-th slot
    gpu_pats = [p for j, p in enumerate(pats) for _ in range(x[n + j])]
    slots = sorted(((s, g) for g, p in enumerate(gpu_pats) for s in p), key=lambda t: -t[0])
    chosen = sorted((j for j in range(n) for _ in range(x[j])), key=lambda j: -cols.share[j])
    gpus_lets: dict[int, list[int]] = {}
    for k, j in enumerate(chosen):
        gpus_lets.setdefault(slots[k][1], []).append(j)
    return _materialise(ctx, cols, rates, [gpus_lets[g] for g in sorted(gpus_lets)], None)


def _materialise(ctx: Ctx, cols: Columns, rates: np.ndarray, gpus: list[list[int]],
                 slow: list[list[dict[str, float]]] | None) -> list[Gpu]:
    """Turn chosen columns into GPUs: each model's rate is split over its columns in proportion
    to their capped throughput; each GPU is rescheduled (shortest duty cycle) when that holds,
    else keeps the column's own schedule."""
    pos = {m: i for i, m in enumerate(cols.active)}
    total = np.zeros(len(cols.active))
    for js in gpus:
        for j in js:
            total += cols.cap[j]
    out = []
    for gi, js in enumerate(gpus):
        lets, fixed = [], []
        for li, j in enumerate(js):
            S = cols.subset(j)
            r = {m: float(rates[pos[m]] * cols.cap[j, pos[m]] / total[pos[m]]) for m in S}
            lets.append(Let(int(cols.share[j]), r))
            sl = slow[gi][li] if slow is not None else {m: 1.0 for m in S}
            b = dict(zip(S, cols.batches(j)))
            duty = sum(ctx.lat(m, int(cols.share[j]), b[m]) * sl[m] for m in S)
            fixed.append(Let(int(cols.share[j]), r, duty, b, dict(sl)))
        got = settle(ctx, lets)
        out.append(Gpu(got if got is not None else fixed))
    return out


def _slowed(ctx: Ctx, cols: Columns, j: int, k: int) -> tuple[np.ndarray, dict[str, float]] | None:
    """Capped throughput of let column j next to let column k (interference), or None."""
    S, B = cols.subset(j), cols.batches(j)
    s = int(cols.share[j])
    other = [(om, int(cols.share[k]), ob) for om, ob in zip(cols.subset(k), cols.batches(k))]
    im = ctx.interference
    sl, lat = {}, []
    for m, b in zip(S, B):
        chosen = max(other, key=lambda o: im.slowdown(m, s, b, [o]))
        f = max(1.0, im.slowdown(m, s, b, [chosen]))
        sl[m] = f
        lat.append(ctx.lat(m, s, b) * f)
    D = sum(lat)
    if any(D + L > ctx.slos[m] + 1e-7 for m, L in zip(S, lat)):
        return None
    v = np.zeros(len(cols.active))
    pos = {m: i for i, m in enumerate(cols.active)}
    for m, b in zip(S, B):
        v[pos[m]] = min(1000.0 * b / D, ctx.rates[m])
    return v, sl


def _optimum_pairs(ctx: Ctx, cols: Columns, rates: np.ndarray, bound: int | None,
                   time_limit: float, max_pairs: int) -> list[Gpu] | None:
    n = len(cols.share)
    if ctx.max_lets_per_gpu > 2:
        raise OptimumTooLarge("exact optimum with interference/memory: at most 2 gpu-lets per GPU supported")
    order = np.argsort(cols.share)
    npairs = sum(int(np.sum(cols.share[order[i + 1:]] + cols.share[order[i]] <= 100)) for i in range(n))
    if npairs > max_pairs:
        raise OptimumTooLarge(f"exact optimum: {npairs} GPU configurations (limit {max_pairs})")
    configs: list[tuple[list[int], np.ndarray, list[dict[str, float]]]] = []
    for j in range(n):
        if memory_ok(ctx, [Let(int(cols.share[j]), dict.fromkeys(cols.subset(j), 1.0))]):
            configs.append(([j], cols.cap[j].copy(), [{m: 1.0 for m in cols.subset(j)}]))
    for j in range(n):
        for k in range(j, n):
            if cols.share[j] + cols.share[k] > 100:
                continue
            lets = [Let(int(cols.share[j]), dict.fromkeys(cols.subset(j), 1.0)),
                    Let(int(cols.share[k]), dict.fromkeys(cols.subset(k), 1.0))]
            if not memory_ok(ctx, lets):
                continue
            a = _slowed(ctx, cols, j, k)
            if a is None:
                continue
            b = _slowed(ctx, cols, k, j)
            if b is None:
                continue
            configs.append(([j, k], np.minimum(a[0] + b[0], rates), [a[1], b[1]]))
    if not configs:
        return None
    V = np.array([c[1] for c in configs])
    sel = _pareto(V)
    configs = [configs[i] for i in sel]
    V = V[sel]
    from scipy.optimize import LinearConstraint

    extra = []
    if bound is not None:
        extra.append(LinearConstraint(np.ones((1, len(configs))), lb=0, ub=bound))
    with np.errstate(divide="ignore"):
        need = np.where(V > 0, np.ceil(rates[None, :] / np.maximum(V, 1e-12) - 1e-9), np.inf).min(1)
    ub = need if bound is None else np.minimum(need, bound)
    if np.any(V.sum(0) < rates * (1 - 1e-9)):
        return None
    x = _solve(np.ones(len(configs)), V.T, rates, extra, ub.astype(float), time_limit)
    if x is None:
        return None
    chosen = [configs[i] for i in range(len(configs)) for _ in range(x[i])]
    return _materialise_pairs(ctx, cols, rates, chosen)


def _materialise_pairs(ctx: Ctx, cols: Columns, rates: np.ndarray, chosen: list) -> list[Gpu]:
    pos = {m: i for i, m in enumerate(cols.active)}
    per_let = []  # (gpu index, column, capped vector under its neighbour, slowdowns)
    for gi, (js, _, sls) in enumerate(chosen):
        for li, j in enumerate(js):
            if len(js) == 2:
                v, _ = _slowed(ctx, cols, j, js[1 - li])  # type: ignore[misc]
            else:
                v = cols.cap[j]
            per_let.append((gi, j, v, sls[li]))
    total = np.zeros(len(cols.active))
    for _, _, v, _ in per_let:
        total += v
    out: list[Gpu] = [Gpu() for _ in chosen]
    for gi, j, v, sl in per_let:
        S = cols.subset(j)
        s = int(cols.share[j])
        r = {m: float(rates[pos[m]] * v[pos[m]] / total[pos[m]]) for m in S}
        b = dict(zip(S, cols.batches(j)))
        duty = sum(ctx.lat(m, s, b[m]) * sl[m] for m in S)
        out[gi].lets.append(Let(s, r, duty, b, dict(sl)))
    for g in out:
        got = settle(ctx, [Let(x.share, dict(x.rates)) for x in g.lets])
        if got is not None:
            g.lets = got
    return out


def ideal(ctx: Ctx, max_gpus: int | None = None) -> list[Gpu]:
    """Planner entry point: the exact optimum, using the heuristic's plan as an upper bound."""
    from .gpulet import gpulet

    try:
        upper = gpulet(ctx, max_gpus)
    except SchedulingError:
        upper = None
    return optimum(ctx, max_gpus, upper=upper)


__all__ = ["Columns", "OptimumInfo", "OptimumTooLarge", "column_cache", "ideal", "mix_columns", "optimum", "split_patterns"]
