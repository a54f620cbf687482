"""The CUDA MPS control daemon, with the project's own pipe and log directories.

MPS shares (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) only take effect for clients
of a running MPS daemon; without one CUDA silently ignores them. The daemon is
started without touching the GPU's compute mode (never change it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class MPSError(RuntimeError):
    pass


def mps_env(pipe_dir: Path, log_dir: Path | None = None) -> dict[str, str]:
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)}
    if log_dir is not None:
        env["CUDA_MPS_LOG_DIRECTORY"] = str(log_dir)
    return env


def is_running(pipe_dir: Path) -> bool:
    """True when a control daemon answers on this pipe directory."""
    if not (pipe_dir / "control").exists() or shutil.which("nvidia-cuda-mps-control") is None:
        return False
    try:
        r = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", text=True, capture_output=True,
                           env={**os.environ, **mps_env(pipe_dir)}, timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return r.returncode == 0


class MPSDaemon:
    """Start the daemon if none runs on our pipe dir; stop it only if we started it."""

    def __init__(self, pipe_dir: Path, log_dir: Path) -> None:
        self.pipe_dir, self.log_dir = Path(pipe_dir), Path(log_dir)
        self.started = False

    def start(self) -> None:
        if is_running(self.pipe_dir):
            return
        if shutil.which("nvidia-cuda-mps-control") is None:
            raise MPSError("nvidia-cuda-mps-control not found: MPS shares cannot be enforced on this host")
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **mps_env(self.pipe_dir, self.log_dir)},
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise MPSError(f"cannot start the MPS daemon: {r.stderr.strip() or r.stdout.strip()}")
        self.started = True

    def stop(self) -> None:
        if not self.started:
            return
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, capture_output=True,
                       env={**os.environ, **mps_env(self.pipe_dir, self.log_dir)}, timeout=30)
        self.started = False
