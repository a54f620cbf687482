"""`controlplane up` end to end: real tritonservers, the real router, real clients; `down` leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from controlplane import zoo
from controlplane.repository import DEFAULT_SOURCE, SourceRepository

from helpers import run_cli, tritonserver_pids

DEPLOYMENT = """\
name: {name}
models:
  - {{name: lenet, rate: 10, slo_ms: 2000}}
  - {{name: mobilenet_v2, rate: 2, slo_ms: 5000}}
devices: cpu
router: {{http_port: 0, grpc_port: 0}}
scheduler: {{algorithm: trivial}}
run_dir: {run_dir}
{extra}
"""


def _write(tmp_path: Path, name: str, extra: str = "") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(DEPLOYMENT.format(name=name, run_dir=tmp_path / "run", extra=extra))
    return p


def _reference(model: str, x: np.ndarray) -> np.ndarray:
    ts = torch.jit.load(str(SourceRepository()[model].artifact()))
    with torch.no_grad():
        return ts(torch.from_numpy(x)).numpy()


def _processes_named(fragment: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if fragment in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("up")
    path = _write(tmp, "e2e")
    # two router processes on the same ports: clients below go through whichever answers, `down` stops both
    path.write_text(path.read_text().replace("router: {http_port: 0, grpc_port: 0}",
                                             "router: {http_port: 0, grpc_port: 0, workers: 2}"))
    before = set(tritonserver_pids(str(tmp)))
    proc = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ready: KServe v2 HTTP at http://127.0.0.1:" in proc.stdout
    assert "curl -s http://127.0.0.1:" in proc.stdout
    assert "infer:    curl -s -X POST http://127.0.0.1:" in proc.stdout
    state = json.loads((tmp / "run" / "state.json").read_text())
    yield path, state, before

    run_cli("down", "-f", str(path))


def test_http_and_grpc_through_the_router_match_torchscript(deployment):
    _, state, _ = deployment
    r = state["router"]
    http = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{r['grpc_port']}")
    assert http.is_server_ready()
    for model, batch in (("lenet", 3), ("mobilenet_v2", 2)):
        x = zoo.example_input(model, batch, seed=7).numpy()
        ref = _reference(model, x)
        hi = httpclient.InferInput("INPUT", list(x.shape), "FP32")
        hi.set_data_from_numpy(x)
        np.testing.assert_allclose(http.infer(model, [hi]).as_numpy("OUTPUT"), ref, rtol=1e-4, atol=1e-5)
        gi = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
        gi.set_data_from_numpy(x)
        np.testing.assert_allclose(grpc.infer(model, [gi]).as_numpy("OUTPUT"), ref, rtol=1e-4, atol=1e-5)


def test_printed_curl_request_works(deployment):
    import re
    import subprocess

    path, state, _ = deployment
    out = run_cli("status", "-f", str(path)).stdout  # still up
    assert "ready" in out
    log = (path.parent / "run" / "controlplane.log").read_text()
    line = next(l for l in log.splitlines() if "infer:" in l)
    cmd = line.split("infer:", 1)[1].strip()
    assert re.match(r"curl -s -X POST http://127\.0\.0\.1:\d+/v2/models/lenet/infer ", cmd)
    reply = json.loads(subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True).stdout)
    got = np.array(reply["outputs"][0]["data"], dtype=np.float32).reshape(reply["outputs"][0]["shape"])
    np.testing.assert_allclose(got, _reference("lenet", np.zeros((1, 1, 28, 28), np.float32)), rtol=1e-4, atol=1e-5)


def test_a_second_up_touches_nothing_while_another_holds_the_deployment(tmp_path):
    """Two `up` of one deployment at once: the one that does not hold the run lock is refused before
    it plans, starts or writes anything (so it cannot remove the other's state either)."""
    import fcntl

    path = _write(tmp_path, "locked")
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / "up.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)      # as an `up` that is still starting holds it
        for args in ((), ("--detach",)):
            proc = run_cli("up", "-f", str(path), *args, timeout=120)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "another `controlplane up` is starting or running it" in " ".join(proc.stderr.split())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["up.lock"]
    assert not tritonserver_pids(str(tmp_path))


def test_status_and_down_find_the_deployment_from_another_directory(tmp_path):
    """Without a run_dir the run directory is absolute (<state>/runs/<name>), not under the directory
    `up` ran in: `status` and `down` run elsewhere find it, and nothing lands in either directory."""
    path = _write(tmp_path, "anywhere")
    path.write_text("\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("run_dir:")))
    env = {"CONTROLPLANE_STATE": str(tmp_path / "state")}
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    try:
        up = run_cli("up", "-f", str(path), "--detach", cwd=here, env=env, timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        assert (tmp_path / "state" / "runs" / "anywhere" / "state.json").exists()
        st = run_cli("status", "-f", str(path), "--json", cwd=there, env=env)
        assert st.returncode == 0, st.stdout + st.stderr
        assert len(json.loads(st.stdout)["gpulets"]) == 2
    finally:
        down = run_cli("down", "-f", str(path), cwd=there, env=env)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not tritonserver_pids(str(tmp_path))
    assert list(here.iterdir()) == [] and list(there.iterdir()) == []


def test_down_leaves_alone_a_process_that_reused_a_recorded_pid(tmp_path):
    """A state file left behind names pids that may belong to other processes by now: `down` and
    `status` check each pid's start time before taking it for the deployment's."""
    import subprocess

    from controlplane.spec import Assignment, GpuLet, GpuletState, Plan, RouterState, RunState

    path = _write(tmp_path, "stale")
    other = subprocess.Popen(["sleep", "120"], start_new_session=True)   # holds "our" pids now
    try:
        state = RunState(deployment="stale", state="ready", pid=other.pid, started=1.0, runtime="process",
                         router=RouterState(host="127.0.0.1", http_port=1, grpc_port=2),
                         gpulets={"cpu0-a": GpuletState(pid=other.pid, started=1.0)},
                         plan=Plan(gpus=1, gpulets=[GpuLet(id="cpu0-a", gpu=0, share=100, models=[
                             Assignment(model="lenet", batch=1, rate=1)])]))
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "state.json").write_text(state.model_dump_json())
        assert run_cli("status", "-f", str(path)).returncode == 3          # not running
        run_cli("down", "-f", str(path), check=True)
        time.sleep(0.5)
        assert other.poll() is None                                       # not killed
    finally:
        other.kill()
        other.wait()


def test_status_lists_gpulets_ready(deployment):
    path, _, _ = deployment
    proc = run_cli("status", "-f", str(path), "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["router_ready"] is True
    assert sorted(g["gpulet"] for g in doc["gpulets"]) == ["cpu0-a", "cpu1-a"]
    assert all(g["ready"] and g["share"] == 100 for g in doc["gpulets"])
    assert {g["models"] for g in doc["gpulets"]} == {"lenet(b32)", "mobilenet_v2(b32)"}


def test_killed_tritonserver_is_restarted_and_serves_again(deployment):
    """kill -9 of a gpu-let's server while its port is held by someone else: it comes back on fresh
    ports, and the router routes there."""
    import socket

    path, state, _ = deployment
    victim = state["gpulets"]["cpu0-a"]["pid"]
    old_port = int(state["gpulets"]["cpu0-a"]["http"].rsplit(":", 1)[1])
    os.kill(victim, signal.SIGKILL)
    squatter = socket.socket()
    for _ in range(50):                          # the port frees once the killed server is gone
        try:
            squatter.bind(("127.0.0.1", old_port))
            squatter.listen(1)
            break
        except OSError:
            time.sleep(0.1)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{state['router']['http_port']}")
    x = zoo.example_input("lenet", 1, seed=3).numpy()
    deadline = time.monotonic() + 120
    while True:
        doc = json.loads(run_cli("status", "-f", str(path), "--json").stdout or "{}")
        g = next((g for g in doc.get("gpulets", []) if g["gpulet"] == "cpu0-a"), None)
        if g and g["restarts"] == 1 and g["ready"] and http.is_server_ready():
            break
        assert time.monotonic() < deadline, f"cpu0-a not back: {doc}"
        time.sleep(1)
    assert g["pid"] != victim and g["http"] != f"127.0.0.1:{old_port}"
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    deadline = time.monotonic() + 10             # the router takes the new ports within a supervision tick
    while True:
        try:
            out = http.infer("lenet", [inp]).as_numpy("OUTPUT")
            break
        except InferenceServerException:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    squatter.close()
    np.testing.assert_allclose(out, _reference("lenet", x), rtol=1e-4, atol=1e-5)


def test_killed_stub_is_noticed_and_its_model_serves_again(deployment):
    """kill -9 of lenet's python-backend stub: Triton still says ready but cannot run lenet. Every
    request meanwhile gets an answer (a 503 naming the dead stub, or success), none hangs, and the
    controller restarts the gpu-let: lenet answers correctly again within 30 s."""
    import psutil

    path, _, _ = deployment
    state = json.loads((path.parent / "run" / "state.json").read_text())
    server = psutil.Process(state["gpulets"]["cpu0-a"]["pid"])
    stubs = [c for c in server.children(recursive=True) if c.name().startswith("triton_python_b")]
    assert len(stubs) == 1
    restarts = state["gpulets"]["cpu0-a"]["restarts"]
    stubs[0].kill()
    http = httpclient.InferenceServerClient(f"127.0.0.1:{state['router']['http_port']}", network_timeout=20)
    x = zoo.example_input("lenet", 1, seed=4).numpy()
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    refused, deadline = [], time.monotonic() + 30
    while True:
        try:
            out = http.infer("lenet", [inp]).as_numpy("OUTPUT")
            if refused:          # answered again after the outage
                break
        except InferenceServerException as e:
            # the dead stub named, or, while the controller restarts the server, no gpu-let reachable
            assert e.status() == "503" and "lenet" in str(e), str(e)
            refused.append(e)
        assert time.monotonic() < deadline, f"lenet not back within 30 s ({len(refused)} refused)"
        time.sleep(0.2)
    np.testing.assert_allclose(out, _reference("lenet", x), rtol=1e-4, atol=1e-5)
    # lenet may answer before the controller's restart is over (Triton starts a new stub itself on a
    # request); the restart is counted once it ends, and the next tests start from there
    deadline = time.monotonic() + 120
    while True:
        doc = json.loads(run_cli("status", "-f", str(path), "--json").stdout or "{}")
        g = next((g for g in doc.get("gpulets", []) if g["gpulet"] == "cpu0-a"), None)
        if g and g["restarts"] == restarts + 1 and g["ready"]:
            break
        assert time.monotonic() < deadline, f"cpu0-a not ready after its restart: {doc}\n{_controller_log(path)}"
        time.sleep(1)


def _controller_log(path: Path, lines: int = 40) -> str:
    """The end of the detached controller's log, for a failure message."""
    log = path.parent / "run" / "controlplane.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def _children(pid: int, fragment: str) -> list[int]:
    out = []
    for c in _processes_named(fragment):
        try:
            if int((Path(f"/proc/{c}/stat").read_text().split(")")[-1].split())[1]) == pid:
                out.append(c)
        except (OSError, IndexError, ValueError):
            pass
    return out


def test_a_dead_router_process_is_replaced(deployment):
    """One of the deployment's two router processes is killed: another takes its place on the same
    ports, and requests keep being answered."""
    import psutil

    path, _, _ = deployment
    state = json.loads((path.parent / "run" / "state.json").read_text())

    def routers() -> list[psutil.Process]:
        out = []
        for c in psutil.Process(state["pid"]).children():
            try:
                cmd = " ".join(c.cmdline())
                if c.status() != psutil.STATUS_ZOMBIE and "spawn_main" in cmd and "resource_tracker" not in cmd:
                    out.append(c)
            except psutil.Error:
                continue
        return out

    (victim,) = routers()
    victim.kill()
    deadline = time.monotonic() + 30
    while True:
        now = routers()
        if len(now) == 1 and now[0].pid != victim.pid:
            break
        assert time.monotonic() < deadline, f"no new router process: {[p.pid for p in now]}\n{_controller_log(path)}"
        time.sleep(0.2)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{state['router']['http_port']}")
    x = zoo.example_input("lenet", 1, seed=5).numpy()
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(20):            # connections spread over both processes
        fresh = httpclient.InferenceServerClient(f"127.0.0.1:{state['router']['http_port']}")
        np.testing.assert_allclose(fresh.infer("lenet", [inp]).as_numpy("OUTPUT"), _reference("lenet", x),
                                   rtol=1e-4, atol=1e-5)
    assert http.is_server_ready()


def test_down_leaves_nothing_running(deployment):
    path, state, before = deployment
    controller = state["pid"]
    assert len(tritonserver_pids(str(path.parent))) == 2
    assert len(_children(controller, "multiprocessing.spawn")) == 1   # the second router process
    routers = _children(controller, "multiprocessing")                 # it, and multiprocessing's helper
    proc = run_cli("down", "-f", str(path), check=True)
    assert f"stopped controller (pid {controller})" in proc.stdout
    assert not tritonserver_pids(str(path.parent))
    assert not _processes_named(str(path))  # no `controlplane up -f <this file>` left
    deadline = time.monotonic() + 10     # multiprocessing's helper exits once the controller's pipe closes
    while [p for p in routers if Path(f"/proc/{p}").exists()] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in routers if Path(f"/proc/{p}").exists()], "a router process outlived down"
    assert not Path(state["plan"] and path.parent / "run" / "state.json").exists()
    with pytest.raises(Exception):
        httpclient.InferenceServerClient(f"127.0.0.1:{state['router']['http_port']}").is_server_live()
    again = run_cli("status", "-f", str(path))
    assert again.returncode == 3 and "not running" in again.stdout


def test_server_that_cannot_start_fails_up_with_its_log_and_leaves_nothing(tmp_path):
    # A source repository whose lenet artifact is not TorchScript: tritonserver fails to load it and exits.
    src = tmp_path / "repo"
    shutil.copytree(DEFAULT_SOURCE / "lenet", src / "lenet")
    shutil.copytree(DEFAULT_SOURCE / "mobilenet_v2", src / "mobilenet_v2")
    (src / "lenet" / "1").mkdir()
    (src / "lenet" / "1" / "model.pt").write_bytes(b"this is not a TorchScript file")
    path = _write(tmp_path, "broken", extra=f"repository: {src}\nruntime: {{startup_timeout_s: 120}}")
    proc = run_cli("up", "-f", str(path), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    msg = " ".join(proc.stderr.split())
    assert "gpu-let cpu0-a: tritonserver exited with code" in msg
    assert "failed to load" in msg  # the server's log tail
    assert not tritonserver_pids(str(tmp_path))
    assert not (tmp_path / "run" / "state.json").exists()


def test_ctrl_c_stops_everything(tmp_path):
    import subprocess
    import sys

    path = _write(tmp_path, "ctrlc")
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "up", "-f", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_file = tmp_path / "run" / "state.json"
    deadline = time.monotonic() + 240
    while not (state_file.exists() and json.loads(state_file.read_text()).get("state") == "ready"):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "up did not become ready"
        time.sleep(0.5)
    assert len(tritonserver_pids(str(tmp_path))) == 2
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped" in out
    assert not tritonserver_pids(str(tmp_path))
    assert not state_file.exists()


def test_router_port_in_use_fails_before_launching_anything(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "busy.yaml"
        path.write_text(DEPLOYMENT.format(name="busy", run_dir=tmp_path / "run", extra="").replace(
            "router: {http_port: 0, grpc_port: 0}", f"router: {{http_port: {port}, grpc_port: 0}}"))
        proc = run_cli("up", "-f", str(path), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"router.http_port: cannot listen on 127.0.0.1:{port}" in " ".join(proc.stderr.split())
    assert "starting" not in proc.stdout  # no gpu-let was launched
    assert not tritonserver_pids(str(tmp_path))
    assert not (tmp_path / "run" / "state.json").exists()


def test_ctrl_c_while_starting_stops_what_was_started(tmp_path):
    import subprocess
    import sys

    path = _write(tmp_path, "early")
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "up", "-f", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not tritonserver_pids(str(tmp_path)):  # servers launched, not ready yet
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted while starting" in out
    assert "ready:" not in out
    assert not tritonserver_pids(str(tmp_path))
    assert not (tmp_path / "run" / "state.json").exists()


def _ours(fragment: str) -> list[int]:
    """Pids of tritonservers and python-backend stubs whose command line names ``fragment``."""
    return [p for p in _processes_named(fragment)
            if Path(f"/proc/{p}/comm").exists() and Path(f"/proc/{p}/comm").read_text().strip()
            in ("tritonserver", "triton_python_b")]


@pytest.mark.parametrize("cleanup", ["down", "up"])
def test_controller_killed_while_starting_down_leaves_nothing(tmp_path, cleanup):
    """SIGKILL of `up` while its servers start: their pids are already in the state file, so `down`
    (or the next `up`, before it starts anything) stops the servers and their python-backend stubs,
    and removes the stubs' shared memory."""
    import subprocess
    import sys

    from controlplane.deploy import SHM_GLOB, orphan_shm

    shm_before = set(Path("/dev/shm").glob(SHM_GLOB))
    path = _write(tmp_path, "killed")
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "up", "-f", str(path)],
                            stdout=log, stderr=subprocess.STDOUT)
    state_file = tmp_path / "run" / "state.json"
    deadline = time.monotonic() + 120
    # wait until a stub runs (the servers are loading models), then kill the controller outright
    while not [p for p in _ours(str(tmp_path)) if Path(f"/proc/{p}/comm").read_text().strip() == "triton_python_b"]:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    recorded = {g["pid"] for g in json.loads(state_file.read_text())["gpulets"].values()}
    assert recorded and all(recorded)
    time.sleep(1.5)                                   # regions younger than 1 s are left alone
    left = _ours(str(tmp_path))
    assert state_file.exists()
    if cleanup == "up":
        again = run_cli("up", "-f", str(path), "--detach", timeout=400)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "cleaned up after a previous run" in again.stdout or not left, (again.stdout, left)
        assert not set(left) & set(_ours(str(tmp_path)))          # the old ones are gone, new ones serve
    out = run_cli("down", "-f", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    if cleanup == "down":
        assert "gpu-let" in out.stdout or not left, (out.stdout, left)
    assert _ours(str(tmp_path)) == []
    assert not set(orphan_shm(min_age_s=0)) - shm_before, out.stdout       # none of ours left unmapped
