"""Shared machinery of all planners: the duty-cycle model of a gpu-let, GPUs with
interference, feasibility checks, the lower bound and conversion to a Plan.

The duty-cycle model unifies the paper's three latency rules. A gpu-let of
share ``s`` serving models ``i`` at rates ``r_i`` runs one batch of each model in
turn every ``D`` ms (the duty cycle). Model ``i`` runs batch ``b_i`` with latency
``L_i = L(i, s, b_i) * margin * slowdown_i``. It is feasible when

* ``sum_i L_i <= D``                      (the round fits in the cycle),
* ``1000 * b_i / D >= r_i``               (each model's throughput covers its rate),
* ``D + L_i <= SLO_i``                    (a request that just missed a batch waits
  at most ``D`` and then runs ``L_i``: the worst-case latency).

With ``scheduler.colocation: concurrent`` a gpu-let's models run at once, each an MPS client
with a Triton instance and queue of its own: each model has its own cycle ``D_i`` and the three
rules hold per model (``L_i <= D_i``, ``1000 b_i / D_i >= r_i``, ``D_i + L_i <= SLO_i``); what
they share is the GPU, priced by the interference model (:func:`co_runners`).

A saturated gpu-let of one model is ``D = L(b)``, i.e. the paper's ``2 L(b) <= SLO``;
a residue gpu-let is ``D = 1000 b / r``, i.e. ``L(b) + b/r <= SLO``; a
time-shared gpu-let is the paper's common duty cycle. For given rates the
smallest feasible ``D`` is found exactly by walking the breakpoints where some
``b_i = ceil(r_i D / 1000)`` changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..profiles import ProfileStore
from ..spec import Assignment, Deployment, GpuLet, ModelSummary, Plan, gpulet_id
from ..interference import InterferenceModel, NoInterference

EPS = 1e-9


class SchedulingError(ValueError):
    """No plan exists under the given constraints; the message says why and what would help."""


#: algorithms whose own arithmetic (the exact optimum's columns) has a gpu-let's models take turns
TURNS_ONLY = frozenset({"ideal", "ideal-prototype", "best"})


def is_concurrent(colocation: str, device: str, algorithm: str) -> bool:
    """Whether a plan has a gpu-let's models run at once (else they take turns), from
    ``scheduler.colocation``. ``auto`` is what the runtime does on the device: on a GPU a
    tritonserver's python-backend models are MPS clients of their own, each capped at the share, so
    they run at once (measured on the H200: docs/benchmarks.md 'Serving', runs 12 and 13); on a
    CPU a gpu-let's processes share its cores, which is turn-taking. Planners that can only plan
    turns (:data:`TURNS_ONLY`) keep turns under ``auto``."""
    if colocation == "auto":
        return not device.lower().startswith("cpu") and algorithm not in TURNS_ONLY
    return colocation == "concurrent"


def cycle_time(lats, concurrent: bool) -> float:
    """Time a gpu-let's batches of one cycle take: in turn their sum, at once (``colocation:
    concurrent``) the longest."""
    lats = list(lats)
    return (max(lats) if lats else 0.0) if concurrent else sum(lats)


@dataclass
class Ctx:
    """Everything a planner needs, resolved from the deployment and options."""

    rates: dict[str, float]      # what the plan must serve: the deployment's rates, padded for bursts (burst_pad)
    slos: dict[str, float]       # what a request's batching may take: the SLO less scheduler.overhead_ms
    max_batch: dict[str, int]
    profiles: ProfileStore
    shares: list[int]
    margin: float = 1.1
    interference: InterferenceModel = field(default_factory=NoInterference)
    max_models: int = 3          # models per time-shared gpu-let (prototype: 3)
    max_lets_per_gpu: int = 2    # gpu-lets per GPU (prototype: 2, a and 100-a)
    memory_check: bool = True
    pct: str = "p99"
    trivial_batch: dict[str, int] = field(default_factory=dict)
    overhead_ms: float = 0.0
    concurrent: bool = False     # a gpu-let's models run at once, each at the share (else they take turns)

    def cycle(self, lats) -> float:
        return cycle_time(lats, self.concurrent)

    def __post_init__(self) -> None:
        self._lat: dict[tuple[str, int, int], float] = {}
        self._cap: dict[tuple[str, int, float], tuple[float, int]] = {}

    @property
    def models(self) -> list[str]:
        return list(self.rates)

    def lat(self, m: str, s: int, b: int) -> float:
        """Planned latency of one batch without interference: profile x margin."""
        k = (m, s, b)
        v = self._lat.get(k)
        if v is None:
            v = self.profiles.latency(m, s, b, self.pct) * self.margin
            self._lat[k] = v
        return v

    def lat_row(self, m: str, s: int) -> list[float]:
        """``[_, lat(m, s, 1), ..., lat(m, s, max_batch)]`` (memoised)."""
        memo = self.__dict__.setdefault("_rows", {})
        row = memo.get((m, s))
        if row is None:
            row = memo[(m, s)] = [0.0] + [self.lat(m, s, b) for b in range(1, self.max_batch[m] + 1)]
        return row

    def fast_row(self, m: str, s: int) -> list[int]:
        """``fast_row(m, s)[b] == fastest_from(m, s, b)``."""
        self.fastest_from(m, s, 1)
        return self.__dict__["_fastest"][(m, s)]

    def min_time(self, m: str, s: int) -> float:
        """Least ms of a share-``s`` gpu-let per request of ``m`` (``L(b)/b`` over batches with
        ``2 L(b) <= SLO``): a gpu-let of share s can only carry rates with
        ``sum_i r_i min_time(i, s) / 1000 <= 1`` (its batches must fit the duty cycle;
        interference only adds)."""
        memo = self.__dict__.setdefault("_gt_memo", {})
        k = (m, s)
        v = memo.get(k)
        if v is None:
            v = math.inf
            for b in range(1, self.max_batch[m] + 1):
                L = self.lat(m, s, b)
                if 2 * L > self.slos[m] + EPS:
                    continue  # not break: measured latencies need not grow with batch
                v = min(v, L / b)
            memo[k] = v
        return v

    def fastest_from(self, m: str, s: int, b: int) -> int:
        """The batch >= b with the least latency (the smallest on ties): b itself when latency grows
        with batch. Measured profiles are not always monotone (a slow batch 1 on a small share);
        a gpu-let that needs batches of b may as well run a larger, faster one."""
        memo = self.__dict__.setdefault("_fastest", {})
        k = (m, s)
        arr = memo.get(k)
        if arr is None:
            mb = self.max_batch[m]
            arr = [0] * (mb + 2)
            best = mb
            for x in range(mb, 0, -1):
                if self.lat(m, s, x) <= self.lat(m, s, best):
                    best = x
                arr[x] = best
            memo[k] = arr
        return arr[b]

    def cap(self, m: str, s: int, slow: float = 1.0) -> tuple[float, int]:
        """Saturated capacity (req/s) of model m alone on share s and its batch:
        the batch with the most throughput among those with 2 L(b) <= SLO."""
        k = (m, s, round(slow, 9))
        v = self._cap.get(k)
        if v is None:
            best, bb = 0.0, 0
            for b in range(1, self.max_batch[m] + 1):
                L = self.lat(m, s, b) * slow
                if 2 * L > self.slos[m] + EPS:
                    continue  # not break: measured latencies need not grow with batch
                t = 1000.0 * b / L
                if t > best:
                    best, bb = t, b
            v = (best, bb)
            self._cap[k] = v
        return v

    def memory(self, m: str) -> float:
        v = self.profiles.memory_mb(m)
        return v or 0.0


@dataclass
class Let:
    """A gpu-let being planned: share, the rate of each model, and its schedule."""

    share: int
    rates: dict[str, float]
    duty: float = 0.0
    batches: dict[str, int] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)
    duties: dict[str, float] = field(default_factory=dict)   # running at once: each model's own cycle

    def copy(self) -> "Let":
        return Let(self.share, dict(self.rates), self.duty, dict(self.batches), dict(self.slow), dict(self.duties))

    def cycle(self, m: str) -> float:
        """Model m's cycle: its own when the let's models run at once, else the let's."""
        return self.duties.get(m, self.duty)


def schedule(ctx: Ctx, share: int, rates: dict[str, float], slow: dict[str, float] | None = None
             ) -> tuple[float, dict[str, int]] | None:
    """Smallest feasible duty cycle and the batches for it, or None (see module doc): the models take
    turns in it (a let whose models run at once is scheduled a model at a time, :func:`schedule_let`)."""
    ms = [m for m, r in rates.items() if r > EPS]
    if not ms:
        return None
    k = len(ms)
    rs = [rates[m] for m in ms]
    sl = [slow.get(m, 1.0) for m in ms] if slow else [1.0] * k
    # necessary: each batch takes at least min_time per request, and the batches fill the cycle
    if sum(r * ctx.min_time(m, share) * f for m, r, f in zip(ms, rs, sl)) > 1000.0 * (1 + 1e-9):
        return None
    tabs = [ctx.lat_row(m, share) for m in ms]
    fast = [ctx.fast_row(m, share) for m in ms]
    slos = [ctx.slos[m] for m in ms]
    mbs = [ctx.max_batch[m] for m in ms]
    dmax = min(slos)
    # breakpoints of D where a batch size steps up (none needed beyond the first past dmax)
    points = set()
    for r, mb in zip(rs, mbs):
        top = min(mb, math.ceil(r * dmax / 1000.0) + 1)
        points.update(1000.0 * x / r for x in range(1, top + 1))
    lo = 0.0
    bs = [0] * k
    lats = [0.0] * k
    for hi in sorted(points):
        if lo >= dmax:
            break
        # for D in (lo, hi]: b_m = ceil(r_m * D / 1000) is constant; evaluate at D = hi
        for j in range(k):
            b = math.ceil(rs[j] * hi / 1000.0 - 1e-9)
            if b < 1:
                b = 1
            if b > mbs[j]:
                return None
            b = fast[j][b]
            bs[j] = b
            L = tabs[j][b] * sl[j]
            lats[j] = L
        tot = sum(lats)
        d = max(tot, lo + EPS if lo > 0 else 0.0)
        # the batches at D=hi also hold for any D in (lo, hi] since ceil is constant there
        if d <= hi + EPS:
            d = max(d, EPS)
            if all(d + lats[j] <= slos[j] + 1e-7 for j in range(k)) and \
                    all(1000.0 * bs[j] / d >= rs[j] - 1e-7 for j in range(k)):
                return d, dict(zip(ms, bs))
        lo = hi
    return None


def schedule_let(ctx: Ctx, share: int, rates: dict[str, float], slow: dict[str, float] | None = None
                 ) -> tuple[float, dict[str, int], dict[str, float]] | None:
    """:func:`schedule` for a let: (duty, batches, each model's own cycle). Running at once
    (``ctx.concurrent``) each model is scheduled alone on the share, and the let's duty is the longest
    of their cycles; taking turns the cycle is common and the third item empty."""
    ms = [m for m, r in rates.items() if r > EPS]
    if not ctx.concurrent or len(ms) <= 1:
        r = schedule(ctx, share, rates, slow)
        return None if r is None else (r[0], r[1], {})
    batches, duties = {}, {}
    for m in ms:
        r = schedule(ctx, share, {m: rates[m]}, {m: (slow or {}).get(m, 1.0)})
        if r is None:
            return None
        duties[m], batches[m] = r[0], r[1][m]
    return max(duties.values()), batches, duties


def let_ok(ctx: Ctx, let: Let, slow: dict[str, float]) -> bool:
    """Whether a let's fixed batches and cycles still hold under the given slowdowns."""
    lats = {m: ctx.lat(m, let.share, let.batches[m]) * slow.get(m, 1.0) for m in let.rates}
    if let.duties:
        if any(lats[m] > let.cycle(m) + 1e-7 for m in let.rates):
            return False
    elif sum(lats.values()) > let.duty + 1e-7:
        return False
    for m, r in let.rates.items():
        d = let.cycle(m)
        if d + lats[m] > ctx.slos[m] + 1e-7 or 1000.0 * let.batches[m] / d < r - 1e-7:
            return False
    return True


def co_runners(im: InterferenceModel, concurrent: bool, model: str, share: float, batch: float,
               lets: Sequence[tuple[float, Mapping[str, int]]], i: int) -> list[tuple[str, float, float]]:
    """What runs beside ``model`` (at ``share``, ``batch``, in the ``i``-th of a GPU's ``lets``, each
    (share, {model: batch})), as the interference model's ``others``. Taking turns, a gpu-let's
    models never run together: only the most disturbing model of each other gpu-let counts. Running
    at once (``colocation: concurrent``), every other model on the GPU does, those of its own
    gpu-let included, as always busy: near a plan's capacity Triton's dynamic batcher keeps each
    instance busy with small batches (H200, run 15: bert at gpu-run x2.68 ran 206 batches a second of
    4.9 ms on each server, busy 100 % of the time, where its plan had batches of 6-8 once per 7 ms
    cycle); weighting co-runners by the plan's batches made the predictions more optimistic still."""
    out: list[tuple[str, float, float]] = []
    for j, (s, bs) in enumerate(lets):
        cands = [(om, s, ob) for om, ob in bs.items() if not (j == i and om == model)]
        if concurrent:
            out += cands
        elif j != i and cands:
            out.append(max(cands, key=lambda o: im.slowdown(model, share, batch, [o])))
    return out


def slowdowns(ctx: Ctx, lets: Sequence[Let], batches: Sequence[dict[str, int]]) -> list[dict[str, float]]:
    """Slowdown of each model of each let given what runs beside it on the same GPU (:func:`co_runners`)."""
    shape = [(let.share, b) for let, b in zip(lets, batches)]
    out = []
    for i, let in enumerate(lets):
        d = {}
        for m in let.rates:
            others = ([] if isinstance(ctx.interference, NoInterference) else
                      co_runners(ctx.interference, ctx.concurrent, m, let.share, batches[i][m], shape, i))
            d[m] = max(1.0, ctx.interference.slowdown(m, let.share, batches[i][m], others)) if others else 1.0
        out.append(d)
    return out


def settle(ctx: Ctx, lets: list[Let]) -> list[Let] | None:
    """Schedule all lets of one GPU under mutual interference, or None if impossible.

    Memoised per context on the lets' shares and rates (plans repeat the same GPU
    many times: saturated gpu-lets of one model, a residue tried on every GPU);
    callers get fresh copies."""
    key = tuple((x.share, tuple(x.rates.items())) for x in lets)
    memo = ctx.__dict__.setdefault("_settle_memo", {})
    if key in memo:
        got = memo[key]
        return None if got is None else [x.copy() for x in got]
    got = _settle(ctx, lets)
    if len(memo) > 200_000:
        memo.clear()
    memo[key] = None if got is None else [x.copy() for x in got]
    return got


def _settle(ctx: Ctx, lets: list[Let]) -> list[Let] | None:
    """See :func:`settle` (not memoised).

    Fixed point: schedule without interference, compute slowdowns from those
    batches, reschedule, and repeat; accept when the final schedules hold under
    the slowdowns their own batches cause."""
    cur = []
    for let in lets:
        r = schedule_let(ctx, let.share, let.rates)
        if r is None:
            return None
        cur.append(Let(let.share, dict(let.rates), r[0], r[1], {m: 1.0 for m in let.rates}, r[2]))
    alone = len(cur) == 1 and not (ctx.concurrent and len(cur[0].rates) > 1)
    if alone or isinstance(ctx.interference, NoInterference):
        return cur
    for _ in range(6):
        sl = slowdowns(ctx, cur, [c.batches for c in cur])
        if all(let_ok(ctx, c, s) for c, s in zip(cur, sl)):
            for c, s in zip(cur, sl):
                c.slow = s
            return cur
        nxt = []
        for c, s in zip(cur, sl):
            # keep the larger of old and new slowdown so the iteration cannot oscillate
            s2 = {m: max(s[m], c.slow.get(m, 1.0)) for m in c.rates}
            r = schedule_let(ctx, c.share, c.rates, s2)
            if r is None:
                return None
            nxt.append(Let(c.share, dict(c.rates), r[0], r[1], s2, r[2]))
        cur = nxt
    sl = slowdowns(ctx, cur, [c.batches for c in cur])
    if all(let_ok(ctx, c, s) for c, s in zip(cur, sl)):
        for c, s in zip(cur, sl):
            c.slow = s
        return cur
    return None


@dataclass
class Gpu:
    lets: list[Let] = field(default_factory=list)

    @property
    def used(self) -> int:
        return sum(let.share for let in self.lets)

    @property
    def free(self) -> int:
        return 100 - self.used


def memory_ok(ctx: Ctx, lets: Sequence[Let]) -> bool:
    """Each gpu-let is its own server process holding its models: memory adds up."""
    total = ctx.profiles.memory_mb_total
    if not ctx.memory_check or not total:
        return True
    return sum(ctx.memory(m) for let in lets for m in let.rates) <= total


def try_gpu(ctx: Ctx, gpu: Gpu, new: Sequence[Let], replace: int | None = None) -> list[Let] | None:
    """The GPU's lets (with ``new`` added, optionally replacing lets[replace]) settled, or None."""
    lets = [x for i, x in enumerate(gpu.lets) if i != replace] + list(new)
    if len(lets) > ctx.max_lets_per_gpu or sum(x.share for x in lets) > 100 or not memory_ok(ctx, lets):
        return None
    return settle(ctx, lets)


def lower_bound(ctx: Ctx) -> float:
    """GPUs no plan can beat: sum over models of rate x the least GPU-time per request,
    share/100 * L(s, b) / b over shares and batches with 2 L <= SLO (any feasible
    gpu-let has L <= D and D + L <= SLO; interference only adds). With concurrent colocation a
    gpu-let's share serves up to max_models models at once, so the sum counts max_models times less."""
    total = 0.0
    for m, r in ctx.rates.items():
        if r <= 0:
            continue
        best = math.inf
        for s in ctx.shares:
            for b in range(1, ctx.max_batch[m] + 1):
                L = ctx.lat(m, s, b)
                if 2 * L > ctx.slos[m] + EPS:
                    continue  # not break: measured latencies need not grow with batch
                best = min(best, s / 100.0 * L / (1000.0 * b))
        if best == math.inf:
            return math.inf
        total += r * best
    return total / ctx.max_models if ctx.concurrent else total


def check_slo_reachable(ctx: Ctx) -> None:
    """Raise SchedulingError for a model that no share and batch can serve within its SLO."""
    for m, r in ctx.rates.items():
        best = min(ctx.lat(m, s, 1) for s in ctx.shares)
        if 2 * best > ctx.slos[m] + EPS:
            raw = min(ctx.profiles.latency(m, s, 1, ctx.pct) for s in ctx.shares)
            raise SchedulingError(
                f"model {m!r}: SLO {ctx.slos[m]:g} ms cannot be met: its best batch-1 latency is "
                f"{raw:.3g} ms ({ctx.pct}, share {max(ctx.shares)} %), {best:.3g} ms with the latency margin "
                f"x{ctx.margin:g}, and a request may wait one batch before its own, so the SLO must be at least "
                f"{2 * best:.3g} ms"
            )


def to_plan(ctx: Ctx, gpus: Sequence[Gpu], deployment: str, algorithm: str) -> Plan:
    """Turn planned GPUs into a Plan: ids gpu<N>-a/-b/... (cpu<N>-a/... on a CPU), per-model summaries."""
    out: list[GpuLet] = []
    thr: dict[str, float] = {m: 0.0 for m in ctx.rates}
    worst: dict[str, float] = {m: 0.0 for m in ctx.rates}
    n = 0
    for gpu in gpus:
        if not gpu.lets:
            continue
        for j, let in enumerate(sorted(gpu.lets, key=lambda x: -x.share)):
            assigns = []
            for m, r in let.rates.items():
                b = let.batches[m]
                L = ctx.lat(m, let.share, b) * let.slow.get(m, 1.0)
                d = let.cycle(m)
                t = 1000.0 * b / d
                thr[m] += t
                worst[m] = max(worst[m], d + L)
                assigns.append(Assignment(model=m, batch=b, rate=round(r, 6), latency_ms=round(L, 6),
                                          throughput=round(t, 6), duty_cycle_ms=round(d, 6) if let.duties else 0.0))
            out.append(GpuLet(id=gpulet_id(ctx.profiles.device, n, j), gpu=n, share=let.share,
                              duty_cycle_ms=round(let.duty, 6), models=assigns))
        n += 1
    summaries = {m: ModelSummary(rate=ctx.rates[m], slo_ms=ctx.slos[m] + ctx.overhead_ms, throughput=round(thr[m], 6),
                                 worst_latency_ms=round(worst[m] + ctx.overhead_ms, 6)) for m in ctx.rates}
    return Plan(deployment=deployment, device=ctx.profiles.device, algorithm=algorithm,
                colocation="concurrent" if ctx.concurrent else "turns", gpus=n, gpulets=out, models=summaries)


def validate_plan(plan: Plan, deployment: Deployment, profiles: ProfileStore, *, margin: float | None = None,
                  interference: InterferenceModel | None = None, pct: str = "p99") -> list[str]:
    """Independent check of a plan against its profile; returns the violations (empty = feasible).

    Recomputes every latency from the profile (x margin x interference from the
    co-located gpu-lets' batches), then checks shares per GPU <= 100, each
    model's throughput >= its rate, duty cycles (a gpu-let's batches in turn; at once with
    ``scheduler.colocation: concurrent``, each model's batch within its own cycle, the assignment's
    ``duty_cycle_ms``, else the gpu-let's) and worst latency within SLO."""
    margin = deployment.scheduler.latency_margin if margin is None else margin
    overhead = deployment.scheduler.overhead_ms
    concurrent = is_concurrent(deployment.scheduler.colocation, plan.device, plan.algorithm)
    im = interference or NoInterference()
    errs: list[str] = []
    used: dict[int, int] = {}
    thr: dict[str, float] = {}
    by_gpu: dict[int, list[GpuLet]] = {}
    for g in plan.gpulets:
        used[g.gpu] = used.get(g.gpu, 0) + g.share
        by_gpu.setdefault(g.gpu, []).append(g)
    for gpu, s in used.items():
        if s > 100:
            errs.append(f"gpu{gpu}: shares sum to {s} %")

    def cycle(g: GpuLet, a: Assignment) -> float:
        return a.duty_cycle_ms if concurrent and a.duty_cycle_ms > 0 else g.duty_cycle_ms

    for gpu, lets in by_gpu.items():
        shape = [(h.share, {x.model: x.batch for x in h.models}) for h in lets]
        for i, g in enumerate(lets):
            lats = []
            for a in g.models:
                spec = deployment.model(a.model)
                others = co_runners(im, concurrent, a.model, g.share, a.batch, shape, i)
                sd = max(1.0, im.slowdown(a.model, g.share, a.batch, others)) if others else 1.0
                L = profiles.latency(a.model, g.share, a.batch, pct) * margin * sd
                d = cycle(g, a)
                lats.append(L)
                t = 1000.0 * a.batch / d if d > 0 else 0.0
                thr[a.model] = thr.get(a.model, 0.0) + t
                if t < a.rate - 1e-6 * max(1.0, a.rate):
                    errs.append(f"{g.id}: {a.model} throughput {t:.3f} < assigned rate {a.rate:.3f}")
                if d + L + overhead > spec.slo_ms * (1 + 1e-6) + 1e-6:
                    errs.append(f"{g.id}: {a.model} worst latency {d + L + overhead:.3f} ms "
                                f"> SLO {spec.slo_ms} ms")
                if concurrent and a.duty_cycle_ms > 0 and L > d * (1 + 1e-6) + 1e-6:
                    errs.append(f"{g.id}: {a.model}'s batch takes {L:.3f} ms > its cycle {d:.3f} ms")
            total = cycle_time(lats, concurrent)
            if total > g.duty_cycle_ms * (1 + 1e-6) + 1e-6:
                errs.append(f"{g.id}: batches take {total:.3f} ms > duty cycle {g.duty_cycle_ms:.3f} ms")
    for m in deployment.models:
        if m.rate > 0 and thr.get(m.name, 0.0) < m.rate * (1 - 1e-6) - 1e-6:
            errs.append(f"{m.name}: planned throughput {thr.get(m.name, 0.0):.3f} < rate {m.rate}")
    return errs


