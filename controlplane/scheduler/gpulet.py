"""The gpu-let elastic partitioning heuristic (ATC'22, "GPU-let"), with its quirks as options.

Per model, in order of rate x SLO (largest first: the hardest to place go first):

1. **Knee share**: the share with the most saturated throughput per percent
   of GPU (``cap(s)/s``); ties go to the smaller share.
2. **Saturated gpu-lets**: while the remaining rate is at least the knee share's
   capacity, place a gpu-let of that share at its saturated batch (the largest
   throughput with ``2 L(b) <= SLO``). *Elastic*: when no GPU has room for the
   knee share but some GPU has a smaller hole, the hole is filled with the
   largest share that fits (taking what that share can carry).
3. **Residue**: the rest goes first to an existing gpu-let by **temporal
   sharing** (common duty cycle, at most ``max_models`` models), choosing the
   smallest such gpu-let that stays feasible (this is the paper's residue merge);
   otherwise to a new gpu-let of the smallest share that can carry it
   (``L(b) + 1000 b / r <= SLO`` at the smallest feasible duty cycle).
4. **Placement**: best fit — the GPU with the least free share that can take
   the gpu-let *and* stays feasible under interference (every gpu-let on it is
   rescheduled with the predicted slowdowns, memory checked). If the new
   gpu-let cannot hold its rate next to its co-runners, the remedy is the
   paper's: shrink its batch (what the slowdown allows: the saturated capacity
   under interference) and re-place the lost throughput as residue. A new GPU
   is opened only when nothing else fits, which is how the plan auto-scales.

5. **Consolidation** (not in the paper; :func:`consolidate`): the pass above decides
   each model once, in order, and often leaves a lightly loaded last GPU. Repeatedly
   take one of the least-loaded GPUs and re-place what it carries on the others:
   temporal sharing into an existing gpu-let, a new gpu-let in free share, else an
   elastic **re-partitioning** of the target GPU (:func:`pack_gpu`: every two-way
   split of its models into gpu-lets, every share pair, under interference and
   memory); a model that fits nowhere whole is split over GPUs (bisection on the
   rate). A GPU is removed only when everything it carried is re-placed, so the
   pass never adds GPUs; its work is bounded (``effort``), not timed, so plans
   are deterministic.

``gpulet()`` runs a small portfolio — the paper order, the "smallest share
carrying the whole rate" policy and temporal-only packing (all gpu-let plans) —
and consolidates the best. On the measured H100 profile (no interference) this
matches the exact optimum on all 19,682 benchmark mixes (docs/benchmarks.md) and
plans 10 models on ~50 GPUs with interference in ~60 ms. Bookkeeping that keeps it fast:
identical GPUs are tried once per placement (signatures), a necessary occupancy
bound (``sum r * min_time <= 1000``) rejects full gpu-lets before any scheduling,
merges try at most ``merge_tries`` candidates, and settled GPUs, re-partitionings
and absorptions are memoised on the context.

Options (the prototype's quirks, made explicit):

* ``max_batch``: the prototype never picked batch 32 (its loops stopped at 31);
  here the deployment's ``max_batch`` (default 32) is reachable. Pass 31 to mimic.
* ``pairs_80_100``: irrelevant once shares are free-form: any two shares with a sum
  <= 100 may share a GPU (the prototype only tried fixed pairs and never 80 next to
  a 20 on a GPU it had opened with 100).
* rate padding to the Poisson 99th percentile is an explicit function
  (:func:`poisson_pad`), applied by ``plan(..., pad_rates=True)``, not hard-wired.
* ``orders``: the paper uses one order (rate x SLO); others (:data:`ORDERS`) can be
  added to the portfolio; giving ``orders`` explicitly turns the portfolio and the
  consolidation off unless asked for (``gpulet-paper`` is ``orders=["rate_slo"]``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

from .core import EPS, Ctx, Gpu, Let, SchedulingError, memory_ok, schedule, schedule_let, settle, try_gpu
from .temporal import temporal as temporal_only

Order = Callable[[Ctx], list[str]]


def order_rate_slo(ctx: Ctx) -> list[str]:
    return sorted(ctx.models, key=lambda m: (-ctx.rates[m] * ctx.slos[m], m))


def order_demand(ctx: Ctx) -> list[str]:
    """Largest GPU demand first (rate / knee capacity), like first-fit-decreasing."""
    def demand(m: str) -> float:
        best = max((ctx.cap(m, s)[0] / s for s in ctx.shares), default=0.0)
        return ctx.rates[m] / (best * 100) if best > 0 else math.inf
    return sorted(ctx.models, key=lambda m: (-demand(m), m))


def order_slo(ctx: Ctx) -> list[str]:
    return sorted(ctx.models, key=lambda m: (ctx.slos[m], -ctx.rates[m], m))


ORDERS: dict[str, Order] = {"rate_slo": order_rate_slo, "demand": order_demand, "slo": order_slo}
#: what ``gpulet`` runs when no orders are given (with the portfolio and consolidation): on the
#: H100 mixes the other orders add nothing once the consolidation pass runs, and each costs a run
DEFAULT_ORDERS = ("rate_slo",)


def knee_share(ctx: Ctx, m: str) -> int:
    best, bs = -1.0, ctx.shares[-1]
    for s in ctx.shares:
        c = ctx.cap(m, s)[0] / s
        if c > best * (1 + 1e-9):
            best, bs = c, s
    return bs


def _sig(gpu: Gpu) -> tuple:
    return tuple((x.share, tuple(x.rates.items())) for x in gpu.lets)


class _Planner:
    def __init__(self, ctx: Ctx, temporal: bool, max_gpus: int | None, share_policy: str = "knee") -> None:
        self.ctx = ctx
        self.temporal = temporal
        self.max_gpus = max_gpus
        self.share_policy = share_policy
        self.gpus: list[Gpu] = []
        self.pending: dict[str, float] = {}
        self.remedy = True
        self.merge_tries = 8

    # -- placement ---------------------------------------------------------------

    def _eff_share(self, gpu: Gpu, want: int, elastic: bool) -> int | None:
        """Share a new gpu-let gets on ``gpu``: the GPU's last slot takes all the free
        share (a bigger share is never slower); ``elastic`` lets a hole smaller than
        ``want`` be used at the largest share that fits."""
        ctx = self.ctx
        if len(gpu.lets) >= ctx.max_lets_per_gpu:
            return None
        fits = [x for x in ctx.shares if x <= gpu.free]
        if not fits:
            return None
        if len(gpu.lets) == ctx.max_lets_per_gpu - 1:
            eff = fits[-1]
            return eff if (eff >= want or elastic) else None
        if gpu.free >= want:
            return want
        return fits[-1] if elastic else None

    def _try(self, gpu: Gpu, m: str, share: int, rate: float) -> float:
        """Add (m, rate) on a new gpu-let of ``share`` to ``gpu``. On interference the
        paper's remedy: shrink what the gpu-lets carry (smaller batches, so less
        slowdown) and queue the throughput the co-located ones lose for re-placement.
        Returns the rate the new gpu-let carries (0: not placed)."""
        ctx = self.ctx
        for frac in (1.0, 0.85, 0.7, 0.5):
            got = try_gpu(ctx, gpu, [Let(share, {m: rate * frac})])
            if got is not None:
                gpu.lets = got
                return rate * frac
            if not gpu.lets:
                return 0.0
        if not self.remedy:
            return 0.0
        for frac in (0.85, 0.7, 0.5):
            shrunk = [Let(x.share, {k: v * frac for k, v in x.rates.items()}) for x in gpu.lets]
            got = try_gpu(ctx, Gpu(shrunk), [Let(share, {m: rate * frac})])
            if got is not None:
                for x in gpu.lets:
                    for k, v in x.rates.items():
                        self.pending[k] = self.pending.get(k, 0.0) + v * (1 - frac)
                gpu.lets = got
                return rate * frac
        return 0.0

    def _place(self, m: str, want: int, rem: float, saturated: bool) -> float:
        """Best fit of a gpu-let for m (share >= want unless elastic) among open GPUs,
        else a new GPU. ``saturated``: carry what the share can (<= rem); residue: all of rem."""
        ctx = self.ctx
        cands = []
        for i, gpu in enumerate(self.gpus):
            eff = self._eff_share(gpu, want, elastic=saturated)
            if eff is not None:
                cands.append((gpu.free, i, gpu, eff))
        failed = set()
        for _, _, gpu, eff in sorted(cands, key=lambda x: (x[0], x[1])):
            c = ctx.cap(m, eff)[0]
            if c <= 0:
                continue
            rate = min(rem, c) if saturated else rem
            if not saturated and c < rem:
                continue
            sig = (_sig(gpu), eff)
            if sig in failed:  # an identical GPU could not take it
                continue
            got = self._try(gpu, m, eff, rate)
            if got > 0:
                return got
            failed.add(sig)
        if self.max_gpus is None or len(self.gpus) < self.max_gpus:
            gpu = Gpu()
            eff = want if ctx.max_lets_per_gpu > 1 else ctx.shares[-1]
            rate = min(rem, ctx.cap(m, eff)[0])
            got = self._try(gpu, m, eff, rate)
            if got > 0:
                self.gpus.append(gpu)
                return got
        return 0.0

    def _merge(self, m: str, r: float) -> bool:
        """Temporal sharing: add (m, r) to the smallest existing gpu-let that stays feasible
        (candidates in order of (share, free share of the GPU); the first that holds wins; only
        the first ``merge_tries`` are tried: the consolidation pass catches what this misses)."""
        ctx = self.ctx
        cands = []
        seen = set()
        for gi, gpu in enumerate(self.gpus):
            sig = _sig(gpu)
            if sig in seen:  # an identical GPU was already considered
                continue
            seen.add(sig)
            for i, let in enumerate(gpu.lets):
                if m in let.rates or len(let.rates) >= ctx.max_models:
                    continue
                # necessary: the gpu-let's batches must fit its duty cycle (saturated ones are full)
                if ctx.cycle([r * gpu_time(ctx, m, let.share),
                              *(x * gpu_time(ctx, k, let.share) for k, x in let.rates.items())]) > 1000.0 * (1 + 1e-9):
                    continue
                cands.append((let.share, gpu.free, gi, i))
        cands.sort()
        for _, _, gi, i in cands[: self.merge_tries]:
            gpu = self.gpus[gi]
            let = gpu.lets[i]
            got = try_gpu(ctx, gpu, [Let(let.share, {**let.rates, m: r})], replace=i)
            if got is not None:
                gpu.lets = got
                return True
        return False

    def _residue(self, m: str, r: float) -> float:
        ctx = self.ctx
        if self.temporal and self._merge(m, r):
            return r
        for s in ctx.shares:
            if ctx.cap(m, s)[0] + EPS < r or schedule(ctx, s, {m: r}) is None:
                continue
            return self._place(m, s, r, saturated=False)
        return 0.0

    # -- main loop ---------------------------------------------------------------

    def run(self, order: list[str]) -> list[Gpu]:
        ctx = self.ctx
        for m in order:
            self._serve(m, ctx.rates[m])
        rounds = 0
        while self.pending:  # throughput lost to the interference remedy
            rounds += 1
            if rounds > 50:
                raise SchedulingError("interference remedy does not converge")
            m, r = self.pending.popitem()
            self._serve(m, r)
        return self.gpus

    def _serve(self, m: str, rem: float) -> None:
        ctx = self.ctx
        if rem <= 1e-6:
            return
        if self.share_policy == "knee":
            s = knee_share(ctx, m)
        else:  # "smallest": the smallest share carrying the whole rate, else the largest
            s = next((x for x in ctx.shares if ctx.cap(m, x)[0] >= rem), ctx.shares[-1])
        cap = ctx.cap(m, s)[0]
        guard = 0
        while rem > 1e-6 * max(1.0, ctx.rates[m]):
            guard += 1
            if guard > 10000:
                raise SchedulingError(f"model {m!r}: placement does not converge")
            if rem >= cap * (1 - 1e-9):
                got = self._place(m, s, rem, saturated=True)
            else:
                got = self._residue(m, rem)
                if got <= 0:
                    got = self._place(m, s, rem, saturated=True)
            if got <= 0:
                need = "" if self.max_gpus is None else f" within {self.max_gpus} GPU(s)"
                raise SchedulingError(f"model {m!r}: {rem:.1f} req/s left that fit nowhere{need}")
            rem -= got


# --------------------------------------------------------------------------- consolidation


def gpu_time(ctx: Ctx, m: str, s: int) -> float:
    """See :meth:`Ctx.min_time`."""
    return ctx.min_time(m, s)


def unit_time(ctx: Ctx, m: str) -> float:
    """Least GPU-seconds per 1000 requests of ``m`` over shares (``share/100 * gpu_time``)."""
    memo = ctx.__dict__.setdefault("_ut_memo", {})
    v = memo.get(m)
    if v is None:
        v = memo[m] = min(s / 100.0 * gpu_time(ctx, m, s) for s in ctx.shares)
    return v


def gpu_load(ctx: Ctx, items: dict[str, float]) -> float:
    """Lower bound on the fraction of one GPU the items need (<= 1 is necessary to fit)."""
    return sum(r * unit_time(ctx, m) for m, r in items.items()) / 1000.0


def _items(gpu: Gpu) -> dict[str, float]:
    out: dict[str, float] = {}
    for let in gpu.lets:
        for m, r in let.rates.items():
            out[m] = out.get(m, 0.0) + r
    return out


def _smallest_share(ctx: Ctx, rates: dict[str, float], limit: int = 100) -> int | None:
    for s in ctx.shares:
        if s > limit:
            return None
        if ctx.cycle(r * gpu_time(ctx, m, s) for m, r in rates.items()) > 1000.0 * (1 + 1e-9):
            continue
        if schedule_let(ctx, s, rates) is not None:
            return s
    return None


def pack_gpu(ctx: Ctx, items: dict[str, float]) -> list[Let] | None:
    """Elastic re-partitioning of one GPU: the lets (one gpu-let, or two whose shares
    sum to <= 100, each time-shared by at most ``max_models`` models) that carry
    ``items`` under interference and memory limits with the least total share, or None.
    Exhaustive over the two-way partitions of the models and the share pairs."""
    items = {m: r for m, r in items.items() if r > EPS}
    if not items:
        return []
    if gpu_load(ctx, items) > 1 + 1e-9:
        return None
    key = tuple(sorted((m, round(r, 6)) for m, r in items.items()))
    memo = ctx.__dict__.setdefault("_pack_memo", {})
    if key in memo:
        got = memo[key]
        return None if got is None else [x.copy() for x in got]
    if len(memo) > 100_000:
        memo.clear()
    got = _pack_gpu(ctx, items)
    memo[key] = None if got is None else [x.copy() for x in got]
    return got


def _pack_gpu(ctx: Ctx, items: dict[str, float]) -> list[Let] | None:
    ms = sorted(items)
    cands: list[tuple[int, tuple[Let, ...]]] = []
    if len(ms) <= ctx.max_models:
        s = _smallest_share(ctx, items)
        if s is not None:
            cands.append((s, (Let(s, dict(items)),)))
    if ctx.max_lets_per_gpu >= 2 and len(ms) >= 2:
        first, rest = ms[0], ms[1:]
        small: dict[tuple[str, ...], int | None] = {}
        for k in range(0, len(rest)):
            for extra in itertools.combinations(rest, k):
                A = (first,) + extra
                B = tuple(x for x in rest if x not in extra)
                if len(A) > ctx.max_models or len(B) > ctx.max_models or not B:
                    continue
                ra = {m: items[m] for m in A}
                rb = {m: items[m] for m in B}
                sa = small.get(A, -1)
                if sa == -1:
                    sa = small[A] = _smallest_share(ctx, ra)
                if sa is None:
                    continue
                sb = small.get(B, -1)
                if sb == -1:
                    sb = small[B] = _smallest_share(ctx, rb)
                if sb is None or sa + sb > 100:
                    continue
                for xa in ctx.shares:
                    if xa < sa:
                        continue
                    for xb in ctx.shares:
                        if xb < sb or xa + xb > 100:
                            continue
                        cands.append((xa + xb, (Let(xa, ra), Let(xb, rb))))
    cands.sort(key=lambda c: c[0])
    for _, lets in cands:
        lets_l = [Let(x.share, dict(x.rates)) for x in lets]
        if not memory_ok(ctx, lets_l):
            continue
        got = settle(ctx, lets_l)
        if got is not None:
            return got
    return None


def _absorb(ctx: Ctx, gpu: Gpu, m: str, r: float) -> list[Let] | None:
    """``gpu``'s lets with (m, r) added, or None: temporal sharing into an existing gpu-let,
    a new gpu-let in the free share, else re-partitioning the whole GPU (:func:`pack_gpu`).
    Memoised on the GPU's shares and rates (plans repeat identical GPUs)."""
    key = (_sig(gpu), m, round(r, 6))
    memo = ctx.__dict__.setdefault("_absorb_memo", {})
    if key in memo:
        got = memo[key]
        return None if got is None else [x.copy() for x in got]
    if len(memo) > 100_000:
        memo.clear()
    got = _absorb1(ctx, gpu, m, r)
    memo[key] = None if got is None else [x.copy() for x in got]
    return got


def _absorb1(ctx: Ctx, gpu: Gpu, m: str, r: float) -> list[Let] | None:
    items = _items(gpu)
    items[m] = items.get(m, 0.0) + r
    if gpu_load(ctx, items) > 1 + 1e-9:
        return None
    for i, let in enumerate(gpu.lets):
        if m not in let.rates and len(let.rates) >= ctx.max_models:
            continue
        rates = dict(let.rates)
        rates[m] = rates.get(m, 0.0) + r
        if ctx.cycle(x * gpu_time(ctx, k, let.share) for k, x in rates.items()) > 1000.0 * (1 + 1e-9):
            continue
        got = try_gpu(ctx, gpu, [Let(let.share, rates)], replace=i)
        if got is not None:
            return got
    if len(gpu.lets) < ctx.max_lets_per_gpu and gpu.free > 0:
        s = _smallest_share(ctx, {m: r}, gpu.free)
        if s is not None:
            got = try_gpu(ctx, gpu, [Let(s, {m: r})])
            if got is not None:
                return got
    return pack_gpu(ctx, items)


class _Budget:
    """Work budget of a consolidation pass: GPU re-partitionings it may try (deterministic,
    unlike a time limit)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def spend(self) -> bool:
        self.left -= 1
        return self.left >= 0


def _try_empty(ctx: Ctx, gpus: list[Gpu], v: int, budget: _Budget) -> list[Gpu] | None:
    """Re-place everything GPU ``v`` carries onto the others (splitting a model's rate
    over several GPUs when it fits nowhere whole); the new plan, or None."""
    victim = _items(gpus[v])
    others = [Gpu([x.copy() for x in g.lets]) for i, g in enumerate(gpus) if i != v]
    loads = [gpu_load(ctx, _items(g)) for g in others]
    if sum(max(0.0, 1 - x) for x in loads) + 1e-9 < gpu_load(ctx, victim):
        return None
    for m, r in sorted(victim.items(), key=lambda it: -it[1] * unit_time(ctx, it[0])):
        u = unit_time(ctx, m) / 1000.0
        order = sorted(range(len(others)), key=lambda i: -loads[i])  # best fit: fullest first
        placed = False
        for i in order:
            if loads[i] + r * u > 1 + 1e-9:
                continue
            got = _absorb(ctx, others[i], m, r)
            if got is not None:
                others[i].lets = got
                loads[i] += r * u
                placed = True
                break
        if placed:
            continue
        # split: the most each GPU can take (bisection on the rate), emptiest first
        for i in sorted(range(len(others)), key=lambda i: loads[i]):
            if not budget.spend():
                return None
            room = (1 - loads[i]) / u if u > 0 else r
            hi = min(r, room)
            if hi <= 1e-6 * max(1.0, r):
                continue
            got = _absorb(ctx, others[i], m, hi)
            if got is None:
                lo, best = 0.0, None
                for _ in range(5):
                    mid = (lo + hi) / 2
                    g2 = _absorb(ctx, others[i], m, mid)
                    if g2 is not None:
                        lo, best = mid, g2
                    else:
                        hi = mid
                if best is None or lo < 0.02 * r:
                    continue
                got, hi = best, lo
            others[i].lets = got
            loads[i] += hi * u
            r -= hi
            if r <= 1e-6 * max(1.0, ctx.rates[m]):
                break
        if r > 1e-6 * max(1.0, ctx.rates[m]):
            return None
    return others


def consolidate(ctx: Ctx, gpus: list[Gpu], *, tries: int = 3, effort: int = 200) -> list[Gpu]:
    """Consolidation pass: repeatedly try to empty one of the ``tries`` least-loaded GPUs by
    re-placing what it carries on the others (merging into gpu-lets, growing or
    re-partitioning them, splitting a model's rate where it fits nowhere whole). Never
    adds GPUs; stops at the first round without a gain or when ``effort`` (rate splits
    tried, each a short bisection) is spent."""
    budget = _Budget(effort)
    gpus = [g for g in gpus if g.lets]
    while len(gpus) > 1 and budget.left > 0:
        loads = [gpu_load(ctx, _items(g)) for g in gpus]
        victims = sorted(range(len(gpus)), key=lambda i: loads[i])[:tries]
        for v in victims:
            got = _try_empty(ctx, gpus, v, budget)
            if got is not None:
                gpus = got
                break
        else:
            break
    return gpus


def gpulet(ctx: Ctx, max_gpus: int | None = None, *, orders: Sequence[str] | None = None,
           temporal: bool = True, share_policy: str = "knee", portfolio: bool | None = None,
           consolidation: bool | None = None, effort: int = 50, slack: int = 0) -> list[Gpu]:
    """Run the heuristic for each order and keep the plan with the fewest GPUs.

    ``portfolio`` (default: on when no ``orders`` are given) also tries the
    heuristic with the "smallest share carrying the whole rate" policy and the
    temporal-only packing, which are gpu-let plans too: the heuristic alone can
    lose to them (e.g. one model whose rate just exceeds its knee share's
    capacity gets split over two gpu-lets that then interfere), and a planner
    that tries them is never worse than temporal-only sharing.

    ``consolidation`` (default: as ``portfolio``) runs :func:`consolidate` on each
    plan: the greedy pass decides each model once, in order, and often leaves a
    lightly loaded last GPU whose models would fit into the others' gpu-lets if
    those grew or were re-partitioned. ``effort`` bounds its work per plan (see there)."""
    if portfolio is None:
        portfolio = orders is None
    if consolidation is None:
        consolidation = portfolio and temporal
    orders = list(orders or DEFAULT_ORDERS)
    cap = None if consolidation else max_gpus  # consolidation may bring an over-the-cap plan under it
    runs: list[Callable[[], list[Gpu]]] = [
        (lambda o=o: _Planner(ctx, temporal, cap, share_policy).run(ORDERS[o](ctx))) for o in orders
    ]
    if portfolio:
        runs.append(lambda: _Planner(ctx, temporal, cap, "smallest").run(ORDERS["rate_slo"](ctx)))
        runs.append(lambda: temporal_only(ctx, cap))
    best: list[Gpu] | None = None
    err: SchedulingError | None = None
    plans: list[list[Gpu]] = []
    for run in runs:
        try:
            plans.append(run())
        except SchedulingError as e:
            err = e
    if consolidation and plans:
        lb = math.ceil(_lb(ctx) - 1e-9)
        plans.sort(key=len)
        out = []
        for gpus in plans:
            if len(gpus) > lb and (not out or len(gpus) <= min(map(len, out)) + slack):
                gpus = consolidate(ctx, gpus, effort=effort)
            out.append(gpus)
            if len(min(out, key=len)) <= lb:
                break
        plans = out
    for gpus in plans:
        if best is None or len(gpus) < len(best):
            best = gpus
    if best is None:
        assert err is not None
        raise err
    if max_gpus is not None and len(best) > max_gpus:
        raise SchedulingError(f"gpu-let needs {len(best)} GPU(s), only {max_gpus} available")
    return best


def _lb(ctx: Ctx) -> float:
    lb = sum(r * unit_time(ctx, m) for m, r in ctx.rates.items() if r > EPS) / 1000.0
    return lb / ctx.max_models if ctx.concurrent else lb      # as core.lower_bound


def shrink_shares(ctx: Ctx, gpus: list[Gpu]) -> list[Gpu]:
    """Give each gpu-let the smallest share that still holds (frees room, lowers cost of a GPU's
    neighbours); done last so it never changes the GPU count."""
    for gpu in gpus:
        for i in range(len(gpu.lets)):
            let = gpu.lets[i]
            for s in ctx.shares:
                if s >= let.share:
                    break
                cand = Let(s, dict(let.rates))
                got = try_gpu(ctx, gpu, [cand], replace=i)
                if got is not None:
                    # keep order stable: the replaced let went to the end
                    gpu.lets = got
                    break
    return gpus


__all__ = ["consolidate", "gpu_load", "gpulet", "knee_share", "ORDERS", "pack_gpu", "shrink_shares", "settle"]
