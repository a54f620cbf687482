"""Re-planning from the measured load: the pure policy, and a running deployment that follows its traffic."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from controlplane import zoo
from controlplane.live import MIN_RATE, LoadWindow, grow, padded, router_arrivals, shrink

from helpers import metrics, run_cli, tritonserver_pids


def test_window_rates_are_over_two_second_spans_and_the_peak_is_the_busiest_inside_the_window():
    w = LoadWindow(window_s=10)
    for t in range(0, 13):                          # a second apart, 10 req/s
        w.add(t, {"a": 10 * t})
    assert w.peak_rates() == {"a": 10.0} and w.last_rates() == {"a": 10.0} and w.full()
    w.add(13, {"a": 220})                           # a step to 100 req/s at t = 12
    assert w.last_rates() == {"a": 55.0}           # the span [11, 13] straddles it
    w.add(14, {"a": 320})
    assert w.last_rates() == {"a": 100.0} and w.peak_rates() == {"a": 100.0}     # [12, 14]: wholly after
    for t in range(15, 27):                         # back to 10 req/s: the busy spans leave the window
        w.add(t, {"a": 320 + 10 * (t - 14)})
    assert w.peak_rates() == {"a": 10.0}
    w.add(27, {"a": 5})                             # a counter reset (router restarted) counts from 0
    assert w.last_rates() == {"a": 2.5} and w.peak_rates()["a"] == 10.0
    young = LoadWindow(window_s=10)
    for t in range(0, 6):
        young.add(t, {"a": 0})
    assert not young.full() and young.span_s() == 5


def test_grow_over_the_padded_plan_shrink_under_two_thirds_and_keep_the_plan_between():
    planned = {"a": 100.0, "b": 50.0}
    assert padded(100.0) > 110
    assert grow(planned, {"a": padded(100.0) - 1, "b": 40.0}) == (None, "")     # a plan serves its bursts
    rates, why = grow(planned, {"a": 150.0, "b": 10.0})
    assert rates == {"a": padded(150.0), "b": 50.0} and "a at 150" in why and "b" not in why   # b keeps its plan
    assert shrink(planned, {"a": 90.0, "b": 40.0}) == (None, "")               # inside the band: keep
    rates, why = shrink(planned, {"a": 90.0})                                   # b idle: gives share back
    assert rates == {"a": 100.0, "b": MIN_RATE} and "b at 0" in why
    # a step to 2x and back: the padded 1x peak is just over half the padded 2x plan, and shrinks
    at2x = padded(1040.0)
    assert padded(550.0) > 0.5 * at2x
    rates, why = shrink({"a": at2x}, {"a": 550.0})
    assert rates == {"a": padded(550.0)} and "< 0.67 x planned" in why
    assert grow({"a": padded(550.0)}, {"a": 550.0}) == (None, "")              # and does not grow back


def test_router_arrivals_reads_the_counters():
    text = ('# HELP router_requests_total requests received (arrivals)\n# TYPE router_requests_total counter\n'
            'router_requests_total{model="lenet"} 12.0\nrouter_requests_total{model="bert"} 3.0\n')
    assert router_arrivals(text) == {"lenet": 12.0, "bert": 3.0}


DEPLOYMENT = """\
name: follow
models:
  - {{name: lenet, rate: 5, slo_ms: 2000}}
devices: cpu
router: {{http_port: 0, grpc_port: 0}}
scheduler: {{algorithm: trivial, epoch_s: 1, window_s: 3}}
run_dir: {run_dir}
"""


def _rate(path: Path) -> float:
    return json.loads((path.parent / "run" / "state.json").read_text())["plan"]["models"]["lenet"]["rate"]


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.25)
    return False


def test_running_deployment_follows_its_load_without_a_failed_request(tmp_path):
    path = tmp_path / "follow.yaml"
    path.write_text(DEPLOYMENT.format(run_dir=tmp_path / "run"))
    proc = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        r = json.loads((tmp_path / "run" / "state.json").read_text())["router"]
        client = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")
        x = zoo.example_input("lenet", 1, seed=2).numpy()
        inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        ref = client.infer("lenet", [inp]).as_numpy("OUTPUT")
        stop, failures, sent = threading.Event(), [], [0]

        def load() -> None:                      # ~40 req/s, 8x the file's rate
            own = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")   # one client per thread
            while not stop.is_set():
                try:
                    np.testing.assert_allclose(own.infer("lenet", [inp]).as_numpy("OUTPUT"), ref, rtol=1e-5)
                    sent[0] += 1
                except Exception as e:  # noqa: BLE001
                    failures.append(repr(e))
                time.sleep(0.025)

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            assert _wait(lambda: _rate(path) >= 15, 30), f"no re-plan up: planned {_rate(path)}"
        finally:
            stop.set()
            t.join(10)
        assert sent[0] > 0 and failures == [], failures[:3]
        assert _wait(lambda: _rate(path) < 5, 30), f"no re-plan down: planned {_rate(path)}"
        status = run_cli("status", "-f", str(path), "--json")
        doc = json.loads(status.stdout)
        assert doc["replans"] >= 2 and "measured load" in doc["last_replan"]
        # how long it took, by stage
        # (and, where the re-plan dropped gpu-lets, how long stopping them took after the switch)
        assert re.search(r"\(serving after [0-9.]+ s: plan [0-9.]+ s, start [0-9.]+ s, route [0-9.]+ s"
                         r"(; old gpu-lets stopped [0-9.]+ s after)?\)$", doc["last_replan"]), doc["last_replan"]
        m = metrics(f"127.0.0.1:{r['http_port']}")        # the controller's, after the router's own
        assert m[("controlplane_replans_total", (("cause", "measured load"),))] >= 2
        assert m[("controlplane_epochs_total", ())] >= 2 and m[("controlplane_gpulets", ())] == 1
        assert m[("controlplane_planned_rate", (("model", "lenet"),))] == _rate(path)
        assert ("controlplane_measured_rate", (("model", "lenet"),)) in m
        assert m[("router_requests_total", (("model", "lenet"),))] >= sent[0]
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []


def test_recalibration_factors():
    from controlplane.live import MIN_BATCHES, measured_vs_predicted, recalibrate

    before = {1: (10, 10_000_000), 4: (0, 0)}
    after = {1: (30, 50_000_000), 4: (10, 80_000_000)}       # 20 batches of 1 in 40 ms, 10 of 4 in 80 ms
    n, meas, pred = measured_vs_predicted(before, after, lambda b: {1: 1.0, 4: 4.0}[b])
    assert (n, meas, pred) == (30, 120.0, 60.0)
    new, why = recalibrate({}, {"lenet": (n, meas, pred)})
    assert new == {"lenet": 2.0} and "lenet ran 2x" in why
    assert recalibrate({"lenet": 2.0}, {"lenet": (n, meas, pred)}) == (None, "")            # already planned so
    assert recalibrate({}, {"lenet": (MIN_BATCHES - 1, 100.0, 10.0)}) == (None, "")         # too few batches


def test_recalibration_leaves_out_the_interference_the_plan_priced_in():
    """A batch planned at 1.2x its profile x margin (the interference model's slowdown) that runs 1.2x its
    profile is as planned: nothing to recalibrate. Without the slowdown it would be scaled by 1.2 and then
    slowed by the interference model again."""
    from controlplane.live import planned_slowdown, recalibrate

    slow = planned_slowdown(latency_ms=13.2, profile_ms=10.0, margin=1.1)
    assert slow == pytest.approx(1.2)
    assert recalibrate({}, {"bert": (100, 100 * 10.0 * 1.2, 100 * 10.0 * slow)}) == (None, "")
    assert planned_slowdown(13.2, 10.0, 1.1, factor=1.2) == 1.0        # planned with a calibrated profile
    assert planned_slowdown(0.0, 10.0, 1.1) == 1.0                    # a plan without latencies
    assert planned_slowdown(5.0, 10.0, 1.1) == 1.0                    # never below 1


RECAL = """\
name: recal
models:
  - {{name: lenet, rate: 40, slo_ms: 500}}
devices: cpu
router: {{http_port: 0, grpc_port: 0}}
scheduler: {{algorithm: gpulet, epoch_s: 1, window_s: 2}}
profiles: {profiles}
run_dir: {run_dir}
"""


def test_a_profile_10x_too_fast_is_recalibrated_while_serving(tmp_path):
    """lenet's profile says every batch takes a tenth of what this machine takes: within a few epochs
    the controller measures Triton's batch times, re-plans with lenet's latencies scaled by what it
    measured, and no request fails meanwhile."""
    import dataclasses

    from controlplane import devices as devmod
    from controlplane.paths import SHIPPED_PROFILES
    from controlplane.profiles import device_slug, read_csv, write_csv

    name = devmod.resolve("cpu").name
    rows = [dataclasses.replace(r, device=name, p50_ms=r.p50_ms / 10, p99_ms=r.p99_ms / 10, mean_ms=r.mean_ms / 10)
            for r in read_csv(SHIPPED_PROFILES / "cpu-2c" / "latency.csv") if r.model == "lenet"]
    (tmp_path / "profiles" / device_slug(name)).mkdir(parents=True)
    write_csv(tmp_path / "profiles" / device_slug(name) / "latency.csv", rows)
    path = tmp_path / "recal.yaml"
    path.write_text(RECAL.format(profiles=tmp_path / "profiles", run_dir=tmp_path / "run"))
    proc = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state_file = tmp_path / "run" / "state.json"
    try:
        first = json.loads(state_file.read_text())
        r = first["router"]
        stop, failures, sent = threading.Event(), [], [0]

        def load() -> None:
            client = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")
            x = zoo.example_input("lenet", 1, seed=2).numpy()
            inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            while not stop.is_set():
                try:
                    assert client.infer("lenet", [inp]).as_numpy("OUTPUT").shape == (1, 10)
                    sent[0] += 1
                except Exception as e:  # noqa: BLE001
                    failures.append(repr(e))
                time.sleep(0.01)

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            ok = _wait(lambda: json.loads(state_file.read_text()).get("calibration", {}).get("lenet", 1.0) > 3, 40)
        finally:
            stop.set()
            t.join(10)
        state = json.loads(state_file.read_text())
        assert ok, f"not recalibrated: {state.get('calibration')}, last re-plan {state.get('last_replan')}"
        assert sent[0] > 0 and failures == [], failures[:3]
        f = state["calibration"]["lenet"]
        lat0 = {a["batch"]: a["latency_ms"] for g in first["plan"]["gpulets"] for a in g["models"]}
        lat1 = {a["batch"]: a["latency_ms"] for g in state["plan"]["gpulets"] for a in g["models"]}
        common = set(lat0) & set(lat1)
        # the same batch is now planned at the measured factor times the profile's latency
        assert all(lat1[b] == pytest.approx(lat0[b] * f, rel=0.02) for b in common), (lat0, lat1, f)
        # and the factor is saved beside the profile
        saved = json.loads((tmp_path / "profiles" / device_slug(name) / "calibration.json").read_text())
        assert saved["factors"]["lenet"] > 3 and saved["reason"].startswith("recalibrated")
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []

    # the next plan on this machine starts from it (no load: nothing re-plans), until the profile changes
    proc = run_cli("plan", "-f", str(path), "--json")
    assert proc.returncode == 0 and "planning with the recalibration saved in" in proc.stderr, proc.stderr
    lat2 = {a["batch"]: a["latency_ms"] for g in json.loads(proc.stdout)["gpulets"] for a in g["models"]}
    k = saved["factors"]["lenet"]
    assert all(lat2[b] == pytest.approx(lat0[b] * k, rel=0.02) for b in set(lat2) & set(lat0)), (lat0, lat2, k)
    write_csv(tmp_path / "profiles" / device_slug(name) / "latency.csv", rows[:-1])     # re-measured
    proc = run_cli("plan", "-f", str(path), "--json")
    assert proc.returncode == 0 and "the profile has changed since" in proc.stderr, proc.stderr


def test_a_transition_that_does_not_fit_in_gpu_memory_is_refused_with_the_figures():
    """Before a re-plan starts its gpu-lets beside the running ones, each GPU's need is checked against
    NVML's free memory (the check itself runs on a GPU host only; here its arithmetic)."""
    from controlplane.devices import free_memory_mb, memory_shortfall

    assert memory_shortfall({0: 3000.0, 1: 100.0}, {0: 2000.0, 1: 5000.0}) == \
        ["GPU 0 has 2000 MiB free, the gpu-lets to start there need 3000 MiB"]
    assert memory_shortfall({0: 3000.0}, {}) == []          # no NVML answer: nothing to hold against it
    assert isinstance(free_memory_mb([0]), dict)
