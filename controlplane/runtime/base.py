"""What every runtime does: run one tritonserver per gpu-let, keep it alive, stop it.

A runtime gets a list of :class:`Launch` (one per gpu-let: its generated model
repository, device placement and environment) and turns each into a *replica*
whose life is an explicit state machine, as in Ray Serve's controller::

    PENDING ──start──► STARTING ──ready──► READY ──dies──► RESTARTING ──ready──► READY
                          │                  │                 │
                          └──timeout/exit──► FAILED ◄──────────┘ (restart failed)
    any ──stop──► STOPPING ──► STOPPED

``start`` is all-or-nothing: if any replica fails to become ready, every replica
already started is stopped and :class:`StartError` carries the failing
server's log tail. ``supervise`` (called periodically) restarts replicas that
died. ``stop`` leaves nothing running.
"""

from __future__ import annotations

import enum
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..devices import GPULET_OVERHEAD_MB
from ..spec import GpuLet


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on host (held open together, so they differ).

    Asked for one at a time, the kernel may hand the port it just gave back again: a tritonserver
    then got one port for HTTP and metrics and exited ("cannot listen to HTTP requests and metrics
    requests at the same address and port"), once in a full CI run."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


#: Triton APIs a gpu-let's server is never asked for by the control plane (the router uses health,
#: metadata, model config, inference and statistics): restricted behind a header whose value nobody is
#: given, so a local client that finds a gpu-let's port cannot unload its models, register shared
#: memory or change its logging and tracing (issue 14).
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"


def restricted_api_args() -> list[str]:
    """tritonserver flags that restrict :data:`RESTRICTED_APIS` over HTTP and gRPC, with a fresh random
    key. The key is in the server's command line (readable by local users where /proc is not mounted
    with hidepid): this keeps the APIs off by default, it is not an authentication scheme."""
    import secrets

    key = f"gpulet-admin={secrets.token_hex(16)}"
    return [f"--http-restricted-api={RESTRICTED_APIS}:{key}", f"--grpc-restricted-protocol={RESTRICTED_APIS}:{key}"]


def server_ready(http: str | None, timeout: float = 1.0) -> bool:
    """Whether the KServe v2 server at host:port (a tritonserver, or the router) answers
    ``/v2/health/ready`` with 200: the one readiness probe of runtimes and ``status``."""
    if not http:
        return False
    import httpx

    try:
        return httpx.get(f"http://{http}/v2/health/ready", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class ReplicaState(str, enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StartError(RuntimeError):
    """A gpu-let's server did not become ready; the message ends with its log tail."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"


@dataclass
class Launch:
    """Everything needed to run one gpu-let's tritonserver."""

    gpulet: GpuLet
    repository: Path                  # the generated model repository of this gpu-let
    log_path: Path
    gpu_uuid: str | None = None       # None: CPU gpu-let
    gpu_index: int | None = None      # physical GPU index (CUDA_VISIBLE_DEVICES)
    cores: list[int] | None = None    # CPU gpu-let: the cores its share maps to
    env: dict[str, str] = field(default_factory=dict)  # share, MPS pipe dir, threads, GPU memory limit
    memory_limit_mb: int | None = None  # the most memory each of its processes may hold (None: no limit)

    @property
    def on_gpu(self) -> bool:
        return self.gpu_index is not None


@dataclass
class ReplicaStatus:
    gpulet: str
    state: ReplicaState
    endpoint: Endpoint | None
    pid: int | None = None            # process runtime
    container: str | None = None      # docker runtime
    restarts: int = 0
    message: str = ""
    node: str | None = None           # ray runtime: the node's address and id
    node_gpu: int | None = None       # ray runtime: the GPU's index on that node (None: CPU)
    log: str | None = None            # where the server's log is, when not <run dir>/logs/<gpu-let>.log


class OwnReplicas:
    """``remove`` for a runtime that keeps its replicas itself (process, ray): ``self.replicas`` maps a gpu-let
    id to its record (``state``, ``launch``), ``self._kill(record)`` stops one, under ``self._lock``."""

    def remove(self, gpulets: list[str]) -> None:
        with self._lock:
            self._remove([self.replicas[g] for g in gpulets if g in self.replicas])

    def _remove(self, reps: list) -> None:
        stop_all(reps, self._kill)
        for r in reps:
            self.replicas.pop(r.launch.gpulet.id, None)


def stop_all(reps: list, kill: Callable) -> None:
    """Stop these replicas (STOPPING, then STOPPED) with ``kill(record)``, all at once: each server takes
    up to its exit timeout to finish what it holds, and one after the other a re-plan's change took the
    sum of them while the controller could not re-plan (benchmarks/live.py, run 17)."""
    reps = [r for r in reps if r.state is not ReplicaState.STOPPED]
    for r in reps:
        r.state = ReplicaState.STOPPING
    if reps:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(reps), thread_name_prefix="stop") as pool:
            list(pool.map(kill, reps))
    for r in reps:
        r.state = ReplicaState.STOPPED


def restart(r, why: str, allowed: bool, kill: Callable[[], None], start: Callable[[], None]) -> bool:
    """One supervision step for a replica that stopped serving (``why``), the same in every runtime that
    restarts its own servers: FAILED when restarting is off; else what is left of it is killed and ``start``
    (spawn and wait ready; raises :class:`StartError`) runs again, with no limit on attempts, the next one
    1, 2, 4 ... 30 s after a failed one (``r.retry_at``). ``r``: the runtime's replica record (state,
    message, restarts, failures, retry_at). True when it serves again."""
    if not allowed:
        r.state, r.message = ReplicaState.FAILED, why
        return False
    if r.state is ReplicaState.READY:
        r.message = f"{why}; restarting"
    r.state = ReplicaState.RESTARTING
    kill()
    r.restarts += 1
    try:
        start()
    except StartError as e:
        kill()
        r.failures += 1
        r.state = ReplicaState.RESTARTING
        r.retry_at = time.monotonic() + min(30.0, 2.0 ** (min(r.failures, 6) - 1))
        r.message = f"restart {r.restarts} failed, next try in {r.retry_at - time.monotonic():.0f} s: {e}"
        return False
    r.message, r.retry_at, r.failures = "", 0.0, 0
    return True


#: a gpu-let's processes may each hold this many times its largest model's memory, plus the base below
MEMORY_HEADROOM = 2.0
#: what every process of a gpu-let holds besides its model: on a GPU the CUDA context and allocator pools
#: (the memory check's allowance); on the CPU the process's private memory with no model run yet (seen
#: 2026-11-30 on 2 cores: a python-backend stub with torch imported, 0.8 GB of data segment; a tritonserver,
#: 0.5 GB, nearly all of it its 63 threads' 8 MB stacks), plus MEMORY_PER_CORE_MB for each core of the
#: machine: thread pools (gRPC's, torch's) grow with it, and every thread's stack counts in the data limit
MEMORY_BASE_MB = {"gpu": GPULET_OVERHEAD_MB, "cpu": 2048.0}
MEMORY_PER_CORE_MB = 16.0


def memory_base_mb(on_gpu: bool) -> float:
    """What a gpu-let's process may hold besides its model (MEMORY_BASE_MB, on the CPU per core too)."""
    return MEMORY_BASE_MB["gpu"] if on_gpu else MEMORY_BASE_MB["cpu"] + MEMORY_PER_CORE_MB * (os.cpu_count() or 1)


def memory_limit_mb(models_mb: Iterable[float | None], on_gpu: bool) -> int | None:
    """The most memory one process of a gpu-let may hold: MEMORY_HEADROOM times the largest of its models'
    memory (the profile's, else the repository's ``memory_mb``) plus :func:`memory_base_mb`. A limit per
    process because that is what both platforms enforce (an MPS client's pinned device memory, a process's
    data segment), and each model instance runs in a process (stub) of its own: a model that leaks or
    overflows fails alone instead of taking the memory its neighbours on the device need.
    None when no model's memory is known (nothing to derive a limit from)."""
    known = [m for m in models_mb if m]
    if not known:
        return None
    return int(math.ceil(MEMORY_HEADROOM * max(known) + memory_base_mb(on_gpu)))


def pinned_memory_limit(limit_mb: int) -> str:
    """CUDA_MPS_PINNED_DEVICE_MEM_LIMIT's value for a process that sees one GPU (its ordinal 0)."""
    return f"0={limit_mb}MB"


def gpulet_env(launch_gpulet: GpuLet, gpu_index: int | None, cores: list[int] | None,
               mps_pipe_dir: str | None, memory_limit_mb: int | None = None) -> dict[str, str]:
    """Environment that makes a tritonserver honour its gpu-let's share.

    GPU: CUDA_VISIBLE_DEVICES, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, the MPS pipe directory, and the
    memory limit as CUDA_MPS_PINNED_DEVICE_MEM_LIMIT (per MPS client, that is per process; ordinal 0 is
    the one GPU the process sees). CPU: thread counts equal to the number of cores the share maps to
    (its memory limit is the process runtime's ``prlimit``).
    """
    env: dict[str, str] = {"CONTROLPLANE_GPULET": launch_gpulet.id, "CONTROLPLANE_SHARE": str(launch_gpulet.share)}
    if gpu_index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(launch_gpulet.share)
        if mps_pipe_dir:
            env["CUDA_MPS_PIPE_DIRECTORY"] = mps_pipe_dir
        if memory_limit_mb:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = pinned_memory_limit(memory_limit_mb)
    else:
        n = str(len(cores or []) or 1)
        env.update({"CUDA_VISIBLE_DEVICES": "", "CONTROLPLANE_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n})
    return env


def cpu_cores_for(gpulets: list[GpuLet], available: list[int] | None = None) -> dict[str, list[int]]:
    """Map CPU gpu-lets to cores so a share means the same on CPU as on a GPU.

    Each virtual device is the machine's whole set of cores; a gpu-let of share s
    at offset o (shares of the gpu-lets before it on the same device) gets the
    cores in [o, o + s) % of that set, at least one.
    """
    cores = sorted(available if available is not None else os.sched_getaffinity(0))
    n = len(cores)
    out: dict[str, list[int]] = {}
    offset: dict[int, int] = {}
    for g in gpulets:
        o = offset.get(g.gpu, 0)
        lo = min(n - 1, (o * n) // 100)
        hi = max(lo + 1, min(n, round((o + g.share) * n / 100)))
        out[g.id] = cores[lo:hi]
        offset[g.gpu] = o + g.share
    return out


class Runtime(ABC):
    """One tritonserver per gpu-let, behind one interface (process, docker or ray)."""

    #: called after each server process is spawned, before it is ready (the controller records its pid)
    on_spawn: Callable[[], None] | None = None

    @abstractmethod
    def start(self, launches: list[Launch]) -> dict[str, Endpoint]:
        """Start every gpu-let and wait until all are ready; all-or-nothing (StartError). On a running
        runtime it adds gpu-lets (ids not in use), and a failure stops only those."""

    @abstractmethod
    def supervise(self) -> list[str]:
        """Restart replicas that died; return the ids restarted. Called periodically."""

    @abstractmethod
    def status(self) -> dict[str, ReplicaStatus]:
        ...

    @abstractmethod
    def logs(self, gpulet: str, tail: int = 100) -> str:
        ...

    @abstractmethod
    def stop(self) -> None:
        """Stop everything this runtime started; idempotent."""

    def remove(self, gpulets: list[str]) -> None:
        """Stop these gpu-lets and forget them; the others keep running (a new plan no longer has them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot change a running deployment (use the process runtime)")

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
