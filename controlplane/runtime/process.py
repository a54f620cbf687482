"""The embedded runtime: one local ``tritonserver`` process per gpu-let.

Each server gets its own generated model repository, free loopback ports, a log
file and the environment of its share (see :func:`~.base.gpulet_env`); on CPU
its cores are pinned with ``taskset``. Servers run in their own process group
(so a terminal's Ctrl-C reaches the control plane, which stops them in order)
and with a parent-death signal (``setpriv --pdeathsig``: they die with the
control plane even if it is killed outright, so nothing is left behind).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


from .base import (Endpoint, Launch, OwnReplicas, ReplicaState, ReplicaStatus, Runtime, StartError, free_ports,
                   restart, restricted_api_args, server_ready, stop_all)
from .triton import TritonInstall, find_tritonserver, python_env

def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _wrappers(cores: list[int] | None, data_limit_mb: int | None = None) -> list[str]:
    """Command prefix: die with the control plane (PDEATHSIG), run on the gpu-let's cores, and hold at
    most ``data_limit_mb`` of private memory per process (RLIMIT_DATA, which the python-backend stubs
    inherit: an allocation past it fails in that process alone, as MemoryError in a Python model).

    Done with util-linux's setpriv, taskset and prlimit rather than a preexec_fn, which can
    deadlock the child of a multi-threaded parent (the router's threads) before exec.
    """
    prefix: list[str] = []
    if shutil.which("setpriv"):
        prefix += ["setpriv", "--pdeathsig", "TERM"]
    if cores and shutil.which("taskset"):
        prefix += ["taskset", "-c", ",".join(map(str, cores))]
    if data_limit_mb and shutil.which("prlimit"):
        prefix += ["prlimit", f"--data={data_limit_mb * 2**20}"]
    return prefix


# --------------------------------------------------------------------------- one server, whoever runs it
# (the process runtime here, and each gpu-let actor of the Ray runtime on its node)


def server_command(install: TritonInstall, repository: Path | str, endpoint: Endpoint,
                   cores: list[int] | None = None, data_limit_mb: int | None = None) -> list[str]:
    """The command line of a gpu-let's tritonserver: die with its parent, on its cores, with its memory
    limit (CPU gpu-lets; on a GPU the limit is in the environment), on the endpoint's address and ports,
    exiting on any model's error, with the admin APIs restricted. No auto-complete of the configs: they are
    complete as the control plane writes them, and asking model.py to complete one costs a python-backend
    stub of its own per model (it imports torch: 3.1 s of a 5.6 s start on a 2-core CPU)."""
    e, cmd = endpoint, [*_wrappers(cores, data_limit_mb), str(install.binary)]
    cmd += [
        f"--model-repository={repository}",
        f"--http-address={e.host}", f"--http-port={e.http_port}",
        f"--grpc-address={e.host}", f"--grpc-port={e.grpc_port}",
        f"--metrics-address={e.host}", f"--metrics-port={e.metrics_port}",
        "--exit-on-error=true", "--strict-readiness=true", "--exit-timeout-secs=5",
        "--disable-auto-complete-config", *restricted_api_args(),
    ]
    if install.backend_dir:
        cmd.append(f"--backend-directory={install.backend_dir}")
    return cmd


def server_env(install: TritonInstall, extra: dict[str, str]) -> dict[str, str]:
    """This process's environment, plus what the python backend needs, plus the gpu-let's."""
    env = dict(os.environ)
    env.update(python_env())
    libs = ":".join(str(p) for p in install.lib_dirs)
    env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libs
    env.update(extra)
    return env


def kill_server(p: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a server's process group (it runs in a session of its own), wait, then SIGKILL what
    is left of the group (the python-backend stubs)."""
    if p is not None and p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    if p is not None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def stubs_missing(pid: int, models: int) -> int:
    """How many of a gpu-let's python-backend stubs (one per model instance) are gone from the process
    tree of its tritonserver (pid); 0 when they cannot be counted."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
        alive = sum(1 for k in kids if k.name().startswith("triton_python_b") and k.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return 0
    return max(0, models - alive)


@dataclass
class _Replica:
    launch: Launch
    endpoint: Endpoint
    state: ReplicaState = ReplicaState.PENDING
    proc: subprocess.Popen | None = None
    restarts: int = 0
    message: str = ""
    log_file: object | None = field(default=None, repr=False)
    retry_at: float = 0.0          # monotonic time of the next restart attempt (backoff after a failed one)
    failures: int = 0              # restart attempts failed in a row


def _stubs_missing(r: "_Replica") -> int:
    return stubs_missing(r.proc.pid, len(r.launch.gpulet.models))


class ProcessRuntime(OwnReplicas, Runtime):
    """tritonserver subprocesses on this machine."""

    def __init__(self, tritonserver: str | None = None, host: str = "127.0.0.1",
                 startup_timeout_s: float = 180.0, restart: bool = True) -> None:
        self.install: TritonInstall = find_tritonserver(tritonserver)
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.restart = restart
        self.replicas: dict[str, _Replica] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ process control

    def _command(self, r: _Replica) -> list[str]:
        ln = r.launch
        return server_command(self.install, ln.repository, r.endpoint, ln.cores,
                              None if ln.on_gpu else ln.memory_limit_mb)

    def _env(self, launch: Launch) -> dict[str, str]:
        return server_env(self.install, launch.env)

    def _spawn(self, r: _Replica) -> None:
        r.launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        r.log_file = open(r.launch.log_path, "ab")
        r.log_file.write(f"\n=== controlplane: starting {r.launch.gpulet.id} ===\n".encode())
        r.log_file.flush()
        r.proc = subprocess.Popen(
            self._command(r), env=self._env(r.launch), stdout=r.log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if self.on_spawn is not None:
            try:
                self.on_spawn()
            except Exception:  # noqa: BLE001 - bookkeeping must not stop a start
                pass

    def _ready(self, r: _Replica) -> bool:
        return server_ready(r.endpoint.http)

    def _wait_ready(self, reps: list[_Replica]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        waiting = list(reps)
        while waiting:
            for r in list(waiting):
                if r.state in (ReplicaState.STOPPING, ReplicaState.STOPPED):
                    raise StartError(f"gpu-let {r.launch.gpulet.id}: stopped while it was starting")
                if r.proc.poll() is not None:
                    r.state = ReplicaState.FAILED
                    raise StartError(
                        f"gpu-let {r.launch.gpulet.id}: tritonserver exited with code {r.proc.returncode} "
                        f"before it was ready; log {r.launch.log_path}:\n{log_tail(r.launch.log_path)}"
                    )
                if self._ready(r):
                    r.state = ReplicaState.READY
                    waiting.remove(r)
            if waiting and time.monotonic() > deadline:
                r = waiting[0]
                r.state = ReplicaState.FAILED
                raise StartError(
                    f"gpu-let {r.launch.gpulet.id}: tritonserver not ready after {self.startup_timeout_s:.0f} s; "
                    f"log {r.launch.log_path}:\n{log_tail(r.launch.log_path)}"
                )
            if waiting:
                time.sleep(0.25)

    def _kill(self, r: _Replica, timeout: float = 10.0) -> None:
        kill_server(r.proc, timeout)
        if r.log_file:
            r.log_file.close()
            r.log_file = None

    # ------------------------------------------------------------------ Runtime

    def start(self, launches: list[Launch]) -> dict[str, Endpoint]:
        """Spawn the servers, then wait until each is ready without holding the runtime: meanwhile
        ``status`` answers and ``stop`` stops them too (the wait then fails at once)."""
        with self._lock:
            reps = []
            taken = [ln.gpulet.id for ln in launches if ln.gpulet.id in self.replicas]
            if taken:
                raise StartError(f"gpu-let(s) {', '.join(taken)} already running")
            ports = free_ports(3 * len(launches), self.host)
            for i, launch in enumerate(launches):
                r = _Replica(launch, Endpoint(self.host, *ports[3 * i:3 * i + 3]))
                self.replicas[launch.gpulet.id] = r
                reps.append(r)
            try:
                for r in reps:
                    r.state = ReplicaState.STARTING
                    self._spawn(r)
            except BaseException:
                self._remove(reps)
                raise
        try:
            self._wait_ready(reps)
        except BaseException:
            with self._lock:
                self._remove(reps)
            raise
        return {r.launch.gpulet.id: r.endpoint for r in reps}

    def supervise(self) -> list[str]:
        """Restart servers that exited or lost a stub, on fresh ports (the old ones may be taken by
        now), with backoff (1, 2, 4 ... 30 s) and no limit on attempts; FAILED only when restarting is off.
        Returns the gpu-lets restarted (their endpoints changed: see ``status``)."""
        restarted = []
        with self._lock:
            for gid, r in self.replicas.items():
                if r.state not in (ReplicaState.READY, ReplicaState.RESTARTING) or r.proc is None:
                    continue
                why = None
                if r.proc.poll() is not None:
                    why = f"exited with code {r.proc.returncode}"
                elif r.state is ReplicaState.READY and (lost := _stubs_missing(r)):
                    # Triton keeps saying ready and answers "Stub process ... is not healthy" for ever
                    why = f"{lost} python-backend stub(s) died"
                if why is None or time.monotonic() < r.retry_at:
                    continue

                def start(r=r) -> None:
                    r.endpoint = Endpoint(self.host, *free_ports(3, self.host))
                    self._spawn(r)
                    self._wait_ready([r])

                if restart(r, why, self.restart, lambda r=r: self._kill(r), start):
                    restarted.append(gid)
        return restarted

    def status(self) -> dict[str, ReplicaStatus]:
        with self._lock:
            return {
                gid: ReplicaStatus(gid, r.state, r.endpoint, pid=r.proc.pid if r.proc else None,
                                   restarts=r.restarts, message=r.message)
                for gid, r in self.replicas.items()
            }

    def logs(self, gpulet: str, tail: int = 100) -> str:
        return log_tail(self.replicas[gpulet].launch.log_path, tail)

    def stop(self) -> None:
        with self._lock:
            stop_all(list(self.replicas.values()), self._kill)
