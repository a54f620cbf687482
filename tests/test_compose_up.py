"""`docker compose up` of a rendered plan serves through the router container.

Renders a CPU plan for lenet with ``write_compose_bundle``, runs it with ``docker compose``
(or Debian's ``docker-compose``) on the locally built images (gpulet-triton-cpu for the
gpu-lets, gpulet-controlplane for the router; the fixture builds or reuses both), sends a
KServe v2 inference to the router's port on 127.0.0.1 and compares it with TorchScript in
process, then ``down -v`` and checks that nothing of the project is left. Skips, printing
why, only where no Docker engine or no compose tool is available.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from controlplane.repository import SourceRepository, build_artifacts
from controlplane.spec import Assignment, Deployment, GpuLet, ModelSpec, Plan

from helpers import check_lenet

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("GPULET_CPU_IMAGE", "gpulet-triton-cpu:latest")
ROUTER_IMAGE = os.environ.get("GPULET_CONTROLPLANE_IMAGE", "gpulet-controlplane:latest")


def _skip(reason: str):
    print(f"\nSKIPPED compose tests: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _compose_tool() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    _skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")


@pytest.fixture(scope="module")
def images(client) -> tuple[str, str]:
    """Both images: reused when their content hashes match, else built."""
    if ROUTER_IMAGE == "gpulet-controlplane:latest":
        env = {**os.environ, "PYTHON": sys.executable}
        if IMAGE != "gpulet-triton-cpu:latest":
            env["BASE_IMAGE"] = IMAGE
        r = subprocess.run(["bash", str(ROOT / "compose" / "build-controlplane-image.sh")], capture_output=True,
                           text=True, env=env, timeout=1800)
        assert r.returncode == 0, f"compose/build-controlplane-image.sh failed:\n{r.stdout}\n{r.stderr}"
    client.images.get(IMAGE)
    client.images.get(ROUTER_IMAGE)
    return IMAGE, ROUTER_IMAGE


@pytest.fixture(scope="module")
def repo() -> SourceRepository:
    r = SourceRepository()
    build_artifacts(r, ["lenet"])
    return r


def _wait_ready(url: str, timeout: float, diagnose) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=3) as r:
                if r.status == 200:
                    return
        except OSError as e:          # connection refused / reset while it starts, HTTP 503 until ready
            last = e
        time.sleep(0.5)
    raise AssertionError(f"router at {url} not ready within {timeout} s ({last}):\n{diagnose()}")


def test_compose_up_serves_lenet_through_router_container_and_down_cleans(client, images, repo, tmp_path):
    from controlplane.compose import write_compose_bundle
    from controlplane.runtime.docker import free_ports

    tool = _compose_tool()
    image, router_image = images
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    name = f"pytest-compose-{tag}"
    project = f"pytestcompose{tag.replace('-', '')}"
    http_port, grpc_port = free_ports(2)
    dep = Deployment(name=name, devices="cpu", runtime={"kind": "docker", "image": image},
                     models=[ModelSpec(name="lenet", rate=20, slo_ms=500)],
                     router={"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port})
    plan = Plan(deployment=name, device="cpu", gpus=1, gpulets=[
        GpuLet(id="cpu0-a", gpu=0, share=50, models=[Assignment(model="lenet", batch=8, rate=10)]),
        GpuLet(id="cpu0-b", gpu=0, share=50, models=[Assignment(model="lenet", batch=4, rate=10)]),
    ])
    cores = sorted(os.sched_getaffinity(0))
    path = write_compose_bundle(dep, plan, tmp_path / "bundle", repo=repo, on_gpu=False, cores=cores,
                                router_image=router_image)
    rendered = path.read_text()
    base = [*tool, "-p", project, "-f", str(path)]

    def compose(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout)

    def ours() -> list:
        return client.containers.list(all=True, filters={"label": [f"com.docker.compose.project={project}"]})

    def diagnose() -> str:
        ps = compose("ps", timeout=60)
        logs = compose("logs", "--no-color", "--tail", "40", timeout=60)
        return f"{ps.stdout}{ps.stderr}\n{logs.stdout[-6000:]}{logs.stderr[-2000:]}"

    t0 = time.monotonic()
    try:
        up = compose("up", "-d")
        assert up.returncode == 0, f"{' '.join(tool)} up failed:\n{up.stdout}\n{up.stderr}\n{diagnose()}\n{rendered}"
        url = f"127.0.0.1:{http_port}"
        _wait_ready(f"http://{url}", 120, diagnose)
        print(f"\ncompose project ready in {time.monotonic() - t0:.1f} s")

        # What runs: two gpu-lets on the Triton image and the router on the control plane image.
        running = {c.labels.get("gpulet.id"): c for c in ours()}
        assert set(running) == {"cpu0-a", "cpu0-b", "router"}
        assert all(c.status == "running" for c in running.values())
        assert running["router"].image.tags and router_image in running["router"].image.tags
        assert all(running[g].image.id == client.images.get(image).id for g in ("cpu0-a", "cpu0-b"))
        ports = running["router"].attrs["NetworkSettings"]["Ports"]
        assert ports[f"{http_port}/tcp"][0] == {"HostIp": "127.0.0.1", "HostPort": str(http_port)}

        # Through the router container, over both gpu-lets (several requests, batch sizes 1 and 5).
        for seed in range(4):
            check_lenet(repo, url, n=1 + 4 * (seed % 2), seed=seed)
        with urllib.request.urlopen(f"http://{url}/v2/models/lenet", timeout=10) as r:
            meta = json.load(r)
        assert meta["name"] == "lenet" and meta["inputs"][0]["name"] == "INPUT"

        import tritonclient.grpc as grpcclient

        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            assert g.is_server_ready() and g.is_model_ready("lenet")
        finally:
            g.close()
    finally:
        down = compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180)
        left = ours()
        for c in left:                      # never leave anything behind, even if `down` failed
            c.remove(force=True)
        print(f"compose up..down took {time.monotonic() - t0:.1f} s")
    assert down.returncode == 0, f"down failed:\n{down.stdout}\n{down.stderr}"
    assert left == [], f"containers left after down: {[c.name for c in left]}"
    assert client.containers.list(all=True, filters={"label": [f"gpulet.deployment={name}"]}) == []
    assert client.networks.list(filters={"label": [f"com.docker.compose.project={project}"]}) == []
