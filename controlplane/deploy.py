"""The controller behind `controlplane up`: plan, launch, route, supervise, tear down.

One :class:`Controller` owns one deployment's life:

1. ``prepare`` resolves the devices, loads (or makes) profiles, plans, and builds
   the model artifacts the plan needs;
2. ``start`` writes a model repository per gpu-let, starts the runtime (one
   tritonserver per gpu-let, all-or-nothing) and the router, and records the
   state file that `status` and `down` read;
3. ``serve`` supervises (restarts dead servers) until asked to stop;
4. ``shutdown`` stops the router, every server and the MPS daemon it started.

Only this module and the CLI do I/O around the pure scheduler.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from . import devices as devmod
from .planning import make_plan
from .repository import SourceRepository, build_artifacts, repository_for, write_gpulet_repositories
from .runtime.base import Endpoint, Launch, Runtime, cpu_cores_for, gpulet_env, memory_limit_mb
from .paths import RunPaths
from .spec import Deployment, GpuletState, Plan, RouterState, RunState


def read_state(paths: RunPaths) -> RunState | None:
    """The deployment's state file; None when there is none or it is not one (a partial or foreign file)."""
    try:
        return RunState.model_validate_json(paths.state.read_text())
    except (OSError, ValueError):
        return None


def hold_run_lock(paths: RunPaths):
    """The deployment's run lock, held until the returned file is closed (or the process exits);
    None when another process holds it: one `up` per deployment, and a second one touches nothing."""
    import fcntl

    paths.root.mkdir(parents=True, exist_ok=True)
    f = open(paths.lock, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether the process runs (a zombie does not) and, when its start time was recorded, is still
    the same process: a pid from an old state file may belong to someone else by now."""
    import psutil

    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if started is not None and abs(p.create_time() - started) > 0.05:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def started_at(pid: int | None) -> float | None:
    """A process's start time (what :func:`pid_alive` compares), None when it is gone."""
    import psutil

    try:
        return psutil.Process(pid).create_time() if pid else None
    except psutil.Error:
        return None


#: the rate (req/s) a model loaded through the repository API is planned for until the measured load
#: says more (scheduler.epoch_s); the request carries none
LOADED_RATE = 1.0


class ControllerMetrics:
    """What the controller does while serving, for the router's ``/metrics``: epochs, re-plans by cause
    (``controlplane apply``, measured load, recalibrated, repository API) and refused ones, how long each
    applied re-plan's stages took, the gpu-lets transitions started and stopped, servers restarted, and per
    model the planned and measured rates."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.epochs = Counter("controlplane_epochs", "re-planning epochs run (the load measured)", registry=r)
        self.replans = Counter("controlplane_replans", "new plans applied while serving, by cause", ["cause"],
                               registry=r)
        self.refused = Counter("controlplane_replans_refused",
                               "new plans tried and given up (the running plan kept serving), by cause", ["cause"],
                               registry=r)
        self.transition = Histogram(
            "controlplane_transition_seconds",
            "an applied re-plan's stages: plan, start (its new gpu-lets until ready), route (every router "
            "process on the new plan: it serves from then), stop (the gpu-lets it dropped, after the switch)",
            ["stage"], buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 60, 180), registry=r)
        self.started = Counter("controlplane_gpulets_started", "gpu-lets started by re-plans", registry=r)
        self.stopped = Counter("controlplane_gpulets_stopped", "gpu-lets drained and stopped by re-plans", registry=r)
        self.restarts = Counter("controlplane_gpulet_restarts", "gpu-let servers restarted after they died",
                                registry=r)
        self.gpulets = Gauge("controlplane_gpulets", "gpu-lets of the running plan", registry=r)
        self.planned = Gauge("controlplane_planned_rate", "requests/s the running plan was made for", ["model"],
                             registry=r)
        self.measured = Gauge("controlplane_measured_rate",
                              "each model's peak arrival rate over the re-planning window (req/s)", ["model"],
                              registry=r)
        self.last_replan = Gauge("controlplane_last_replan_timestamp_seconds", "when the running plan was applied",
                                 registry=r)

    def plan(self, plan: Plan) -> None:
        self.gpulets.set(len(plan.gpulets))
        self.planned.clear()
        for name, m in plan.models.items():
            self.planned.labels(name).set(m.rate)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _cause(reason: str) -> str:
    """A re-plan's reason reduced to its cause, a metric label: 'measured load: lenet ...' -> 'measured load'."""
    return reason.split(":", 1)[0].strip()


class RepositoryRefused(Exception):
    """A repository API request the controller will not do: its HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Controller:
    def __init__(self, deployment: Deployment, repo: SourceRepository | None = None, log=print) -> None:
        self.repo = repo or repository_for(deployment)
        from .repository import with_repository_slos

        self.dep = with_repository_slos(deployment, self.repo)
        self.paths = RunPaths.for_deployment(deployment)
        self.log = log
        self.devices: devmod.DeviceSet | None = None
        self.plan: Plan | None = None
        self.runtime: Runtime | None = None
        self.router = None
        self.mps = None
        self.endpoints: dict[str, Endpoint] = {}
        self.memory_limits: dict[str, int | None] = {}   # gpu-let -> MB each of its processes may hold
        self._stopped = False
        self._serving = False       # serve()'s loop runs: changes go beside it (_begin)
        self._generation = 0        # plans tried since start; names the gpu-lets each adds
        self._state = "starting"
        self.replans = 0
        self.last_replan: str | None = None
        self.calibration: dict[str, float] = {}     # source model -> measured over profile, the running plan's
        self._batch_stats: dict[tuple[str, str], dict] = {}
        self._profiles = None               # the unscaled profile store recalibration compares with
        self.metrics = ControllerMetrics()
        self._last_change: tuple[float, float, str] = (0.0, 0.0, "")      # the last re-plan: start, end, reason
        self._changes = None        # the one thread changes run on while serving (see _begin)
        self._change = None         # the change in flight there (a Future)
        self.changing: str | None = None                 # its reason, for `status`

    @property
    def served(self) -> Deployment:
        """The deployment as its plan serves it: the apps' step models at their rates and SLO budgets
        (controlplane.apps.planned); the file's own deployment when it has no apps."""
        from .apps import planned

        return planned(self.dep, self.plan) if self.plan is not None else self.dep

    # ------------------------------------------------------------------ prepare

    def prepare(self, plan: Plan | None = None) -> Plan:
        self.devices = devmod.resolve(self.dep.devices)
        ray = self.dep.runtime.kind == "ray"
        if self.devices.fleet and not ray:
            raise ValueError("devices: {gpus, model} describes GPUs to plan for elsewhere (`plan`, `compose`, "
                             "`render k8s`); `up` runs on this machine's: devices auto or a list of GPU indices (or, with "
                             "runtime: ray, on the cluster's GPUs)")
        if plan is None:   # up measures what its device's profile lacks (saying so) rather than fail
            from .planning import starting_calibration

            if self.dep.scheduler.algorithm != "trivial":      # a trivial plan has no latencies to scale
                self.calibration = starting_calibration(self.dep, self.devices.name, self.log)
            plan = make_plan(self.dep, self.devices, repo=self.repo, profile_missing=True, log=self.log,
                             calibration=self.calibration)
        if (self.devices.on_gpu and not ray and plan.gpulets
                and max(g.gpu for g in plan.gpulets) >= self.devices.count()):      # ray: the runtime checks the cluster
            raise ValueError(f"the plan needs {plan.gpus} GPU(s) but the deployment has {self.devices.count()}")
        build_artifacts(self.repo, plan.model_names(), progress=lambda n: self.log(f"building model {n} ..."))
        self.plan = plan
        return plan

    def _mps_pipe_dir(self) -> Path:
        """The deployment's MPS pipe directory: runtime.mps_pipe_dir, else a short one under /tmp."""
        rt = self.dep.runtime
        return Path(rt.mps_pipe_dir) if rt.mps_pipe_dir else self.paths.mps(self.dep.name) / "pipe"

    def launches(self, only: set[str] | None = None) -> list[Launch]:
        """What to start for the plan's gpu-lets (those in ``only``, if given), their repositories written."""
        assert self.plan is not None and self.devices is not None
        on_gpu = self.devices.on_gpu
        chosen = [g for g in self.plan.gpulets if only is None or g.id in only]
        repos = write_gpulet_repositories(self.repo, self.plan.model_copy(update={"gpulets": chosen}),
                                          self.paths.repos, on_gpu=on_gpu,
                                          slo_ms={m.name: m.slo_ms for m in self.served.models})
        cores = cpu_cores_for(self.plan.gpulets, list(self.devices.cores)) if not on_gpu else {}
        pipe = str(self._mps_pipe_dir())
        out = []
        for g in chosen:
            gpu = self.devices.gpus[g.gpu] if on_gpu else None
            limit = (memory_limit_mb([self._model_memory_mb(a.model) for a in g.models], on_gpu)
                     if self.dep.runtime.memory_limits else None)
            self.memory_limits[g.id] = limit
            out.append(Launch(
                gpulet=g, repository=repos[g.id].resolve(), log_path=(self.paths.logs / f"{g.id}.log").resolve(),
                gpu_uuid=gpu.uuid if gpu else None, gpu_index=gpu.index if gpu else None,
                cores=cores.get(g.id), memory_limit_mb=limit,
                env=gpulet_env(g, gpu.index if gpu else None, cores.get(g.id), pipe if on_gpu else None, limit),
            ))
        return out

    def _model_memory_mb(self, model: str) -> float | None:
        """A served model's memory: the larger of its profile's and its repository config's ``memory_mb``
        (a CPU profile may measure only the tensors; None: neither says)."""
        from .planning import load_profiles

        if self._profiles is None:
            self._profiles = load_profiles(self.dep, self.devices.name)
        source = self.served.model(model).source
        store = self._profiles
        known = [v for v in (store.memory_mb(source) if store and store.has(source) else None,
                             self.repo[source].memory_mb) if v]
        return max(known) if known else None

    # ------------------------------------------------------------------ start / stop

    def _make_runtime(self) -> Runtime:
        rt = self.dep.runtime
        if rt.kind == "docker":
            from .runtime.docker import DockerRuntime

            return DockerRuntime(image=rt.image, deployment=self.dep.name,
                                 startup_timeout_s=rt.startup_timeout_s, restart=rt.restart)
        if rt.kind == "ray":
            from .runtime.ray import RayRuntime

            mps = self.paths.mps(self.dep.name)
            return RayRuntime(address=rt.ray_address, deployment=self.dep.name, tritonserver=rt.tritonserver,
                              startup_timeout_s=rt.startup_timeout_s, restart=rt.restart,
                              ship_repositories=rt.ship_repositories, cores=list(self.devices.cores),
                              mps_pipe_dir=str(self._mps_pipe_dir()), mps_log_dir=str(mps / "log"),
                              mps_private=not rt.mps_pipe_dir)
        from .runtime.process import ProcessRuntime

        return ProcessRuntime(rt.tritonserver, startup_timeout_s=rt.startup_timeout_s, restart=rt.restart)

    def _check_router_ports(self) -> None:
        """Fail before launching anything when the router's ports are taken (0 means any free port)."""
        import socket

        r = self.dep.router
        for field, port in (("http_port", r.http_port), ("grpc_port", r.grpc_port)):
            if port == 0:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((r.host, port))
                except OSError as e:
                    raise ValueError(f"router.{field}: cannot listen on {r.host}:{port}: {e.strerror}; "
                                     f"stop what uses it or choose another port (0 picks a free one)") from None

    def start(self) -> None:
        """Launch gpu-lets and the router; on any failure stop what was started and re-raise."""
        assert self.plan is not None
        self._check_router_ports()
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._write_state("starting")
        try:
            if self.devices.on_gpu and self.dep.runtime.kind != "ray":    # ray: one per node, by the runtime
                from .runtime.mps import Daemon

                self.mps = Daemon(self._mps_pipe_dir(), self.paths.mps(self.dep.name) / "log",
                                  private=not self.dep.runtime.mps_pipe_dir)
                self.mps.start()
            self.runtime = self._make_runtime()
            # pids are in the state file from the moment each server is spawned, so that a controller
            # killed while the servers start leaves `down` what to stop
            self.runtime.on_spawn = lambda: self._write_state(self._state)
            launches = self.launches()
            self.log(f"starting {len(launches)} gpu-let(s) with the {self.dep.runtime.kind} runtime ...")
            self.endpoints = self.runtime.start(launches)
            self._write_state("starting")
            from .router import RouterServer, RoutingTable

            table = RoutingTable.from_plan(self.plan, self.endpoints, self.repo, self.served)
            self.router = RouterServer(table, self.dep.router, self._router_options())
            self.router.start_in_thread()
            self.metrics.plan(self.plan)
            self._publish_metrics()
            self._write_state("ready")
        except BaseException:
            self.shutdown()
            raise

    def _router_options(self):
        from .router import RouterOptions

        control = None
        if self.dep.router.repository_api:
            shutil.rmtree(self.paths.control, ignore_errors=True)     # requests left by an earlier run
            self.paths.control.mkdir(parents=True)
            control = str(self.paths.control)
        return RouterOptions(max_body_bytes=self.dep.router.max_body_bytes, control_dir=control,
                             repository_dir=str(self.repo.root.resolve()))

    def _publish_metrics(self) -> None:
        try:
            self.router.publish_metrics(self.metrics.text())
        except (OSError, RuntimeError) as e:
            self.log(f"router: could not publish the controller's metrics: {e}")

    # ------------------------------------------------------------------ repository API: load / unload

    def repository_target(self, action: str, model: str, override: dict | None = None) -> tuple[Deployment | None, str]:
        """The deployment a repository API request asks for (None: nothing to change) and what to say.
        Loading a served model reloads it: the same deployment, its gpu-lets started anew from the
        repository as it is now. ``override`` (a load's config): slo_ms, rate and max_batch to plan it with.

        Raises RepositoryRefused (with an HTTP status) for a request that cannot be done."""
        served = [m.name for m in self.served.models]
        repo = repository_for(self.dep)       # as it is now: `repo add` may have changed it since `up`
        if action == "load":
            override = override or {}
            if model in served:        # Triton's load of a loaded model reloads it: a new version, say
                if not override:
                    return self.dep, f"{model!r} reloaded"
                doc = self.dep.model_dump(mode="json", exclude_none=True)
                entry = next((m for m in doc["models"] if m["name"] == model), None)
                if entry is None:
                    raise RepositoryRefused(400, f"{model!r} is served as a step of an app; its SLO and rate "
                                                 "come from the app (`controlplane apply`)")
                entry.update({k: v for k, v in override.items()})
                return Deployment.model_validate(doc), f"{model!r} reloaded with {override}"
            if model not in repo.names():
                raise RepositoryRefused(404, f"no model {model!r} in the repository "
                                             f"({self.dep.repository or 'the zoo'}); it has: {', '.join(repo.names())}")
            info = repo[model]
            if not (override.get("slo_ms") or info.slo_ms):
                raise RepositoryRefused(400, f"model {model!r} has no SLO: give it one with `controlplane repo add "
                                             f"{model} ... --slo-ms MS --replace` (the 'slo_ms' parameter of its config.pbtxt)")
            doc = self.dep.model_dump(mode="json", exclude_none=True)
            doc["models"].append({"name": model, "rate": override.get("rate", LOADED_RATE),
                                  "slo_ms": override.get("slo_ms") or info.slo_ms,
                                  **({"max_batch": override["max_batch"]} if "max_batch" in override else {})})
            return Deployment.model_validate(doc), f"{model!r} loaded"
        if action == "unload":
            if model not in served:
                return None, f"{model!r} is not served"
            app = next((a.name for a in self.dep.apps for st in a.steps if st.model == model), None)
            if app is not None:
                raise RepositoryRefused(400, f"{model!r} is a step of app {app!r}; change the app with "
                                             "`controlplane apply`")
            if served == [model]:
                raise RepositoryRefused(400, f"{model!r} is the deployment's only model; `controlplane down` stops "
                                             "the deployment")
            doc = self.dep.model_dump(mode="json", exclude_none=True)
            doc["models"] = [m for m in doc["models"] if m["name"] != model]
            return Deployment.model_validate(doc), f"{model!r} unloaded"
        raise RepositoryRefused(400, f"unknown repository action {action!r}")

    def _take_repository_requests(self) -> None:
        """Load or unload what the router's repository API was asked for, one request at a time."""
        if not self.dep.router.repository_api:
            return
        from .router.control import answer, take_requests

        for req, doc in take_requests(self.paths.control):
            action, model = str(doc.get("action")), str(doc.get("model"))
            t0, t1, why = self._last_change
            try:
                if t0 <= req.stat().st_mtime <= t1:
                    raise RepositoryRefused(409, f"{action} of {model!r} arrived while another change was being "
                                                 f"applied ({why}); try again")
                dep, message = self.repository_target(action, model, doc.get("override") or {})
                if dep is not None:
                    self.apply(dep, reason=f"repository API: {action} {model}",
                               reload=frozenset([model]) if action == "load" else frozenset())
                    self.log(f"repository API: {message}")
                answer(req, True, message=message)
            except RepositoryRefused as e:
                answer(req, False, e.status, error=str(e))
            except Exception as e:  # noqa: BLE001 - reported to the client; the previous plan keeps serving
                msg = f"{action} of {model!r} failed, the previous plan keeps serving: {type(e).__name__}: {e}"
                self.log(f"repository API: {msg}")
                answer(req, False, 400, error=msg)

    # ------------------------------------------------------------------ apply: a new target

    def apply(self, dep: Deployment, reason: str = "apply", calibration: dict[str, float] | None = None,
              reload: frozenset[str] = frozenset(), started: float | None = None) -> Plan:
        """:meth:`_apply`, counted in the controller's metrics (applied or refused, by cause). ``started``:
        when the change was taken up (default: now); repository requests from then until it ends are refused."""
        started = started or time.time()
        try:
            plan = self._apply(dep, reason, calibration, reload)
        except BaseException:
            self._last_change = (started, time.time(), reason)
            self.metrics.refused.labels(_cause(reason)).inc()
            self._publish_metrics()
            raise
        self._last_change = (started, time.time(), reason)
        self.metrics.replans.labels(_cause(reason)).inc()
        self.metrics.last_replan.set(time.time())
        self.metrics.plan(plan)
        self._publish_metrics()
        return plan

    def _apply(self, dep: Deployment, reason: str, calibration: dict[str, float] | None,
               reload: frozenset[str]) -> Plan:
        """Move the running deployment to ``dep`` (models added or removed, new rates or SLOs) without
        failing a request: plan it; keep each running gpu-let the new plan has unchanged; start the
        ones it adds and wait until they are ready; route by the new plan in every router process;
        only then stop the gpu-lets it no longer has (their requests in flight are answered first:
        the router sends them nothing more, and tritonserver finishes what it holds on SIGTERM).
        On any failure before the switch, what was started is stopped and the old plan keeps
        serving; the error says why. ``reload``: models whose gpu-lets are all started anew (a new
        version of the model in the repository), even where the plan keeps them as they were."""
        assert self.plan is not None and self.runtime is not None and self.router is not None
        t_start = time.monotonic()
        for field in ("name", "devices", "runtime", "router", "repository", "run_dir"):
            if getattr(dep, field) != getattr(self.dep, field):
                raise ValueError(f"apply: '{field}' differs from the running deployment's; "
                                 f"changing it needs `down` and `up`")
        repo = repository_for(dep)
        calibration = self.calibration if calibration is None else calibration
        plan = make_plan(dep, self.devices, repo=repo, profile_missing=True, log=self.log, calibration=calibration,
                         previous=self.plan)
        if self.devices.on_gpu and plan.gpulets and max(g.gpu for g in plan.gpulets) >= self.devices.count():
            raise ValueError(f"the plan needs {plan.gpus} GPU(s) but the deployment has {self.devices.count()}")
        build_artifacts(repo, plan.model_names(), progress=lambda n: self.log(f"building model {n} ..."))
        t_planned = time.monotonic()
        from .apps import planned

        slo = {m.name: m.slo_ms for m in planned(dep, plan).models}
        old_slo = {m.name: m.slo_ms for m in self.served.models}
        running = {_gpulet_key(g, old_slo): g.id for g in self.plan.gpulets
                   if not reload.intersection(a.model for a in g.models)}
        self._generation += 1
        kept, gpulets = set(), []
        for g in plan.gpulets:
            gid = running.pop(_gpulet_key(g, slo), None)
            if gid is not None:
                kept.add(gid)
            gpulets.append(g.model_copy(update={"id": gid or f"{g.id}-r{self._generation}"}))
        plan = plan.model_copy(update={"gpulets": gpulets})
        added = {g.id for g in gpulets} - kept
        removed = [g.id for g in self.plan.gpulets if g.id not in kept]
        old = (self.dep, self.repo, self.plan)
        self.dep, self.repo, self.plan = dep, repo, plan
        try:
            self._check_memory([g for g in gpulets if g.id in added])
            launches = self.launches(only=added)
            self._check_not_stopping()
            if launches:
                self.log(f"apply: starting {len(launches)} gpu-let(s): {', '.join(sorted(added))}")
                self.endpoints.update(self.runtime.start(launches))
            t_started = time.monotonic()
            from .router import RoutingTable

            endpoints = {gid: ep for gid, ep in self.endpoints.items() if gid in kept or gid in added}
            self._check_not_stopping()
            self.router.update(RoutingTable.from_plan(plan, endpoints, repo, dep))
            t_routed = time.monotonic()
            # where a transition's time goes, by stage (live.py reports it; the GPU's is mostly start)
            took = (f"serving after {t_routed - t_start:.1f} s: plan {t_planned - t_start:.1f} s, "
                    f"start {t_started - t_planned:.1f} s, route {t_routed - t_started:.1f} s")
        except BaseException:
            self.dep, self.repo, self.plan = old
            if self.runtime is not None:
                self.runtime.remove(sorted(added))
            raise
        self.metrics.started.inc(len(added))
        for stage, t0, t1 in (("plan", t_start, t_planned), ("start", t_planned, t_started), ("route", t_started, t_routed)):
            self.metrics.transition.labels(stage).observe(t1 - t0)
        if calibration and calibration != self.calibration:
            self._save_calibration(calibration, reason)
        if removed:
            self.log(f"apply: stopping {len(removed)} gpu-let(s) the new plan does not have: {', '.join(removed)}")
            self.runtime.remove(removed)
            self.metrics.stopped.inc(len(removed))
            stopped = time.monotonic() - t_routed
            self.metrics.transition.labels("stop").observe(stopped)
            # after the switch, but the change (and so the next re-plan) waits for it: say how long
            took += f"; old gpu-lets stopped {stopped:.1f} s after"
        self.endpoints = endpoints
        self.calibration = dict(calibration)
        self._profiles = None              # apply may have measured models the profile lacked
        self.replans += 1
        self.last_replan = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {reason} ({took})"
        self.log(f"re-planned ({reason}): {len(plan.gpulets)} gpu-let(s), "
                 f"{len(added)} started, {len(removed)} stopped, {len(kept)} kept; {took}")
        self._write_state("ready")
        return plan

    def _save_calibration(self, factors: dict[str, float], reason: str) -> None:
        """Keep recalibrated factors beside the profile: the next `up` on this device plans from them."""
        from .planning import save_calibration

        try:
            path = save_calibration(self.dep, self.devices.name, factors, reason)
            self.log(f"recalibration saved in {path}")
        except OSError as e:      # a read-only profile folder: the running plan has them all the same
            self.log(f"could not save the recalibration beside the profile: {e}")

    def _check_not_stopping(self) -> None:
        if self._stopped:
            raise RuntimeError("the deployment is stopping")

    def _check_memory(self, gpulets) -> None:
        """Refuse a transition whose new gpu-lets would not fit in the GPU memory free now (NVML), beside
        the running ones that keep serving until the switch: an OOM there would fail them too."""
        if not gpulets or not self.devices.on_gpu or self.dep.runtime.kind == "ray":   # ray: not this host's GPUs
            return
        need: dict[int, float] = {}
        for g in gpulets:
            models = sum(self._model_memory_mb(a.model) or 0.0 for a in g.models)
            need[g.gpu] = need.get(g.gpu, 0.0) + models + devmod.GPULET_OVERHEAD_MB
        nvml = devmod.free_memory_mb([self.devices.gpus[i].index for i in need])     # by NVML index
        free = {i: nvml[self.devices.gpus[i].index] for i in need if self.devices.gpus[i].index in nvml}
        short = devmod.memory_shortfall(need, free)
        if short:
            raise RuntimeError("not enough GPU memory to start the new plan's gpu-lets beside the running ones: "
                               + "; ".join(short))

    def _route_to_restarted(self) -> None:
        """A restarted server may listen on new ports: route to where each gpu-let is now."""
        now = {gid: st.endpoint for gid, st in self.runtime.status().items() if st.endpoint is not None}
        if all(now.get(gid) == ep for gid, ep in self.endpoints.items()):
            return
        self.endpoints.update({gid: ep for gid, ep in now.items() if gid in self.endpoints})
        from .router import RoutingTable

        try:
            self.router.update(RoutingTable.from_plan(self.plan, self.endpoints, self.repo, self.served))
        except Exception as e:  # noqa: BLE001 - logged; the next restart or apply tries again
            self.log(f"router: could not take the restarted gpu-lets' new ports: {e}")

    def _sample(self, window) -> bool:
        """Add the router's arrival counts to the window (every second); False when they cannot be read."""
        import httpx

        from .live import router_arrivals

        try:
            text = httpx.get(f"http://{self.router.http_url}/metrics", timeout=5).text
        except httpx.HTTPError as e:
            self.log(f"load: cannot read the router's metrics: {e}")
            return False
        window.add(time.monotonic(), router_arrivals(text))
        return True

    def _grow(self, window) -> bool:
        """Every second: a model whose rate over the latest span exceeds its plan's at two samples in a
        row is re-planned at once (two, so the rate planned for is a span wholly after a step, not one
        straddling it), for that rate (:func:`controlplane.live.grow`). True when it re-planned."""
        from .live import grow, over_plan

        planned = {m.name: m.rate for m in self.served.models}
        last = window.last_rates()
        before, self._over = self._over, set(over_plan(planned, last))
        if self._over & before:
            rates, why = grow(planned, last)
            self._replan(rates, f"measured load: {why}", None)
            self._over = set()
            return True
        return False

    def _shrink(self, window) -> bool:
        """Every second, once the window is full: a model whose padded peak over the whole window is well
        under its plan gives share back (:func:`controlplane.live.shrink`). The window is what keeps a
        dip from giving share back, not the epoch: checked only at epochs, a step back waited up to one
        epoch more (20 s by default) after the window had seen it. True when it re-planned."""
        from .live import shrink

        if not window.full():
            return False
        rates, why = shrink({m.name: m.rate for m in self.served.models}, window.peak_rates())
        if rates is None:
            return False
        self._replan(rates, f"measured load: {why}", None)
        return True

    def _epoch(self, window) -> None:
        """One re-planning epoch: publish the measured rates, and apply a new plan when a model runs well
        off its profile (:func:`controlplane.live.recalibrate`: the profile is scaled by what was
        measured). The load's changes are :meth:`_grow`'s and :meth:`_shrink`'s, every second."""
        from .live import recalibrate

        self.metrics.epochs.inc()
        for m, rate in window.peak_rates().items():
            self.metrics.measured.labels(m).set(rate)
        self._publish_metrics()
        calibration, why_cal = recalibrate(self.calibration, self._measure_batches())
        if window.span_s() < min(self.dep.scheduler.epoch_s, self.dep.scheduler.window_s) * 0.9:
            return      # not a full epoch measured yet
        if calibration is not None:
            self._replan(None, f"recalibrated: {why_cal}", calibration)

    def _replan(self, rates: dict[str, float] | None, reason: str, calibration: dict[str, float] | None) -> None:
        """Apply the served deployment with the models at ``rates`` (None: as they are) through the
        same loop as ``apply``; a failure leaves the running plan serving."""
        doc = self.served.model_dump(mode="json", exclude_none=True)
        for a in doc.get("apps", []):
            a["rate"] = 0.0             # the step models' measured rates already count the apps' requests
        for m in doc["models"]:
            if rates is not None:
                m["rate"] = round(rates[m["name"]], 3)
        dep = Deployment.model_validate(doc)

        def replan() -> None:
            try:
                self.apply(dep, reason=reason, calibration=calibration)
            except Exception as e:  # noqa: BLE001 - the running plan keeps serving; tried again next epoch
                self.log(f"epoch: re-planning failed, the running plan keeps serving: {type(e).__name__}: {e}")

        self._begin(reason, replan)

    def _measure_batches(self) -> dict[str, tuple[int, float, float]]:
        """Per source model, (batches, measured ms, profile ms) since the last epoch, from each gpu-let's
        Triton statistics against the profile unscaled (what the plan's latencies come from) times the
        interference slowdown the plan priced in (:func:`controlplane.live.planned_slowdown`)."""
        import httpx

        from .live import batch_stats, measured_vs_predicted, planned_slowdown
        from .planning import load_profiles

        if self.plan.algorithm == "trivial":
            return {}          # planned without latencies
        if self._profiles is None:          # read once per plan, not every epoch
            self._profiles = load_profiles(self.dep, self.devices.name)
        store = self._profiles
        out: dict[str, tuple[int, float, float]] = {}
        for g in self.plan.gpulets:
            ep = self.endpoints.get(g.id)
            if ep is None:
                continue
            for a in g.models:
                try:
                    st = httpx.get(f"http://{ep.http}/v2/models/{a.model}/stats", timeout=5).json()
                    cur = batch_stats(st["model_stats"][0])
                except (httpx.HTTPError, KeyError, IndexError, ValueError):
                    continue
                prev = self._batch_stats.get((g.id, a.model))
                self._batch_stats[(g.id, a.model)] = cur
                src = self.served.model(a.model).source
                if prev is None or store is None or src not in store.models():
                    continue
                slow = planned_slowdown(a.latency_ms, store.latency(src, g.share, a.batch, pct="p99"),
                                        self.dep.scheduler.latency_margin, self.calibration.get(src, 1.0))
                n, meas, pred = measured_vs_predicted(
                    prev, cur, lambda b, slow=slow: store.latency(src, g.share, b, pct="p50") * slow)
                n0, m0, p0 = out.get(src, (0, 0.0, 0.0))
                out[src] = (n0 + n, m0 + meas, p0 + pred)
        return out

    def _take_apply_request(self) -> None:
        """Run a pending `controlplane apply` (its file in the run directory) and leave its result."""
        req = self.paths.apply_request
        if not req.exists():
            return
        from .spec import load_deployment

        taken = req.with_name(req.name + ".taken")
        started = time.time()               # before `taken` appears: a request that sees it is during the change
        req.replace(taken)
        result: dict = {"request": taken.read_text()}
        try:
            plan = self.apply(load_deployment(taken), reason="controlplane apply", started=started)
            result.update(ok=True, plan=json.loads(plan.model_dump_json()))
            self.log(f"apply: now serving {', '.join(plan.model_names())} on {len(plan.gpulets)} gpu-let(s)")
        except Exception as e:  # noqa: BLE001 - reported to the caller of `apply`; the old plan keeps serving
            result.update(ok=False, error=f"{type(e).__name__}: {e}")
            self.log(f"apply failed, the previous plan keeps serving: {result['error']}")
        tmp = self.paths.apply_result.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(self.paths.apply_result)
        taken.unlink(missing_ok=True)

    def write_example_request(self, model: str) -> Path:
        """A KServe v2 JSON request for `model` (zeros), so `up` can print a curl line that works."""
        info = self.repo[model]
        inputs = []
        for t in info.inputs:
            shape = [1, *t.shape]
            n = 1
            for d in shape:
                n *= max(d, 1)
            inputs.append({"name": t.name, "datatype": t.datatype, "shape": shape, "data": [0] * n})
        path = self.paths.root / f"example-{model}.json"
        path.write_text(json.dumps({"inputs": inputs}))
        return path

    def _begin(self, reason: str, change) -> None:
        """Run ``change`` (an apply, a re-plan, the repository API's requests): beside :meth:`serve`'s loop
        when it runs, one change at a time, so the loop keeps measuring the load while new gpu-lets start
        and warm (5-10 s each on the H200, benchmarks/startup.py) and decides again on current counts when it ends; inline
        otherwise. ``change`` reports its own failures (the running plan keeps serving)."""
        if not self._serving:
            change()
            return
        self.changing = f"{reason} (since {time.strftime('%H:%M:%S')})"
        self._write_state(self._state)
        if self._changes is None:
            # One thread, kept until shutdown: a server dies with the *thread* that spawned it
            # (setpriv --pdeathsig), so a thread per change would take its servers with it when it ends.
            from concurrent.futures import ThreadPoolExecutor

            self._changes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controlplane-change")
        self._change = self._changes.submit(change)

    def _changing(self) -> bool:
        """True while a change runs; when one has just ended, forget it (and the load seen over the old plan)."""
        if self._change is None:
            return False
        if not self._change.done():
            return True
        self._change, self.changing, self._over = None, None, set()
        self._write_state(self._state)
        return False

    def serve(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Supervise until stop is set, one loop: measure the load every second; when no change is in
        flight, take `apply` and repository API requests, re-plan from the measured load (at once on
        growth, every ``scheduler.epoch_s`` otherwise), restart dead servers, keep the state file
        current. Changes run beside the loop (:meth:`_begin`): while one is in flight the loop only
        measures (the runtime is the change's until it ends; a server that dies meanwhile is restarted
        after it)."""
        from .live import LoadWindow

        epoch = self.dep.scheduler.epoch_s
        window = self.window = LoadWindow(self.dep.scheduler.window_s)
        self._over: set[str] = set()
        next_epoch = time.monotonic() + (epoch or 0)
        self._serving = True
        try:
            self._serve(stop, interval_s, epoch, window, next_epoch)
        finally:
            self._serving = False

    def _serve(self, stop: threading.Event, interval_s: float, epoch: float, window, next_epoch: float) -> None:
        while not stop.wait(min(interval_s, epoch or interval_s)):
            if not self.router.alive():
                # The router's first process is this one: it cannot be restarted apart from the
                # controller, so the controller stops everything (`status` then says so) rather than
                # leave servers nobody can reach. It replaces its other processes itself.
                self.log(f"the router stopped ({self.router._error or 'its thread exited'}); stopping the deployment")
                return
            sampled = bool(epoch) and self._sample(window)
            if self._changing():
                continue
            if self.paths.apply_request.exists():
                self._begin("controlplane apply", self._take_apply_request)
                continue
            if self.dep.router.repository_api and any(self.paths.control.glob("req-*.json")):
                self._begin("repository API", self._take_repository_requests)
                continue
            if sampled and not self._grow(window) and not self._shrink(window) and time.monotonic() >= next_epoch:
                next_epoch = time.monotonic() + epoch
                self._epoch(window)
            if self._changing():
                continue
            restarted = self.runtime.supervise()
            for gid in restarted:
                self.log(f"gpu-let {gid}: restarted")
            if restarted:
                self.metrics.restarts.inc(len(restarted))
                self._publish_metrics()
                self._route_to_restarted()
                self._write_state("ready")

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        change = self._change
        if change is not None and not change.done():
            # stop its servers first (a process runtime's start then fails at once, rather than after
            # they are ready), then wait for it: it takes back what it started and routes nothing more
            self.log("stopping: a change is in flight; stopping what it started too")
            if self.runtime is not None:
                self.runtime.stop()
            change.exception()
        self._write_state("stopping")
        if self.router is not None:
            try:
                self.router.stop()
            except Exception as e:  # keep tearing down
                self.log(f"router stop: {e}")
        if self.runtime is not None:
            self.runtime.stop()
            remove_orphan_shm()
        if self.mps is not None:
            self.mps.stop()
        if self._changes is not None:
            self._changes.shutdown(wait=False)      # its servers are stopped: the thread may end
        try:
            self.paths.state.unlink()
        except OSError:
            pass

    # ------------------------------------------------------------------ state file

    def _write_state(self, state: str) -> None:
        self._state = state
        if self.plan is None:
            return
        statuses = self.runtime.status() if self.runtime is not None else {}
        doc = RunState(
            deployment=self.dep.name, state=state, pid=os.getpid(), started=started_at(os.getpid()),
            runtime=self.dep.runtime.kind,
            device=self.devices.name if self.devices else None, updated=time.time(),
            router=RouterState(host=self.dep.router.host,
                               http_port=getattr(self.router, "http_port", self.dep.router.http_port),
                               grpc_port=getattr(self.router, "grpc_port", self.dep.router.grpc_port)),
            gpulets={gid: GpuletState(http=s.endpoint.http if s.endpoint else None,
                                      grpc=s.endpoint.grpc if s.endpoint else None,
                                      pid=s.pid, started=started_at(s.pid), container=s.container,
                                      node=s.node, node_gpu=s.node_gpu, restarts=s.restarts,
                                      memory_limit_mb=self.memory_limits.get(gid),
                                      log=s.log or str(self.paths.logs / f"{gid}.log"))
                     for gid, s in statuses.items()},
            plan=self.plan, replans=self.replans, last_replan=self.last_replan, calibration=self.calibration,
            changing=self.changing)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_text(doc.model_dump_json(indent=2))
        tmp.replace(self.paths.state)


def _gpulet_key(g, slo_ms: dict) -> tuple:
    """What a gpu-let's server is started with: equal keys mean the running one can stay."""
    return (g.gpu, g.share, tuple(sorted((a.model, a.batch, round(a.latency_ms, 3), slo_ms.get(a.model))
                                         for a in g.models)))


def _kill_group(pgid: int | None, started: float | None) -> int:
    """SIGKILL what is left of a server's process group (the server runs in a session of its own, its
    python-backend stubs with it), the leader alive or not. A live leader must be the recorded server
    (same start time); without one, only tritonservers and stubs started after the server are
    taken: a pid or group id reused by someone else since is left alone. Returns how many were killed."""
    import psutil

    if not pgid or started is None:
        return 0
    try:
        if abs(psutil.Process(pgid).create_time() - started) > 0.05:
            return 0                   # the leader's pid belongs to another process now
    except psutil.NoSuchProcess:
        pass                           # gone (a zombie is still the recorded server: its stubs are taken)
    except psutil.AccessDenied:
        return 0
    killed = []
    for p in psutil.process_iter(["pid", "create_time", "name"]):
        try:
            if p.pid == os.getpid() or os.getpgid(p.pid) != pgid:
                continue
            if p.info["create_time"] < started - 1.0 or not p.info["name"].startswith(("tritonserver", "triton_python_b")):
                continue
            p.kill()
            killed.append(p)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    psutil.wait_procs(killed, timeout=10)     # gone before their shared memory is looked at
    return len(killed)


#: the python backend's shared-memory regions; a stub killed with SIGKILL leaves its region behind
SHM_GLOB = "triton_python_backend_shm_region_*"


def orphan_shm(root: Path = Path("/dev/shm"), min_age_s: float = 1.0) -> list[Path]:
    """This user's python-backend shared-memory regions that no running process has mapped or open,
    older than ``min_age_s`` (a region a server is creating right now is left alone)."""
    import psutil

    now = time.time()
    regions = []
    for f in root.glob(SHM_GLOB):
        try:
            st = f.stat()
        except OSError:
            continue
        if st.st_uid == os.getuid() and now - st.st_mtime >= min_age_s:
            regions.append(f)
    if not regions:
        return []
    used = set()
    for p in psutil.process_iter(["pid"]):
        try:
            with open(f"/proc/{p.pid}/maps") as fh:
                used.update(ln.split(None, 5)[5].strip() for ln in fh if "/dev/shm/" in ln and len(ln.split(None, 5)) == 6)
            for fd in Path(f"/proc/{p.pid}/fd").iterdir():
                t = os.readlink(fd)
                if t.startswith("/dev/shm/"):
                    used.add(t)
        except (OSError, psutil.Error):
            continue
    return [f for f in regions if str(f) not in used]


def remove_orphan_shm(root: Path = Path("/dev/shm"), min_age_s: float = 1.0) -> int:
    """Remove :func:`orphan_shm`'s regions (a stub killed with SIGKILL leaves its region behind)."""
    n = 0
    for f in orphan_shm(root, min_age_s):
        try:
            f.unlink()
            n += 1
        except OSError:
            pass
    return n


def stop_deployment(paths: RunPaths, timeout_s: float = 60.0) -> list[str]:
    """Stop a running deployment through its state file; return what was stopped.

    Asks the controller to shut down (SIGTERM) and waits; if it does not, kills it and
    every server process group it recorded, and removes containers by label.
    """
    state = read_state(paths)
    if state is None:
        return []
    done = []
    pid = state.pid
    if pid_alive(pid, state.started) and pid != os.getpid():
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid, state.started) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid, state.started):
            os.kill(pid, signal.SIGKILL)
        done.append(f"controller (pid {pid})")
    for gid, g in state.gpulets.items():
        killed = _kill_group(g.pid, g.started)
        if killed:
            done.append(f"gpu-let {gid} (pid {g.pid}" + (f" and {killed - 1} more)" if killed > 1 else ")"))
    removed = remove_orphan_shm()
    if removed:
        done.append(f"{removed} shared-memory region(s) of dead python-backend stubs")
    if state.runtime == "docker":
        try:
            from .runtime.docker import remove_deployment_containers

            done += [f"container {c}" for c in remove_deployment_containers(state.deployment)]
        except Exception:
            pass
    try:
        paths.state.unlink()
    except OSError:
        pass
    return done
