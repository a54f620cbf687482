"""Scheduler: hand-computed plans on a tiny profile, error messages, properties of every plan."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.profiles import store_from_function, synthetic_store
from controlplane.scheduler import (
    ALGORITHMS,
    FittedInterference,
    LinearUtilInterference,
    NoInterference,
    OptimumTooLarge,
    SchedulingError,
    fit_pairs,
    gpu_lower_bound,
    plan,
    prediction_errors,
    render_table,
    validate_plan,
)
from controlplane.spec import Deployment, Plan


def dep(models, **sched):
    """A deployment planned as the hand-computed expectations are: no margin, headroom, overhead or interference,
    a gpu-let's models taking turns (the paper's arithmetic)."""
    sched.setdefault("colocation", "turns")
    sched.setdefault("latency_margin", 1.0)
    sched.setdefault("burst_pct", 0.0)
    sched.setdefault("overhead_ms", 0.0)
    sched.setdefault("interference", False)
    return Deployment.model_validate({"name": "t", "models": models, "scheduler": sched})


# latency (2 + 2b) * 100/share ms: easy to compute by hand
TINY = store_from_function(lambda m, s, b: (2.0 + 2.0 * b) * 100.0 / s, ["a", "b", "c"], shares=[50, 100],
                           batches=[1, 2, 3, 4])


class Const:
    """Slowdown x2 whenever another gpu-let shares the GPU."""

    name = "const2"

    def slowdown(self, model, share, batch, others):
        return 2.0 if others else 1.0


def test_temporal_sharing_hand_computed():
    # shares [100] only: a and b at 100 req/s each, SLO 40. One gpu-let, batch 1 each:
    # L = 4 ms each, duty D = 4 + 4 = 8 ms (<= 10 ms, the largest D at which batch 1
    # still covers 100 req/s), throughput 1000/8 = 125 req/s, worst latency 8 + 4 = 12 ms.
    d = dep([{"name": "a", "rate": 100, "slo_ms": 40}, {"name": "b", "rate": 100, "slo_ms": 40}],
            shares=[100], max_batch=4)
    p = plan(d, TINY, algorithm="gpulet")
    assert p.gpus == 1 and len(p.gpulets) == 1
    g = p.gpulets[0]
    assert g.id == "gpu0-a" and g.share == 100
    assert g.duty_cycle_ms == pytest.approx(8.0)
    assert {a.model: a.batch for a in g.models} == {"a": 1, "b": 1}
    assert p.models["a"].throughput == pytest.approx(125.0)
    assert p.models["b"].worst_latency_ms == pytest.approx(12.0)
    # without temporal sharing each model needs its own whole GPU
    assert plan(d, TINY, algorithm="greedy").gpus == 2
    assert plan(d, TINY, algorithm="temporal").gpus == 1
    assert gpu_lower_bound(d, TINY) == 1


def test_concurrent_colocation_runs_a_gpulets_models_at_once():
    # shares [100]; a, b, c at 250 req/s each, SLO 20. Taking turns no two fit one gpu-let (two at
    # batch 4 take 10 + 10 ms of a 16 ms cycle), so three GPUs. At once (each model of a python-backend
    # tritonserver is an MPS client of its own at the share) one gpu-let holds all three: cycle D = 4 ms,
    # batch 1 each (L = 4 ms <= D), throughput 250 req/s each, worst latency D + L = 8 ms.
    models = [{"name": m, "rate": 250, "slo_ms": 20} for m in "abc"]
    turns = dep(models, shares=[100], max_batch=4)
    together = dep(models, shares=[100], max_batch=4, colocation="concurrent")
    assert plan(turns, TINY, algorithm="gpulet").gpus == 3
    p = plan(together, TINY, algorithm="gpulet")
    assert p.gpus == 1 and len(p.gpulets) == 1
    g = p.gpulets[0]
    assert g.duty_cycle_ms == pytest.approx(4.0)
    assert {a.model: a.batch for a in g.models} == {"a": 1, "b": 1, "c": 1}
    assert p.models["a"].worst_latency_ms == pytest.approx(8.0)
    assert validate_plan(p, together, TINY) == []
    # the same plan read as turn-taking is infeasible: its batches take 12 ms of a 4 ms cycle
    assert any("batches take 12.000 ms > duty cycle 4.000 ms" in e for e in validate_plan(p, turns, TINY))
    assert gpu_lower_bound(together, TINY) == 1
    assert plan(together, TINY, algorithm="temporal").gpus == 1
    # the exact optimum's arithmetic takes turns: refused, naming the planners that can
    with pytest.raises(SchedulingError, match="colocation: concurrent is planned by gpulet"):
        plan(together, TINY, algorithm="ideal")


def test_auto_colocation_is_concurrent_on_a_gpu_and_turns_on_a_cpu_or_with_the_exact_optimum():
    """``colocation: auto`` (the default) plans what the runtime does: the three models of
    test_concurrent_colocation_runs_a_gpulets_models_at_once share one gpu-let on a GPU, need three on a CPU."""
    models = [{"name": m, "rate": 250, "slo_ms": 20} for m in "abc"]
    auto = dep(models, shares=[100], max_batch=4, colocation="auto")
    assert Deployment.model_validate({"models": models}).scheduler.colocation == "auto"
    cpu = store_from_function(lambda m, s, b: (2.0 + 2.0 * b) * 100.0 / s, "abc", shares=[50, 100],
                              batches=[1, 2, 3, 4], device="cpu-2c")
    on_gpu = plan(auto, TINY, algorithm="gpulet")
    assert on_gpu.gpus == 1 and validate_plan(on_gpu, auto, TINY) == []
    on_cpu = plan(auto, cpu, algorithm="gpulet")
    assert on_cpu.gpus == 3 and validate_plan(on_cpu, auto, cpu) == []
    assert (on_gpu.colocation, on_cpu.colocation) == ("concurrent", "turns")       # the plan says which
    # the exact optimum plans turns only: under auto it plans them instead of refusing
    assert plan(auto, TINY, algorithm="ideal").gpus == 3


def test_colocation_must_be_auto_turns_or_concurrent():
    with pytest.raises(ValueError, match="colocation") as e:
        dep([{"name": "a", "rate": 1, "slo_ms": 20}], colocation="parallel")
    assert "'auto', 'turns' or 'concurrent'" in str(e.value)        # the error names the choices


def test_interference_forces_an_extra_gpu():
    # shares [50, 100], SLO 20, 100 req/s each, temporal sharing off (max_models=1) so only
    # spatial sharing can put them together. Alone on 50 %: L(1) = 8 ms, D = 8 (1000/8 = 125
    # >= 100 req/s), worst 8 + 8 = 16 <= 20. So a and b get one 50 % gpu-let each: one GPU.
    # With a x2 slowdown L(1) = 16 ms and D + L = 32 > 20 (batch 2 is worse: L = 24): they
    # cannot share a GPU -> two GPUs.
    d = dep([{"name": "a", "rate": 100, "slo_ms": 20}, {"name": "b", "rate": 100, "slo_ms": 20}], max_batch=4,
            shares=[50, 100])
    p0 = plan(d, TINY, algorithm="gpulet", interference=NoInterference(), max_models=1)
    assert p0.gpus == 1
    assert sorted(g.share for g in p0.gpulets) == [50, 50]
    p1 = plan(d, TINY, algorithm="gpulet", interference=Const(), max_models=1)
    assert p1.gpus == 2
    assert validate_plan(p1, d, TINY, interference=Const()) == []
    # the first plan would break under that interference, which the checker sees
    assert validate_plan(p0, d, TINY, interference=Const()) != []
    assert plan(d, TINY, algorithm="ideal", interference=Const(), max_models=1).gpus == 2
    assert plan(d, TINY, algorithm="ideal", interference=NoInterference(), max_models=1).gpus == 1
    # with temporal sharing the optimum runs both on one whole gpu-let (no co-runner, no slowdown):
    # L(1) = 4 ms each, D = 8 ms, worst 12 <= 20
    p2 = plan(d, TINY, algorithm="ideal", interference=Const())
    assert p2.gpus == 1 and len(p2.gpulets) == 1 and p2.gpulets[0].share == 100
    assert validate_plan(p2, d, TINY, interference=Const()) == []


def test_running_at_once_each_model_keeps_its_own_cycle():
    # shares [100]; a (SLO 10 ms, 100 req/s) beside c (SLO 100 ms, 350 req/s). Each is a Triton instance
    # with its own queue, so a's requests never wait for c's batches: a runs batch 1 every 4 ms (worst
    # 4 + 4 = 8 <= 10), c batch 3 every 8 ms (L(3) = 8). One common cycle would be at least c's 8 ms
    # and a's worst latency 8 + 4 = 12 > 10: two GPUs.
    models = [{"name": "a", "rate": 100, "slo_ms": 10}, {"name": "c", "rate": 350, "slo_ms": 100}]
    d = dep(models, shares=[100], max_batch=4, colocation="concurrent")
    p = plan(d, TINY, algorithm="gpulet")
    assert p.gpus == 1 and len(p.gpulets) == 1
    g = p.gpulets[0]
    own = {x.model: (x.batch, x.duty_cycle_ms) for x in g.models}
    assert own == {"a": (1, pytest.approx(4.0)), "c": (3, pytest.approx(8.0))}
    assert g.duty_cycle_ms == pytest.approx(8.0)                   # the longest of the models' cycles
    assert p.models["a"].worst_latency_ms == pytest.approx(8.0)
    assert validate_plan(p, d, TINY) == []
    shared = p.model_copy(deep=True)
    next(x for x in shared.gpulets[0].models if x.model == "a").duty_cycle_ms = 0.0   # on the gpu-let's 8 ms
    assert any("a worst latency 12.000 ms > SLO 10.0 ms" in e for e in validate_plan(shared, d, TINY))
    assert plan(dep(models, shares=[100], max_batch=4), TINY, algorithm="gpulet").gpus == 2     # turns


def test_running_at_once_a_gpulets_own_models_interfere():
    # shares [100], a and b at 100 req/s, SLO 20, on one gpu-let. Taking turns they never run together:
    # no co-runner, no slowdown. At once each is the other's co-runner: under a x2 slowdown L(1) = 8 ms,
    # so the duty cycle is 8 ms, not 4 (still 125 req/s each, worst 16 <= 20).
    models = [{"name": "a", "rate": 100, "slo_ms": 20}, {"name": "b", "rate": 100, "slo_ms": 20}]
    d = dep(models, max_batch=4, shares=[100], colocation="concurrent")
    p0 = plan(d, TINY, algorithm="gpulet", interference=NoInterference())
    p1 = plan(d, TINY, algorithm="gpulet", interference=Const())
    assert [len(p.gpulets) for p in (p0, p1)] == [1, 1]
    assert (p0.gpulets[0].duty_cycle_ms, p1.gpulets[0].duty_cycle_ms) == (pytest.approx(4.0), pytest.approx(8.0))
    assert validate_plan(p1, d, TINY, interference=Const()) == []
    assert any("batches take 8.000 ms > duty cycle 4.000 ms" in e for e in validate_plan(p0, d, TINY, interference=Const()))
    turns = dep(models, max_batch=4, shares=[100])
    pt = plan(turns, TINY, algorithm="gpulet", interference=Const())
    assert len(pt.gpulets) == 1 and validate_plan(pt, turns, TINY, interference=Const()) == []


def test_unreachable_slo_names_model_and_best_latency():
    d = dep([{"name": "a", "rate": 10, "slo_ms": 40}, {"name": "c", "rate": 10, "slo_ms": 7}])
    with pytest.raises(SchedulingError) as e:
        plan(d, TINY)
    msg = str(e.value)
    assert "'c'" in msg and "4 ms" in msg and "SLO 7" in msg


def test_not_enough_gpus_says_how_many():
    d = dep([{"name": "a", "rate": 1000, "slo_ms": 20}], max_batch=4)
    need = plan(d, TINY).gpus
    assert need >= 2
    with pytest.raises(SchedulingError, match=rf"needs {need} GPU"):
        plan(d, TINY, gpus=need - 1)
    assert plan(d, TINY, gpus=need).gpus == need


def test_unknown_model_and_algorithm():
    with pytest.raises(SchedulingError, match="no profile .* zzz"):
        plan(dep([{"name": "zzz", "rate": 1, "slo_ms": 100}]), TINY)
    with pytest.raises(SchedulingError, match="unknown scheduling algorithm"):
        plan(dep([{"name": "a", "rate": 1, "slo_ms": 100}]), TINY, algorithm="nope")


def test_trivial_plan_one_gpu_per_model():
    d = dep([{"name": "a", "rate": 5, "slo_ms": 100, "max_batch": 3}, {"name": "b", "rate": 5, "slo_ms": 100}])
    p = plan(d, TINY, algorithm="trivial")
    assert p.gpus == 2 and [g.share for g in p.gpulets] == [100, 100]
    assert [g.models[0].batch for g in p.gpulets] == [3, 1]
    assert {g.id for g in p.gpulets} == {"gpu0-a", "gpu1-a"}


def test_zero_rate_model_gets_no_gpulet():
    d = dep([{"name": "a", "rate": 0, "slo_ms": 40}, {"name": "b", "rate": 50, "slo_ms": 40}])
    p = plan(d, TINY)
    assert p.model_names() == ["b"]
    assert p.models["a"].throughput == 0


def test_plan_is_json_roundtrip_and_table_renders():
    d = dep([{"name": "resnet50", "rate": 900, "slo_ms": 108}, {"name": "lenet", "rate": 500, "slo_ms": 5}],
            interference=True, latency_margin=1.1)
    p = plan(d, synthetic_store())
    again = Plan.model_validate(json.loads(p.model_dump_json()))
    assert again == p
    assert p.algorithm == "gpulet" and p.device == "synthetic-h100"
    t = render_table(p)
    assert "resnet50" in t and f"{p.gpus} GPU(s)" in t


def test_memory_check_splits_models():
    store = store_from_function(lambda m, s, b: 1.0 + b, ["a", "b"], shares=[50, 100], batches=[1, 2],
                                memory_mb={"a": 600, "b": 600}, memory_mb_total=1000)
    d = dep([{"name": "a", "rate": 10, "slo_ms": 50}, {"name": "b", "rate": 10, "slo_ms": 50}], max_batch=2)
    assert plan(d, store).gpus == 2
    assert plan(d, store, memory_check=False).gpus == 1


# --------------------------------------------------------------------------- interference


def test_linear_model_alone_is_one_and_pressure_grows():
    im = LinearUtilInterference()
    assert im.slowdown("resnet50", 50, 8, []) == 1.0
    light = im.slowdown("resnet50", 50, 8, [("lenet", 50, 1)])
    heavy = im.slowdown("resnet50", 50, 8, [("vgg16", 50, 32)])
    assert 1.0 <= light < heavy < 2.0
    assert im.slowdown("lenet4", 50, 8, [("vgg16", 50, 32)]) == im.slowdown("lenet", 50, 8, [("vgg16", 50, 32)])


def _pairs_from(truth, n, seed=0):
    rng = random.Random(seed)
    models = ["resnet50", "vgg16", "lenet", "bert"]
    rows = []
    for _ in range(n):
        ma, mb = rng.choice(models), rng.choice(models)
        sa = rng.choice([20, 40, 50, 60, 80])
        sb = 100 - sa
        ba, bb = rng.choice([1, 4, 16]), rng.choice([1, 4, 16])
        rows.append({"device": "H100", "model_a": ma, "share_a": str(sa), "batch_a": str(ba), "model_b": mb,
                     "share_b": str(sb), "batch_b": str(bb),
                     "slowdown_a": str(truth.slowdown(ma, sa, ba, [(mb, sb, bb)])),
                     "slowdown_b": str(truth.slowdown(mb, sb, bb, [(ma, sa, ba)]))})
    return rows


def test_fit_pairs_recovers_a_model_of_its_own_form(tmp_path):
    truth = FittedInterference(
        coef={"k0": 0.05, "k_share_a": -0.02, "k_share_b": 0.1, "k_log2batch_a": 0.01, "k_log2batch_b": 0.02},
        sensitivity={"resnet50": 0.05, "vgg16": 0.1, "lenet": 0.0, "bert": 0.03},
        pressure={"resnet50": 0.08, "vgg16": 0.15, "lenet": 0.0, "bert": 0.04})
    fit = fit_pairs(_pairs_from(truth, 200))
    err = prediction_errors(fit, _pairs_from(truth, 100, seed=1))
    assert err["mae"] < 0.01 and err["n"] == 200
    p = tmp_path / "int.json"
    fit.save(p)
    back = FittedInterference.load(p)
    row = _pairs_from(truth, 1, seed=2)[0]
    assert back.predict(row) == pytest.approx(fit.predict(row))
    assert fit.slowdown("resnet50", 50, 4, []) == 1.0
    assert fit.slowdown("unseen", 50, 4, [("unseen2", 50, 4)]) >= 1.0


def test_fit_pairs_rejects_incomplete_rows():
    with pytest.raises(ValueError, match="missing"):
        fit_pairs([{"model_a": "x"}])


# --------------------------------------------------------------------------- properties

SLO = {"lenet": 5, "googlenet": 66, "resnet50": 108, "ssd-mobilenet": 202, "vgg16": 142, "mnasnet1_0": 62,
       "mobilenet_v2": 64, "densenet161": 202, "bert": 22}
SYN = synthetic_store()

workloads = st.lists(
    st.tuples(st.sampled_from(sorted(SLO)), st.integers(0, 2500)), min_size=1, max_size=4, unique_by=lambda x: x[0]
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wl=workloads, interference=st.booleans())
def test_every_plan_is_feasible_and_never_worse_than_temporal(wl, interference):
    d = dep([{"name": m, "rate": r, "slo_ms": SLO[m]} for m, r in wl], latency_margin=1.1,
            interference=interference)
    im = LinearUtilInterference() if interference else NoInterference()
    lb = gpu_lower_bound(d, SYN)
    results = {}
    for algo in ("gpulet", "temporal", "greedy", "ideal"):
        try:
            p = plan(d, SYN, algorithm=algo)
        except OptimumTooLarge:  # the exact optimum has limits; the others must always answer
            assert algo == "ideal"
            continue
        assert validate_plan(p, d, SYN, interference=im) == [], algo
        for gid in range(p.gpus):
            assert p.used_share(gid) <= 100
        for m, r in wl:
            assert p.models[m].throughput >= r - 1e-6
            assert p.models[m].worst_latency_ms <= SLO[m] + 1e-6
        assert p.gpus >= lb
        results[algo] = p.gpus
    assert results["gpulet"] <= results["temporal"]
    if "ideal" in results:
        assert results["ideal"] <= results["gpulet"]


@settings(max_examples=15, deadline=None)
@given(wl=workloads)
def test_more_gpus_allowed_never_hurts(wl):
    d = dep([{"name": m, "rate": r, "slo_ms": SLO[m]} for m, r in wl])
    p = plan(d, SYN)
    assert plan(d, SYN, gpus=max(p.gpus, 1)).gpus == p.gpus


def test_registry_names():
    """Each name runs the function of that name: `ideal` the exact optimum, `ideal-prototype` the
    prototype's space (no `milp`: it named the method, and ran the other one)."""
    from controlplane.scheduler import baselines, gpulet, ideal, temporal

    assert ALGORITHMS["gpulet"] is gpulet and ALGORITHMS["temporal"] is temporal and ALGORITHMS["ideal"] is ideal
    assert ALGORITHMS["ideal-prototype"] is baselines.ideal_prototype
    assert ALGORITHMS["greedy"] is baselines.greedy and ALGORITHMS["trivial"] is baselines.trivial
    assert "milp" not in ALGORITHMS


def test_planning_10_models_at_scale():
    # Planning time is measured in benchmarks/scheduler.py, not here.
    names = sorted(SLO)
    d = dep([{"name": n, "rate": 3000.0, "slo_ms": SLO[n]} for n in names], latency_margin=1.1, interference=True)
    p = plan(d, SYN)
    assert p.gpus >= gpu_lower_bound(d, SYN)
    assert not math.isnan(p.models["bert"].throughput)


def test_plot_writes_png(tmp_path):
    from controlplane.plot import plot

    d = dep([{"name": "a", "rate": 100, "slo_ms": 40}, {"name": "b", "rate": 100, "slo_ms": 40}], shares=[100])
    out = plot(plan(d, TINY), tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- exact optimum vs brute force


def _brute_force_gpus(store, rates, slos, shares, max_batch, max_models, interference, limit=3):
    """Fewest GPUs by enumerating every gpu-let (share, models, batches; duty = sum of latencies)
    and every GPU (one gpu-let, or two whose shares fit, slowed down by ``interference``), then
    every multiset of up to ``limit`` GPUs. Independent of the column program."""
    import itertools as it

    models = [m for m in rates if rates[m] > 0]

    def let_thr(s, S, bs, slow):
        lat = [store.latency(m, s, b) * slow for m, b in zip(S, bs)]
        D = sum(lat)
        if any(D + L > slos[m] + 1e-9 for m, L in zip(S, lat)):
            return None
        return {m: 1000.0 * b / D for m, b in zip(S, bs)}

    lets = []
    for s in shares:
        for k in range(1, max_models + 1):
            for S in it.combinations(models, k):
                for bs in it.product(range(1, max_batch + 1), repeat=k):
                    lets.append((s, S, bs))
    gpus = []
    for s, S, bs in lets:
        t = let_thr(s, S, bs, 1.0)
        if t:
            gpus.append(t)
    for (s1, S1, b1), (s2, S2, b2) in it.combinations_with_replacement(lets, 2):
        if s1 + s2 > 100:
            continue
        f = 2.0 if interference else 1.0
        t1, t2 = let_thr(s1, S1, b1, f), let_thr(s2, S2, b2, f)
        if t1 and t2:
            gpus.append({m: t1.get(m, 0.0) + t2.get(m, 0.0) for m in models})
    vecs = {tuple(round(min(g.get(m, 0.0), rates[m]), 9) for m in models) for g in gpus}
    vecs = [v for v in vecs if not any(w != v and all(a >= b for a, b in zip(w, v)) for w in vecs)]
    for n in range(1, limit + 1):
        for combo in it.combinations_with_replacement(vecs, n):
            if all(sum(v[i] for v in combo) >= rates[m] - 1e-6 for i, m in enumerate(models)):
                return n
    return None


@pytest.mark.parametrize("seed", range(12))
def test_exact_optimum_matches_brute_force(seed):
    rng = random.Random(seed)
    store = store_from_function(lambda m, s, b: ({"a": 2.0, "b": 3.0, "c": 1.0}[m] + 1.5 * b) * 100.0 / s,
                                ["a", "b", "c"], shares=[50, 100], batches=[1, 2, 3])
    slos = {"a": rng.choice([20, 30, 40]), "b": rng.choice([25, 40]), "c": rng.choice([10, 15, 30])}
    rates = {m: rng.choice([0, 50, 100, 150, 250, 400]) for m in slos}
    if not any(rates.values()):
        rates["a"] = 100
    interference = seed % 2 == 1
    d = dep([{"name": m, "rate": rates[m], "slo_ms": slos[m]} for m in slos], shares=[50, 100], max_batch=3)
    im = Const() if interference else NoInterference()
    want = _brute_force_gpus(store, rates, slos, [50, 100], 3, 2, interference)
    try:
        p = plan(d, store, algorithm="ideal", interference=im, max_models=2)
    except SchedulingError:
        assert want is None
        return
    if want is not None:
        assert p.gpus == want, (rates, slos)
    else:
        assert p.gpus > 3
    assert validate_plan(p, d, store, interference=im) == []
    assert p.gpus <= plan(d, store, algorithm="gpulet", interference=im, max_models=2).gpus


# --------------------------------------------------------------------------- consolidation, best, measured profile

import itertools  # noqa: E402
from pathlib import Path  # noqa: E402

H100 = Path(__file__).resolve().parents[1] / "profiles" / "h100"
needs_h100 = pytest.mark.skipif(not (H100 / "latency.csv").exists(), reason="profiles/h100 not committed")


def _h100():
    from controlplane.profiles import ProfileStore

    return ProfileStore.load(H100)


@needs_h100
def test_consolidation_saves_the_gpu_the_paper_heuristic_loses():
    # the paper's one-pass heuristic needs 2 GPUs; consolidation re-partitions one GPU into two
    # gpu-lets of three models each (the optimum)
    store = _h100()
    rates = {"lenet": 100, "vgg16": 200, "mnasnet1_0": 100, "mobilenet_v2": 200, "densenet161": 100, "bert": 100}
    d = dep([{"name": m, "rate": r, "slo_ms": SLO[m]} for m, r in rates.items()], latency_margin=1.1)
    assert plan(d, store, algorithm="gpulet-paper").gpus == 2
    p = plan(d, store, algorithm="gpulet")
    assert p.gpus == 1
    assert max(len(g.models) for g in p.gpulets) <= 3  # within the optimum's space
    assert validate_plan(p, d, store) == []


@needs_h100
def test_gpulet_matches_the_optimum_on_a_sample_of_h100_mixes():
    store = _h100()
    names = sorted(SLO)
    mixes = [m for m in itertools.product([0, 100, 200], repeat=9) if any(m)][::613]
    worse = []
    for mix in mixes:
        d = dep([{"name": n, "rate": r, "slo_ms": SLO[n]} for n, r in zip(names, mix) if r], latency_margin=1.1)
        g = plan(d, store, algorithm="gpulet")
        assert validate_plan(g, d, store) == []
        o = plan(d, store, algorithm="ideal")
        if g.gpus > o.gpus:
            worse.append(mix)
    assert not worse, worse


@needs_h100
def test_gpulet_plans_10_models_on_about_50_gpus():
    # Planning time (~60 ms) is measured in benchmarks/scheduler.py, not here.
    store = _h100()
    store.alias("lenet1", "lenet")
    slo = dict(SLO, lenet1=5)
    d = dep([{"name": n, "rate": 23400.0, "slo_ms": s} for n, s in slo.items()], latency_margin=1.1,
            interference=True)
    p = plan(d, store, algorithm="gpulet")
    assert 30 <= p.gpus <= 64
    assert validate_plan(p, d, store, interference=store.interference) == []


def test_best_is_gpulet_refined_by_the_optimum():
    d = dep([{"name": "a", "rate": 120, "slo_ms": 30}, {"name": "b", "rate": 260, "slo_ms": 40},
             {"name": "c", "rate": 90, "slo_ms": 25}], shares=[50, 100], max_batch=4)
    g = plan(d, TINY, algorithm="gpulet")
    b = plan(d, TINY, algorithm="best")
    assert b.gpus <= g.gpus
    assert b.gpus == plan(d, TINY, algorithm="ideal").gpus
    assert validate_plan(b, d, TINY) == []


# latency not monotone in batch (as measured on small shares: batch 1 slower than batch 2)
BUMPY = store_from_function(lambda m, s, b: ({"a": 2.0, "b": 3.0, "c": 1.0}[m] + 1.5 * b + (6.0 if b == 1 else 0.0))
                            * 100.0 / s, ["a", "b", "c"], shares=[50, 100], batches=[1, 2, 3])


def test_a_faster_larger_batch_is_used():
    # a alone at 50 req/s on 100 %: batch 1 takes 9.5 ms, batch 2 only 5 ms -> run batch 2
    d = dep([{"name": "a", "rate": 50, "slo_ms": 30}], shares=[100], max_batch=3)
    p = plan(d, BUMPY, algorithm="gpulet")
    assert p.gpulets[0].models[0].batch == 2
    assert validate_plan(p, d, BUMPY) == []


@pytest.mark.parametrize("seed", range(6))
def test_exact_optimum_matches_brute_force_on_a_non_monotone_profile(seed):
    rng = random.Random(100 + seed)
    slos = {"a": rng.choice([25, 40]), "b": rng.choice([30, 45]), "c": rng.choice([20, 30])}
    rates = {m: rng.choice([0, 50, 100, 200, 300]) for m in slos}
    if not any(rates.values()):
        rates["b"] = 150
    d = dep([{"name": m, "rate": rates[m], "slo_ms": slos[m]} for m in slos], shares=[50, 100], max_batch=3)
    want = _brute_force_gpus(BUMPY, rates, slos, [50, 100], 3, 2, False)
    try:
        p = plan(d, BUMPY, algorithm="ideal", max_models=2)
    except SchedulingError:
        assert want is None
        return
    if want is not None:
        assert p.gpus == want, (rates, slos)
    assert validate_plan(p, d, BUMPY) == []
    g = plan(d, BUMPY, algorithm="gpulet", max_models=2)
    assert validate_plan(g, d, BUMPY) == []


def test_bursts_padded_within_half_the_slo_and_overhead_comes_off_the_slo():
    """burst_pct: each model planned for the quantile of its Poisson arrivals within half its SLO (a tight
    SLO gets relatively more room); overhead_ms: the time outside the batch counts against the SLO, in the
    plan and in its check."""
    from scipy.stats import poisson

    from controlplane.scheduler import burst_pad

    assert burst_pad(100.0, 40.0, 0.99) == pytest.approx(poisson.ppf(0.99, 2.0) / 0.02)      # 6 in 20 ms
    assert burst_pad(100.0, 40.0, 0.0) == 100.0 and burst_pad(0.0, 40.0, 0.99) == 0.0
    assert burst_pad(1000.0, 20.0, 0.99) / 1000 > burst_pad(1000.0, 200.0, 0.99) / 1000 > 1.0
    models = [{"name": "a", "rate": 100, "slo_ms": 40}]
    full = plan(dep(models), TINY, algorithm="gpulet")
    room = plan(dep(models, burst_pct=0.99), TINY, algorithm="gpulet")
    assert room.models["a"].rate == pytest.approx(300.0)
    assert room.models["a"].throughput >= 300.0 - 1e-6 > full.models["a"].rate
    slow = dep(models, overhead_ms=25.0)
    p = plan(slow, TINY, algorithm="gpulet")
    assert p.models["a"].slo_ms == 40
    assert p.models["a"].worst_latency_ms <= 40 + 1e-6
    assert p.models["a"].worst_latency_ms == pytest.approx(
        max(g.duty_cycle_ms + g.assignment("a").latency_ms for g in p.gpulets_for("a")) + 25.0)
    assert validate_plan(p, slow, TINY, margin=1.0) == []
    assert validate_plan(full, slow, TINY, margin=1.0) != []      # planned without the overhead: too slow
    with pytest.raises(SchedulingError, match="overhead_ms"):
        plan(dep(models, overhead_ms=40.0), TINY, algorithm="gpulet")


def _let_key(g) -> tuple:
    """A gpu-let as its server is started (its GPU index aside: to_plan renumbers past an emptied GPU)."""
    return (g.share, tuple(sorted((a.model, a.batch) for a in g.models)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wl=workloads, which=st.integers(0, 3), factor=st.sampled_from([0.0, 0.4, 1.6, 3.0]), add=st.booleans(),
       interference=st.booleans())
def test_replanning_keeps_the_gpulets_of_unchanged_models(wl, which, factor, add, interference):
    """One model's rate changes (or a model is added): the incremental candidate keeps every gpu-let whose
    models kept their rate; the plan taken is feasible and uses no more GPUs than planning afresh."""
    from collections import Counter

    from controlplane.scheduler import ALGORITHMS, make_ctx, to_plan
    from controlplane.scheduler.incremental import incremental

    d0 = dep([{"name": m, "rate": r, "slo_ms": SLO[m]} for m, r in wl], latency_margin=1.1, interference=interference)
    p0 = plan(d0, SYN)
    changed = wl[which % len(wl)][0]
    models = [{"name": m, "rate": r * factor if m == changed else r, "slo_ms": SLO[m]} for m, r in wl]
    extra = next(m for m in SLO if m not in dict(wl))
    if add:
        models.append({"name": extra, "rate": 300, "slo_ms": SLO[extra]})
    d1 = dep(models, latency_margin=1.1, interference=interference)
    im = LinearUtilInterference() if interference else NoInterference()
    inc = plan(d1, SYN, previous=p0)
    assert validate_plan(inc, d1, SYN, interference=im) == []
    assert inc.gpus <= plan(d1, SYN).gpus
    ctx = make_ctx(d1, SYN)
    got = incremental(ctx, p0, ALGORITHMS["gpulet"], None)
    unchanged = [g for g in p0.gpulets if changed not in {a.model for a in g.models}]
    if got is not None:
        cand = to_plan(ctx, got, "t", "gpulet")
        if not interference:     # with it, a kept gpu-let's batches follow its new neighbours' interference
            assert not Counter(map(_let_key, unchanged)) - Counter(map(_let_key, cand.gpulets))
        assert validate_plan(cand, d1, SYN, interference=im) == []
    elif unchanged and not interference:
        # without interference, kept gpu-lets always hold: only a model that fits nowhere makes it give up
        assert add or factor > 1


def test_replanning_one_model_moves_only_that_model():
    """The nine models on the synthetic profile, bert's rate down from 400 to 100 req/s: only bert's
    gpu-let (and any model it shared one with) is planned again, on less share; the rest stays."""
    d0 = dep([{"name": m, "rate": 400, "slo_ms": s} for m, s in SLO.items()], latency_margin=1.1)
    p0 = plan(d0, SYN)
    d1 = dep([{"name": m, "rate": 100 if m == "bert" else 400, "slo_ms": s} for m, s in SLO.items()],
             latency_margin=1.1)
    inc = plan(d1, SYN, previous=p0)
    moved = [g for g in p0.gpulets if _let_key(g) not in set(map(_let_key, inc.gpulets))]
    assert moved and {a.model for g in moved for a in g.models} <= {a.model for g in p0.gpulets_for("bert")
                                                                   for a in g.models}
    assert inc.models["bert"].throughput >= 100
    assert sum(g.share for g in inc.gpulets_for("bert")) < sum(g.share for g in p0.gpulets_for("bert"))
    assert validate_plan(inc, d1, SYN) == []


def test_a_step_back_gives_back_gpulets_and_starts_none():
    """resnet50 steps from 2x back to 1x on 20 % gpu-lets (the H200's live trace): the incremental plan keeps
    the gpu-lets the 1x rate needs exactly as they run (no server to start: a transition is then only the
    routing and the old servers' stop) and gives back the others; the kept ones carry the new rate."""
    from collections import Counter

    base = [("resnet50", 600), ("bert", 400), ("vgg16", 200)]
    kw = dict(shares=[20, 40, 60, 80, 100], gpulets_per_gpu=5)
    d0 = dep([{"name": m, "rate": r * (2 if m == "resnet50" else 1), "slo_ms": SLO[m]} for m, r in base], **kw)
    p0 = plan(d0, SYN)
    d1 = dep([{"name": m, "rate": r, "slo_ms": SLO[m]} for m, r in base], **kw)
    p1 = plan(d1, SYN, previous=p0)
    assert validate_plan(p1, d1, SYN) == []
    assert not Counter(map(_let_key, p1.gpulets)) - Counter(map(_let_key, p0.gpulets))      # nothing new
    assert len(p1.gpulets_for("resnet50")) < len(p0.gpulets_for("resnet50"))
    assert sum(g.share for g in p1.gpulets) < sum(g.share for g in p0.gpulets)
    assert sum(g.assignment("resnet50").rate for g in p1.gpulets_for("resnet50")) == pytest.approx(600, rel=1e-6)
    # a rate that falls less than one gpu-let's worth has nothing to drop: the model is planned again
    d2 = dep([{"name": m, "rate": r * (1.9 if m == "resnet50" else 1), "slo_ms": SLO[m]} for m, r in base], **kw)
    p2 = plan(d2, SYN, previous=p0)
    assert validate_plan(p2, d2, SYN) == []
    assert sum(g.share for g in p2.gpulets) <= sum(g.share for g in p0.gpulets)
