"""Render a plan as a compose file: router, MPS daemon, one Triton service per gpu-let.

``render_compose`` is pure (deployment + plan in, YAML text out); ``compose_command`` is
the CLI command ``controlplane compose -f deployment.yaml`` that plans, writes the
per-gpu-let model repositories, the plan and the compose file into an output directory,
so that ``docker compose up`` (or ``docker-compose up``) runs the deployment.

Every gpu-let service mirrors what :class:`~controlplane.runtime.docker.DockerRuntime`
creates: the gpu-let's repository read-only at ``/models``, the share's environment,
``ipc: host``, the GPU by UUID (``deploy.resources.reservations.devices``) and the MPS
pipe directory, or on CPU a ``cpuset``; ``restart: on-failure``; the same labels.

MPS: ``mps="container"`` adds an ``mps-daemon`` service (``nvidia-cuda-mps-control -f``
from the GPU image, which the NVIDIA container toolkit provides) sharing the pipe
directory with the gpu-lets; ``mps="host"`` expects the daemon on the host
(``nvidia-cuda-mps-control -d`` with the same ``CUDA_MPS_PIPE_DIRECTORY``); CPU plans
have none.

Router: a ``router`` service running ``controlplane router`` on the control plane image
(``gpulet-controlplane:latest``, built by ``compose/build-controlplane-image.sh`` on top of the
CPU Triton image; it needs no GPU), with deployment.yaml, plan.json and endpoints.json of the
bundle mounted at /etc/gpulet and, where the deployment names its own source repository, that
directory at the same path. It starts once every gpu-let is healthy and is healthy itself when
its ``/v2/health/ready`` answers; its ports are published on the deployment's router host.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
import yaml

from .runtime.base import cpu_cores_for, gpulet_env
from .runtime.docker import (
    CONTAINER_PORTS, CONTAINER_REPOSITORY, LABEL_DEPLOYMENT, LABEL_GPU, LABEL_ID, LABEL_MANAGED,
    LABEL_MODELS, LABEL_SHARE, MANAGED_VALUE,
)
from .spec import Deployment, Plan

DEFAULT_MPS_PIPE_DIR = "/tmp/nvidia-mps"
DEFAULT_MPS_LOG_DIR = "/tmp/nvidia-log"
DEFAULT_ROUTER_IMAGE = "gpulet-controlplane:latest"
CONFIG_DIR = "/etc/gpulet"            # where the router service sees deployment, plan and endpoints


def project_name(deployment: Deployment) -> str:
    """Compose project name of a deployment (lower case, no dots)."""
    return f"gpulet-{deployment.name}".lower().replace(".", "-")


def service_name(gpulet_id: str) -> str:
    return f"gpulet-{gpulet_id}"


def endpoints_for_compose(plan: Plan) -> dict[str, dict]:
    """gpu-let -> its address inside the compose network (what the router dials)."""
    return {g.id: {"host": service_name(g.id), "http_port": CONTAINER_PORTS[0], "grpc_port": CONTAINER_PORTS[1],
                   "metrics_port": CONTAINER_PORTS[2]} for g in plan.gpulets}


def render_compose(
    deployment: Deployment,
    plan: Plan,
    *,
    repos_root: str | Path,
    on_gpu: bool | None = None,
    image: str | None = None,
    gpu_uuids: dict[int, str] | None = None,
    mps: str = "container",
    mps_pipe_dir: str = DEFAULT_MPS_PIPE_DIR,
    mps_log_dir: str = DEFAULT_MPS_LOG_DIR,
    cores: list[int] | None = None,
    router_image: str = DEFAULT_ROUTER_IMAGE,
    config_dir: str | Path | None = None,
    publish_gpulets: bool = True,
) -> str:
    """The compose file (YAML) that runs ``plan``.

    repos_root: host directory with one generated repository per gpu-let (``<root>/<id>``,
    as :func:`~controlplane.repository.write_gpulet_repositories` writes them).
    on_gpu: GPU plan (default: unless ``plan.device`` starts with "cpu"). gpu_uuids: plan GPU index ->
    UUID (default: the index itself is passed as device id). mps: "container", "host" or
    "none" (GPU only). cores: host cores CPU gpu-lets are spread over (default: all).
    config_dir: host directory with deployment.yaml, plan.json and endpoints.json for the
    router (default: repos_root's parent). publish_gpulets: also publish every gpu-let's
    ports on 127.0.0.1 (random host ports) for debugging.
    """
    if on_gpu is None:
        on_gpu = not plan.device.startswith("cpu")
    if mps not in ("container", "host", "none"):
        raise ValueError(f"mps must be 'container', 'host' or 'none', got {mps!r}")
    image = image or deployment.runtime.image
    repos_root = Path(repos_root).resolve()
    config_dir = Path(config_dir).resolve() if config_dir else repos_root.parent
    use_mps = on_gpu and mps != "none"
    core_map = {} if on_gpu else cpu_cores_for(plan.gpulets, cores if cores is not None
                                               else sorted(os.sched_getaffinity(0)))
    services: dict[str, dict] = {}
    gpus = sorted({g.gpu for g in plan.gpulets})

    def device_ids(indices: list[int]) -> list[str]:
        return [(gpu_uuids or {}).get(i, str(i)) for i in indices]

    def gpu_reservation(indices: list[int]) -> dict:
        return {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "device_ids": device_ids(indices), "capabilities": ["gpu"]}]}}}

    if use_mps and mps == "container":
        services["mps-daemon"] = {
            "image": image,
            "command": ["nvidia-cuda-mps-control", "-f"],
            "ipc": "host",
            "init": True,
            "environment": {"CUDA_MPS_PIPE_DIRECTORY": mps_pipe_dir, "CUDA_MPS_LOG_DIRECTORY": mps_log_dir,
                            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"},
            "volumes": [f"{mps_pipe_dir}:{mps_pipe_dir}", f"{mps_log_dir}:{mps_log_dir}"],
            "deploy": gpu_reservation(gpus),
            "restart": "unless-stopped",
            "labels": {LABEL_MANAGED: MANAGED_VALUE, LABEL_DEPLOYMENT: deployment.name, LABEL_ID: "mps-daemon"},
            "healthcheck": {"test": ["CMD-SHELL", "echo get_server_list | nvidia-cuda-mps-control"],
                            "interval": "5s", "timeout": "3s", "retries": 5},
        }

    for g in plan.gpulets:
        env = gpulet_env(g, 0 if on_gpu else None, core_map.get(g.id), mps_pipe_dir if use_mps else None)
        if on_gpu:
            env["CUDA_VISIBLE_DEVICES"] = device_ids([g.gpu])[0] if gpu_uuids else "0"
        svc: dict = {
            "image": image,
            "command": ["tritonserver", f"--model-repository={CONTAINER_REPOSITORY}",
                        f"--http-port={CONTAINER_PORTS[0]}", f"--grpc-port={CONTAINER_PORTS[1]}",
                        f"--metrics-port={CONTAINER_PORTS[2]}", "--exit-on-error=true", "--strict-readiness=true",
                        "--disable-auto-complete-config"],
            "environment": env,
            "volumes": [f"{repos_root / g.id}:{CONTAINER_REPOSITORY}:ro"],
            "ipc": "host",
            "restart": "on-failure:5",
            "labels": {LABEL_MANAGED: MANAGED_VALUE, LABEL_DEPLOYMENT: deployment.name, LABEL_ID: g.id,
                       LABEL_GPU: str(g.gpu), LABEL_SHARE: str(g.share),
                       LABEL_MODELS: ",".join(a.model for a in g.models)},
            "healthcheck": {"test": ["CMD-SHELL", f"curl -fsS http://127.0.0.1:{CONTAINER_PORTS[0]}/v2/health/ready"],
                            "interval": "5s", "timeout": "3s", "retries": 3, "start_period": "120s"},
        }
        if publish_gpulets:
            svc["ports"] = [f"127.0.0.1::{p}" for p in CONTAINER_PORTS]
        if on_gpu:
            svc["deploy"] = gpu_reservation([g.gpu])
            if use_mps:
                svc["volumes"].append(f"{mps_pipe_dir}:{mps_pipe_dir}")
                if mps == "container":
                    svc["depends_on"] = {"mps-daemon": {"condition": "service_healthy"}}
        elif core_map.get(g.id):
            svc["cpuset"] = ",".join(str(c) for c in core_map[g.id])
        services[service_name(g.id)] = svc

    r = deployment.router
    router_volumes = [f"{config_dir}:{CONFIG_DIR}:ro"]
    if deployment.repository:
        # A source repository of the user's: the router reads its model configs at the same path.
        src = Path(deployment.repository).resolve()
        router_volumes.append(f"{src}:{src}:ro")
    services["router"] = {
        "image": router_image,
        "command": ["controlplane", "router", "-f", f"{CONFIG_DIR}/deployment.yaml",
                    "--plan", f"{CONFIG_DIR}/plan.json", "--endpoints", f"{CONFIG_DIR}/endpoints.json",
                    "--host", "0.0.0.0"],
        "volumes": router_volumes,
        "ports": [f"{r.host}:{r.http_port}:{r.http_port}", f"{r.host}:{r.grpc_port}:{r.grpc_port}"],
        "depends_on": {service_name(g.id): {"condition": "service_healthy"} for g in plan.gpulets},
        "restart": "on-failure",
        "labels": {LABEL_MANAGED: MANAGED_VALUE, LABEL_DEPLOYMENT: deployment.name, LABEL_ID: "router"},
        # Ready when every gpu-let behind it is (the router's own ready endpoint).
        "healthcheck": {"test": ["CMD-SHELL", f"curl -fsS http://127.0.0.1:{r.http_port}/v2/health/ready"],
                        "interval": "5s", "timeout": "3s", "retries": 3, "start_period": "30s"},
    }
    # No top-level `name`: docker-compose 1.x rejects it; the project name comes from -p.
    doc = {"services": services}
    header = (f"# gpulet deployment {deployment.name!r}: {len(plan.gpulets)} gpu-let(s) on "
              f"{plan.gpus} {'GPU(s)' if on_gpu else 'CPU device(s)'}, plan algorithm {plan.algorithm}.\n"
              f"# Generated by `controlplane compose`; run with "
              f"`docker compose -p {project_name(deployment)} -f <this file> up -d` (or docker-compose).\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def write_compose_bundle(deployment: Deployment, plan: Plan, out_dir: str | Path, repo=None, on_gpu: bool | None = None,
                         gpu_uuids: dict[int, str] | None = None, **kwargs) -> Path:
    """Write repos/, plan.json, endpoints.json, deployment.yaml and docker-compose.yml under out_dir."""
    import json

    from .repository import SourceRepository, build_artifacts, write_gpulet_repositories

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if on_gpu is None:
        on_gpu = not plan.device.startswith("cpu")
    repo = repo or SourceRepository(deployment.repository)
    build_artifacts(repo, plan.model_names())
    write_gpulet_repositories(repo, plan, out / "repos", on_gpu=on_gpu,
                              slo_ms={m.name: m.slo_ms for m in deployment.models})
    (out / "plan.json").write_text(plan.model_dump_json(indent=2))
    (out / "endpoints.json").write_text(json.dumps(endpoints_for_compose(plan), indent=2))
    dumped = deployment.model_dump(mode="json")
    if deployment.repository:          # absolute: the router container mounts it at the same path
        dumped["repository"] = str(Path(deployment.repository).resolve())
    (out / "deployment.yaml").write_text(yaml.safe_dump(dumped, sort_keys=False))
    text = render_compose(deployment, plan, repos_root=out / "repos", on_gpu=on_gpu, gpu_uuids=gpu_uuids,
                          config_dir=out, **kwargs)
    path = out / "docker-compose.yml"
    path.write_text(text)
    return path


def compose_command(
    file: str = typer.Option("deployments/default.yaml", "-f", "--file", help="deployment file (YAML)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default: <run dir>/compose)"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="use this plan (JSON) instead of planning"),
    image: Optional[str] = typer.Option(None, "--image", help="Triton image (default: the deployment's runtime.image)"),
    mps: str = typer.Option("container", "--mps", help="MPS daemon: container | host | none"),
    router_image: str = typer.Option(DEFAULT_ROUTER_IMAGE, "--router-image",
                                     help="control plane image running the router (compose/build-controlplane-image.sh)"),
) -> None:
    """Render a deployment's plan as a compose file (router, MPS daemon, one service per gpu-let)."""
    from . import devices as devmod
    from .cli_base import console, fail, plan_or_load, read_deployment
    from .paths import RunPaths

    dep = read_deployment(file)
    devices = devmod.resolve(dep.devices)
    plan = plan_or_load(dep, plan_file, devices)
    uuids = {i: g.uuid for i, g in enumerate(devices.gpus)} if devices.on_gpu and not devices.fleet else None
    out = out_dir or RunPaths.for_deployment(dep).compose
    if mps not in ("container", "host", "none"):
        fail(f"--mps must be container, host or none, not {mps!r}")
    path = write_compose_bundle(dep, plan, out, on_gpu=devices.on_gpu, gpu_uuids=uuids,
                                image=image, mps=mps, cores=None if devices.on_gpu else list(devices.cores),
                                router_image=router_image)
    console.print(f"wrote {path} ({len(plan.gpulets)} gpu-let(s)); run: "
                      f"docker compose -p {project_name(dep)} -f {path} up -d", highlight=False)
