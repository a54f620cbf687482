"""Docker runtime: one Triton container per gpu-let, through the Docker SDK.

For every :class:`~controlplane.runtime.base.Launch` the runtime creates one container
from a Triton image (``compose/Dockerfile.gpu`` on NVIDIA's image, or the locally built
``compose/Dockerfile.cpu``; both have ``tritonserver`` on PATH):

* the gpu-let's generated model repository bind-mounted read-only at ``/models``;
* the environment of :func:`~controlplane.runtime.base.gpulet_env` (share, threads); on a
  GPU ``CUDA_VISIBLE_DEVICES`` names the GPU by UUID (valid whether or not the MPS
  server or the container renumbers devices), a device request for that GPU by UUID,
  and the MPS pipe directory bind-mounted at the same path (``CUDA_MPS_PIPE_DIRECTORY``);
  on the CPU the container is pinned to the gpu-let's cores (``cpuset``);
* ``ipc=host`` (MPS needs the host's IPC namespace; the python backend's shared memory
  is then not capped by Docker's 64 MB ``/dev/shm``);
* HTTP, gRPC and metrics ports published on ``127.0.0.1`` at free host ports chosen
  here, so they survive restarts (or, with ``network_mode="host"``, tritonserver listens
  on those ports itself);
* labels ``gpulet.managed-by=controlplane``, ``gpulet.deployment``, ``gpulet.id``,
  ``gpulet.gpu``, ``gpulet.share``, ``gpulet.models`` and the ports, so that a later
  process (``controlplane down``, a new ``up``) finds every container of a deployment;
* restart policy ``on-failure`` (Docker restarts a server that crashes); ``supervise``
  also starts containers Docker will not restart (killed by hand, retries used up) and
  recreates ones removed behind our back.

Readiness is Triton's ``/v2/health/ready``. ``start`` is all-or-nothing: on any failure
every container of the deployment is removed and :class:`StartError` carries the failing
container's log tail. Container logs are also written to ``Launch.log_path`` when a
container is removed, so they outlive it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from .base import (Endpoint, Launch, ReplicaState, ReplicaStatus, Runtime, StartError, free_ports,
                   restricted_api_args, server_ready)

LABEL_MANAGED = "gpulet.managed-by"
MANAGED_VALUE = "controlplane"
LABEL_DEPLOYMENT = "gpulet.deployment"
LABEL_ID = "gpulet.id"
LABEL_GPU = "gpulet.gpu"
LABEL_SHARE = "gpulet.share"
LABEL_MODELS = "gpulet.models"
LABEL_PORTS = "gpulet.ports"          # "http,grpc,metrics" on the host

CONTAINER_REPOSITORY = "/models"
CONTAINER_PORTS = (8000, 8001, 8002)  # http, grpc, metrics inside the container
DEFAULT_CPU_IMAGE = "gpulet-triton-cpu:latest"

# Host-side variables that must not leak into a container (they name host paths).
_HOST_ONLY_ENV = {"PATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "HOME"}


class DockerUnavailable(RuntimeError):
    """No Docker engine answers (or the `docker` package is missing); the message says why."""


def docker_client(timeout: float = 60.0):
    """A Docker SDK client from the environment (DOCKER_HOST etc.), checked with a ping."""
    try:
        import docker
    except ImportError as e:  # pragma: no cover - docker is a dependency
        raise DockerUnavailable(f"the 'docker' Python package is missing: {e}") from None
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except Exception as e:  # docker.errors.DockerException, connection errors
        raise DockerUnavailable(
            f"no Docker engine reachable ({e}); start one with compose/start-dockerd.sh"
        ) from None
    return client


def container_name(deployment: str, gpulet: str) -> str:
    return f"gpulet-{deployment}-{gpulet}"


def _label_filter(deployment: str | None) -> dict:
    labels = [f"{LABEL_MANAGED}={MANAGED_VALUE}"]
    if deployment is not None:
        labels.append(f"{LABEL_DEPLOYMENT}={deployment}")
    return {"label": labels}


def list_containers(deployment: str | None = None, client=None) -> list:
    """Containers (running or not) the control plane started for a deployment (None: all)."""
    own = client is None
    client = client or docker_client()
    try:
        return client.containers.list(all=True, filters=_label_filter(deployment))
    finally:
        if own:
            client.close()


def _save_logs(container, path: Path | None) -> None:
    if path is None:
        return
    with contextlib.suppress(Exception):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(container.logs(stdout=True, stderr=True))


def remove_containers(deployment: str | None = None, client=None,
                      log_dir: Path | None = None) -> list[str]:
    """Remove every container of a deployment (None: of every deployment); `controlplane down`.

    With log_dir, each container's log is saved first as ``<log_dir>/<gpulet>.log``.
    Returns the names removed. Containers already gone are ignored.
    """
    import docker.errors

    own = client is None
    client = client or docker_client()
    removed = []
    try:
        for c in client.containers.list(all=True, filters=_label_filter(deployment)):
            if log_dir is not None:
                _save_logs(c, Path(log_dir) / f"{c.labels.get(LABEL_ID, c.name)}.log")
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True, v=True)
                removed.append(c.name)
    finally:
        if own:
            client.close()
    return removed


@dataclass
class _Replica:
    launch: Launch
    endpoint: Endpoint
    name: str
    container: object | None = None     # docker.models.containers.Container
    state: ReplicaState = ReplicaState.PENDING
    restarts: int = 0                   # restarts seen (by Docker or by supervise)
    engine_restarts: int = 0            # Docker's RestartCount last seen
    message: str = ""


class DockerRuntime(Runtime):
    """One container per gpu-let from ``image``; see the module docstring.

    ``up`` builds it as ``DockerRuntime(image=dep.runtime.image, deployment=dep.name,
    startup_timeout_s=dep.runtime.startup_timeout_s, restart=dep.runtime.restart,
    mps_pipe_dir=<the MPS pipe dir when on GPU>)``.
    """

    def __init__(self, image: str = DEFAULT_CPU_IMAGE, deployment: str = "default", *,
                 startup_timeout_s: float = 180.0, restart: bool = True, max_restarts: int = 5,
                 mps_pipe_dir: str | None = None, host: str = "127.0.0.1",
                 network_mode: str | None = None, user: str | None = None,
                 extra_args: list[str] | None = None, gpu_driver: str = "nvidia",
                 client=None) -> None:
        self.image = image
        self.deployment = deployment
        self.startup_timeout_s = startup_timeout_s
        self.restart = restart
        self.max_restarts = max_restarts
        self.mps_pipe_dir = mps_pipe_dir
        self.host = host
        self.network_mode = network_mode      # None: bridge + published ports; "host": host network
        self.user = user                      # e.g. "1000:1000" to match a host MPS daemon's user
        self.extra_args = list(extra_args or [])
        self.gpu_driver = gpu_driver
        self._client = client
        self._replicas: dict[str, _Replica] = {}

    # ------------------------------------------------------------------ engine

    @property
    def client(self):
        if self._client is None:
            self._client = docker_client()
        return self._client

    def containers(self) -> list:
        """This deployment's containers as the engine lists them (any state)."""
        return list_containers(self.deployment, self.client)

    # ------------------------------------------------------------------ container spec

    def _command(self, endpoint: Endpoint) -> list[str]:
        ports = ((endpoint.http_port, endpoint.grpc_port, endpoint.metrics_port)
                 if self.network_mode == "host" else CONTAINER_PORTS)
        return [
            "tritonserver",
            f"--model-repository={CONTAINER_REPOSITORY}",
            f"--http-port={ports[0]}", f"--grpc-port={ports[1]}", f"--metrics-port={ports[2]}",
            "--exit-on-error=true", "--strict-readiness=true", "--disable-auto-complete-config",
            *restricted_api_args(),
            *self.extra_args,
        ]

    def _environment(self, launch: Launch) -> dict[str, str]:
        env = {k: v for k, v in launch.env.items() if k not in _HOST_ONLY_ENV}
        if launch.on_gpu:
            # The container sees only its GPU; a UUID is right however devices are numbered.
            env["CUDA_VISIBLE_DEVICES"] = launch.gpu_uuid or "0"
            pipe = env.get("CUDA_MPS_PIPE_DIRECTORY") or self.mps_pipe_dir
            if pipe:   # mounted at the same (absolute) path inside the container
                env["CUDA_MPS_PIPE_DIRECTORY"] = str(Path(pipe).resolve())
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def _labels(self, launch: Launch, endpoint: Endpoint) -> dict[str, str]:
        g = launch.gpulet
        return {
            LABEL_MANAGED: MANAGED_VALUE,
            LABEL_DEPLOYMENT: self.deployment,
            LABEL_ID: g.id,
            LABEL_GPU: str(g.gpu),
            LABEL_SHARE: str(g.share),
            LABEL_MODELS: ",".join(a.model for a in g.models),
            LABEL_PORTS: f"{endpoint.http_port},{endpoint.grpc_port},{endpoint.metrics_port}",
            "gpulet.device": "gpu" if launch.on_gpu else "cpu",
        }

    def _create(self, r: _Replica):
        import docker.types

        launch, ep = r.launch, r.endpoint
        repo = Path(launch.repository).resolve()
        if not repo.is_dir():
            raise StartError(f"gpu-let {launch.gpulet.id}: model repository {repo} does not exist")
        volumes = {str(repo): {"bind": CONTAINER_REPOSITORY, "mode": "ro"}}
        env = self._environment(launch)
        kwargs: dict = {}
        if launch.on_gpu:
            ident = launch.gpu_uuid or str(launch.gpu_index)
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(driver=self.gpu_driver, device_ids=[ident], capabilities=[["gpu"]])
            ]
            pipe = env.get("CUDA_MPS_PIPE_DIRECTORY")
            if pipe:
                Path(pipe).mkdir(parents=True, exist_ok=True)
                volumes[pipe] = {"bind": pipe, "mode": "rw"}
        elif launch.cores:
            kwargs["cpuset_cpus"] = ",".join(str(c) for c in launch.cores)
        if self.network_mode == "host":
            kwargs["network_mode"] = "host"
        else:
            kwargs["ports"] = {
                f"{CONTAINER_PORTS[0]}/tcp": (self.host, ep.http_port),
                f"{CONTAINER_PORTS[1]}/tcp": (self.host, ep.grpc_port),
                f"{CONTAINER_PORTS[2]}/tcp": (self.host, ep.metrics_port),
            }
        if self.user:
            kwargs["user"] = self.user
        restart_policy = ({"Name": "on-failure", "MaximumRetryCount": self.max_restarts}
                          if self.restart else {"Name": "no"})
        return self.client.containers.create(
            self.image, command=self._command(ep), name=r.name, detach=True,
            environment=env, volumes=volumes, labels=self._labels(launch, ep),
            ipc_mode="host", restart_policy=restart_policy, init=False,
            log_config=docker.types.LogConfig(type="json-file", config={"max-size": "20m", "max-file": "2"}),
            **kwargs,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self, launches: list[Launch]) -> dict[str, Endpoint]:
        """Start these gpu-lets' containers and wait until they serve; the endpoints of the ones started.

        The first call removes what an earlier run of the deployment left; later calls (a new plan of a
        running deployment, `controlplane apply`) add containers beside the running ones. All or nothing:
        on any failure the containers this call created are removed, the running ones stay."""
        import docker.errors

        ids = [lc.gpulet.id for lc in launches]
        if len(ids) != len(set(ids)) or set(ids) & set(self._replicas):
            raise StartError(f"gpu-let ids must be unique and new, got {ids} (running: {sorted(self._replicas)})")
        adding = bool(self._replicas)
        try:
            self.client.images.get(self.image)
        except DockerUnavailable as e:
            raise StartError(str(e)) from None
        except docker.errors.ImageNotFound:
            hint = " (build it with compose/build-cpu-image.sh)" if "gpulet-triton-cpu" in self.image else ""
            raise StartError(f"Docker image {self.image!r} not found{hint}") from None
        if not adding:          # leftovers of an earlier run of this deployment (crashed `up`, no `down`)
            remove_containers(self.deployment, self.client)
        ports = free_ports(3 * len(launches), "127.0.0.1" if self.host in ("127.0.0.1", "localhost") else "")
        new = []
        for i, lc in enumerate(launches):
            ep = Endpoint(self.host, *ports[3 * i: 3 * i + 3])
            new.append(_Replica(lc, ep, container_name(self.deployment, lc.gpulet.id)))
            self._replicas[lc.gpulet.id] = new[-1]
        try:
            for r in new:
                r.container = self._create(r)
                r.container.start()
                r.state = ReplicaState.STARTING
            self._wait_ready(new, self.startup_timeout_s)
        except BaseException as e:  # StartError, engine errors, KeyboardInterrupt: leave nothing behind
            failed = next((r for r in new if r.state == ReplicaState.FAILED), None)
            if adding:
                self._remove(new)
            else:
                self._teardown()
            if isinstance(e, StartError):
                raise
            if isinstance(e, docker.errors.DockerException):
                who = f"gpu-let {failed.launch.gpulet.id}: " if failed else ""
                raise StartError(f"{who}Docker: {e}") from e
            raise
        return {r.launch.gpulet.id: r.endpoint for r in new}

    def remove(self, gpulets: list[str]) -> None:
        """Stop these gpu-lets' containers (SIGTERM: tritonserver finishes what it holds) and forget them;
        the others keep running (a new plan no longer has them)."""
        self._remove([self._replicas[g] for g in gpulets if g in self._replicas])

    def _remove(self, reps: list) -> None:
        import docker.errors

        for r in reps:
            r.state = ReplicaState.STOPPING
            if r.container is not None:
                _save_logs(r.container, Path(r.launch.log_path))
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    r.container.stop(timeout=10)
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    r.container.remove(force=True)
            r.state = ReplicaState.STOPPED
            self._replicas.pop(r.launch.gpulet.id, None)

    def _inspect(self, r: _Replica) -> dict | None:
        import docker.errors

        try:
            r.container.reload()
            return r.container.attrs
        except docker.errors.NotFound:
            return None

    def _tail(self, r: _Replica, n: int = 40) -> str:
        try:
            return r.container.logs(stdout=True, stderr=True, tail=n).decode(errors="replace")
        except Exception:
            return ""

    def _wait_ready(self, replicas: list[_Replica], timeout: float) -> None:
        """Wait until every replica answers ready; StartError (with its log tail) on the first failure."""
        deadline = time.monotonic() + timeout
        waiting = list(replicas)
        while waiting:
            for r in list(waiting):
                attrs = self._inspect(r)
                gid = r.launch.gpulet.id
                if attrs is None:
                    r.state = ReplicaState.FAILED
                    raise StartError(f"gpu-let {gid}: container {r.name} disappeared while starting")
                st = attrs["State"]
                if st["Status"] in ("exited", "dead") or attrs.get("RestartCount", 0) > r.engine_restarts:
                    r.state = ReplicaState.FAILED
                    r.message = f"exited with code {st.get('ExitCode')} while starting"
                    raise StartError(f"gpu-let {gid}: container {r.name} {r.message}; "
                                     f"log tail:\n{self._tail(r)}")
                if st["Status"] == "running" and server_ready(f"{self.host}:{r.endpoint.http_port}", timeout=2.0):
                    r.state = ReplicaState.READY
                    r.message = ""
                    waiting.remove(r)
            if not waiting:
                return
            if time.monotonic() > deadline:
                r = waiting[0]
                r.state = ReplicaState.FAILED
                r.message = f"not ready after {timeout:.0f} s"
                raise StartError(f"gpu-let {r.launch.gpulet.id}: container {r.name} {r.message}; "
                                 f"log tail:\n{self._tail(r)}")
            time.sleep(0.5)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every replica is ready again (after restarts); StartError on timeout."""
        deadline = time.monotonic() + (timeout or self.startup_timeout_s)
        while True:
            self.supervise()
            if all(r.state == ReplicaState.READY for r in self._replicas.values()):
                return
            if time.monotonic() > deadline:
                bad = {g: r.state.value for g, r in self._replicas.items() if r.state != ReplicaState.READY}
                raise StartError(f"replicas not ready after {timeout} s: {bad}")
            time.sleep(0.5)

    def supervise(self) -> list[str]:
        """Refresh every replica; start the ones Docker will not restart; return ids restarted.

        A container Docker restarted itself (on-failure) counts as restarted too. A
        restarted replica is RESTARTING until its server answers ready again (a later call
        sees it; the ports do not change).
        """
        import docker.errors

        restarted = []
        for gid, r in self._replicas.items():
            if r.state in (ReplicaState.STOPPING, ReplicaState.STOPPED, ReplicaState.PENDING):
                continue
            attrs = self._inspect(r)
            try:
                if attrs is None:                         # removed behind our back: recreate
                    if not self.restart:
                        r.state, r.message = ReplicaState.FAILED, "container removed"
                        continue
                    r.container = self._create(r)
                    r.container.start()
                    r.engine_restarts = 0
                    r.restarts += 1
                    r.state, r.message = ReplicaState.RESTARTING, "container was removed; recreated"
                    restarted.append(gid)
                    continue
                st = attrs["State"]
                count = attrs.get("RestartCount", 0)
                if count > r.engine_restarts:             # Docker restarted it (crash, on-failure)
                    r.restarts += count - r.engine_restarts
                    r.engine_restarts = count
                    r.state, r.message = ReplicaState.RESTARTING, f"restarted by Docker (exit {st.get('ExitCode')})"
                    restarted.append(gid)
                if st["Status"] in ("exited", "dead"):    # Docker will not restart it
                    if not self.restart or r.restarts >= self.max_restarts:
                        r.state = ReplicaState.FAILED
                        r.message = f"exited with code {st.get('ExitCode')}"
                        continue
                    r.container.start()
                    r.container.reload()
                    r.engine_restarts = r.container.attrs.get("RestartCount", 0)
                    r.restarts += 1
                    r.state, r.message = ReplicaState.RESTARTING, f"exited with code {st.get('ExitCode')}; started again"
                    if gid not in restarted:
                        restarted.append(gid)
                elif st["Status"] == "running":
                    if server_ready(f"{self.host}:{r.endpoint.http_port}"):
                        r.state, r.message = ReplicaState.READY, ""
                    elif r.state == ReplicaState.READY:
                        r.state, r.message = ReplicaState.RESTARTING, "running but not ready"
                else:                                     # restarting, created, paused
                    if r.state == ReplicaState.READY:
                        r.state = ReplicaState.RESTARTING
                    r.message = st["Status"]
            except docker.errors.DockerException as e:
                r.state, r.message = ReplicaState.FAILED, f"restart failed: {e}"
        return restarted

    def status(self) -> dict[str, ReplicaStatus]:
        out = {}
        for gid, r in self._replicas.items():
            out[gid] = ReplicaStatus(
                gpulet=gid, state=r.state,
                endpoint=r.endpoint if r.state not in (ReplicaState.STOPPED, ReplicaState.FAILED) else None,
                container=getattr(r.container, "id", None), restarts=r.restarts, message=r.message,
            )
        return out

    def logs(self, gpulet: str, tail: int = 100) -> str:
        """The container's log (stdout and stderr); after removal, the saved log file."""
        import docker.errors

        r = self._replicas.get(gpulet)
        name = r.name if r else container_name(self.deployment, gpulet)
        try:
            c = self.client.containers.get(name)
            return c.logs(stdout=True, stderr=True, tail=tail).decode(errors="replace")
        except docker.errors.NotFound:
            if r and Path(r.launch.log_path).exists():
                lines = Path(r.launch.log_path).read_text(errors="replace").splitlines()
                return "\n".join(lines[-tail:]) + "\n"
            raise KeyError(f"no container for gpu-let {gpulet!r} of deployment {self.deployment!r}") from None

    def _teardown(self) -> None:
        for r in self._replicas.values():
            r.state = ReplicaState.STOPPING
            if r.container is not None:
                _save_logs(r.container, Path(r.launch.log_path))
        # Everything labelled with this deployment, ours or from an earlier run.
        remove_containers(self.deployment, self.client)
        for r in self._replicas.values():
            r.state = ReplicaState.STOPPED
        self._replicas.clear()

    def stop(self) -> None:
        """Remove every container of this deployment (this run's and earlier runs'); idempotent."""
        if self._client is None and not self._replicas:
            with contextlib.suppress(DockerUnavailable):
                remove_containers(self.deployment)
            return
        self._teardown()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


__all__ = [
    "DockerRuntime", "DockerUnavailable", "docker_client",
    "list_containers", "remove_containers", "remove_deployment_containers", "container_logs",
    "container_name",
    "LABEL_MANAGED", "LABEL_DEPLOYMENT", "LABEL_ID", "CONTAINER_REPOSITORY", "DEFAULT_CPU_IMAGE",
]



def remove_deployment_containers(deployment: str, log_dir: Path | None = None) -> list[str]:
    """`controlplane down` for the docker runtime: remove the deployment's containers by label."""
    return remove_containers(deployment, log_dir=log_dir)


def container_logs(container: str, tail: int = 100) -> str:
    """Log tail of a container given by id or name (`controlplane logs` reads the id from the state file)."""
    import docker.errors

    client = docker_client()
    try:
        return client.containers.get(container).logs(stdout=True, stderr=True, tail=tail).decode(errors="replace")
    except docker.errors.NotFound:
        raise KeyError(f"container {container} not found (removed by `controlplane down`?)") from None
    finally:
        client.close()
