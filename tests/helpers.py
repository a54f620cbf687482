"""Helpers for tests: run the CLI as a user would, find leftover servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run `controlplane ARGS` in a fresh interpreter, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "controlplane", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    if check and proc.returncode != 0:
        raise AssertionError(f"controlplane {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tritonserver_pids(containing: str = "") -> list[int]:
    """PIDs of running tritonservers whose command line contains `containing` (e.g. a test's tmp dir,
    so that servers of other tests or other users of the machine do not count)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() != "tritonserver":
                    continue
                if containing in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out
