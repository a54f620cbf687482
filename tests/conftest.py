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
