"""Ray runtime: each gpu-let is one Ray actor, on its node, that owns the gpu-let's tritonserver.

The controller (``controlplane up``, on the head or any machine that can reach the cluster) is
the Ray driver. For every :class:`~controlplane.runtime.base.Launch`:

* **Placement.** The plan's device index maps to the cluster (:func:`cluster_devices`): alive
  nodes in order (the head first, then by address, then by node id); on a cluster with GPUs,
  device *i* is the *i*-th GPU counting each node's GPUs in index order (``ray.nodes()``'s
  ``GPU`` resource); on a cluster without GPUs every node is one virtual CPU device, and plan
  device *i* runs on node *i mod nodes* (as the process runtime runs every virtual device on
  the one host's cores). The actor is pinned there with ``NodeAffinitySchedulingStrategy``
  (``soft=False``) and takes no Ray resources (``num_cpus=0``, ``num_gpus=0``): the plan does the
  accounting, Ray's GPU assignment (which would set ``CUDA_VISIBLE_DEVICES`` itself) is not used.
* **The server.** The actor (:class:`GpuletServer`) starts ``tritonserver`` on its node with the
  command and environment of the process runtime (:func:`~.process.server_command`,
  :func:`~.process.server_env`, :func:`~.base.gpulet_env`): on a GPU ``CUDA_VISIBLE_DEVICES`` is
  the GPU's index on its node, the share ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, and the MPS
  pipe directory that of the node's MPS control daemon, which one small actor per GPU node
  (:class:`MpsDaemon`) starts when none answers there and stops at the end; on a CPU the
  gpu-let's share of the node's cores (its cores on the head, scaled to the node's count).
  The server listens on the node's address (as Ray knows it) at free ports chosen there; the
  actor reports that endpoint, which the router (running with the controller) uses.
* **Its life.** The server runs in a session of its own with a parent-death signal, so it dies
  with its actor however the actor ends (``ray.kill``, a crash, its node's raylet); a graceful
  stop kills its process group. Actors are owned by the controller: if it dies, Ray kills them,
  and with them the servers. ``supervise`` restarts a gpu-let whose actor died, whose server
  exited or lost a python-backend stub: a new actor on the same node, on fresh ports.
* **Model repositories** are written by the controller into its run directory. By default the
  actor is given that path, so every node must see the run directory at the same path (a
  shared filesystem, or the one machine of a local test cluster); with ``ship_repositories``
  the controller sends each repository's bytes with its actor (Ray's object store) and the
  actor unpacks them into a node-local directory
  (``<tmp>/gpulet-ray-<uid>/<deployment>/<gpu-let>``, removed when the actor stops).
  The server's log is written to the run directory in the first case, beside the unpacked
  repository in the second; ``logs`` asks the actor for it.
* **Code on the nodes.** The driver ships the ``controlplane`` package to the workers
  (``runtime_env.py_modules``); the nodes need the rest of its environment: ``ray``,
  ``nvidia-pytriton`` (or ``runtime.tritonserver`` at the same path on every node) and the
  python backend's packages (torch, numpy), as for any Ray job.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .base import (Endpoint, Launch, OwnReplicas, ReplicaState, ReplicaStatus, Runtime, StartError, free_ports,
                   gpulet_env, restart, server_ready)

#: the Ray namespace of every actor the control plane creates; names are "<deployment>/<gpu-let>#<n>"
NAMESPACE = "gpulet"


class RayUnavailable(RuntimeError):
    """The ray package is missing or no cluster answers at the address; the message says why."""


def _ray():
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"the ray runtime needs the 'ray' package ({e}): pip install 'controlplane[ray]'") from None
    return ray


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class NodeDevice:
    """One device of the plan on the cluster: a node, and a GPU of it (None: the node's CPUs)."""

    node_id: str
    address: str          # the node's IP as Ray knows it (NodeManagerAddress)
    gpu: int | None

    @property
    def label(self) -> str:
        return f"{self.address} {self.node_id[:8]}"


def _is_head(n: dict) -> bool:
    return any(k == "node:__internal_head__" for k in n.get("Resources", {}))


def cluster_devices(nodes: list[dict], gpus: bool = True) -> list[NodeDevice]:
    """The plan's devices on a cluster, from ``ray.nodes()``: alive nodes, the head first, then by
    address and node id; with ``gpus`` and any GPU in the cluster, every GPU of every node (in index
    order on its node); otherwise one device per node (its CPUs)."""
    alive = sorted((n for n in nodes if n.get("Alive")),
                   key=lambda n: (not _is_head(n), n["NodeManagerAddress"], n["NodeID"]))
    if gpus:
        out = [NodeDevice(n["NodeID"], n["NodeManagerAddress"], i)
               for n in alive for i in range(int(n.get("Resources", {}).get("GPU", 0)))]
        if out:
            return out
    return [NodeDevice(n["NodeID"], n["NodeManagerAddress"], None) for n in alive]


def place(device: int, devices: list[NodeDevice], on_gpu: bool) -> NodeDevice:
    """Where plan device ``device`` runs: the cluster's GPU of that index, or (CPU) node device mod nodes."""
    if not devices:
        raise StartError("the Ray cluster has no alive node")
    if on_gpu:
        if devices[0].gpu is None:
            raise StartError("the plan is for GPUs, but the Ray cluster has none (no node advertises a 'GPU' resource)")
        if device >= len(devices):
            raise StartError(f"the plan uses GPU {device}, but the Ray cluster has {len(devices)} GPU(s)")
        return devices[device]
    return devices[device % len(devices)]


def core_fraction(cores: list[int] | None, all_cores: list[int]) -> tuple[float, float] | None:
    """A CPU gpu-let's cores (on the controller's machine) as a fraction [lo, hi) of all its cores."""
    if not cores or not all_cores:
        return None
    idx = [all_cores.index(c) for c in cores if c in all_cores]
    if not idx:
        return None
    n = len(all_cores)
    return min(idx) / n, (max(idx) + 1) / n


def cores_on_node(frac: tuple[float, float] | None, node_cores: list[int]) -> list[int]:
    """The same fraction of a node's cores (at least one)."""
    m = len(node_cores)
    if frac is None or m == 0:
        return list(node_cores)
    lo = min(m - 1, int(frac[0] * m))
    hi = max(lo + 1, min(m, round(frac[1] * m)))
    return node_cores[lo:hi]


def pack_repository(path: Path) -> bytes:
    """A gpu-let's generated model repository as a gzip'd tar (hard links and symlinks followed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1, dereference=True) as tar:
        tar.add(str(path), arcname=".")
    return buf.getvalue()


def node_scratch(deployment: str, gpulet: str) -> Path:
    """Where a node keeps a gpu-let's shipped repository and log."""
    return Path(tempfile.gettempdir()) / f"gpulet-ray-{os.getuid()}" / deployment / gpulet


# --------------------------------------------------------------------------- the actors (on the nodes)


class GpuletServer:
    """A Ray actor that owns one gpu-let's tritonserver on its node (see the module docstring).

    ``start`` spawns the server and returns at once with its endpoint; readiness is asked of the
    server itself (``/v2/health/ready``) by the controller, which so also checks that it can reach it."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.repository: Path | None = None
        self.log_path: Path | None = None
        self._scratch: Path | None = None
        import atexit

        atexit.register(self.stop)        # a graceful exit of the worker (SIGKILL: the parent-death signal)

    def start(self, repository_tar: bytes | None = None) -> dict:
        import ray

        from .process import server_command, server_env
        from .triton import find_tritonserver

        s = self.spec
        g = s["gpulet"]
        if repository_tar is not None:
            self._scratch = node_scratch(s["deployment"], g.id)
            shutil.rmtree(self._scratch, ignore_errors=True)
            (self._scratch / "repository").mkdir(parents=True)
            with tarfile.open(fileobj=io.BytesIO(repository_tar), mode="r:gz") as tar:
                tar.extractall(self._scratch / "repository", filter="data")
            self.repository = self._scratch / "repository"
            self.log_path = self._scratch / f"{g.id}.log"
        else:
            self.repository = Path(s["repository"])
            if not self.repository.is_dir():
                raise FileNotFoundError(f"model repository {self.repository} is not on node "
                                        f"{ray.util.get_node_ip_address()}: share the run directory with every node, "
                                        "or set runtime.ship_repositories")
            self.log_path = Path(s["log_path"])
        install = find_tritonserver(s.get("tritonserver"))
        host = ray.util.get_node_ip_address()
        endpoint = Endpoint(host, *free_ports(3, host))
        cores = None if s.get("node_gpu") is not None else cores_on_node(s.get("core_fraction"),
                                                                         sorted(os.sched_getaffinity(0)))
        limit = s.get("memory_limit_mb")
        env = gpulet_env(g, s.get("node_gpu"), cores, s.get("mps_pipe_dir"), limit)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== controlplane: starting {g.id} (ray actor, node {host}) ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                server_command(install, self.repository, endpoint, cores, limit if cores is not None else None),
                env=server_env(install, env),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return {"host": endpoint.host, "ports": [endpoint.http_port, endpoint.grpc_port, endpoint.metrics_port],
                "pid": self.proc.pid, "node_id": ray.get_runtime_context().get_node_id(),
                "log": str(self.log_path), "worker_pid": os.getpid()}

    def poll(self) -> dict:
        """The server's exit code (None: running) and how many of its python-backend stubs are gone."""
        from .process import stubs_missing

        if self.proc is None:
            return {"exit": None, "stubs_missing": 0}
        code = self.proc.poll()
        missing = stubs_missing(self.proc.pid, len(self.spec["gpulet"].models)) if code is None else 0
        return {"exit": code, "stubs_missing": missing}

    def log_tail(self, lines: int = 40) -> str:
        from .process import log_tail

        return log_tail(self.log_path, lines) if self.log_path else "(no log)"

    def stop(self) -> None:
        """Kill the server's process group; remove a shipped repository. Idempotent."""
        from .process import kill_server

        if self.proc is not None:
            kill_server(self.proc)
        if self._scratch is not None:
            shutil.rmtree(self._scratch / "repository", ignore_errors=True)


class MpsDaemon:
    """A Ray actor per GPU node: the node's MPS control daemon on the deployment's pipe directory,
    started if none answers there, stopped by ``stop`` if this actor started it."""

    def __init__(self, pipe_dir: str, log_dir: str, private: bool) -> None:
        from .mps import Daemon

        self.daemon = Daemon(pipe_dir, log_dir, private=private).start()

    def stop(self) -> None:
        self.daemon.stop()


# --------------------------------------------------------------------------- the runtime (on the controller)


@dataclass
class _Replica:
    launch: Launch
    device: NodeDevice
    actor: object | None = None
    name: str = ""
    endpoint: Endpoint | None = None
    pid: int | None = None            # the server's pid on its node
    log: str | None = None            # the server's log on its node
    state: ReplicaState = ReplicaState.PENDING
    restarts: int = 0
    message: str = ""
    retry_at: float = 0.0
    failures: int = 0


class RayRuntime(OwnReplicas, Runtime):
    """One actor per gpu-let on a Ray cluster; see the module docstring.

    ``up`` builds it as ``RayRuntime(address=dep.runtime.ray_address, deployment=dep.name,
    tritonserver=dep.runtime.tritonserver, startup_timeout_s=..., restart=..., ship_repositories=...,
    cores=<the controller's cores, which CPU gpu-lets' cores are given in>, mps_pipe_dir=...)``.
    """

    def __init__(self, address: str = "auto", deployment: str = "default", *, tritonserver: str | None = None,
                 startup_timeout_s: float = 180.0, restart: bool = True, ship_repositories: bool = False,
                 cores: list[int] | None = None, mps_pipe_dir: str | None = None, mps_log_dir: str | None = None,
                 mps_private: bool = True) -> None:
        self.address = address
        self.deployment = deployment
        self.tritonserver = tritonserver
        self.startup_timeout_s = startup_timeout_s
        self.restart = restart
        self.ship = ship_repositories
        self.cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
        self.mps_pipe_dir = mps_pipe_dir
        self.mps_log_dir = mps_log_dir
        self.mps_private = mps_private
        self.replicas: dict[str, _Replica] = {}
        self._mps: dict[str, object] = {}          # node id -> MpsDaemon actor
        self._connected = False
        self._serial = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ cluster

    def connect(self):
        """Join the cluster as a driver (once); the ray module."""
        ray = _ray()
        if not ray.is_initialized():     # else this process is a driver already (its connection is used)
            import controlplane

            _check_reachable(self.address)
            try:
                ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING",
                         configure_logging=True,
                         runtime_env={"py_modules": [controlplane], "excludes": ["__pycache__", "*.pyc"]})
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise RayUnavailable(f"cannot connect to the Ray cluster at {self.address!r}: {e}") from None
            self._connected = True
        return ray

    def devices(self, on_gpu: bool) -> list[NodeDevice]:
        return cluster_devices(self.connect().nodes(), gpus=on_gpu)

    def _spec(self, r: _Replica) -> dict:
        lc = r.launch
        return {
            "deployment": self.deployment, "gpulet": lc.gpulet, "tritonserver": self.tritonserver,
            "repository": str(lc.repository), "log_path": str(lc.log_path),
            "node_gpu": r.device.gpu if lc.on_gpu else None,
            "core_fraction": core_fraction(lc.cores, self.cores),
            "mps_pipe_dir": self.mps_pipe_dir if lc.on_gpu else None,
            "memory_limit_mb": lc.memory_limit_mb,
        }

    def _ensure_mps(self, device: NodeDevice) -> None:
        """The node's MPS control daemon, started by an actor of ours when none answers there."""
        ray = self.connect()
        if device.node_id in self._mps or not self.mps_pipe_dir:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = _actor_class(MpsDaemon).options(
            name=f"{self.deployment}/mps-{device.node_id[:12]}", namespace=NAMESPACE, num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(device.node_id, soft=False),
        ).remote(self.mps_pipe_dir, self.mps_log_dir or str(Path(self.mps_pipe_dir).parent / "log"), self.mps_private)
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=60)
        except Exception as e:
            with contextlib.suppress(Exception):
                ray.kill(actor)
            raise StartError(f"node {device.label}: cannot start the MPS control daemon: {e}") from None
        self._mps[device.node_id] = actor

    def _spawn(self, r: _Replica):
        """Create the gpu-let's actor on its node and ask it to start the server; the ObjectRef of its answer."""
        ray = self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if r.launch.on_gpu:
            self._ensure_mps(r.device)
        self._serial += 1
        r.name = f"{self.deployment}/{r.launch.gpulet.id}#{self._serial}"
        r.actor = _actor_class(GpuletServer).options(
            name=r.name, namespace=NAMESPACE, num_cpus=0, num_gpus=0, max_restarts=0, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(r.device.node_id, soft=False),
        ).remote(self._spec(r))
        tar = ray.put(pack_repository(r.launch.repository)) if self.ship else None
        r.endpoint, r.pid = None, None
        if self.on_spawn is not None:
            with contextlib.suppress(Exception):
                self.on_spawn()
        return r.actor.start.remote(tar)

    def _tail(self, r: _Replica) -> str:
        ray = self.connect()
        try:
            return ray.get(r.actor.log_tail.remote(30), timeout=10)
        except Exception:  # noqa: BLE001 - the actor is gone: the log, if this machine sees it
            from .process import log_tail

            return log_tail(Path(r.log or r.launch.log_path))

    def _wait_ready(self, reps: list[_Replica], started: dict[str, object]) -> None:
        """Wait until each replica's actor reported its endpoint and its server answers ready."""
        ray = self.connect()
        deadline = time.monotonic() + self.startup_timeout_s
        waiting = list(reps)
        while waiting:
            for r in list(waiting):
                gid = r.launch.gpulet.id
                if r.endpoint is None:
                    done, _ = ray.wait([started[gid]], timeout=0)
                    if done:
                        try:
                            info = ray.get(started[gid])
                        except Exception as e:  # noqa: BLE001 - RayActorError, the actor's exception
                            r.state = ReplicaState.FAILED
                            raise StartError(f"gpu-let {gid}: its Ray actor on node {r.device.label} could not "
                                             f"start tritonserver: {_short(e)}") from None
                        r.endpoint, r.pid, r.log = Endpoint(info["host"], *info["ports"]), info["pid"], info["log"]
                    continue
                try:
                    st = ray.get(r.actor.poll.remote(), timeout=30)
                except Exception as e:  # noqa: BLE001 - the actor died while its server started
                    r.state = ReplicaState.FAILED
                    raise StartError(f"gpu-let {gid}: its Ray actor died while tritonserver started: {_short(e)}; "
                                     f"log {r.log}:\n{self._tail(r)}") from None
                if st["exit"] is not None:
                    r.state = ReplicaState.FAILED
                    raise StartError(f"gpu-let {gid}: tritonserver exited with code {st['exit']} before it was "
                                     f"ready (node {r.device.label}); log {r.log}:\n{self._tail(r)}")
                if server_ready(r.endpoint.http):
                    r.state = ReplicaState.READY
                    waiting.remove(r)
            if waiting and time.monotonic() > deadline:
                r = waiting[0]
                r.state = ReplicaState.FAILED
                where = (f"tritonserver at {r.endpoint.http} not ready" if r.endpoint else
                         "its Ray actor not started (is the node alive, with the runtime's packages?)")
                raise StartError(f"gpu-let {r.launch.gpulet.id}: {where} after {self.startup_timeout_s:.0f} s "
                                 f"(node {r.device.label})" + (f"; log {r.log}:\n{self._tail(r)}" if r.endpoint else ""))
            if waiting:
                time.sleep(0.25)

    def _kill(self, r: _Replica) -> None:
        """Stop the server (through its actor, which kills the process group) and kill the actor."""
        if r.actor is None:
            return
        ray = self.connect()
        with contextlib.suppress(Exception):
            ray.get(r.actor.stop.remote(), timeout=30)
        with contextlib.suppress(Exception):
            ray.kill(r.actor, no_restart=True)
        r.actor = None

    # ------------------------------------------------------------------ Runtime

    def start(self, launches: list[Launch]) -> dict[str, Endpoint]:
        with self._lock:
            taken = [ln.gpulet.id for ln in launches if ln.gpulet.id in self.replicas]
            if taken:
                raise StartError(f"gpu-let(s) {', '.join(taken)} already running")
            if not launches:
                return {}
            try:
                devices = self.devices(launches[0].on_gpu)
            except RayUnavailable as e:
                raise StartError(str(e)) from None
            reps = []
            for ln in launches:
                r = _Replica(ln, place(ln.gpulet.gpu, devices, ln.on_gpu))
                self.replicas[ln.gpulet.id] = r
                reps.append(r)
            try:
                started = {}
                for r in reps:
                    r.state = ReplicaState.STARTING
                    started[r.launch.gpulet.id] = self._spawn(r)
                self._wait_ready(reps, started)
            except BaseException:
                self._remove(reps)
                raise
            return {r.launch.gpulet.id: r.endpoint for r in reps}

    def _check(self, r: _Replica) -> str | None:
        """Why the replica needs a restart, or None."""
        ray = self.connect()
        from ray.exceptions import GetTimeoutError

        try:
            st = ray.get(r.actor.poll.remote(), timeout=15)
        except GetTimeoutError:
            return None                            # busy; asked again next time
        except Exception as e:  # noqa: BLE001 - RayActorError: killed, crashed, its node gone
            return f"its Ray actor died ({_short(e)})"
        if st["exit"] is not None:
            return f"exited with code {st['exit']}"
        if r.state is ReplicaState.READY and st["stubs_missing"]:
            return f"{st['stubs_missing']} python-backend stub(s) died"
        return None

    def supervise(self) -> list[str]:
        """Restart gpu-lets whose actor died or whose server exited or lost a stub: a new actor on the same
        node, fresh ports, backoff 1, 2, 4 ... 30 s between failed attempts; FAILED only when restart is off."""
        restarted = []
        with self._lock:
            for gid, r in self.replicas.items():
                if r.state not in (ReplicaState.READY, ReplicaState.RESTARTING):
                    continue
                if r.actor is None:
                    why = r.message or "not running"
                else:
                    why = self._check(r)
                if why is None or time.monotonic() < r.retry_at:
                    continue
                if restart(r, why, self.restart, lambda r=r: self._kill(r),
                           lambda r=r, gid=gid: self._wait_ready([r], {gid: self._spawn(r)})):
                    restarted.append(gid)
        return restarted

    def status(self) -> dict[str, ReplicaStatus]:
        with self._lock:
            return {gid: ReplicaStatus(gid, r.state, r.endpoint, restarts=r.restarts, message=r.message,
                                       node=r.device.label, node_gpu=r.device.gpu, log=r.log)
                    for gid, r in self.replicas.items()}

    def logs(self, gpulet: str, tail: int = 100) -> str:
        r = self.replicas[gpulet]
        if r.actor is not None:
            with contextlib.suppress(Exception):
                return self.connect().get(r.actor.log_tail.remote(tail), timeout=10)
        from .process import log_tail

        return log_tail(Path(r.log or r.launch.log_path), tail)

    def actors(self) -> list[str]:
        """Names of this deployment's actors alive in the cluster (gpu-lets and MPS daemons)."""
        ray = self.connect()
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == NAMESPACE and a["name"].startswith(f"{self.deployment}/"))

    def stop(self) -> None:
        """Stop every server and kill every actor of this deployment, wait until Ray lists none of them,
        and leave the cluster. Idempotent."""
        with self._lock:
            if not self.replicas and not self._mps and not self._connected:
                return
            ray = self.connect()
            for r in self.replicas.values():
                if r.state is not ReplicaState.STOPPED:
                    r.state = ReplicaState.STOPPING
                    self._kill(r)
                    r.state = ReplicaState.STOPPED
            for actor in self._mps.values():
                with contextlib.suppress(Exception):
                    ray.get(actor.stop.remote(), timeout=60)
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            self._mps.clear()
            deadline = time.monotonic() + 30
            with contextlib.suppress(Exception):
                while self.actors() and time.monotonic() < deadline:
                    time.sleep(0.2)
            if self._connected:              # the connection this runtime made; another driver's stays
                with contextlib.suppress(Exception):
                    ray.shutdown()
                self._connected = False


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """RayUnavailable unless something listens at a HOST:PORT or ray://HOST:PORT address: ray.init retries
    an address where nothing answers for minutes, printing warnings, before it gives up."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RayUnavailable(f"no Ray cluster answers at {address!r} ({e}); start one with `ray start --head`, "
                             "or set runtime.address to the address it printed") from None


_ACTOR_CLASSES: dict[type, object] = {}


def _actor_class(cls: type):
    """``ray.remote(cls)``, made once per driver (each call would export the class anew)."""
    if cls not in _ACTOR_CLASSES:
        _ACTOR_CLASSES[cls] = _ray().remote(cls)
    return _ACTOR_CLASSES[cls]


def _short(e: BaseException, limit: int = 600) -> str:
    """An error from Ray in one line: the actor's own exception rather than Ray's wrapper and traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


__all__ = ["RayRuntime", "RayUnavailable", "GpuletServer", "MpsDaemon", "NodeDevice", "cluster_devices", "place",
           "NAMESPACE"]
