"""`controlplane render k8s`: a 2-node, 4-GPU plan as Kubernetes manifests that pass kubernetes-validate
(strict) and say, read back, every gpu-let's share, GPU, node, image, ports and probes. No cluster here:
what was not run is said in the README."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from controlplane.repository import SourceRepository
from controlplane.spec import Assignment, GpuLet, Plan

from helpers import run_cli

K8S_VERSION = "1.34.0"      # resource.k8s.io/v1 (DRA) is GA from 1.34

DEPLOYMENT = """\
name: fleet
models:
  - {name: resnet50, rate: 600, slo_ms: 108}
  - {name: bert, rate: 900, slo_ms: 22}
  - {name: vgg16, rate: 300, slo_ms: 142}
  - {name: mobilenet_v2, rate: 400, slo_ms: 64}
runtime: {kind: docker, image: "gpulet-triton-gpu:24.12"}
router: {http_port: 8000, grpc_port: 8001}
"""

PLAN = Plan(deployment="fleet", device="NVIDIA H200", algorithm="gpulet", gpus=4, gpulets=[
    GpuLet(id="gpu0-a", gpu=0, share=60, models=[Assignment(model="resnet50", batch=16, rate=600)]),
    GpuLet(id="gpu0-b", gpu=0, share=40, models=[Assignment(model="bert", batch=8, rate=450)]),
    GpuLet(id="gpu1-a", gpu=1, share=100, models=[Assignment(model="bert", batch=8, rate=450)]),
    GpuLet(id="gpu2-a", gpu=2, share=50, models=[Assignment(model="vgg16", batch=8, rate=300)]),
    GpuLet(id="gpu3-a", gpu=3, share=20, models=[Assignment(model="mobilenet_v2", batch=4, rate=200),
                                                 Assignment(model="resnet50", batch=2, rate=10)]),
    GpuLet(id="gpu3-b", gpu=3, share=80, models=[Assignment(model="mobilenet_v2", batch=8, rate=200)]),
])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("k8s")
    (tmp / "fleet.yaml").write_text(DEPLOYMENT)
    (tmp / "plan.json").write_text(PLAN.model_dump_json())
    out = run_cli("render", "k8s", "-f", str(tmp / "fleet.yaml"), "--plan", str(tmp / "plan.json"), "-o",
                  str(tmp / "out"), "--node", "node-a", "--node", "node-b", "--gpus-per-node", "2", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kubectl apply -f" in out.stdout
    docs = [d for p in sorted((tmp / "out").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    return tmp / "out", docs


def test_every_manifest_passes_kubernetes_validate(rendered):
    _, docs = rendered
    assert len(docs) == 4 + 3 * len(PLAN.gpulets) + 3       # claims, per gpu-let (ConfigMap, Deployment, Service), router
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    broken = json.loads(json.dumps(docs[5]))                 # the check can fail: a wrong field is caught
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _by(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_each_gpulet_reads_back_with_its_share_gpu_node_image_ports_and_probes(rendered):
    _, docs = rendered
    deps, services, claims, maps = (_by(docs, k) for k in ("Deployment", "Service", "ResourceClaim", "ConfigMap"))
    for g in PLAN.gpulets:
        name = f"fleet-{g.id}"
        pod = deps[name]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == str(g.share)
        # each process's GPU memory: twice its largest model's memory_mb (config.pbtxt) + 1 GB, as `up` sets it
        largest = max(SourceRepository()[a.model].memory_mb for a in g.models)
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={int(2 * largest + 1024)}MB"
        assert c["image"] == "gpulet-triton-gpu:24.12"
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert c["securityContext"]["runAsNonRoot"] and not c["securityContext"]["allowPrivilegeEscalation"]
        assert any(a.startswith("--http-restricted-api=model-repository") for a in c["command"])
        # its GPU: the claim shared by the gpu-lets of that GPU, selecting it by index on its node
        (rc,) = pod["resourceClaims"]
        claim = claims[rc["resourceClaimName"]]
        assert rc["resourceClaimName"] == f"fleet-gpu{g.gpu}" and c["resources"]["claims"] == [{"name": "gpu"}]
        assert claim["spec"]["devices"]["requests"][0]["exactly"]["selectors"][0]["cel"]["expression"].endswith(
            f".index == {g.gpu % 2}")
        assert claim["spec"]["devices"]["config"][0]["opaque"]["parameters"]["sharing"]["strategy"] == "MPS"
        assert pod["nodeSelector"] == {"kubernetes.io/hostname": ["node-a", "node-b"][g.gpu // 2]}
        # its repository: the plan's batcher config per model, assembled with the model files at start
        data = maps[name]["data"]
        for a in g.models:
            assert f"max_batch_size: {max(a.batch, 32)}" in data[f"{a.model}.config.pbtxt"]
            assert f"/artifacts/{a.model}/model.pt /models/{a.model}/1/model.pt" in \
                pod["initContainers"][0]["command"][-1]
        assert "TritonPythonModel" in data["model.py"]
        assert {p["port"] for p in services[name]["spec"]["ports"]} == {8000, 8001, 8002}
    assert len(claims) == 4


def test_the_router_finds_every_gpulet_through_its_service(rendered):
    _, docs = rendered
    router = _by(docs, "ConfigMap")["fleet-router"]["data"]
    endpoints = json.loads(router["endpoints.json"])
    assert endpoints == {g.id: {"host": f"fleet-{g.id}", "http_port": 8000, "grpc_port": 8001, "metrics_port": 8002}
                         for g in PLAN.gpulets}
    dep = yaml.safe_load(router["deployment.yaml"])
    assert dep["router"]["host"] == "0.0.0.0" and dep["repository"] == "/etc/gpulet/repository"
    assert {k for k in router if k.endswith(".source.config.pbtxt")} == \
        {f"{m}.source.config.pbtxt" for m in ("resnet50", "bert", "vgg16", "mobilenet_v2")}
    svc = _by(docs, "Service")["fleet-router"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {8000, 8001}


def test_a_plan_with_more_gpus_than_the_nodes_given_is_refused(tmp_path):
    (tmp_path / "fleet.yaml").write_text(DEPLOYMENT)
    (tmp_path / "plan.json").write_text(PLAN.model_dump_json())
    out = run_cli("render", "k8s", "-f", str(tmp_path / "fleet.yaml"), "--plan", str(tmp_path / "plan.json"), "-o",
                  str(tmp_path / "out"), "--node", "node-a", "--gpus-per-node", "2", timeout=120)
    assert out.returncode == 1 and "too few" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "out").exists()


FLEET = """\
name: fleet
models:
  - {name: resnet50, rate: 2000, slo_ms: 108}
  - {name: bert, rate: 3000, slo_ms: 22}
devices: {gpus: 4, model: H200}
scheduler: {gpulets_per_gpu: 5}
"""


def test_a_fleet_described_in_the_deployment_is_planned_and_rendered_here_but_not_run(tmp_path):
    """devices: {gpus, model}: planned from that GPU's shipped profile on this GPU-less machine and
    rendered; `up` refuses it, saying what it is for."""
    (tmp_path / "fleet.yaml").write_text(FLEET)
    out = run_cli("render", "k8s", "-f", str(tmp_path / "fleet.yaml"), "-o", str(tmp_path / "out"),
                  "--gpus-per-node", "2", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    docs = [d for p in sorted((tmp_path / "out").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    plan = Plan.model_validate_json(_by(docs, "ConfigMap")["fleet-router"]["data"]["plan.json"])
    assert plan.gpus >= 2 and plan.device == "H200"
    assert len(_by(docs, "ResourceClaim")) == len({g.gpu for g in plan.gpulets})
    up = run_cli("up", "-f", str(tmp_path / "fleet.yaml"), timeout=120)
    assert up.returncode != 0 and "plan for elsewhere" in up.stdout + up.stderr, up.stdout + up.stderr
