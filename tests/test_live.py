"""Re-planning from the measured load: the pure policy, and a running deployment that follows its traffic."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from controlplane import zoo
from controlplane.live import MIN_RATE, LoadWindow, decide, padded, router_arrivals

from helpers import run_cli, tritonserver_pids


def test_window_peak_is_the_busiest_epoch_inside_the_window():
    w = LoadWindow(window_s=30)
    for t, n in ((0, 0), (10, 100), (20, 700), (30, 800), (40, 900)):
        w.add(t, {"a": n})
    assert w.peak_rates() == {"a": 60.0}            # 100 -> 700 in 10 s, still inside [10, 40]
    w.add(50, {"a": 1000})
    w.add(60, {"a": 1100})
    assert w.peak_rates() == {"a": 10.0}            # the busy epoch left the window
    w.add(70, {"a": 50})                            # a counter reset (router restarted) counts from 0
    assert w.peak_rates()["a"] == 10.0 and w.span_s() == 30


def test_decide_scales_up_at_once_down_with_hysteresis():
    planned = {"a": 100.0, "b": 50.0}
    assert decide(planned, {"a": 90.0, "b": 40.0}) == (None, "")          # inside the band: keep
    rates, why = decide(planned, {"a": 150.0, "b": 40.0})
    assert rates["a"] == padded(150.0) > 150 and "a at 150" in why       # up: at once, padded
    assert rates["b"] == padded(40.0)
    rates, why = decide(planned, {"a": 90.0})                             # b idle: gives share back
    assert rates["b"] == MIN_RATE and "b at 0" in why


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
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []
