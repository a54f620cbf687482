"""The ray runtime on a real local Ray cluster of two nodes (head + one worker, CPU only).

The module starts the cluster with `ray start` in a temporary directory (each node with one CPU and
a resource of its own, `node_a` / `node_b`), runs `controlplane up --detach` with `runtime: ray`
and a plan of two gpu-lets on two virtual CPU devices (lenet, mobilenet_v2), one on each node, and
checks answers through the router, the restart of a killed actor and that `down` leaves nothing.
The cluster is stopped in the fixture's finalizer, failure or not, by killing the processes the
two `ray start`s started (their process groups and everything below them), not with `ray stop`,
which would stop every Ray cluster of this user on the machine.

Skips only when ray cannot be imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray runtime needs the 'ray' package (pip install 'controlplane[ray]')")

from controlplane import zoo  # noqa: E402
from controlplane.repository import SourceRepository  # noqa: E402
from controlplane.runtime.base import StartError, free_ports  # noqa: E402
from controlplane.runtime.ray import NAMESPACE, NodeDevice, cluster_devices, core_fraction, cores_on_node, place  # noqa: E402
from controlplane.spec import SpecError, parse_deployment  # noqa: E402

from helpers import run_cli, tritonserver_pids  # noqa: E402

NAME = f"raytest-{os.getpid()}"

DEPLOYMENT = """\
name: {name}
models:
  - {{name: lenet, rate: 10, slo_ms: 2000}}
  - {{name: mobilenet_v2, rate: 2, slo_ms: 5000}}
devices: cpu
runtime: {{kind: ray, address: "{address}", ship_repositories: true, startup_timeout_s: 120}}
router: {{http_port: 0, grpc_port: 0, workers: 1}}
scheduler: {{algorithm: trivial}}
run_dir: {run_dir}
"""


# --------------------------------------------------------------------------- the cluster


def _ray_start(args: list[str], env: dict) -> int:
    """Run `ray start ARGS` in a session of its own; the process group its daemons stay in."""
    cmd = [str(Path(sys.executable).parent / "ray"), "start", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
    return proc.pid


def _processes_of(groups: list[int], temp_dir: str):
    """Every live process of these process groups or naming temp_dir, and all their descendants
    (Ray's workers run in groups of their own below the raylets; our servers below the workers)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.pid) in groups or temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
        except (psutil.Error, ProcessLookupError):
            continue
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                found[c.pid] = c
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_cluster(groups: list[int], temp_dir: str) -> None:
    import psutil

    procs = _processes_of(groups, temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=5)
        if not procs:
            break


@pytest.fixture(scope="module")
def cluster():
    """(GCS address, temp dir): a head and a worker node, CPU only, each advertising its own resource."""
    # short: Ray's Unix sockets live under it (a 107-byte path limit)
    temp_dir = tempfile.mkdtemp(prefix="gpr-", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    groups: list[int] = []
    try:
        client_port, = free_ports(1)
        groups.append(_ray_start(["--head", "--port=0", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                                  f"--ray-client-server-port={client_port}", '--resources={"node_a": 1}', *common], env))
        address = (Path(temp_dir) / "ray_current_cluster").read_text().strip()
        groups.append(_ray_start([f"--address={address}", '--resources={"node_b": 1}', *common], env))
        ray.init(address=address, namespace="pytest", log_to_driver=False, logging_level="WARNING")
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, f"the worker node did not join: {ray.nodes()}"
            time.sleep(0.5)
        yield address, temp_dir
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_cluster(groups, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _actors(deployment: str = NAME) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith(f"{deployment}/"))


def _ours(fragment: str) -> list[int]:
    """Processes whose command line names fragment (a run directory, a node's scratch directory)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if fragment in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _gpulet_actor_workers() -> list[int]:
    """Ray worker processes running one of our gpu-let actors (Ray titles them ray::GpuletServer...)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::GpuletServer"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _status(path: Path) -> dict:
    proc = run_cli("status", "-f", str(path), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _reference(model: str, x: np.ndarray) -> np.ndarray:
    import torch

    ts = torch.jit.load(str(SourceRepository()[model].artifact())).eval()
    with torch.inference_mode():
        return ts(torch.from_numpy(x)).numpy()


def _infer_both(router_http: str, router_grpc: str, model: str, batch: int, seed: int) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = zoo.example_input(model, batch, seed=seed).numpy()
    ref = _reference(model, x)
    http = httpclient.InferenceServerClient(router_http, network_timeout=60)
    hi = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    hi.set_data_from_numpy(x)
    np.testing.assert_allclose(http.infer(model, [hi]).as_numpy("OUTPUT"), ref, rtol=1e-4, atol=1e-5)
    grpc = grpcclient.InferenceServerClient(router_grpc)
    gi = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    gi.set_data_from_numpy(x)
    np.testing.assert_allclose(grpc.infer(model, [gi]).as_numpy("OUTPUT"), ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def deployment(cluster, tmp_path_factory):
    """`controlplane up --detach` on the cluster: (deployment file, state at ready)."""
    address, _ = cluster
    tmp = tmp_path_factory.mktemp("ray-up")
    path = tmp / f"{NAME}.yaml"
    path.write_text(DEPLOYMENT.format(name=NAME, address=address, run_dir=tmp / "run"))
    proc = run_cli("up", "-f", str(path), "--detach", timeout=400)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "with the ray runtime" in proc.stdout
        state = json.loads((tmp / "run" / "state.json").read_text())
        yield path, state
    finally:
        run_cli("down", "-f", str(path))
        scratch = Path(tempfile.gettempdir()) / f"gpulet-ray-{os.getuid()}"
        shutil.rmtree(scratch / NAME, ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch.rmdir()                   # when no other deployment has one there


# --------------------------------------------------------------------------- without a cluster


def test_runtime_address_is_validated():
    def dep(runtime):
        return parse_deployment({"models": [{"name": "lenet", "rate": 1}], "runtime": runtime})

    assert dep({"kind": "ray"}).runtime.ray_address == "auto"
    assert dep({"kind": "ray", "address": "ray://head.example:10001"}).runtime.ray_address == "ray://head.example:10001"
    assert dep({"kind": "ray", "address": "10.0.0.5:6379"}).runtime.ray_address == "10.0.0.5:6379"
    assert dep("ray").runtime.kind == "ray"
    with pytest.raises(SpecError, match=r"runtime.address: .*'head' is not a Ray cluster address"):
        dep({"kind": "ray", "address": "head"})
    with pytest.raises(SpecError, match="address is an option of the ray runtime"):
        dep({"kind": "process", "address": "auto"})
    with pytest.raises(SpecError, match="ship_repositories is an option of the ray runtime"):
        dep({"kind": "docker", "ship_repositories": True})


def _node(node_id: str, ip: str, gpus: int = 0, head: bool = False, alive: bool = True) -> dict:
    res = {"CPU": 8.0, f"node:{ip}": 1.0, **({"GPU": float(gpus)} if gpus else {})}
    if head:
        res["node:__internal_head__"] = 1.0
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": alive, "Resources": res}


def test_plan_devices_map_to_the_cluster_gpus_by_node():
    """The plan's GPU i is the cluster's i-th GPU: the head's first, then nodes by address, each node's
    GPUs in index order; dead nodes and GPU-less nodes take none. On a CPU cluster, one device per node."""
    nodes = [_node("cc", "10.0.0.9", gpus=2), _node("aa", "10.0.0.7", gpus=0, head=True),
             _node("bb", "10.0.0.8", gpus=4), _node("dd", "10.0.0.6", gpus=8, alive=False)]
    devs = cluster_devices(nodes)
    assert [(d.node_id, d.gpu) for d in devs] == [("bb", 0), ("bb", 1), ("bb", 2), ("bb", 3), ("cc", 0), ("cc", 1)]
    assert place(4, devs, on_gpu=True) == NodeDevice("cc", "10.0.0.9", 0)
    with pytest.raises(StartError, match="plan uses GPU 6, but the Ray cluster has 6 GPU"):
        place(6, devs, on_gpu=True)
    cpu = cluster_devices(nodes, gpus=False)
    assert [d.node_id for d in cpu] == ["aa", "bb", "cc"] and all(d.gpu is None for d in cpu)
    assert [place(i, cpu, on_gpu=False).node_id for i in range(4)] == ["aa", "bb", "cc", "aa"]
    with pytest.raises(StartError, match="has none"):
        place(0, cluster_devices([_node("aa", "10.0.0.7", head=True)]), on_gpu=True)


def test_cpu_share_is_the_same_fraction_of_each_nodes_cores():
    frac = core_fraction([2, 3], [0, 1, 2, 3])         # the second half of the controller's cores
    assert frac == (0.5, 1.0)
    assert cores_on_node(frac, list(range(8))) == [4, 5, 6, 7]
    assert cores_on_node(frac, [0]) == [0]              # at least one
    assert cores_on_node(None, [0, 1]) == [0, 1]


# --------------------------------------------------------------------------- on the cluster


def test_gpulets_run_on_both_nodes_and_status_names_them(deployment, cluster):
    path, state = deployment
    doc = _status(path)
    rows = {g["gpulet"]: g for g in doc["gpulets"]}
    assert sorted(rows) == ["cpu0-a", "cpu1-a"]
    assert all(g["ready"] for g in rows.values()), rows
    nodes = {f'{n["NodeManagerAddress"]} {n["NodeID"][:8]}' for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert {rows[g]["node"] for g in rows} == nodes          # one gpu-let on each node, by its address and id
    assert all(rows[g]["node_gpu"] is None for g in rows)
    assert all(rows[g]["http"].startswith(rows[g]["node"].split()[0] + ":") for g in rows)   # at the node's address
    assert _actors() == [f"{NAME}/cpu0-a#1", f"{NAME}/cpu1-a#2"]
    text = run_cli("status", "-f", str(path)).stdout
    assert "ray runtime" in text and "node" in text
    # shipped repositories: the server's log is beside the unpacked copy on its node (this machine here)
    log = run_cli("logs", "cpu1-a", "-f", str(path), "-n", "400")
    assert log.returncode == 0 and "Started HTTPService" in log.stdout, log.stdout + log.stderr


def test_requests_through_the_router_reach_both_nodes(deployment):
    _, state = deployment
    r = state["router"]
    http, grpc = f"127.0.0.1:{r['http_port']}", f"127.0.0.1:{r['grpc_port']}"
    _infer_both(http, grpc, "lenet", 3, seed=1)            # cpu0-a
    _infer_both(http, grpc, "mobilenet_v2", 2, seed=2)     # cpu1-a, on the other node


def test_a_killed_actor_is_restarted_on_its_node_and_serves(deployment):
    path, state = deployment
    before = {g["gpulet"]: g for g in _status(path)["gpulets"]}["cpu0-a"]
    (name,) = [a for a in _actors() if a.startswith(f"{NAME}/cpu0-a#")]
    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        g = {g["gpulet"]: g for g in _status(path)["gpulets"]}["cpu0-a"]
        if g["restarts"] == 1 and g["ready"]:
            break
        assert time.monotonic() < deadline, f"cpu0-a not back: {g}"
        time.sleep(1)
    assert g["node"] == before["node"] and g["http"] != before["http"]
    (new,) = [a for a in _actors() if a.startswith(f"{NAME}/cpu0-a#")]
    assert new != name
    # the killed actor's worker and its tritonserver (parent-death signal) go; one of each per gpu-let stays
    scratch = f"gpulet-ray-{os.getuid()}/{NAME}/"
    deadline = time.monotonic() + 30
    while True:
        workers = _gpulet_actor_workers()
        servers = [p for p in tritonserver_pids() if p in _ours(scratch)]
        if len(workers) == 2 and len(servers) == 2:
            break
        assert time.monotonic() < deadline, f"actor workers {workers}, servers {servers}"
        time.sleep(0.5)
    r = state["router"]
    deadline = time.monotonic() + 15                          # the router takes the new ports within a tick
    while True:
        try:
            _infer_both(f"127.0.0.1:{r['http_port']}", f"127.0.0.1:{r['grpc_port']}", "lenet", 2, seed=3)
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.3)


def test_down_leaves_no_actor_server_or_stub(deployment):
    path, state = deployment
    scratch = f"gpulet-ray-{os.getuid()}/{NAME}/"
    assert len(tritonserver_pids()) >= 2 and _ours(scratch)
    proc = run_cli("down", "-f", str(path), check=True)
    assert f"stopped controller (pid {state['pid']})" in proc.stdout
    deadline = time.monotonic() + 30       # Ray reaps killed actors' workers asynchronously
    while (_actors() or _gpulet_actor_workers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _actors() == []
    assert _gpulet_actor_workers() == []
    assert _ours(scratch) == []                               # no tritonserver, no python-backend stub
    assert _ours(str(path.parent / "run")) == []
    assert not (path.parent / "run" / "state.json").exists()


def test_a_killed_controller_takes_its_actors_and_servers_with_it(cluster, tmp_path):
    """kill -9 of `up`: Ray kills the actors it owned (owner fate-sharing), the servers die with their
    actors (parent-death signal); `down` then only clears the state file."""
    address, _ = cluster
    name = f"{NAME}-orphan"
    path = tmp_path / f"{name}.yaml"
    path.write_text(DEPLOYMENT.format(name=name, address=address, run_dir=tmp_path / "run")
                    .replace("  - {name: mobilenet_v2, rate: 2, slo_ms: 5000}\n", "")
                    .replace("ship_repositories: true", "ship_repositories: false"))
    up = run_cli("up", "-f", str(path), "--detach", timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        assert len(_actors(name)) == 1 and len(_ours(str(tmp_path / "run" / "repos"))) >= 2    # server + stub
        os.kill(state["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _actors(name) or _ours(str(tmp_path / "run" / "repos")):
            assert time.monotonic() < deadline, (_actors(name), _ours(str(tmp_path / "run" / "repos")))
            time.sleep(0.5)
    finally:
        down = run_cli("down", "-f", str(path))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (tmp_path / "run" / "state.json").exists()


def test_by_default_the_actor_serves_the_repository_at_its_path_and_gpulets_come_and_go(cluster, tmp_path):
    """Without ship_repositories (the default) the server on the node reads the repository the controller
    wrote, at its path (every node of this cluster sees this machine's files). A running runtime takes
    another gpu-let and drops one (what `apply` does); stop leaves nothing."""
    import psutil

    from controlplane.repository import build_artifacts, write_gpulet_repositories
    from controlplane.runtime.base import Launch, ReplicaState, cpu_cores_for, gpulet_env
    from controlplane.runtime.ray import RayRuntime
    from controlplane.spec import Assignment, GpuLet, Plan

    from helpers import check_lenet

    address, _ = cluster
    plan = Plan(gpus=2, gpulets=[GpuLet(id=gid, gpu=gpu, share=50, models=[Assignment(model="lenet", batch=4, rate=1)])
                                 for gid, gpu in (("cpu0-a", 0), ("cpu1-a", 1))])
    repo = SourceRepository()
    build_artifacts(repo, ["lenet"])
    repos = write_gpulet_repositories(repo, plan, tmp_path / "repos", on_gpu=False)
    cores = cpu_cores_for(plan.gpulets)
    first, second = (Launch(gpulet=g, repository=repos[g.id].resolve(), log_path=tmp_path / "logs" / f"{g.id}.log",
                            cores=cores[g.id], env=gpulet_env(g, None, cores[g.id], None)) for g in plan.gpulets)
    deployment = f"{NAME}-path"
    rt = RayRuntime(address=address, deployment=deployment, startup_timeout_s=120)
    try:
        (ep,) = rt.start([first]).values()
        check_lenet(repo, ep.http, n=2, seed=5)
        st = rt.status()["cpu0-a"]
        assert st.state is ReplicaState.READY and st.log == str(first.log_path)
        assert "Started HTTPService" in rt.logs("cpu0-a") and first.log_path.exists()
        servers = [p for p in tritonserver_pids() if p in _ours(f"--model-repository={first.repository}")]
        assert len(servers) == 1
        # the gpu-let's share of the node's cores (the node is this machine: the same cores) and its environment
        assert psutil.Process(servers[0]).cpu_affinity() == cores["cpu0-a"]
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{servers[0]}/environ").read_bytes().decode().split("\0")
                   if "=" in kv)
        assert env["CONTROLPLANE_GPULET"] == "cpu0-a" and env["CONTROLPLANE_SHARE"] == "50"
        assert env["OMP_NUM_THREADS"] == str(len(cores["cpu0-a"])) and env["CUDA_VISIBLE_DEVICES"] == ""
        assert _actors(deployment) == [f"{deployment}/cpu0-a#1"]

        with pytest.raises(StartError, match="already running"):
            rt.start([first])
        (ep2,) = rt.start([second]).values()                 # added beside the running one, on the other node
        check_lenet(repo, ep2.http, n=1, seed=6)
        assert rt.status()["cpu1-a"].node != rt.status()["cpu0-a"].node
        rt.remove(["cpu0-a"])
        assert sorted(rt.status()) == ["cpu1-a"]
        deadline = time.monotonic() + 30
        while _actors(deployment) != [f"{deployment}/cpu1-a#2"] or _ours(str(first.repository)):
            assert time.monotonic() < deadline, (_actors(deployment), _ours(str(first.repository)))
            time.sleep(0.3)
        check_lenet(repo, ep2.http, n=1, seed=7)             # the other one kept serving
    finally:
        rt.stop()
    assert _actors(deployment) == []
    assert _ours(str(tmp_path / "repos")) == []          # no server, no stub


def test_a_repository_the_node_cannot_see_fails_the_start_and_leaves_nothing(cluster, tmp_path):
    """Without ship_repositories the actor is given the path: where the node lacks it, the start fails
    naming the path and the remedy, and nothing stays behind."""
    from controlplane.runtime.base import Launch
    from controlplane.runtime.ray import RayRuntime
    from controlplane.spec import Assignment, GpuLet

    address, _ = cluster
    g = GpuLet(id="cpu0-a", gpu=0, share=100, models=[Assignment(model="lenet", batch=1, rate=1)])
    launch = Launch(gpulet=g, repository=tmp_path / "not-here", log_path=tmp_path / "cpu0-a.log")
    rt = RayRuntime(address=address, deployment=f"{NAME}-missing", startup_timeout_s=60)
    try:
        with pytest.raises(StartError, match=r"could not start tritonserver: FileNotFoundError: model repository "
                                             r"\S+/not-here is not on node \S+: share the run directory with every "
                                             r"node, or set runtime.ship_repositories$"):
            rt.start([launch])
        assert rt.status() == {}
    finally:
        rt.stop()
    assert _actors(f"{NAME}-missing") == []


def test_up_against_an_address_where_no_cluster_answers_fails_and_leaves_nothing(tmp_path):
    port, = free_ports(1)                          # nothing listens there
    path = tmp_path / "nocluster.yaml"
    path.write_text(DEPLOYMENT.format(name=f"{NAME}-none", address=f"127.0.0.1:{port}", run_dir=tmp_path / "run"))
    proc = run_cli("up", "-f", str(path), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"no Ray cluster answers at '127.0.0.1:{port}'" in " ".join(proc.stderr.split())
    assert not (tmp_path / "run" / "state.json").exists()
