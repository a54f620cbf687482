"""Render a plan as Kubernetes manifests: one Deployment + Service per gpu-let, the router in front.

``render_k8s`` is pure (deployment + plan in, a list of manifest dicts out); ``write_k8s_bundle``
writes them as one YAML file per gpu-let plus the router's and the GPUs', and ``controlplane render
k8s`` is the command. Nothing here talks to a cluster: `kubectl apply -f DIR` does that.

What each gpu-let gets, mirroring the process and docker runtimes:

* **Its model repository**, assembled at start by an init container in an ``emptyDir`` at ``/models``:
  the generated ``config.pbtxt`` of each model (Triton's dynamic batcher from the plan) and the
  python-backend ``model.py`` come from a ConfigMap (``<deployment>-<gpu-let>``); the model files
  (``<model>/model.pt`` or ``model.onnx``, as ``controlplane repo build`` leaves them in the cache, or
  your repository's version folders) from a read-only volume the cluster provides, by default the
  PersistentVolumeClaim ``<deployment>-models``. Model files are too large for ConfigMaps.
* **Its GPU and share.** GPU sharing at uneven shares goes through Dynamic Resource Allocation with
  NVIDIA's DRA driver (``gpu.nvidia.com``): one ResourceClaim per GPU of the plan, selecting the
  GPU by index and asking for MPS sharing; every gpu-let on that GPU references the same claim and
  sets its own ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (its share), as ``up`` does on one host. The
  device plugin's ``sharing.mps`` was not chosen: it splits a GPU into equal replicas, so a 20/80 plan
  cannot be expressed. GPU ``g`` of the plan is on node ``g // gpus_per_node`` (``nodes`` names them:
  a ``kubernetes.io/hostname`` node selector); without ``nodes`` the scheduler places each claim.
* **Its ports** (HTTP 8000, gRPC 8001, metrics 8002) behind a ClusterIP Service named like the
  Deployment; probes on ``/v2/health/live`` and ``/v2/health/ready``; the Triton APIs the control
  plane never uses restricted as on one host; a non-root security context (the Triton images' user,
  uid 1000); CPU and memory requests and limits.

The router: ``controlplane router`` on the control plane image, its deployment file, plan, endpoints
(the gpu-lets' Services) and the models' configs from a ConfigMap; ClusterIP Service on the
deployment's router ports. Expose it as your cluster does (Ingress, LoadBalancer): it binds 0.0.0.0
inside its pod.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

import yaml
from google.protobuf import text_format

from .repository import SourceRepository, gpulet_config, plan_slos
from .runtime.base import RESTRICTED_APIS, memory_limit_mb, pinned_memory_limit
from .spec import Deployment, Plan

PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
TRITON_UID = 1000                   # the Triton images' `triton-server` user
DRA_DRIVER = "gpu.nvidia.com"
CONFIG_DIR = "/etc/gpulet"
DEFAULT_ROUTER_IMAGE = "gpulet-controlplane:latest"
MODEL_TEMPLATE = Path(__file__).parent / "templates" / "model.py"


def k8s_name(*parts: str) -> str:
    """A DNS-1123 name from parts (lower case, '-' for anything else, at most 63 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    return name[:63].rstrip("-")


def _labels(dep: Deployment, component: str, **more: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "gpulet", "app.kubernetes.io/instance": k8s_name(dep.name),
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "controlplane", **more}


def _security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": TRITON_UID, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _probe(path: str, port: str, initial: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "initialDelaySeconds": initial, "periodSeconds": 5,
            "timeoutSeconds": 3, "failureThreshold": failures}


def gpu_claim_name(dep: Deployment, gpu: int) -> str:
    return k8s_name(dep.name, f"gpu{gpu}")


def gpulet_name(dep: Deployment, gpulet_id: str) -> str:
    return k8s_name(dep.name, gpulet_id)


def _claim(dep: Deployment, gpu: int, index: int) -> dict:
    """One GPU of the plan as a ResourceClaim the gpu-lets on it share, with MPS sharing."""
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": gpu_claim_name(dep, gpu), "labels": _labels(dep, "gpu", **{"gpulet.io/gpu": str(gpu)})},
        "spec": {"devices": {
            "requests": [{"name": "gpu", "exactly": {
                "deviceClassName": DRA_DRIVER,
                "selectors": [{"cel": {"expression": f"device.attributes['{DRA_DRIVER}'].index == {index}"}}]}}],
            "config": [{"requests": ["gpu"], "opaque": {"driver": DRA_DRIVER, "parameters": {
                "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
                "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 100}}}}}],
        }},
    }


def render_k8s(dep: Deployment, plan: Plan, repo: SourceRepository | None = None, *, image: str | None = None,
               router_image: str = DEFAULT_ROUTER_IMAGE, nodes: list[str] | None = None,
               gpus_per_node: int | None = None, artifacts_claim: str | None = None,
               namespace: str | None = None) -> list[dict]:
    """Every manifest that runs ``plan`` on a cluster, in apply order. Pure but for reading the
    source repository's configs and the model.py template.

    nodes: node names (GPU g of the plan on ``nodes[g // gpus_per_node]``); gpus_per_node: default
    all of the plan's GPUs on one node; artifacts_claim: the PersistentVolumeClaim holding the model
    files (default ``<deployment>-models``)."""
    repo = repo or SourceRepository(dep.repository)
    on_gpu = not plan.device.startswith("cpu")
    image = image or dep.runtime.image
    per_node = gpus_per_node or max(1, plan.gpus)
    if nodes and max((g.gpu for g in plan.gpulets), default=0) // per_node >= len(nodes):
        raise ValueError(f"the plan has {plan.gpus} GPU(s): {len(nodes)} node(s) of {per_node} GPU(s) are too few")
    artifacts = artifacts_claim or k8s_name(dep.name, "models")
    slos = plan_slos(repo, plan, {m.name: m.slo_ms for m in dep.models})
    meta_ns = {"namespace": namespace} if namespace else {}
    out: list[dict] = []
    if on_gpu:
        for gpu in sorted({g.gpu for g in plan.gpulets}):
            c = _claim(dep, gpu, gpu % per_node)
            c["metadata"].update(meta_ns)
            out.append(c)
    template = MODEL_TEMPLATE.read_text()
    endpoints = {}
    for g in plan.gpulets:
        name = gpulet_name(dep, g.id)
        labels = _labels(dep, "gpulet", **{"gpulet.io/gpulet": k8s_name(g.id), "gpulet.io/share": str(g.share),
                                           **({"gpulet.io/gpu": str(g.gpu)} if on_gpu else {})})
        data = {"model.py": template}
        script = ["set -e"]
        for a in g.models:
            info = repo[a.model]
            data[f"{a.model}.config.pbtxt"] = text_format.MessageToString(gpulet_config(info, a, on_gpu, slos.get(a.model)))
            v = info.version
            script += [f"mkdir -p /models/{a.model}/{v}",
                       f"cp /config/{a.model}.config.pbtxt /models/{a.model}/config.pbtxt"]
            if info.is_python():       # the user's python model: its .py files travel in the ConfigMap
                for f in sorted(p for p in (info.path / v).iterdir() if p.suffix == ".py"):
                    data[f"{a.model}.{f.name}"] = f.read_text()
                    script.append(f"cp /config/{a.model}.{f.name} /models/{a.model}/{v}/{f.name}")
                continue
            art = info.artifact()
            src = info.source or info.name
            script += [f"cp /config/model.py /models/{a.model}/{v}/model.py",
                       f"cp /artifacts/{src}/{art.name} /models/{a.model}/{v}/{art.name}"]
            if art.suffix == ".onnx":       # model.py runs it with this (the image has no controlplane package)
                data["onnx_model.py"] = (Path(__file__).parent / "onnx_model.py").read_text()
                script.append(f"cp /config/onnx_model.py /models/{a.model}/{v}/onnx_model.py")
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "labels": labels, **meta_ns}, "data": data})
        env = [{"name": "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "value": str(g.share)}] if on_gpu else []
        # its memory limit as `up` sets it (runtime.base.memory_limit_mb), from the repository's memory_mb:
        # the render reads no profile
        limit = memory_limit_mb([repo[a.model].memory_mb for a in g.models], on_gpu) if dep.runtime.memory_limits else None
        if on_gpu and limit:
            env.append({"name": "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "value": pinned_memory_limit(limit)})
        cpu = max(1, round(g.share / 25))          # what the process runtime pins on a 4-core share of 100
        resources: dict = {"requests": {"cpu": str(cpu), "memory": "4Gi"},
                           "limits": {"cpu": str(cpu * 2), "memory": "16Gi"}}
        command = ["tritonserver", "--model-repository=/models", f"--http-port={PORTS['http']}",
                   f"--grpc-port={PORTS['grpc']}", f"--metrics-port={PORTS['metrics']}", "--exit-on-error=true",
                   "--strict-readiness=true", "--disable-auto-complete-config",
                   # the key is not kept anywhere: nobody needs these APIs on a gpu-let (runtime.base)
                   f"--http-restricted-api={RESTRICTED_APIS}:gpulet-admin=$(GPULET_ADMIN_KEY)",
                   f"--grpc-restricted-protocol={RESTRICTED_APIS}:gpulet-admin=$(GPULET_ADMIN_KEY)"]
        env.append({"name": "GPULET_ADMIN_KEY", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}})
        container = {
            "name": "tritonserver", "image": image, "command": command, "env": env,
            "ports": [{"name": n, "containerPort": p} for n, p in PORTS.items()],
            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
            "readinessProbe": _probe("/v2/health/ready", "http", 10, 3),
            "livenessProbe": _probe("/v2/health/live", "http", 60, 6),
            "startupProbe": _probe("/v2/health/ready", "http", 5, 60),
            "resources": resources, "securityContext": _security(),
        }
        pod: dict = {
            "securityContext": {"runAsNonRoot": True, "runAsUser": TRITON_UID, "fsGroup": TRITON_UID},
            "initContainers": [{
                "name": "repository", "image": image, "command": ["sh", "-c", "\n".join(script)],
                "volumeMounts": [{"name": "models", "mountPath": "/models"},
                                 {"name": "config", "mountPath": "/config", "readOnly": True},
                                 {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
                "securityContext": _security()}],
            "containers": [container],
            "volumes": [{"name": "models", "emptyDir": {}},
                        {"name": "config", "configMap": {"name": name}},
                        {"name": "artifacts", "persistentVolumeClaim": {"claimName": artifacts, "readOnly": True}}],
        }
        if on_gpu:
            pod["resourceClaims"] = [{"name": "gpu", "resourceClaimName": gpu_claim_name(dep, g.gpu)}]
            container["resources"]["claims"] = [{"name": "gpu"}]
        if nodes:
            pod["nodeSelector"] = {"kubernetes.io/hostname": nodes[g.gpu // per_node if on_gpu else 0]}
        out.append({"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": name, "labels": labels, **meta_ns},
                    "spec": {"replicas": 1, "selector": {"matchLabels": {"gpulet.io/gpulet": k8s_name(g.id),
                                                                          "app.kubernetes.io/instance": k8s_name(dep.name)}},
                             "strategy": {"type": "Recreate"},     # its GPU share is taken until the old pod is gone
                             "template": {"metadata": {"labels": labels}, "spec": pod}}})
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels, **meta_ns},
                    "spec": {"type": "ClusterIP", "selector": {"gpulet.io/gpulet": k8s_name(g.id),
                                                               "app.kubernetes.io/instance": k8s_name(dep.name)},
                             "ports": [{"name": n, "port": p, "targetPort": n} for n, p in PORTS.items()]}})
        endpoints[g.id] = {"host": name, "http_port": PORTS["http"], "grpc_port": PORTS["grpc"],
                           "metrics_port": PORTS["metrics"]}
    out += _router(dep, plan, repo, endpoints, router_image, meta_ns)
    return out


def _router(dep: Deployment, plan: Plan, repo: SourceRepository, endpoints: dict, router_image: str,
            meta_ns: dict) -> list[dict]:
    name = k8s_name(dep.name, "router")
    labels = _labels(dep, "router")
    doc = dep.model_dump(mode="json", exclude_none=True)
    doc["repository"] = f"{CONFIG_DIR}/repository"
    doc["router"] = {**doc.get("router", {}), "host": "0.0.0.0"}
    data = {"deployment.yaml": yaml.safe_dump(doc, sort_keys=False), "plan.json": plan.model_dump_json(indent=1),
            "endpoints.json": json.dumps(endpoints, indent=1)}
    items = [{"key": k, "path": k} for k in data]
    for m in sorted({info_name for info_name in plan.model_names()}):
        src = repo[m].source or m
        key = f"{src}.source.config.pbtxt"
        if key not in data:
            data[key] = (repo.root / src / "config.pbtxt").read_text()
            items.append({"key": key, "path": f"repository/{src}/config.pbtxt"})
    r = dep.router
    container = {
        "name": "router", "image": router_image,
        "command": ["controlplane", "router", "-f", f"{CONFIG_DIR}/deployment.yaml", "--plan",
                    f"{CONFIG_DIR}/plan.json", "--endpoints", f"{CONFIG_DIR}/endpoints.json", "--host", "0.0.0.0"],
        "ports": [{"name": "http", "containerPort": r.http_port}, {"name": "grpc", "containerPort": r.grpc_port}],
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        "readinessProbe": _probe("/v2/health/ready", "http", 5, 3),
        "livenessProbe": _probe("/v2/health/live", "http", 10, 6),
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}},
        "securityContext": _security(),
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels, **meta_ns}, "data": data},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels, **meta_ns},
         "spec": {"replicas": 1,
                  "selector": {"matchLabels": {"app.kubernetes.io/component": "router",
                                               "app.kubernetes.io/instance": k8s_name(dep.name)}},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "securityContext": {"runAsNonRoot": True, "runAsUser": TRITON_UID},
                      "containers": [container],
                      "volumes": [{"name": "config", "configMap": {"name": name, "items": items}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels, **meta_ns},
         "spec": {"type": "ClusterIP",
                  "selector": {"app.kubernetes.io/component": "router", "app.kubernetes.io/instance": k8s_name(dep.name)},
                  "ports": [{"name": "http", "port": r.http_port, "targetPort": "http"},
                            {"name": "grpc", "port": r.grpc_port, "targetPort": "grpc"}]}},
    ]


def write_k8s_bundle(manifests: list[dict], out_dir: str | Path) -> list[Path]:
    """One YAML file per component (GPUs, each gpu-let, the router), numbered in apply order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    for m in manifests:
        labels = m["metadata"].get("labels", {})
        key = labels.get("gpulet.io/gpulet") or labels.get("app.kubernetes.io/component", "other")
        groups.setdefault(key, []).append(m)
    paths = []
    for i, (key, docs) in enumerate(groups.items()):
        path = out / f"{i:02d}-{key}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        paths.append(path)
    return paths


def render_command(
    what: str = typer.Argument(..., help="what to render: k8s"),
    file: str = typer.Option("deployments/default.yaml", "-f", "--file", help="deployment file (YAML)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="output directory"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="use this plan (JSON, `controlplane plan --json`)"),
    image: Optional[str] = typer.Option(None, "--image", help="Triton image (default: the deployment's runtime.image)"),
    router_image: str = typer.Option(DEFAULT_ROUTER_IMAGE, "--router-image", help="control plane image (the router)"),
    nodes: list[str] = typer.Option([], "--node", help="node names in GPU order (repeat); GPU g on node g // gpus-per-node"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1, help="GPUs per node"),
    artifacts_claim: Optional[str] = typer.Option(None, "--artifacts-claim",
                                                  help="PersistentVolumeClaim with the model files (default <name>-models)"),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n"),
) -> None:
    """Render a deployment's plan as Kubernetes manifests (`kubectl apply -f DIR`)."""
    from .cli_base import console, fail, plan_or_load, read_deployment

    if what != "k8s":
        fail(f"unknown target {what!r}: `controlplane render k8s`")
    dep = read_deployment(file)
    plan = plan_or_load(dep, plan_file)
    try:
        manifests = render_k8s(dep, plan, image=image, router_image=router_image, nodes=nodes or None,
                               gpus_per_node=gpus_per_node, artifacts_claim=artifacts_claim, namespace=namespace)
    except (ValueError, KeyError) as e:
        fail(str(e), 1)
    paths = write_k8s_bundle(manifests, out_dir)
    console.print(f"wrote {len(manifests)} manifests in {len(paths)} files under {out_dir} ({len(plan.gpulets)} "
                  f"gpu-let(s) on {plan.gpus} {'GPU(s)' if not plan.device.startswith('cpu') else 'CPU device(s)'}); "
                  f"apply with: kubectl apply -f {out_dir}", highlight=False)
