"""Where the control plane keeps things — one place, so the README's table and the code agree.

============================  ===================================================================
what                          where
============================  ===================================================================
built model artifacts         ``<cache>/zoo/<model>/model.pt``
Triton's python backend       ``<cache>/triton-backends/<version>/`` (the stub for this Python)
profiles measured here        ``<cache>/profiles/<device>/`` (``profile`` and ``up`` write them)
profiles shipped              ``profiles/<device>/`` in the source tree (read only)
one deployment's run          ``<run dir>`` = the deployment's ``run_dir`` (made absolute), else
                              ``<state>/runs/<name>``: ``state.json``, ``up.lock``, ``logs/``, ``repos/``
its MPS pipe and log          ``/tmp/gpulet-mps-<name>-<hash>/`` (a Unix socket path must stay
                              under 108 bytes) or the deployment's ``runtime.mps_pipe_dir``
the profiler's MPS daemon     ``$CONTROLPLANE_MPS_DIR``, else ``/tmp/gpulet-mps-profile-<uid>/``
============================  ===================================================================

``<cache>`` is ``$CONTROLPLANE_CACHE``, else ``~/.cache/controlplane``; ``<state>`` is
``$CONTROLPLANE_STATE``, else ``$XDG_STATE_HOME/controlplane``, else ``~/.local/state/controlplane``:
absolute, so `status`, `apply` and `down` find a deployment from any directory. Nothing is written
into the source tree or the installed package at run time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .spec import Deployment

#: profiles that come with the project (read only)
SHIPPED_PROFILES = Path(__file__).resolve().parent.parent / "profiles"


def cache_dir() -> Path:
    """$CONTROLPLANE_CACHE, else ~/.cache/controlplane."""
    return Path(os.environ.get("CONTROLPLANE_CACHE") or Path.home() / ".cache" / "controlplane")


def state_dir() -> Path:
    """$CONTROLPLANE_STATE, else $XDG_STATE_HOME/controlplane, else ~/.local/state/controlplane."""
    if os.environ.get("CONTROLPLANE_STATE"):
        return Path(os.environ["CONTROLPLANE_STATE"]).absolute()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).absolute() / "controlplane"


def measured_profiles(dep: Deployment | None = None) -> Path:
    """Where profiles measured on this machine are written (and read first): the deployment's
    ``profiles:`` folder if it names one, else ``<cache>/profiles``."""
    return Path(dep.profiles) if dep is not None and dep.profiles else cache_dir() / "profiles"


@dataclass(frozen=True)
class RunPaths:
    """Where one deployment keeps its state, logs and generated repositories."""

    root: Path

    @classmethod
    def for_deployment(cls, dep: Deployment) -> "RunPaths":
        return cls(Path(dep.run_dir).absolute() if dep.run_dir else state_dir() / "runs" / dep.name)

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def repos(self) -> Path:
        return self.root / "repos"

    @property
    def compose(self) -> Path:
        return self.root / "compose"

    @property
    def apply_request(self) -> Path:
        """A deployment file `controlplane apply` leaves for the running `up` (taken within a second)."""
        return self.root / "apply.yaml"

    @property
    def apply_result(self) -> Path:
        """What the running `up` made of the last apply request (JSON: ok, error or plan)."""
        return self.root / "apply.json"

    @property
    def control(self) -> Path:
        """The router's repository API requests to the running `up`, and the repository index it keeps
        (controlplane.router.control)."""
        return self.root / "control"

    @property
    def lock(self) -> Path:
        """Held (flock) by the one `up` that runs this deployment, from before it plans until it exits."""
        return self.root / "up.lock"

    def mps(self, name: str) -> Path:
        """MPS pipe/log dirs: short and under /tmp, since the pipe is a Unix socket (108-byte path limit)."""
        tag = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"gpulet-mps-{name}-{tag}"


def write_json(path: Path, doc, indent: int | None = None) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=indent))
    tmp.replace(path)
