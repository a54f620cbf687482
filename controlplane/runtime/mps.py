"""MPS handling: the control daemon on the project's own pipe and log directories.

A share (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) only limits a process that is a
client of a running MPS server; without one CUDA ignores it without a word and
the "20 %" row would be a 100 % measurement. So the profiler

* starts the control daemon with the project's own pipe and log directories
  (:class:`Daemon`; never touches the compute mode, clocks or MIG),
* checks that a daemon answers before it starts a worker for a share < 100
  (:func:`status`), and
* has each worker check, after it initialised CUDA, that the MPS server lists
  its pid among its clients (:func:`is_client`); a worker that is not a client
  refuses to record a share < 100 (:class:`MPSNotActive`).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"


class MPSNotActive(RuntimeError):
    """A GPU share < 100 % was asked for, but MPS does not enforce it."""


def default_dirs(root: str | Path | None = None) -> tuple[Path, Path]:
    """The profiler's MPS pipe and log directories: under root, ``$CONTROLPLANE_MPS_DIR``, else
    /tmp/gpulet-mps-profile-<uid> (short: the pipe is a Unix socket; see controlplane.paths)."""
    base = Path(root or os.environ.get("CONTROLPLANE_MPS_DIR")
                or Path(tempfile.gettempdir()) / f"gpulet-mps-profile-{os.getuid()}")
    return base / "pipe", base / "log"


def _env(pipe_dir: Path, log_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)}
    if log_dir is not None:
        env["CUDA_MPS_LOG_DIRECTORY"] = str(log_dir)
    return env


def control(command: str, pipe_dir: Path, timeout: float = 10.0, tries: int = 4) -> str | None:
    """Send one command to the control daemon on ``pipe_dir``; None when none answers.

    Several ``nvidia-cuda-mps-control`` clients at once can fail (seen on the H100 when six
    workers checked at the same moment), so calls are serialised with a lock file beside the
    pipe directory and retried.
    """
    import fcntl

    pipe_dir = Path(pipe_dir)
    if shutil.which(CONTROL) is None or not (pipe_dir / "control").exists():
        return None
    lock_path = pipe_dir.parent / (pipe_dir.name + ".lock")
    for attempt in range(tries):
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                r = subprocess.run([CONTROL], input=command + "\n", text=True, capture_output=True,
                                   env=_env(pipe_dir), timeout=timeout)
            if r.returncode == 0:
                return r.stdout
        except (subprocess.TimeoutExpired, OSError):
            pass
        time.sleep(0.2 * (attempt + 1))
    return None


@dataclass
class MPSStatus:
    active: bool
    reason: str
    servers: list[int]


def status(pipe_dir: str | Path) -> MPSStatus:
    """Whether an MPS control daemon answers on ``pipe_dir`` (and which servers it runs)."""
    pipe_dir = Path(pipe_dir)
    if shutil.which(CONTROL) is None:
        return MPSStatus(False, f"{CONTROL} is not installed (no NVIDIA driver tools on this host)", [])
    if not (pipe_dir / "control").exists():
        return MPSStatus(False, f"no MPS control daemon: {pipe_dir}/control does not exist "
                                f"(start one with `controlplane profile --start-mps` or {CONTROL} -d)", [])
    out = control("get_server_list", pipe_dir)
    if out is None:
        return MPSStatus(False, f"the MPS control daemon on {pipe_dir} does not answer", [])
    return MPSStatus(True, "MPS control daemon answers", [int(x) for x in out.split() if x.isdigit()])


def is_client(pid: int, pipe_dir: str | Path) -> bool:
    """True when an MPS server of the daemon on ``pipe_dir`` lists ``pid`` as its client."""
    st = status(pipe_dir)
    for server in st.servers:
        out = control(f"get_client_list {server}", Path(pipe_dir)) or ""
        if str(pid) in out.split():
            return True
    return False


def require_client(share: int, pipe_dir: str | Path | None, pid: int | None = None, wait_s: float = 5.0) -> None:
    """Raise MPSNotActive unless this process (after CUDA init) is an MPS client; share 100 needs nothing."""
    if share >= 100:
        return
    if not pipe_dir:
        raise MPSNotActive(f"share {share} % asked for, but CUDA_MPS_PIPE_DIRECTORY is not set: "
                           "the share would be ignored")
    pid = os.getpid() if pid is None else pid
    deadline = time.monotonic() + wait_s
    while True:
        st = status(pipe_dir)
        if not st.active:
            raise MPSNotActive(f"share {share} % asked for, but MPS is not active: {st.reason}")
        if is_client(pid, pipe_dir):
            return
        if time.monotonic() > deadline:
            raise MPSNotActive(f"share {share} % asked for, but process {pid} is not a client of the MPS "
                               f"server on {pipe_dir} (servers {st.servers}): the share would be ignored")
        time.sleep(0.2)


def private_dir(path: Path) -> None:
    """Make ``path`` (mode 0700), or check that the one there is this user's and closed to others."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise MPSNotActive(f"{path} is not a private directory of this user (owner uid {st.st_uid}, mode "
                           f"{stat.S_IMODE(st.st_mode):o}): remove it, or set runtime.mps_pipe_dir")


class Daemon:
    """The MPS control daemon on the project's pipe/log dirs; stops it only if it started it."""

    def __init__(self, pipe_dir: str | Path | None = None, log_dir: str | Path | None = None,
                 private: bool = True) -> None:
        """private: the dirs must be this user's and closed to others (made so when new); off for a
        pipe directory the user named (a daemon they run, e.g. the system's)."""
        p, l = default_dirs()
        self.pipe_dir = Path(pipe_dir) if pipe_dir else p
        self.log_dir = Path(log_dir) if log_dir else l
        self.private = private
        self.started = False

    def start(self) -> "Daemon":
        # The dirs sit under /tmp with predictable names: one made by another user could hold a
        # daemon of theirs that our servers would join. They must be ours and closed to others.
        if self.private:
            for d in (self.pipe_dir, self.log_dir):
                private_dir(d)
        else:
            self.pipe_dir.mkdir(parents=True, exist_ok=True)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        if status(self.pipe_dir).active:
            return self
        if shutil.which(CONTROL) is None:
            raise MPSNotActive(f"{CONTROL} not found: MPS shares cannot be enforced on this host")
        r = subprocess.run([CONTROL, "-d"], env=_env(self.pipe_dir, self.log_dir), capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise MPSNotActive(f"cannot start the MPS daemon: {r.stderr.strip() or r.stdout.strip()}")
        self.started = True
        deadline = time.monotonic() + 10
        while not status(self.pipe_dir).active:
            if time.monotonic() > deadline:
                raise MPSNotActive(f"MPS daemon started but does not answer on {self.pipe_dir}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.started:
            control("quit", self.pipe_dir, timeout=30)
            self.started = False

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
