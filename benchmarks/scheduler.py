"""Scheduler benchmark: GPUs per scenario, peak rates, the 19,682-mix comparison, planning time.

Writes its section of docs/benchmarks.md (between ``<!-- scheduler:begin -->`` and
``<!-- scheduler:end -->``; other sections are kept). Uses profiles/h100 when it
exists, else the synthetic H100 profile (controlplane.profiles.synthetic_store),
and says which.

    python benchmarks/scheduler.py [--profiles profiles/h100] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.profiles import ProfileStore, synthetic_store  # noqa: E402
from controlplane.scheduler import ALGORITHMS, SchedulingError, make_ctx, milp_columns  # noqa: E402
from controlplane.scheduler.baselines import ideal_prototype  # noqa: E402
from controlplane.scheduler.core import check_slo_reachable, lower_bound  # noqa: E402
from controlplane.scheduler.gpulet import gpulet  # noqa: E402
from controlplane.scheduler.optimum import OptimumInfo, OptimumTooLarge, optimum  # noqa: E402
from controlplane.spec import Deployment, SchedulerSpec, load_deployment  # noqa: E402

SLO = {"lenet": 5, "googlenet": 66, "resnet50": 108, "ssd-mobilenet": 202, "vgg16": 142, "mnasnet1_0": 62,
       "mobilenet_v2": 64, "densenet161": 202, "bert": 22}
NINE = list(SLO)
SCENARIOS = ["scen1", "scen2", "scen3", "scen4", "scen5", "game", "traffic"]
BEGIN, END = "<!-- scheduler:begin -->", "<!-- scheduler:end -->"


def load_profiles(path: str | None) -> tuple[ProfileStore, str]:
    p = Path(path) if path else ROOT / "profiles" / "h100"
    if path != "synthetic" and p.exists():
        store = ProfileStore.load(p)
        src = f"measured profile `{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}` ({store.device})"
    else:
        store = synthetic_store()
        src = "**synthetic** H100 profile (`controlplane.profiles.synthetic_store`; profiles/h100 does not exist yet)"
    for i in range(1, 7):
        if store.has("lenet"):
            store.alias(f"lenet{i}", "lenet")
    if store.interference is not None:
        src += f"; interference: fitted from measured pairs (`interference.json`, {store.interference.n_rows} pairs)"
    else:
        src += "; interference: the paper's linear model with RTX 2080 Ti coefficients (no measured interference.json)"
    return store, src


def scenario(name: str, r: float, store: ProfileStore) -> Deployment:
    """The deployment file with every rate scaled to sweep parameter r (files are written at r=200); an
    app's (game, traffic) as its models at the app's rate, each with its SLO budget
    (controlplane.apps.expand) from equal weights: game's steps run at once, so each budget is the whole
    SLO; traffic's paths have three steps, so a third of 202 ms each, near the prototype's 69/67/67.
    Models the profile lacks are left out (:func:`unprofiled`: traffic's crop on the H100)."""
    from controlplane.apps import expand, split_slo

    d = load_deployment(ROOT / "deployments" / f"{name}.yaml")
    data = d.model_dump()
    # The sweep's planner settings are this page's (the defaults, the file's latency margin): a file's
    # serving settings (traffic's shares and gpu-lets per GPU for the H200) are not the prototype's, and
    # a gpu-let's models take turns, as in the paper (the exact optimum plans nothing else).
    data["scheduler"] = SchedulerSpec(latency_margin=d.scheduler.latency_margin, colocation="turns").model_dump()
    for m in data["models"] + data["apps"]:
        m["rate"] = m["rate"] / 200.0 * r
    d = Deployment.model_validate(data)
    if d.apps:
        d = expand(d, {a.name: split_slo(a, lambda m: None)[0] for a in d.apps})
    left_out = unprofiled(d, store)
    return d.model_copy(update={"models": [m for m in d.models if m.name not in left_out]})


def unprofiled(d: Deployment, store: ProfileStore) -> list[str]:
    """The scenario's models without a profile row: crop (the traffic app's step) was never measured on
    the H100 (no H100 here), and its cost there is not guessed; the GPU counts leave it out."""
    return [m.name for m in d.models if not store.has(m.name)]


def gpus_needed(d: Deployment, store: ProfileStore, algo: str, interference: bool | None = True) -> int | None:
    ctx = make_ctx(d, store, interference=interference)
    try:
        check_slo_reachable(ctx)
        return len(ALGORITHMS[algo](ctx, None))
    except SchedulingError:
        return None


def fits(d: Deployment, store: ProfileStore, algo: str, n: int, interference: bool = True) -> bool:
    ctx = make_ctx(d, store, interference=interference)
    try:
        check_slo_reachable(ctx)
        return len(ALGORITHMS[algo](ctx, n)) <= n
    except SchedulingError:
        return False


def peak_rate(name: str, store: ProfileStore, algo: str, n: int, interference: bool = True) -> int:
    """Largest r in 10..2990 (step 10) schedulable on n GPUs (binary search; load is monotone in r)."""
    lo, hi = 0, 299  # index k -> r = 10k
    if not fits(scenario(name, 10, store), store, algo, n, interference):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(scenario(name, 10 * mid, store), store, algo, n, interference):
            lo = mid
        else:
            hi = mid - 1
    return 10 * lo


# --------------------------------------------------------------------------- mixes

_W: dict = {}


def _init(profile_path: str | None) -> None:
    store, _ = load_profiles(profile_path)
    base = Deployment.model_validate({"models": [{"name": n, "rate": 1, "slo_ms": SLO[n]} for n in NINE],
                                   "scheduler": {"colocation": "turns"}})
    ctx = make_ctx(base, store, interference=False)
    _W.update(ctx=ctx, cols=milp_columns(ctx))


def _mix(mix: tuple[int, ...]) -> tuple:
    ctx = _W["ctx"]
    ctx.rates = {n: float(r) for n, r in zip(NINE, mix)}
    t0 = time.perf_counter()
    gplan = gpulet(ctx)
    tg = time.perf_counter() - t0
    g = len(gplan)
    gp = len(gpulet(ctx, orders=["rate_slo"]))
    info = OptimumInfo()
    try:
        o = len(optimum(ctx, upper=gplan, info=info, time_limit=20.0))
    except OptimumTooLarge:
        o = None
    proto = len(ideal_prototype(ctx, cols=_W["cols"]))
    lb = math.ceil(lower_bound(ctx) - 1e-9)
    t = len(ALGORITHMS["temporal"](ctx, None))
    return g, gp, o, proto, lb, t, info.method, tg


def run_mixes(profile_path: str | None, workers: int, limit: int | None = None) -> dict:
    mixes = [m for m in itertools.product([0, 100, 200], repeat=9) if any(m)]
    if limit:
        mixes = mixes[:: max(1, len(mixes) // limit)]
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(profile_path,)) as pool:
        res = pool.map(_mix, mixes, chunksize=50)
    wall = time.perf_counter() - t0
    n = len(res)
    solved = [r for r in res if r[2] is not None]
    ns = len(solved)

    def pct(k: int, of: int = n) -> str:
        return f"{k} ({100.0 * k / of:.2f} %)" if of else "0"

    methods: dict[str, int] = {}
    for r in res:
        methods[r[6] or "too large"] = methods.get(r[6] or "too large", 0) + 1
    worst = [(r[0] - r[2], mixes[i]) for i, r in enumerate(res) if r[2] is not None and r[0] > r[2]]
    return {
        "n": n, "wall": wall, "solved": ns, "unsolved": n - ns, "methods": methods,
        "g_eq_opt": pct(sum(r[0] == r[2] for r in solved), ns),
        "g_gt_opt": pct(sum(r[0] > r[2] for r in solved), ns),
        "gp_eq_opt": pct(sum(r[1] == r[2] for r in solved), ns),
        "g_le_proto": pct(sum(r[0] <= r[3] for r in res)),
        "g_eq_lb": pct(sum(r[0] == r[4] for r in res)),
        "g_lt_temporal": pct(sum(r[0] < r[5] for r in res)),
        "gpus_g": sum(r[0] for r in solved), "gpus_gp": sum(r[1] for r in solved),
        "gpus_opt": sum(r[2] for r in solved), "gpus_proto": sum(r[3] for r in res),
        "gpus_lb": sum(r[4] for r in res), "gpus_t": sum(r[5] for r in res),
        "examples": sorted(worst, reverse=True)[:3],
        "t_mean_ms": 1000 * statistics.mean(r[7] for r in res), "t_max_ms": 1000 * max(r[7] for r in res),
        "gp_examples": [mixes[i] for i, r in enumerate(res) if r[2] is not None and r[1] > r[2]][:2],
    }


def planning_time(store: ProfileStore, algo: str, reps: int = 5) -> tuple[float, int]:
    names = NINE + ["lenet1"]
    slo = dict(SLO, lenet1=5)
    # rates chosen so the plan needs about 64 GPUs
    scale = 1.0
    for _ in range(30):
        d = Deployment.model_validate({"models": [{"name": n, "rate": 1000 * scale, "slo_ms": slo[n]} for n in names],
                                       "scheduler": {"algorithm": algo, "colocation": "turns"}})
        ctx = make_ctx(d, store, interference=True)
        n = len(gpulet(ctx, orders=["rate_slo"]))
        if abs(n - 64) <= 2:
            break
        scale *= 64 / max(n, 1)
    times = []
    for _ in range(reps):
        ctx = make_ctx(d, store, interference=True)
        t = time.perf_counter()
        n = len(ALGORITHMS[algo](ctx, 64))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, n


def write_section(text: str) -> Path:
    from benchlib import write_section as write

    return write(BEGIN, END, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", default=None, help="profile dir (default profiles/h100, else synthetic)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true", help="sample ~1000 mixes instead of all 19,682")
    args = ap.parse_args()
    store, src = load_profiles(args.profiles)
    out = ["## Scheduler", ""]
    out.append(f"Command: `python benchmarks/scheduler.py{' --quick' if args.quick else ''}`  ")
    out.append(f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, {args.workers} worker process(es), "
               f"Python {platform.python_version()}  ")
    out.append(f"Date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}  ")
    sched = SchedulerSpec()
    out.append(f"Profile: {src}. Latency margin x1.1, shares 20/40/50/60/80/100, batches 1..32, "
               "at most 2 gpu-lets per GPU and 3 models per gpu-let; each model planned for the "
               f"{100 * sched.burst_pct:g}th percentile of its Poisson arrivals within half its SLO (burst_pct; the "
               f"paper planned for the mean rate), with {sched.overhead_ms:g} ms outside the batch counted against "
               "its SLO (overhead_ms): the deployments' defaults. The measured latencies are not always "
               "monotone in batch (on small shares batch 1 can be slower than batch 4): planners and the optimum "
               "let a gpu-let run a larger batch when it is faster.")
    out.append("")
    out.append("Algorithms: `gpulet` = the paper's heuristic run as a portfolio (paper order, smallest-share policy, "
               "temporal-only packing) whose best plan goes through a consolidation pass (empty the least-loaded "
               "GPU by merging its models into other gpu-lets, growing or re-partitioning them, splitting rates); "
               "`gpulet-paper` = the paper's heuristic alone; `best` = gpulet refined by the exact optimum within "
               "5 s, else the better of gpulet and ideal-prototype where the optimum is too large. When to use which: "
               "`gpulet` by default (milliseconds; optimal on every mix below); `best` when a GPU saved is worth "
               "seconds of planning (large deployments with interference, where the fixed-split program can beat "
               "the heuristic, see the planning-time table); `ideal` to insist on a proven optimum.")
    out.append("")
    out.append("### GPUs needed per scenario (interference on: the model named under Profile)")
    out.append("")
    out.append("r is the sweep parameter of scenarios.md (scen1 runs three models at 2r). "
               "`ideal` is the exact optimum of the same planning problem (`controlplane/scheduler/optimum.py`; "
               "with interference it enumerates per-GPU pairs of gpu-lets and gives up above its limits: `–`). "
               "`ideal-prototype` is the prototype's exhaustive space only (fixed splits, one model per gpu-let, "
               "no temporal sharing), so gpu-let can beat it.")
    out.append("")
    out.append("| scenario | r | gpu-let | gpu-let (paper order) | temporal-only | greedy | ideal | ideal (no interference) "
               "| ideal-prototype | lower bound |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    t0 = time.perf_counter()
    for name in SCENARIOS:
        for r in (200, 1000):
            d = scenario(name, r, store)
            vals = [gpus_needed(d, store, a) for a in ("gpulet", "gpulet-paper", "temporal", "greedy", "ideal")]
            vals.append(gpus_needed(d, store, "ideal", interference=False))
            vals.append(gpus_needed(d, store, "ideal-prototype"))
            ctx = make_ctx(d, store, interference=False)
            lb = math.ceil(lower_bound(ctx) - 1e-9)
            cells = ["–" if v is None else str(v) for v in vals]
            out.append(f"| {name} | {r} | " + " | ".join(cells) + f" | {lb} |")
    out.append("")
    for name in SCENARIOS:
        left_out = unprofiled(load_deployment(ROOT / "deployments" / f"{name}.yaml"), store)
        if left_out:
            out.append(f"{name}: {', '.join(left_out)} not counted here or below (no row in the profile; "
                       "`controlplane profile --device gpu -m " + ",".join(left_out) + "` on that GPU measures it).  ")
    out.append("")
    for interference in (True, False):
        label = "interference on" if interference else "no interference"
        out.append(f"### Highest schedulable rate r (req/s, step 10, max 2990) on 1, 2 and 4 GPUs, {label}")
        out.append("")
        out.append("| scenario | gpu-let 1 | gpu-let 2 | gpu-let 4 | temporal 1 | temporal 2 | temporal 4 | gain on 4 |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        gains = []
        for name in SCENARIOS:
            g = [peak_rate(name, store, "gpulet", n, interference) for n in (1, 2, 4)]
            t = [peak_rate(name, store, "temporal", n, interference) for n in (1, 2, 4)]
            gain = (g[2] / t[2] - 1) * 100 if t[2] else float("nan")
            if t[2] and g[2] < 2990:
                gains.append(gain)
            out.append(f"| {name} | " + " | ".join(map(str, g + t)) + f" | {gain:+.1f} % |")
        if gains:
            out.append("")
            out.append(f"Mean throughput gain of gpu-let over temporal-only on 4 GPUs (scenarios not capped at 2990): "
                       f"{statistics.mean(gains):+.1f} % (paper, 2080 Ti: +102.6 %).")
        out.append("")
    t_scen = time.perf_counter() - t0
    print(f"scenarios done in {t_scen:.1f}s", flush=True)
    mixes = run_mixes(args.profiles, args.workers, 1000 if args.quick else None)
    out.append(f"### All {mixes['n']:,} mixes of the nine models at rates {{0, 100, 200}} req/s (no interference)")
    out.append("")
    out.append(f"Profile as above, interference off (the exact optimum's GPU-configuration enumeration is too "
               f"large for 19,682 mixes with it). Wall time {mixes['wall']:.0f} s on {args.workers} processes "
               "(gpu-let, gpu-let paper order, the exact optimum, the prototype's ideal, temporal-only and the lower "
               "bound for every mix). The exact optimum: "
               "the LP relaxation of the column program proves gpu-let optimal where ceil(LP) equals its GPU count; "
               "otherwise an integer program over the columns left after LP reduced-cost fixing looks for a plan "
               "with fewer GPUs (so the `optimum` column is min(exact optimum, gpu-let): gpu-let's portfolio includes "
               "temporal-only packing, which may time-share more than 3 models on a whole GPU, outside the optimum's "
               "space). How each mix was decided: "
               + ", ".join(f"{k} {v}" for k, v in sorted(mixes["methods"].items())) + ". "
               f"gpu-let planning time per mix: mean {mixes['t_mean_ms']:.1f} ms, max {mixes['t_max_ms']:.0f} ms.")
    out.append("")
    out.append("| comparison | mixes |")
    out.append("| --- | ---: |")
    out.append(f"| exact optimum computed (within limits: 5000 columns, 20 s) | {mixes['solved']} of {mixes['n']} |")
    out.append(f"| gpu-let uses exactly as many GPUs as the optimum (of those) | {mixes['g_eq_opt']} |")
    out.append(f"| gpu-let uses more than the optimum (of those) | {mixes['g_gt_opt']} |")
    out.append(f"| gpu-let-paper (one order, no portfolio, no consolidation) matches the optimum (of those) "
               f"| {mixes['gp_eq_opt']} |")
    out.append(f"| gpu-let uses no more GPUs than the prototype's ideal (fixed splits) | {mixes['g_le_proto']} |")
    out.append(f"| gpu-let reaches the simple lower bound | {mixes['g_eq_lb']} |")
    out.append(f"| gpu-let uses fewer GPUs than temporal-only | {mixes['g_lt_temporal']} |")
    out.append("")
    out.append(f"GPUs summed over the solved mixes: gpu-let {mixes['gpus_g']}, gpu-let (paper order) {mixes['gpus_gp']}, "
               f"exact optimum {mixes['gpus_opt']}; over all mixes: prototype's ideal {mixes['gpus_proto']}, "
               f"temporal-only {mixes['gpus_t']}, lower bound {mixes['gpus_lb']}.")
    if mixes["examples"]:
        out.append("")
        out.append("Examples where gpu-let loses GPUs (extra GPUs, rates of " + ", ".join(NINE) + "): "
                   + "; ".join(f"+{k} at {m}" for k, m in mixes["examples"]) + ".")
    out.append("")
    out.append("### Planning time, 10 models on about 64 GPUs (median of 5, interference on)")
    out.append("")
    out.append("| algorithm | ms | GPUs |")
    out.append("| --- | ---: | ---: |")
    for a in ("gpulet-paper", "gpulet", "temporal", "greedy", "ideal-prototype", "ideal", "best"):
        try:
            ms, n = planning_time(store, a)
            out.append(f"| {a} | {ms:.1f} | {n} |")
        except SchedulingError as e:
            out.append(f"| {a} | – | – ({str(e)[:80]}) |")
    doc = write_section("\n".join(out))
    print("\n".join(out))
    print(f"\nwrote {doc}")


if __name__ == "__main__":
    main()
