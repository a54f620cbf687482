"""Shared fixtures: an isolated artifact cache and helpers to run the CLI for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def artifact_cache(tmp_path_factory) -> Path:
    """Built models and the python-backend dir go to a cache of this test session only,
    unless CONTROLPLANE_CACHE is set (to reuse builds between runs)."""
    if os.environ.get("CONTROLPLANE_CACHE"):
        return Path(os.environ["CONTROLPLANE_CACHE"])
    path = tmp_path_factory.mktemp("cache")
    os.environ["CONTROLPLANE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def client():
    """A Docker SDK client for the docker tests; they skip, saying why, when no engine answers."""
    import sys

    from controlplane.runtime.docker import DockerUnavailable, docker_client

    try:
        c = docker_client(timeout=120)
    except DockerUnavailable as e:
        print(f"\nSKIPPED docker tests: {e}", file=sys.stderr)
        pytest.skip(str(e))
    yield c
    c.close()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """One CPU gpu-let (a real tritonserver) serving lenet and mobilenet_v2: (plan, endpoints, repository)."""
    from router_helpers import one_gpulet_plan, start_servers

    plan = one_gpulet_plan()
    rt, eps, repo = start_servers(plan, tmp_path_factory.mktemp("gpulet"))
    try:
        yield plan, eps, repo
    finally:
        rt.stop()


@pytest.fixture(scope="module")
def server(backend):
    """The router in front of ``backend``, in one process (workers=0 would pick one per 4 cores of the
    machine; the multi-process router has its own test), bodies limited to router_helpers.MAX_BODY."""
    from controlplane.router import RouterServer, RoutingTable
    from controlplane.spec import RouterSpec
    from router_helpers import MAX_BODY, deployment

    plan, eps, repo = backend
    table = RoutingTable.from_plan(plan, eps, repo, deployment())
    srv = RouterServer(table, RouterSpec(http_port=0, grpc_port=0, max_body_bytes=MAX_BODY, workers=1))
    srv.start_in_thread()
    try:
        yield srv
    finally:
        srv.stop()
