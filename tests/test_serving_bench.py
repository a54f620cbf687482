"""benchmarks/serving.py's app-mix logic, pure (no server): what the load targets are, scaling, the plain
tritonservers' models, the early profile check and the plan for an app (issue 16). The benchmark itself
runs on a GPU; its CPU smoke run is described in its module docstring's section on app mixes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from controlplane.paths import SHIPPED_PROFILES
from controlplane.profiles import ProfileStore, read_csv
from controlplane.spec import Deployment, load_deployment

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def serving():
    spec = importlib.util.spec_from_file_location("serving_bench", ROOT / "benchmarks" / "serving.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def traffic() -> Deployment:
    return load_deployment(ROOT / "deployments" / "traffic.yaml")


@pytest.fixture(scope="module")
def full_h200() -> ProfileStore:
    """profiles/h200 as shipped: every model of the serving mixes, traffic's steps included."""
    return ProfileStore.load(SHIPPED_PROFILES / "h200")


def test_targets_are_the_apps_and_the_models_with_a_rate(serving, traffic):
    assert [(t.name, t.rate, t.slo_ms, t.app) for t in serving.targets(traffic)] == [("traffic", 200.0, 202.0, True)]
    gpu_run = load_deployment(ROOT / "deployments" / "gpu-run.yaml")
    assert [(t.name, t.app) for t in serving.targets(gpu_run)] == [("resnet50", False), ("vgg16", False),
                                                                   ("bert", False)]
    assert serving.MIXES["traffic"] == ROOT / "deployments" / "traffic.yaml"


def test_scaled_scales_the_apps_too(serving, traffic):
    s = serving.scaled(traffic, 1.5)
    assert s.apps[0].rate == pytest.approx(300.0)
    assert [m.rate for m in s.models] == [0.0] * 4


def test_profile_check_names_the_missing_models_and_the_command(serving, traffic, full_h200):
    rows = [r for r in read_csv(SHIPPED_PROFILES / "h200" / "latency.csv")
            if r.model not in ("ssd-mobilenet", "crop", "googlenet")]
    store = ProfileStore.from_rows(rows, device=rows[0].device)      # the H200 profile before run 12
    why = serving.missing_profiles({"traffic": traffic}, store, Path("profiles/h200"))
    assert "ssd-mobilenet, crop, googlenet" in why and "vgg16" not in why.split("(")[1]
    assert "controlplane profile --device gpu --mode serving -m ssd-mobilenet,crop,googlenet" in why
    assert "--shares 20,30,40,50,60,70,80,100 --batches 1,2,4,8,16,32" in why
    assert "--csv profiles/h200/latency.csv" in why
    assert serving.missing_profiles({"traffic": traffic}, full_h200, Path("x")) is None


def test_plain_triton_models_and_the_plan_carry_the_same_split(serving, traffic, full_h200):
    served = serving.served(traffic, full_h200)
    assert [m.name for m in served.models] == ["ssd-mobilenet", "crop", "googlenet", "vgg16"]
    assert all(m.rate == 200.0 for m in served.models)
    scale, plan = serving.planner_max(traffic, full_h200, "gpulet", steps=4)
    assert scale > 0 and plan is not None
    app = plan.apps["traffic"]
    assert app.rate == pytest.approx(200.0 * scale)
    assert {m.name: round(m.slo_ms, 3) for m in served.models} == app.budgets_ms


def test_app_note_reports_end_to_end_attainment_at_the_planned_rate(serving):
    point = {"scale": 1.25, "models": {"traffic": {"attainment": 0.995, "behind": False}}}
    m = {"rates": {"traffic": 200.0}, "slo_ms": {"traffic": 202.0}, "apps": {"traffic": ["ssd-mobilenet", "crop"]},
         "predicted": {"gpulet": 1.25}, "systems": {"gpulet": {"points": [point]}}}
    note = serving.app_note("traffic", m)
    assert "x1.25, 250 req/s) 99.50 % within the SLO" in note and "direct: n/a" in note


def test_the_hand_split_puts_the_tightest_slo_model_alone(serving):
    """mps-split, the design notes' 40/60 arrangement: bert (22 ms) alone, resnet50 and vgg16 together."""
    gpu_run = load_deployment(ROOT / "deployments" / "gpu-run.yaml")
    assert serving.hand_split(gpu_run) == [["bert"], ["resnet50", "vgg16"]]
    assert serving.HAND_SHARES == [40, 60] and "mps-split" not in serving.TRITONS


def test_on_the_h200_the_gpulet_system_runs_a_gpulets_models_at_once_and_turns_is_the_papers(serving, full_h200):
    """``gpulet`` serves the mix as shipped (``colocation: auto``: concurrent on a GPU); ``turns`` the same mix
    with the paper's turn-taking. Each plan checks out against the deployment it is served with, and the
    concurrent plan at its max scale is more than turn-taking allows (else the two systems would be one)."""
    from controlplane.scheduler import validate_plan

    gpu_run = load_deployment(ROOT / "deployments" / "gpu-run.yaml")
    tt = serving.turns(gpu_run)
    assert gpu_run.scheduler.colocation == "auto" and tt.scheduler.colocation == "turns"
    scale, plan = serving.planner_max(gpu_run, full_h200, "gpulet", steps=6)
    t_scale, t_plan = serving.planner_max(tt, full_h200, "gpulet", steps=6)
    assert plan is not None and t_plan is not None and scale > t_scale > 0
    assert validate_plan(plan, serving.scaled(gpu_run, scale), full_h200) == []
    assert validate_plan(t_plan, serving.scaled(tt, t_scale), full_h200) == []
    assert validate_plan(plan, serving.scaled(tt, scale), full_h200) != []
    assert "turns" in serving.SYSTEMS and "turns" not in serving.TRITONS


def test_the_table_compares_with_the_best_tritonserver_and_the_hand_split_apart(serving):
    """Issue 10's targets are against one plain tritonserver (1, 2 or 4 instances); the hand split under MPS
    is a column of its own, and measured over predicted is the plan's honesty."""
    def sysd(mx, fail=None):
        return {"points": [{}], "max_scale": mx, "fail_scale": fail}
    doc = {"date": "d", "gpu": "g", "command": "c", "profile": "p", "profile_device": "pd", "duration_s": 8,
           "attainment": 0.99, "mixes": {"m": {"predicted": {"gpulet": 2.5}, "systems": {
               "gpulet": sysd(2.0, 2.5), "triton1": sysd(1.6), "triton2": sysd(1.0), "mps-split": sysd(2.5),
               "direct": sysd(2.5), "temporal": sysd(1.0)}}}}
    row = next(ln for ln in serving.render(doc).splitlines() if ln.startswith("| m |"))
    head = next(ln for ln in serving.render(doc).splitlines() if ln.startswith("| mix |"))
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["gpu-let / predicted"] == "0.80x"
    assert cells["gpu-let / best tritonN"] == "1.25x"
    assert cells["gpu-let / mps-split"] == "0.80x"
    assert cells["gpu-let / temporal"] == "2.00x" and cells["router / direct"] == "0.80x"


def test_router_side_attainment_is_read_from_the_routers_own_counters(serving):
    """Per point the benchmark diffs the router's arrivals and answers within the SLO (its /metrics text,
    every router process summed), so a miss can be placed inside or outside the router."""
    from controlplane.router.core import Metrics

    m = Metrics()
    for _ in range(10):
        m.requests.labels("bert").inc()
    m.slo_met.labels("bert").inc(10)
    before = serving.router_counts(m.exposition().decode())
    assert before == {"bert": (10.0, 10.0)}
    m.requests.labels("bert").inc(100)
    m.slo_met.labels("bert").inc(97)
    m.requests.labels("vgg16").inc(5)
    after = serving.router_counts(m.exposition().decode())
    assert serving.router_attainment(before, after) == {"bert": 0.97, "vgg16": 0.0}
    assert serving.router_counts("") == {} and serving.router_attainment({}, {}) == {}


def test_the_search_brackets_a_max_scale_from_a_close_first_point(serving):
    """From a first point within 20 % of the answer (a prediction, an earlier run), three points bracket
    the max scale within 12 %: a step of STEP to a bracket, then bisection. A system known to be below a
    better one's max stops after two failures."""
    def system(capacity):
        tried = []

        def probe(s):
            tried.append(round(s, 4))
            return {"scale": s, "pass": s <= capacity}
        return probe, tried

    probe, tried = system(2.3)
    r = serving.search(probe, 2.68, 3)
    assert tried == [2.68, 2.144, 2.412] and (r["max_scale"], r["fail_scale"]) == (2.144, 2.412)
    assert r["fail_scale"] / r["max_scale"] < 1.13 and len(r["points"]) == 3
    probe, tried = system(3.0)
    r = serving.search(probe, 2.4, 3)
    assert tried == [2.4, 3.0, 3.75] and (r["max_scale"], r["fail_scale"]) == (3.0, 3.75)
    probe, tried = system(1.0)
    r = serving.search(probe, 2.0, 4, below=True)
    assert tried == [2.0, 1.6] and r["max_scale"] == 0.0 and r["fail_scale"] == 1.6


def test_live_bench_answers_a_load_change_only_with_a_replan_for_the_model_that_changed():
    """benchmarks/live.py's reaction time: a re-plan for another model (run 17: resnet50's step back landing
    after vgg16's step) is not the answer to a change; a change nobody re-planned for has none."""
    spec = importlib.util.spec_from_file_location("live_bench", ROOT / "benchmarks" / "live.py")
    live = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(live)
    trace = [{"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0}]
    rows = [{"t_s": 15.0 * i} for i in range(len(trace))]
    replans = [(22.0, "x: measured load: a at 30 req/s > planned 10 (serving after 5 s: ...)"),
               (50.0, "x: measured load: a at 10 req/s < 0.67 x planned 31 (...)")]
    assert live.reactions(rows, trace, replans) == [7.0, 20.0, None]      # b's step: a's re-plan is not its answer
    # a re-plan is timed at its switch: the state shows it only after the old gpu-lets stopped
    assert live.stopped_s("x (serving after 9.4 s: plan 0.0 s, start 9.3 s, route 0.1 s; "
                          "old gpu-lets stopped 6.2 s after)") == 6.2
    assert live.stopped_s("x (serving after 9.4 s: plan 0.0 s, start 9.3 s, route 0.1 s)") == 0.0


def test_startup_bench_cuts_each_real_start_into_stages(tmp_path):
    """benchmarks/startup.py on this machine (CPU: no probes), the default deployment: every start of every
    gpu-let is cut into stages from its real tritonserver's log, each model of the gpu-let found there with its
    stub (of which import torch), load and prepare, all of it within the start as the runtime timed it."""
    import json
    import subprocess

    out = tmp_path / "out"
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--out", str(out), "--work",
                        str(tmp_path / "work"), "--deployment", str(ROOT / "deployments" / "default.yaml"),
                        "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((out / "startup.json").read_text())
    starts = doc["alone"][0] + doc["auto_complete"] + doc["together"]
    assert len(starts) == 3 * len(doc["plan"])
    for s in starts:
        planned = next(g for g in doc["plan"] if g["gpulet"] == s["gpulet"])
        assert sorted(s["models"]) == sorted(planned["models"]), s
        for m in s["models"].values():
            assert 0 < m["import_torch"] <= m["stub"] <= m["total"] <= s["total"] + 0.05, s
            assert 0 <= m["done_after"] <= s["total"] + 0.05, s
        assert s["spawn_to_loading"] >= 0 and s["models_to_http"] >= -0.05 and s["http_to_ready"] >= -0.05, s
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs        # a CPU run writes nothing into the tree
