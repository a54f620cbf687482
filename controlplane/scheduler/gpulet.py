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

Options (the prototype's quirks, made explicit):

* ``max_batch``: the prototype never picked batch 32 (its loops stopped at 31);
  here the deployment's ``max_batch`` (default 32) is reachable. Pass 31 to mimic.
* ``pairs_80_100``: irrelevant once shares are free-form: any two shares with a sum
  <= 100 may share a GPU (the prototype only tried fixed pairs and never 80 next to
  a 20 on a GPU it had opened with 100).
* rate padding to the Poisson 99th percentile is an explicit function
  (:func:`poisson_pad`), applied by ``plan(..., pad_rates=True)``, not hard-wired.
* ``orders``: the paper uses one order; by default this planner also tries a
  few other orders and keeps the plan with the fewest GPUs ("do better where
  the heuristic leaves GPUs on the table"); ``paper=True`` runs exactly one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .core import EPS, Ctx, Gpu, Let, SchedulingError, schedule, settle, try_gpu

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


def knee_share(ctx: Ctx, m: str) -> int:
    best, bs = -1.0, ctx.shares[-1]
    for s in ctx.shares:
        c = ctx.cap(m, s)[0] / s
        if c > best * (1 + 1e-9):
            best, bs = c, s
    return bs


class _Planner:
    def __init__(self, ctx: Ctx, temporal: bool, max_gpus: int | None, share_policy: str = "knee") -> None:
        self.ctx = ctx
        self.temporal = temporal
        self.max_gpus = max_gpus
        self.share_policy = share_policy
        self.gpus: list[Gpu] = []
        self.pending: dict[str, float] = {}
        self.remedy = True

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
        for _, _, gpu, eff in sorted(cands, key=lambda x: (x[0], x[1])):
            c = ctx.cap(m, eff)[0]
            if c <= 0:
                continue
            rate = min(rem, c) if saturated else rem
            if not saturated and c < rem:
                continue
            got = self._try(gpu, m, eff, rate)
            if got > 0:
                return got
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
        """Temporal sharing: add (m, r) to the smallest existing gpu-let that stays feasible."""
        ctx = self.ctx
        best = None
        for gpu in self.gpus:
            for i, let in enumerate(gpu.lets):
                if m in let.rates or len(let.rates) >= ctx.max_models:
                    continue
                key = (let.share, gpu.free)
                if best is not None and key >= best[0]:
                    continue
                cand = Let(let.share, {**let.rates, m: r})
                got = try_gpu(ctx, gpu, [cand], replace=i)
                if got is not None:
                    best = (key, gpu, got)
        if best is None:
            return False
        best[1].lets = best[2]
        return True

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


def gpulet(ctx: Ctx, max_gpus: int | None = None, *, orders: Sequence[str] | None = None,
           temporal: bool = True, share_policy: str = "knee", portfolio: bool | None = None) -> list[Gpu]:
    """Run the heuristic for each order and keep the plan with the fewest GPUs.

    ``portfolio`` (default: on when no ``orders`` are given) also tries the
    heuristic with the "smallest share carrying the whole rate" policy and the
    temporal-only packing, which are gpu-let plans too: the heuristic alone can
    lose to them (e.g. one model whose rate just exceeds its knee share's
    capacity gets split over two gpu-lets that then interfere), and a planner
    that tries them is never worse than temporal-only sharing."""
    if portfolio is None:
        portfolio = orders is None
    orders = list(orders or ORDERS)
    runs: list[Callable[[], list[Gpu]]] = [
        (lambda o=o: _Planner(ctx, temporal, max_gpus, share_policy).run(ORDERS[o](ctx))) for o in orders
    ]
    if portfolio:
        from .baselines import temporal as temporal_only

        runs.append(lambda: _Planner(ctx, temporal, max_gpus, "smallest").run(ORDERS["rate_slo"](ctx)))
        runs.append(lambda: temporal_only(ctx, max_gpus))
    best: list[Gpu] | None = None
    err: SchedulingError | None = None
    for run in runs:
        try:
            gpus = run()
        except SchedulingError as e:
            err = e
            continue
        if best is None or len(gpus) < len(best):
            best = gpus
    if best is None:
        assert err is not None
        raise err
    return best


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


__all__ = ["gpulet", "knee_share", "ORDERS", "shrink_shares", "settle"]
