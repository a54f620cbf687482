"""Docker runtime against a real Docker engine and the locally built CPU Triton image.

Needs a Docker engine (compose/start-dockerd.sh) and the image gpulet-triton-cpu:latest
(compose/build-cpu-image.sh; the fixture runs it, which reuses an image whose content
hash matches). Skips, printing why, only when no engine can be reached.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from controlplane.repository import SourceRepository, build_artifacts, write_gpulet_repositories
from controlplane.runtime.base import Launch, ReplicaState, StartError, cpu_cores_for, gpulet_env
from controlplane.spec import Assignment, Deployment, GpuLet, ModelSpec, Plan

from helpers import check_lenet

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("GPULET_CPU_IMAGE", "gpulet-triton-cpu:latest")
DEPLOYMENT = f"pytest-docker-{os.getpid()}"


def _skip(reason: str):
    print(f"\nSKIPPED docker-runtime tests: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image(client) -> str:
    """The CPU image: reused when its content hash matches, else built (a few minutes)."""
    if IMAGE == "gpulet-triton-cpu:latest":
        r = subprocess.run(["bash", str(ROOT / "compose" / "build-cpu-image.sh")], capture_output=True, text=True,
                           env={**os.environ, "PYTHON": sys.executable}, timeout=1800)
        assert r.returncode == 0, f"compose/build-cpu-image.sh failed:\n{r.stdout}\n{r.stderr}"
    client.images.get(IMAGE)
    return IMAGE


@pytest.fixture(scope="module")
def repo() -> SourceRepository:
    r = SourceRepository()
    build_artifacts(r, ["lenet"])
    return r


def _plan(*gpulets: GpuLet, device: str = "cpu") -> Plan:
    return Plan(deployment=DEPLOYMENT, device=device, gpus=1, gpulets=list(gpulets))


def _launches(repo: SourceRepository, plan: Plan, root: Path) -> list[Launch]:
    repos = write_gpulet_repositories(repo, plan, root / "repos", on_gpu=False)
    cores = cpu_cores_for(plan.gpulets)
    return [Launch(gpulet=g, repository=repos[g.id].resolve(), log_path=root / "logs" / f"{g.id}.log",
                   cores=cores[g.id], env=gpulet_env(g, None, cores[g.id], None))
            for g in plan.gpulets]


def _lenet(gid: str, share: int, batch: int) -> GpuLet:
    return GpuLet(id=gid, gpu=0, share=share, models=[Assignment(model="lenet", batch=batch, rate=10)])


def _ours(client, deployment: str = DEPLOYMENT) -> list:
    return client.containers.list(all=True, filters={"label": [f"gpulet.deployment={deployment}"]})


def _wait_restarted(rt, gid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gid in rt.supervise():
            return
        time.sleep(0.3)
    raise AssertionError(f"{gid} was not restarted within {timeout} s: {rt.status()[gid]}")


@pytest.fixture(scope="module")
def served(client, image, repo, tmp_path_factory):
    from controlplane.runtime.docker import DockerRuntime

    root = tmp_path_factory.mktemp("docker-run")
    plan = _plan(_lenet("cpu0-a", 50, 8), _lenet("cpu0-b", 50, 4))
    launches = _launches(repo, plan, root)
    rt = DockerRuntime(image=image, deployment=DEPLOYMENT, startup_timeout_s=180)
    t0 = time.monotonic()
    endpoints = rt.start(launches)
    print(f"\n2 gpu-let containers ready in {time.monotonic() - t0:.1f} s")
    yield rt, endpoints, launches
    rt.stop()
    assert _ours(client) == []


# --------------------------------------------------------------------------- serving


def test_serves_lenet_like_torchscript_in_process(served, repo):
    rt, endpoints, _ = served
    assert set(endpoints) == {"cpu0-a", "cpu0-b"}
    for i, ep in enumerate(endpoints.values()):
        assert ep.host == "127.0.0.1"
        check_lenet(repo, ep.http, n=3, seed=i)
    assert all(s.state == ReplicaState.READY for s in rt.status().values())


def test_grpc_endpoint_serves(served, repo):
    import tritonclient.grpc as grpcclient

    _, endpoints, _ = served
    c = grpcclient.InferenceServerClient(endpoints["cpu0-b"].grpc)
    assert c.is_model_ready("lenet")
    c.close()


def test_containers_carry_env_mounts_labels_ports(served, client):
    rt, endpoints, launches = served
    containers = {c.labels["gpulet.id"]: c for c in _ours(client)}
    assert set(containers) == {"cpu0-a", "cpu0-b"}
    for lc in launches:
        c = containers[lc.gpulet.id]
        c.reload()
        a = c.attrs
        labels = a["Config"]["Labels"]
        assert labels["gpulet.deployment"] == DEPLOYMENT
        assert labels["gpulet.managed-by"] == "controlplane"
        assert labels["gpulet.share"] == "50" and labels["gpulet.models"] == "lenet"
        env = dict(e.split("=", 1) for e in a["Config"]["Env"])
        for k in ("CONTROLPLANE_GPULET", "CONTROLPLANE_SHARE", "CONTROLPLANE_THREADS", "OMP_NUM_THREADS"):
            assert env[k] == lc.env[k], k
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["VIRTUAL_ENV"] == "/opt/venv"          # the image's, not the host's
        mounts = {m["Destination"]: m for m in a["Mounts"]}
        assert mounts["/models"]["Source"] == str(lc.repository) and mounts["/models"]["RW"] is False
        host = a["HostConfig"]
        assert host["IpcMode"] == "host"
        assert host["RestartPolicy"]["Name"] == "on-failure"
        assert host["CpusetCpus"] == ",".join(map(str, lc.cores))
        ep = endpoints[lc.gpulet.id]
        ports = a["NetworkSettings"]["Ports"]
        for cport, hport in (("8000/tcp", ep.http_port), ("8001/tcp", ep.grpc_port), ("8002/tcp", ep.metrics_port)):
            assert ports[cport][0] == {"HostIp": "127.0.0.1", "HostPort": str(hport)}
        assert a["Config"]["Cmd"][:2] == ["tritonserver", "--model-repository=/models"]
    st = rt.status()["cpu0-a"]
    assert st.container == containers["cpu0-a"].id


def test_logs(served):
    rt, _, _ = served
    text = rt.logs("cpu0-a", tail=200)
    assert "Started HTTPService" in text and "lenet" in text


def test_crashed_server_is_restarted_by_docker_and_serves_again(served, client, repo):
    rt, endpoints, _ = served
    c = client.containers.get("gpulet-%s-cpu0-a" % DEPLOYMENT)
    pid = c.attrs["State"]["Pid"]
    assert pid > 0
    os.kill(pid, signal.SIGKILL)               # a crash: Docker's on-failure policy restarts it
    _wait_restarted(rt, "cpu0-a")
    rt.wait_ready(timeout=120)
    assert rt.status()["cpu0-a"].restarts >= 1
    check_lenet(repo, endpoints["cpu0-a"].http, seed=7)   # same ports after the restart


def test_killed_container_is_started_by_supervise_and_serves_again(served, client, repo):
    rt, endpoints, _ = served
    before = rt.status()["cpu0-b"].restarts
    client.containers.get("gpulet-%s-cpu0-b" % DEPLOYMENT).kill()   # Docker does not restart a killed one
    _wait_restarted(rt, "cpu0-b")
    rt.wait_ready(timeout=120)
    assert rt.status()["cpu0-b"].restarts == before + 1
    check_lenet(repo, endpoints["cpu0-b"].http, seed=8)


def test_removed_container_is_recreated(served, client, repo):
    rt, endpoints, _ = served
    client.containers.get("gpulet-%s-cpu0-b" % DEPLOYMENT).remove(force=True)
    _wait_restarted(rt, "cpu0-b")
    rt.wait_ready(timeout=120)
    check_lenet(repo, endpoints["cpu0-b"].http, seed=9)


def test_stop_removes_everything_and_is_idempotent(served, client, tmp_path):
    rt, _, launches = served
    rt.stop()
    assert _ours(client) == []
    rt.stop()
    assert "Started HTTPService" in launches[0].log_path.read_text()   # logs outlive the container


# --------------------------------------------------------------------------- failures


def test_failed_start_leaves_no_containers_and_reports_log_tail(client, image, repo, tmp_path):
    from controlplane.runtime.docker import DockerRuntime

    dep = DEPLOYMENT + "-fail"
    plan = _plan(_lenet("cpu0-a", 50, 8), _lenet("cpu0-b", 50, 8))
    launches = _launches(repo, plan, tmp_path)
    bad = launches[1].repository / "lenet" / "1" / "model.pt"
    bad.unlink()
    bad.write_bytes(b"not a TorchScript file")
    rt = DockerRuntime(image=image, deployment=dep, startup_timeout_s=120)
    with pytest.raises(StartError) as e:
        rt.start(launches)
    msg = str(e.value)
    assert "cpu0-b" in msg and "log tail" in msg
    assert "lenet" in msg
    assert _ours(client, dep) == []


def test_missing_image_is_a_start_error(client, repo, tmp_path):
    from controlplane.runtime.docker import DockerRuntime

    rt = DockerRuntime(image="gpulet-no-such-image:0", deployment=DEPLOYMENT + "-noimg")
    with pytest.raises(StartError, match="not found"):
        rt.start(_launches(repo, _plan(_lenet("cpu0-a", 100, 1)), tmp_path))


def test_gpu_launch_spec_and_failed_gpu_start(client, image, repo, tmp_path):
    """On a GPU: device request by UUID, share, MPS pipe dir mounted; here the start fails cleanly."""
    from controlplane.runtime.docker import DockerRuntime, _Replica, container_name
    from controlplane.runtime.base import Endpoint

    dep = DEPLOYMENT + "-gpu"
    g = _lenet("gpu0-a", 40, 4)
    plan = _plan(g, device="gpu")
    repos = write_gpulet_repositories(repo, plan, tmp_path / "repos", on_gpu=True)
    pipe = str(tmp_path / "mps" / "pipe")
    uuid = "GPU-12345678-1234-1234-1234-123456789abc"
    launch = Launch(gpulet=g, repository=repos[g.id], log_path=tmp_path / "g.log", gpu_uuid=uuid, gpu_index=3,
                    env=gpulet_env(g, 3, None, pipe))
    rt = DockerRuntime(image=image, deployment=dep, startup_timeout_s=30)
    r = _Replica(launch, Endpoint("127.0.0.1", 1, 2, 3), container_name(dep, g.id))
    c = rt._create(r)                       # created, not started: inspect what the engine was told
    try:
        a = client.api.inspect_container(c.id)
        env = dict(e.split("=", 1) for e in a["Config"]["Env"])
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == pipe
        assert env["CUDA_VISIBLE_DEVICES"] == uuid
        req = a["HostConfig"]["DeviceRequests"][0]
        assert req["Driver"] == "nvidia" and req["DeviceIDs"] == [uuid] and req["Capabilities"] == [["gpu"]]
        mounts = {m["Destination"]: m for m in a["Mounts"]}
        assert mounts[pipe]["RW"] is True and mounts["/models"]["RW"] is False
        assert a["HostConfig"]["IpcMode"] == "host"
    finally:
        c.remove(force=True)
    if shutil.which("nvidia-smi") is None:
        with pytest.raises(StartError):
            rt.start([launch])
        assert _ours(client, dep) == []


def test_down_removes_leftovers_of_an_earlier_run(client, image):
    from controlplane.runtime.docker import DockerRuntime, remove_deployment_containers

    dep = DEPLOYMENT + "-left"
    labels = {"gpulet.managed-by": "controlplane", "gpulet.deployment": dep, "gpulet.id": "cpu0-z"}
    for i in range(2):
        client.containers.create(image, command=["sleep", "300"], labels={**labels, "gpulet.id": f"cpu0-{i}"})
    assert len(_ours(client, dep)) == 2
    DockerRuntime(image=image, deployment=dep).stop()        # a fresh process's `down`
    assert _ours(client, dep) == []
    client.containers.create(image, command=["sleep", "300"], labels=labels)
    assert len(remove_deployment_containers(dep)) == 1
    assert _ours(client, dep) == []


# --------------------------------------------------------------------------- compose


def _compose_tools() -> list[list[str]]:
    tools = []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        tools.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    return tools


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_rendered_compose_passes_compose_config(repo, tmp_path, device):
    from controlplane.compose import write_compose_bundle

    tools = _compose_tools()
    if not tools:
        _skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")
    dep = Deployment(name="composetest", models=[ModelSpec(name="lenet", rate=100, slo_ms=50)],
                     runtime="docker")
    plan = Plan(deployment="composetest", device="cpu" if device == "cpu" else "NVIDIA H100", gpus=2, gpulets=[
        _lenet("g0-a", 60, 8), _lenet("g0-b", 40, 4),
        GpuLet(id="g1-a", gpu=1, share=100, models=[Assignment(model="lenet", batch=16, rate=50)]),
    ])
    uuids = {0: "GPU-aaaaaaaa-0000-0000-0000-000000000000", 1: "GPU-bbbbbbbb-0000-0000-0000-000000000000"}
    for tool in tools:
        out = tmp_path / tool[-1]
        path = write_compose_bundle(dep, plan, out, repo=repo, on_gpu=device == "gpu",
                                    gpu_uuids=uuids if device == "gpu" else None, cores=[0, 1])
        r = subprocess.run([*tool, "-f", str(path), "-p", "composetest", "config"], capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(tool)} config failed:\n{r.stderr}\n{path.read_text()}"
        doc = yaml.safe_load(r.stdout)
        services = doc["services"]
        want = {"router", "gpulet-g0-a", "gpulet-g0-b", "gpulet-g1-a"} | ({"mps-daemon"} if device == "gpu" else set())
        assert set(services) == want
        s = services["gpulet-g0-a"]
        env = s["environment"]
        assert env["CONTROLPLANE_GPULET"] == "g0-a"
        assert s["ipc"] == "host"
        assert any(str(out / "repos" / "g0-a") in str(v) for v in s["volumes"])
        if device == "gpu":
            assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "60"
            devs = s["deploy"]["resources"]["reservations"]["devices"][0]
            assert devs["device_ids"] == [uuids[0]]
            assert services["gpulet-g1-a"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [uuids[1]]
        else:
            assert s["cpuset"] == "0"
        assert (out / "repos" / "g1-a" / "lenet" / "config.pbtxt").exists()
        router = services["router"]
        assert router["image"] == "gpulet-controlplane:latest"
        assert router["command"][:2] == ["controlplane", "router"]
        assert "/v2/health/ready" in " ".join(router["healthcheck"]["test"])
        assert set(router["depends_on"]) == want - {"router", "mps-daemon"}


# --------------------------------------------------------------------------- end to end: controlplane up


def _deployment_file(tmp_path: Path, name: str, port: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "devices": "cpu", "runtime": {"kind": "docker", "image": IMAGE},
        "models": [{"name": "lenet", "rate": 20, "slo_ms": 200}],
        "router": {"http_port": port, "grpc_port": port + 1}, "run_dir": str(tmp_path / "run"),
        "scheduler": {"algorithm": "trivial"},      # no profiles needed: this tests the runtime
    }))
    return path


def _router_infer_ok(repo, port: int, timeout: float = 60, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check_lenet(repo, f"127.0.0.1:{port}", n=2, seed=port)
        except Exception:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"controlplane up exited {proc.returncode}:\n{proc.stdout.read()}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_up_with_docker_runtime_serves_through_router_restarts_and_down_cleans(client, image, repo, tmp_path):
    from controlplane.runtime.docker import free_ports

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import run_cli

    name = f"pytest-up-{os.getpid()}"
    port = free_ports(1)[0]
    dep = _deployment_file(tmp_path, name, port)
    try:
        run_cli("up", "-f", str(dep), "-d", timeout=300, check=True)
        cs = _ours(client, name)
        assert len(cs) >= 1 and all(c.labels["gpulet.managed-by"] == "controlplane" for c in cs)
        _router_infer_ok(repo, port)
        os.kill(cs[0].attrs["State"]["Pid"], signal.SIGKILL)       # crash one server: traffic resumes
        time.sleep(2)
        _router_infer_ok(repo, port, timeout=120)
        logs = run_cli("logs", "-f", str(dep), cs[0].labels["gpulet.id"], check=True).stdout
        assert "HTTPService" in logs
    finally:
        run_cli("down", "-f", str(dep), timeout=120)
    assert _ours(client, name) == []


def test_ctrl_c_on_up_leaves_no_containers(client, image, repo, tmp_path):
    from controlplane.runtime.docker import free_ports

    name = f"pytest-ctrlc-{os.getpid()}"
    port = free_ports(1)[0]
    dep = _deployment_file(tmp_path, name, port)
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "up", "-f", str(dep)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _router_infer_ok(repo, port, timeout=180, proc=proc)
        assert _ours(client, name)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _ours(client, name) == [], proc.stdout.read()


def test_a_users_onnx_model_is_served_inside_the_container(client, image, tmp_path):
    """`repo add --onnx` models run in the CPU image too: onnxruntime is in it, and the gpu-let's
    repository carries the onnx_model.py that model.py loads (no controlplane package in there)."""
    import warnings

    import numpy as np
    import onnxruntime
    import torch
    import tritonclient.http as httpclient

    from controlplane.model_add import add_model
    from controlplane.runtime.docker import DockerRuntime

    class Mix(torch.nn.Module):
        def forward(self, a, b):
            return torch.tanh(a) * b

    f = tmp_path / "mix.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Mix(), (torch.rand(2, 5), torch.rand(2, 5)), str(f), input_names=["A", "B"],
                          output_names=["Y"], dynamic_axes={n: {0: "batch"} for n in ("A", "B", "Y")}, dynamo=False)
    add_model(tmp_path / "user", "mix", f, "onnx", max_batch=8)
    user = SourceRepository(tmp_path / "user")
    plan = _plan(GpuLet(id="cpu0-a", gpu=0, share=100, models=[Assignment(model="mix", batch=4, rate=10)]))
    rt = DockerRuntime(image=image, deployment=f"{DEPLOYMENT}-onnx", startup_timeout_s=180)
    try:
        eps = rt.start(_launches(user, plan, tmp_path))
        a, b = (np.random.default_rng(i).random((3, 5), dtype=np.float32) for i in (1, 2))
        c = httpclient.InferenceServerClient(eps["cpu0-a"].http)
        ins = []
        for name, x in (("A", a), ("B", b)):
            i = httpclient.InferInput(name, [3, 5], "FP32")
            i.set_data_from_numpy(x)
            ins.append(i)
        (want,) = onnxruntime.InferenceSession(str(f)).run(None, {"A": a, "B": b})
        np.testing.assert_allclose(c.infer("mix", ins).as_numpy("Y"), want, rtol=1e-5, atol=1e-6)
    finally:
        rt.stop()
    assert _ours(client, f"{DEPLOYMENT}-onnx") == []


def test_apply_adds_and_removes_containers_beside_the_running_ones(client, image, repo, tmp_path):
    """`controlplane apply` on the docker runtime: a model added gets a container of its own while lenet's
    keeps running (the same container), and is served through the router; removing it again removes
    exactly its container."""
    import numpy as np
    import tritonclient.http as httpclient

    from controlplane import zoo
    from controlplane.runtime.docker import free_ports

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import run_cli

    name = f"pytest-apply-{os.getpid()}"
    port = free_ports(1)[0]
    dep = _deployment_file(tmp_path, name, port)
    try:
        run_cli("up", "-f", str(dep), "-d", timeout=300, check=True)
        (lenet,) = _ours(client, name)
        doc = yaml.safe_load(dep.read_text())
        doc["models"].append({"name": "mobilenet_v2", "rate": 2, "slo_ms": 5000})
        more = tmp_path / "more.yaml"
        more.write_text(yaml.safe_dump(doc))
        run_cli("apply", "-f", str(more), timeout=400, check=True)
        assert {c.id for c in _ours(client, name)} > {lenet.id} and len(_ours(client, name)) == 2
        x = zoo.example_input("mobilenet_v2", 1, seed=1).numpy()
        inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = httpclient.InferenceServerClient(f"127.0.0.1:{port}").infer("mobilenet_v2", [inp]).as_numpy("OUTPUT")
        assert out.shape == (1, 1000) and np.isfinite(out).all()
        run_cli("apply", "-f", str(dep), timeout=400, check=True)
        assert [c.id for c in _ours(client, name)] == [lenet.id]
        _router_infer_ok(repo, port)
    finally:
        run_cli("down", "-f", str(dep), timeout=120)
    assert _ours(client, name) == []
