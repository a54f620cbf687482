"""`controlplane apply`: a running deployment moves to a changed file without failing a request.

Real tritonservers, the real router (two processes), real clients sending without pause while
gpu-lets are added, replaced and removed; every answer is checked against TorchScript.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from controlplane import zoo

from helpers import Traffic, metrics, run_cli, tritonserver_pids

DEPLOYMENT = """\
name: live
models:
{models}
devices: cpu
router: {{http_port: 0, grpc_port: 0, workers: 2}}
scheduler: {{algorithm: trivial}}
run_dir: {run_dir}
"""
LENET = "  - {name: lenet, rate: 10, slo_ms: %d}"
MOBILENET = "  - {name: mobilenet_v2, rate: 2, slo_ms: 5000}"


def _write(path: Path, *models: str) -> Path:
    path.write_text(DEPLOYMENT.format(models="\n".join(models), run_dir=path.parent / "run"))
    return path


def _state(path: Path) -> dict:
    return json.loads((path.parent / "run" / "state.json").read_text())


def _pids(state: dict) -> dict[str, int]:
    return {gid: g["pid"] for gid, g in state["gpulets"].items()}


def test_apply_adds_replaces_and_removes_gpulets_without_a_failed_request(tmp_path):
    path = _write(tmp_path / "live.yaml", LENET % 2000)
    proc = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        first = _state(path)
        r = first["router"]
        (lenet_gid, lenet_pid), = _pids(first).items()
        with Traffic(f"127.0.0.1:{r['http_port']}", f"127.0.0.1:{r['grpc_port']}") as traffic:
            # 1. a model added: a gpu-let of its own starts; lenet's keeps running (same process)
            _write(path, LENET % 2000, MOBILENET)
            out = run_cli("apply", "-f", str(path), timeout=400)
            assert out.returncode == 0, out.stdout + out.stderr
            added = _state(path)
            assert _pids(added)[lenet_gid] == lenet_pid and len(added["gpulets"]) == 2
            assert {m for g in added["plan"]["gpulets"] for m in (a["model"] for a in g["models"])} == \
                {"lenet", "mobilenet_v2"}
            http = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")
            assert http.is_model_ready("mobilenet_v2")
            x = zoo.example_input("mobilenet_v2", 1, seed=1).numpy()
            inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            assert http.infer("mobilenet_v2", [inp]).as_numpy("OUTPUT").shape[0] == 1

            # 2. lenet's SLO changed: its server is replaced (new one ready first, old one stopped after)
            _write(path, LENET % 1500, MOBILENET)
            out = run_cli("apply", "-f", str(path), timeout=400)
            assert out.returncode == 0, out.stdout + out.stderr
            replaced = _pids(_state(path))
            assert lenet_gid not in replaced and len(replaced) == 2
            assert lenet_pid not in tritonserver_pids(str(tmp_path))

            # 3. a model removed: its server stops
            mobilenet_pid = next(p for g, p in replaced.items() if g in added["gpulets"] and g != lenet_gid)
            _write(path, LENET % 1500)
            out = run_cli("apply", "-f", str(path), timeout=400)
            assert out.returncode == 0, out.stdout + out.stderr
            assert len(_state(path)["gpulets"]) == 1
            assert mobilenet_pid not in tritonserver_pids(str(tmp_path))
            assert not http.is_model_ready("mobilenet_v2")
            # the last re-plan says how long stopping the dropped server took after the switch
            assert re.search(r"; old gpu-lets stopped [0-9.]+ s after\)$", _state(path)["last_replan"]), \
                _state(path)["last_replan"]

            # 4. a change apply cannot make is refused and nothing moves
            bad = tmp_path / "bad.yaml"
            bad.write_text(path.read_text().replace("workers: 2", "workers: 1"))
            before = _pids(_state(path))
            out = run_cli("apply", "-f", str(bad), timeout=120)
            assert out.returncode == 1 and "'router' differs" in out.stderr, out.stdout + out.stderr
            assert _pids(_state(path)) == before
        assert traffic.ok > 0 and traffic.failures == [], traffic.failures[:5]
        m = metrics(f"127.0.0.1:{r['http_port']}")
        assert m[("controlplane_replans_total", (("cause", "controlplane apply"),))] == 3
        assert m[("controlplane_replans_refused_total", (("cause", "controlplane apply"),))] == 1
        assert m[("controlplane_gpulets_started_total", ())] == 2       # mobilenet_v2's, then lenet's new one
        assert m[("controlplane_gpulets_stopped_total", ())] == 2       # lenet's old one, then mobilenet_v2's
        assert m[("controlplane_gpulets", ())] == 1
        # each applied change's stages, timed: three changes, two of which stopped a server
        count = {st: m[("controlplane_transition_seconds_count", (("stage", st),))] for st in
                 ("plan", "start", "route", "stop")}
        assert count == {"plan": 3, "start": 3, "route": 3, "stop": 2}, count
        assert m[("controlplane_transition_seconds_sum", (("stage", "start"),))] > 0
        assert sorted(tritonserver_pids(str(tmp_path))) == sorted(before.values())
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []


def test_apply_to_a_deployment_that_is_not_running(tmp_path):
    path = _write(tmp_path / "live.yaml", LENET % 2000)
    out = run_cli("apply", "-f", str(path), timeout=120)
    assert out.returncode == 3 and "is not running" in out.stdout


@pytest.fixture(autouse=True)
def _no_servers_left(tmp_path):
    yield
    assert tritonserver_pids(str(tmp_path)) == []


def test_a_change_runs_beside_the_loop_which_keeps_measuring_and_a_stop_midway_leaves_nothing(tmp_path):
    """While a change's new gpu-let starts (held here, after its server is spawned, until the test lets
    it go), the controller's loop keeps sampling the router's counts, lenet keeps being served by the
    previous plan's gpu-let, and `status` shows the target with the change in flight. A stop in the
    middle of a second change (what Ctrl-C does) stops its half-started server with the rest."""
    import threading
    import time

    from controlplane.deploy import Controller
    from controlplane.runtime.base import ReplicaState
    from controlplane.spec import load_deployment

    def write(slo_ms: int) -> Path:      # sampling every tick (epoch_s set), no re-plan within the test
        p = _write(tmp_path / "live.yaml", LENET % slo_ms)
        p.write_text(p.read_text().replace("algorithm: trivial", "algorithm: trivial, epoch_s: 600, window_s: 600"))
        return p

    path = write(2000)
    ctl = Controller(load_deployment(path), log=lambda m: None)
    ctl.prepare()
    ctl.start()
    stop, release, held = threading.Event(), threading.Event(), threading.Event()
    wait_ready = ctl.runtime._wait_ready

    def held_wait(reps):                 # the gate: spawned, not yet waited for; a stop ends it
        held.set()
        while not release.is_set() and all(r.state not in (ReplicaState.STOPPING, ReplicaState.STOPPED)
                                            for r in reps):
            time.sleep(0.05)
        return wait_ready(reps)

    ctl.runtime._wait_ready = held_wait
    loop = threading.Thread(target=ctl.serve, args=(stop,), kwargs={"interval_s": 0.5}, daemon=True)
    loop.start()
    applied: list = []
    try:
        (old_gid,) = _pids(_state(path))
        r = _state(path)["router"]
        with Traffic(f"127.0.0.1:{r['http_port']}", f"127.0.0.1:{r['grpc_port']}") as traffic:
            # 1. lenet's SLO changed: its gpu-let is replaced; held while the new one starts
            write(1500)
            t = threading.Thread(target=lambda: applied.append(run_cli("apply", "-f", str(path), timeout=400)))
            t.start()
            assert held.wait(120), "the change never started a gpu-let"
            samples, served = len(ctl.window.samples), traffic.ok
            deadline = time.monotonic() + 60
            while (len(ctl.window.samples) < samples + 3 or traffic.ok <= served) and time.monotonic() < deadline:
                time.sleep(0.25)
            assert len(ctl.window.samples) >= samples + 3, "the loop stopped measuring during the change"
            assert traffic.ok > served, "lenet was not served during the change"
            state = _state(path)
            assert state["changing"].startswith("controlplane apply")
            assert old_gid in state["gpulets"] and old_gid not in {g["id"] for g in state["plan"]["gpulets"]}
            status = run_cli("status", "-f", str(path))
            assert "changing: controlplane apply" in status.stdout and old_gid in status.stdout, status.stdout
            release.set()
            t.join(400)
            assert applied[0].returncode == 0, applied[0].stdout + applied[0].stderr
            deadline = time.monotonic() + 30
            while _state(path)["changing"] is not None and time.monotonic() < deadline:
                time.sleep(0.25)
            assert _state(path)["changing"] is None
            (new_gid,) = _pids(_state(path))
            assert new_gid != old_gid
            served = traffic.ok                 # the new server outlives the change that started it
            time.sleep(2)
            deadline = time.monotonic() + 30
            while traffic.ok < served + 20 and time.monotonic() < deadline:
                time.sleep(0.25)
            new = _state(path)["gpulets"][new_gid]
            assert new["restarts"] == 0 and "Signal (15)" not in Path(new["log"]).read_text()
        assert traffic.ok > 0 and traffic.failures == [], traffic.failures[:5]

        # 2. a second change, stopped while its gpu-let starts
        release.clear()
        held.clear()
        write(1000)
        t = threading.Thread(target=lambda: applied.append(run_cli("apply", "-f", str(path), timeout=400)))
        t.start()
        assert held.wait(120), "the second change never started a gpu-let"
        deadline = time.monotonic() + 30        # spawned through its wrappers (taskset), then exec'd
        while len(tritonserver_pids(str(tmp_path))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(tritonserver_pids(str(tmp_path))) == 2          # the serving one and the one held
    finally:
        stop.set()
        loop.join(60)
        ctl.shutdown()
    t.join(400)
    assert applied[1].returncode != 0, applied[1].stdout
    assert tritonserver_pids(str(tmp_path)) == []
