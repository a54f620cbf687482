"""Serving benchmark on one GPU (or ``--gpus N``): the highest load each system serves at its SLOs, side by side, in one run.

Run on a GPU machine (see docs/benchmarks.md, "Serving", for the exact call):

    python benchmarks/serving.py --out DIR [--mixes gpu-run,scen1,bert-heavy] [--systems ...]
                                 [--duration 8] [--points 4] [--profile profiles/h200] [--gpus 2]
    python benchmarks/serving.py --render DIR/serving.json    # its table into docs/benchmarks.md (Serving)
    python benchmarks/serving.py --plan-only --mixes traffic [--profile DIR]   # profile check, predicted scales
                                                                                # and plans; no GPU, starts nothing

For each mix (a deployment file whose rates are scaled together by one factor),
each system's **max scale** is the highest factor at which every model (of an app mix: every app, end
to end; below) has >= 99 % of its requests answered within its SLO (Poisson arrivals over HTTP, or gRPC
with ``--protocol grpc``, from `controlplane loadgen` worker processes; a point whose client fell behind its
schedule does not count as a pass). Systems:

- ``gpulet``: ``controlplane up`` with the gpu-let plan made for the planner's own
  max scale on the GPUs (its *predicted* max scale), through the router, with the mix's own
  ``scheduler.colocation`` (default ``auto``: on a GPU a gpu-let's models run at once, each at the share);
- ``direct``: the same gpu-let servers, addressed directly (no router);
- ``temporal``: ``controlplane up`` with the temporal-only plan (one 100 % gpu-let);
- ``turns``: ``controlplane up`` with the gpu-let plan made with ``scheduler.colocation: turns``
  (a gpu-let's models take turns in a duty cycle: the paper's model, the planner's default
  until run 13) at that planner's own max scale, through the router;
- ``triton1`` / ``triton2`` / ``triton4``: one plain tritonserver holding every
  model, Triton's ``dynamic_batching { }``, 1 / 2 / 4 instances per model on each GPU, no MPS,
  no router (but an app's: below) — what a user running Triton alone would deploy;
- ``mps-split`` (one GPU): two plain tritonservers under one MPS daemon on the GPU, split by hand as
  in the design notes' measurement (../shared/DESIGN.md): the tightest-SLO model alone at 40 %, the
  others together at 60 %, 1 instance each — what a user who knows MPS would try first;
- ``split`` (``--gpus`` > 1): one plain tritonserver per GPU, the models divided between them
  as a user would even them out (largest GPU demand first, onto the least loaded GPU, by the
  profile), 1 instance each, the clients sending each model to its server.

**App mixes** (a deployment with ``apps:``, e.g. ``traffic``: ssd-mobilenet -> crop -> googlenet | vgg16,
202 ms end to end): the load targets are the apps, each addressed by its name like a model (rate =
the app's rate x scale, SLO = its end-to-end SLO), and any model with a rate of its own; attainment
and the pass rule are per target, so an app's is its end-to-end attainment. Each point still keeps
Triton's queue and compute times per step model (where the time goes). The planners plan the
app's steps at its rate with their SLO budgets (``make_plan``). ``direct`` has no router to chain
the steps and is skipped (a note in the JSON). The plain-Triton baselines have no ensemble: the
chaining is done outside Triton by the same router code as ``gpulet``'s — a ``controlplane router``
process (its own processes, not the load generator's) whose routing table sends every step model to
the plain tritonserver(s) with no admission limit — and the clients send the app to it. That is
the issue's "client chaining calls to one plain tritonserver", chained by the same code for every
system so the comparison measures the serving, not the chaining. A ``--profile`` that lacks a
model of a mix (a profile without the traffic app's steps, say) stops the run before any
server starts, naming the models and the command that measures them. Without a GPU, the app path
runs on the CPU (plain tritonservers on CPU instances; plans from the CPU profile)::

    python benchmarks/serving.py --mixes deployments/cpu-app.yaml --profile profiles/cpu-2c --out /tmp/s
                                 --work /tmp/w --systems gpulet,direct,temporal,triton1 --duration 2 --points 1

Every system runs the same python-backend ``model.py`` and TorchScript
artifacts, the same tritonserver flags. The search: test the guess, then grow or
shrink by 1.5x until the bracket closes, then bisect (``--points`` tests per
system). Results go to DIR/serving.json after every point (a run cut short keeps
what it measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.spec import Deployment, Plan, load_deployment  # noqa: E402

MIXES = {
    "gpu-run": ROOT / "deployments" / "gpu-run.yaml",
    "bert-heavy": ROOT / "deployments" / "bert-heavy.yaml",
    "vision-bert": ROOT / "deployments" / "vision-bert.yaml",
    "traffic": ROOT / "deployments" / "traffic.yaml",      # an app (issue 16)
}
SYSTEMS = ["gpulet", "direct", "temporal", "turns", "triton1", "triton2", "triton4", "mps-split", "split"]
#: what issue 10 measures the gpu-let plan against: one plain tritonserver, 1, 2 or 4 instances per model
#: (the hand splits under MPS, mps-split and split, get a column of their own)
TRITONS = ["triton1", "triton2", "triton4"]
HAND_SHARES = [40, 60]     # mps-split: the tightest-SLO model's server, then the rest
ATTAIN = 0.99
PROTOCOL = "http"          # the clients' protocol, for every system (--protocol)
ROUTER_WORKERS = 0         # router processes of the gpu-let deployments (0: RouterSpec's default)
GPUS = 1                   # GPUs every system gets (--gpus)
NO_DIRECT = ("not applicable: addressed directly, the gpu-let servers have no router to chain the app's steps "
             "(an app is served only through a router)")


def markers(gpus: int) -> tuple[str, str]:
    """Where docs/benchmarks.md keeps the latest run's table on this many GPUs."""
    tag = "serving-table" if gpus == 1 else f"serving-table-{gpus}gpu"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


@dataclass(frozen=True)
class Target:
    """What the clients send and the pass rule judges: a model, or an app (one KServe model of the router
    whose requests run its steps; its attainment is end to end)."""

    name: str
    rate: float          # requests/s at scale 1
    slo_ms: float
    app: bool = False


def targets(dep: Deployment) -> list[Target]:
    """The mix's load: each app at its rate and SLO, and every model with a rate of its own (an app's step
    models have rate 0 in their file: the app brings their load)."""
    return ([Target(a.name, a.rate, a.slo_ms, app=True) for a in dep.apps] +
            [Target(m.name, m.rate, m.slo_ms) for m in dep.models if m.rate > 0])


def scaled(dep: Deployment, s: float) -> Deployment:
    """The mix at ``s`` x its rates (the models' and the apps'), its router on free ports."""
    d = dep.model_dump(mode="json", exclude_none=True)
    for m in d["models"]:
        m["rate"] = m["rate"] * s
    for a in d.get("apps", []):
        a["rate"] = a["rate"] * s
    d["name"] = f"{dep.name}-x{s:.3g}".replace(".", "_")
    d["router"] = {"http_port": 0, "grpc_port": 0, "workers": ROUTER_WORKERS}
    return Deployment.model_validate(d)


# --------------------------------------------------------------------------- planning (pure)


def planner_max(dep: Deployment, store, algorithm: str, steps: int = 12) -> tuple[float, Plan | None]:
    """The largest scale the planner fits on ``GPUS`` GPUs (bisection), and its plan there."""
    from controlplane.planning import make_plan

    def fit(s: float) -> Plan | None:
        try:
            return make_plan(scaled(dep, s), profile=store, algorithm=algorithm, gpus=GPUS)
        except Exception:  # noqa: BLE001 - SchedulingError and unreachable SLOs alike: does not fit
            return None

    lo, hi, best = 0.0, 1.0, None
    while (p := fit(hi)) is not None and hi < 256:
        lo, hi, best = hi, hi * 2, p
    for _ in range(steps):
        mid = (lo + hi) / 2
        p = fit(mid)
        if p is not None:
            lo, best = mid, p
        else:
            hi = mid
    return lo, best


def turns(dep: Deployment) -> Deployment:
    """The mix planned with ``scheduler.colocation: turns`` (the ``turns`` system)."""
    return dep.model_copy(update={"scheduler": dep.scheduler.model_copy(update={"colocation": "turns"})})


def as_planned(sysname: str, dep: Deployment) -> tuple[Deployment, str]:
    """The deployment and planner a planned system (gpulet, temporal, turns) serves the mix with."""
    return (turns(dep), "gpulet") if sysname == "turns" else (dep, sysname)


def served(dep: Deployment, store) -> Deployment:
    """The models as the planner plans them: each app's steps added at its rate, their SLOs its budgets
    (split by the steps' profiled latencies, batch 1, largest share, as ``make_plan`` splits). What the
    plain tritonservers hold and what ``split`` evens out; the file's own deployment when it has no apps."""
    if not dep.apps:
        return dep
    from controlplane import apps as appmod
    from controlplane.planning import split_apps
    from controlplane.repository import repository_for

    return split_apps(dep, store, appmod.check(dep, repository_for(dep)))[0]


def profiled_names(dep: Deployment) -> list[str]:
    """The profile rows a mix plans with: each model's source (a `base:` copy plans as its base) and each
    app step's model."""
    src = {m.name: m.source for m in dep.models}
    names = list(src.values()) + [src.get(st.model, st.model) for a in dep.apps for st in a.steps]
    return list(dict.fromkeys(names))


def missing_profiles(deps: dict[str, Deployment], store, profile: Path) -> str | None:
    """Why the run cannot plan, before any server starts: the models of each mix the profile lacks, and the
    command that adds them to it (None when it has them all). Without this the planner would find no scale
    that fits, deep inside the bisection, and every system would be skipped as unplannable."""
    have = set(store.models())
    lack = {mix: [n for n in profiled_names(dep) if n not in have] for mix, dep in deps.items()}
    lack = {mix: names for mix, names in lack.items() if names}
    if not lack:
        return None
    names = list(dict.fromkeys(n for ns in lack.values() for n in ns))
    csv = profile if profile.suffix == ".csv" else profile / "latency.csv"
    device = "cpu" if str(store.device).lower().startswith("cpu") else "gpu"
    shares = sorted({sh for m in have for sh in store.shares(m)})
    batches = sorted({b for m in have for b in store.batches(m)})
    per_mix = "; ".join(f"{mix} needs {', '.join(ns)}" for mix, ns in lack.items())
    return (f"the profile {profile} ({store.device}) has no rows for {', '.join(names)} ({per_mix}). Measure them "
            f"on a machine with that {device} (rows appended to the profile; resumable), with the shares and batches "
            f"the profile has:\n"
            f"  python -m controlplane profile --device {device} --mode serving -m {','.join(names)} "
            f"--shares {','.join(map(str, shares))} --batches {','.join(map(str, batches))} --point-budget-s 0.6 "
            f"--min-runs 8 --warmup 2 --no-plots --csv {csv}\n"
            f"or leave those mixes out of --mixes.")


# --------------------------------------------------------------------------- systems


def router_metrics(http: str) -> str:
    """A router's /metrics text (a comment saying why where it does not answer)."""
    import httpx

    try:
        return httpx.get(f"http://{http}/metrics", timeout=5).text
    except httpx.HTTPError as e:
        return f"# metrics unavailable: {e}"


class Deployed:
    """`controlplane up --detach --plan` of a plan; endpoints of the router and of each gpu-let."""

    def __init__(self, dep: Deployment, plan: Plan, out: Path) -> None:
        self.dep, self.plan, self.out = dep, plan, out

    def start(self) -> None:
        import yaml

        self.out.mkdir(parents=True, exist_ok=True)
        self.dep_file = self.out / "deployment.yaml"
        self.dep_file.write_text(yaml.safe_dump(self.dep.model_dump(mode="json", exclude_none=True), sort_keys=False))
        plan_file = self.out / "plan.json"
        plan_file.write_text(self.plan.model_dump_json(indent=1))
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "controlplane", "up", "-f", str(self.dep_file), "--detach",
                            "--plan", str(plan_file)], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"up failed: {p.stdout[-2000:]} {p.stderr[-2000:]}")
        self.up_s = time.monotonic() - t0
        from controlplane.paths import RunPaths

        self.state = json.loads(RunPaths.for_deployment(self.dep).state.read_text())
        r = self.state["router"]
        self.router_grpc = f"{r['host']}:{r['grpc_port']}"
        self.router_http = f"{r['host']}:{r['http_port']}"

    def urls(self, direct: bool) -> list[tuple[str, dict[str, float]]]:
        """(url, fraction of each target's rate) per endpoint the load goes to: all to the router, or
        (``direct``, models only) each model to its gpu-lets in the plan's proportions."""
        if not direct:
            return [(self.router_grpc if PROTOCOL == "grpc" else self.router_http,
                     {t.name: 1.0 for t in targets(self.dep)})]
        out = []
        for g in self.plan.gpulets:
            fr = {}
            for a in g.models:
                total = sum(gg.assignment(a.model).rate for gg in self.plan.gpulets_for(a.model))
                fr[a.model] = a.rate / total if total > 0 else 1.0 / len(self.plan.gpulets_for(a.model))
            out.append((self.state["gpulets"][g.id][PROTOCOL], fr))
        return out

    def servers(self) -> list[str]:
        """HTTP endpoints of the tritonservers (for their statistics)."""
        return [g["http"] for g in self.state["gpulets"].values()]

    def server_names(self) -> dict[str, str]:
        return {gid: g["http"] for gid, g in self.state["gpulets"].items()}

    def router_metrics(self) -> str:
        return router_metrics(self.router_http)

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "controlplane", "down", "-f", str(self.dep_file)],
                       capture_output=True, text=True, timeout=120)


def even_split(dep: Deployment, store, gpus: int) -> list[list[str]]:
    """The models divided between ``gpus`` servers as a user evening out the load would: each model's GPU
    demand (its rate over its profiled throughput at 100 %, at the largest batch that runs within half its
    SLO), largest first, onto the least loaded GPU."""
    def demand(m) -> float:
        best = 0.0
        for b in store.batches(m.name):
            if store.latency(m.name, 100, b) <= m.slo_ms / 2:
                best = max(best, store.throughput(m.name, 100, b))
        return m.rate / best if best else math.inf

    need = {m.name: demand(m) for m in dep.models}
    load = [0.0] * gpus
    out: list[list[str]] = [[] for _ in range(gpus)]
    for name in sorted(need, key=need.get, reverse=True):
        i = load.index(min(load))
        out[i].append(name)
        load[i] += need[name]
    return [names for names in out if names]


def hand_split(dep: Deployment) -> list[list[str]]:
    """mps-split's servers: the tightest-SLO model alone, every other model together (HAND_SHARES)."""
    tight = min(dep.models, key=lambda m: m.slo_ms).name
    return [[tight], [m.name for m in dep.models if m.name != tight]]


def free_port() -> int:
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


_ROUTER_PIDS: set[int] = set()     # chaining routers this benchmark started: their CPU is the router's, not the client's


class ChainRouter:
    """The project's router in front of plain tritonservers, for an app mix's plain-Triton baselines: it
    chains each app's steps outside Triton (no ensemble), with the same code as the gpu-let deployments'
    router. Run as ``controlplane router`` (the CLI that serves given endpoints) in processes of its own, so
    it shares neither the load generator's interpreter nor its GIL; as many router processes as ``up``'s
    (``--router-workers``). Its table sends each model to the one server holding it, with no planned
    throughput, hence no in-flight limit: it passes every request on, as a client chaining calls would.
    It stays in this benchmark's process group, so whatever ends the benchmark ends it too."""

    def __init__(self, dep: Deployment, plan: Plan, endpoints: dict, out: Path) -> None:
        self.dep, self.plan, self.endpoints, self.out = dep, plan, endpoints, out
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        import dataclasses

        import yaml

        self.out.mkdir(parents=True, exist_ok=True)
        doc = self.dep.model_dump(mode="json", exclude_none=True)
        self.http_port, self.grpc_port = free_port(), free_port()
        doc["router"] = {"host": "127.0.0.1", "http_port": self.http_port, "grpc_port": self.grpc_port,
                         "workers": ROUTER_WORKERS}
        files = {"deployment.yaml": yaml.safe_dump(doc, sort_keys=False), "plan.json": self.plan.model_dump_json(indent=1),
                 "endpoints.json": json.dumps({k: dataclasses.asdict(e) for k, e in self.endpoints.items()})}
        for name, text in files.items():
            (self.out / name).write_text(text)
        self.log_path = self.out / "router.log"
        with self.log_path.open("w") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controlplane", "router", "-f", str(self.out / "deployment.yaml"),
                 "--plan", str(self.out / "plan.json"), "--endpoints", str(self.out / "endpoints.json")],
                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        _ROUTER_PIDS.add(self.proc.pid)
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until it answers for every app (its tritonservers are up already)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the chaining router exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                if all(httpx.get(f"http://{self.http}/v2/models/{a.name}/ready", timeout=2).status_code == 200
                       for a in self.dep.apps):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the chaining router did not serve the apps within {timeout_s:g} s: "
                                   f"{self.log_path.read_text()[-2000:]}")
            time.sleep(0.5)

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}" if PROTOCOL == "grpc" else self.http

    def metrics(self) -> str:
        return router_metrics(self.http)

    def stop(self) -> None:
        """SIGTERM (the router stops its worker processes), then SIGKILL to it and its children if it lingers."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for c in children:
            try:
                c.kill()
            except psutil.Error:
                pass


class PlainTriton:
    """Plain tritonservers, Triton's dynamic batcher: one holding every model of the mix with ``instances``
    instances on each GPU (``groups`` None), or one per GPU holding its group of models, no MPS; or, with
    ``shares``, one per group on GPU 0 under an MPS daemon of its own, each at its share.
    No router for models; an app mix's apps go through a :class:`ChainRouter` to them (the models the
    servers hold are then the apps' steps too: ``dep`` is :func:`served`'s)."""

    def __init__(self, dep: Deployment, instances: int, out: Path, on_gpu: bool = True,
                 groups: list[list[str]] | None = None, shares: list[int] | None = None) -> None:
        self.dep, self.instances, self.out, self.on_gpu, self.groups = dep, instances, out, on_gpu, groups
        self.shares = shares
        self.chain: ChainRouter | None = None
        self.mps = None

    def _repository(self, root: Path, names: list[str], gpus: list[int]) -> None:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        from controlplane.repository import MODEL_TEMPLATE, build_artifacts, repository_for

        repo = repository_for(self.dep)
        build_artifacts(repo, names)
        shutil.rmtree(root, ignore_errors=True)
        for n in names:
            info = repo[n]
            cfg = mc.ModelConfig()
            cfg.CopyFrom(info.config)
            cfg.backend = "python"
            cfg.ClearField("instance_group")
            cfg.dynamic_batching.SetInParent()
            if self.on_gpu:
                cfg.instance_group.add(count=self.instances, kind=mc.ModelInstanceGroup.KIND_GPU).gpus.extend(gpus)
            else:   # CPU: only to try the script on a machine without a GPU
                cfg.instance_group.add(count=self.instances, kind=mc.ModelInstanceGroup.KIND_CPU)
            (root / n / "1").mkdir(parents=True)
            (root / n / "config.pbtxt").write_text(text_format.MessageToString(cfg))
            shutil.copy2(MODEL_TEMPLATE, root / n / "1" / "model.py")
            shutil.copy2(info.artifact(), root / n / "1" / "model.pt")

    def start(self) -> None:
        from controlplane.runtime.base import Launch
        from controlplane.runtime.process import ProcessRuntime
        from controlplane.spec import Assignment, GpuLet

        launches = []
        # one server on every GPU (its instances on each), or one per GPU seeing only that GPU, or (shares)
        # one per group on GPU 0
        servers = ([(list(range(GPUS)), [m.name for m in self.dep.models])] if self.groups is None
                   else [([0 if self.shares else i], names) for i, names in enumerate(self.groups)])
        mps_env = {}
        if self.shares and self.on_gpu:
            from controlplane.runtime.mps import Daemon

            self.mps = Daemon(self.out / "mps" / "pipe", self.out / "mps" / "log").start()
            mps_env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.mps.pipe_dir)}
        for i, (gpus, names) in enumerate(servers):
            root = self.out / f"repository{i}"
            # CUDA_VISIBLE_DEVICES renumbers what a server sees from 0
            self._repository(root, names, list(range(len(gpus))))
            share = self.shares[i] if self.shares else 100
            gl = GpuLet(id=f"triton{i}", gpu=gpus[0], share=share,
                        models=[Assignment(model=n, batch=1, rate=0) for n in names])
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)) if self.on_gpu else ""}
            if mps_env:
                env |= {**mps_env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(share)}
            launches.append(Launch(gpulet=gl, repository=root.resolve(), log_path=(self.out / f"triton{i}.log").resolve(),
                                   gpu_index=gpus[0] if self.on_gpu else None,
                                   gpu_uuid=str(gpus[0]) if self.on_gpu else None, env=env))
        self.rt = ProcessRuntime(startup_timeout_s=600)
        t0 = time.monotonic()
        eps = self.rt.start(launches)
        own = {t.name for t in targets(self.dep) if not t.app}
        self.ends = [(eps[la.gpulet.id], {a.model: 1.0 for a in la.gpulet.models if a.model in own})
                     for la in launches]
        if self.dep.apps:
            plan = Plan(deployment=self.dep.name, device="plain-triton", algorithm="plain-triton", gpus=len(launches),
                        gpulets=[la.gpulet for la in launches])
            self.chain = ChainRouter(self.dep, plan, {la.gpulet.id: eps[la.gpulet.id] for la in launches},
                                     self.out / "router")
            self.chain.start()
        self.up_s = time.monotonic() - t0

    def servers(self) -> list[str]:
        return [ep.http for ep, _ in self.ends]

    def server_names(self) -> dict[str, str]:
        return {f"triton{i}": ep.http for i, (ep, _) in enumerate(self.ends)}

    def urls(self, direct: bool = False) -> list[tuple[str, dict[str, float]]]:
        """Models with a rate of their own straight to their server; apps to the chaining router."""
        out = [(ep.grpc if PROTOCOL == "grpc" else ep.http, frac) for ep, frac in self.ends if frac]
        if self.chain is not None:
            out.append((self.chain.url, {a.name: 1.0 for a in self.dep.apps}))
        return out

    def router_metrics(self) -> str:
        return self.chain.metrics() if self.chain is not None else ""

    def stop(self) -> None:
        try:
            if self.chain is not None:
                self.chain.stop()
        finally:
            if hasattr(self, "rt"):
                self.rt.stop()
            if self.mps is not None:
                self.mps.stop()


# --------------------------------------------------------------------------- GPU memory


def gpu_memory() -> dict:
    """GPU memory in use, MiB: per GPU, and per tritonserver (its own and its python-backend stubs'
    allocations, read from nvidia-smi's compute processes, keyed by the server's HTTP port)."""
    import psutil

    def smi(*q: str) -> list[list[str]]:
        try:
            p = subprocess.run(["nvidia-smi", *q, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                               timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [[c.strip() for c in ln.split(",")] for ln in p.stdout.splitlines() if ln.strip()]

    per_gpu = {r[0]: float(r[1]) for r in smi("--query-gpu=index,memory.used") if len(r) == 2 and r[1].isdigit()}
    servers: dict[str, float] = {}
    for r in smi("--query-compute-apps=pid,used_memory"):
        if len(r) != 2 or not r[0].isdigit() or not r[1].isdigit():
            continue
        try:
            proc = psutil.Process(int(r[0]))
            while proc is not None and proc.name() != "tritonserver":
                proc = proc.parent()
            args = proc.cmdline() if proc is not None else []
        except psutil.Error:
            continue
        port = next((a.split("=", 1)[1] for a in args if a.startswith("--http-port=")), None)
        if port:
            servers[port] = servers.get(port, 0.0) + float(r[1])
    return {"gpus": per_gpu, "servers": servers}


# --------------------------------------------------------------------------- where the CPU goes


def _proc_cpu() -> dict[int, tuple[str, int, float]]:
    """pid -> (name, ppid, CPU seconds so far) of every process; with its reaped children's, so the
    load generator's worker processes, gone by the end of a point, still count."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name", "ppid", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is not None:
            out[p.pid] = (p.info["name"] or "", p.info["ppid"] or 0, t.user + t.system + t.children_user + t.children_system)
    return out


def _role(pid: int, procs: dict, me: int) -> str:
    """tritonserver, its python-backend stubs, the MPS daemon, the chaining routers this benchmark started,
    this benchmark's own tree (the load generator), and the rest (the detached control plane: the router's
    processes)."""
    comm = procs[pid][0]
    if comm == "tritonserver":
        return "triton"
    if comm.startswith("triton_python"):
        return "stub"
    if comm.startswith("nvidia-cuda-mps"):
        return "mps"
    p, seen = pid, 0
    while p > 1 and p in procs and seen < 64:
        if p in _ROUTER_PIDS:
            return "router"
        if p == me:
            return "client"
        p, seen = procs[p][1], seen + 1
    return "router" if comm.startswith("python") else "other"


class CpuMeter:
    """Cores used per role over a point, and the machine's busy fraction: is the CPU the bottleneck?"""

    def __enter__(self) -> "CpuMeter":
        self.t0, self.p0, self.s0 = time.monotonic(), _proc_cpu(), _stat()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self.t0
        p1, s1 = _proc_cpu(), _stat()
        cores: dict[str, float] = {}
        for pid, (_, _, c1) in p1.items():
            c0 = self.p0.get(pid, (None, None, 0.0))[2]
            r = _role(pid, p1, os.getpid())
            cores[r] = cores.get(r, 0.0) + max(0.0, c1 - c0) / wall
        busy = 1.0 - (s1[1] - self.s0[1]) / max(1e-9, s1[0] - self.s0[0])
        self.result = {"cores": {k: round(v, 2) for k, v in sorted(cores.items()) if v >= 0.01},
                       "machine_busy": round(busy, 3)}


def _stat() -> tuple[float, float]:
    """(total, idle + iowait) jiffies of all CPUs."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return float(sum(f)), float(f[3] + f[4])


# --------------------------------------------------------------------------- where a request's time goes


STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def triton_stats(urls: list[str]) -> dict[str, dict[str, float]]:
    """Per model, summed over the servers: Triton's cumulative counters (/v2/models/stats)."""
    import httpx

    out: dict[str, dict[str, float]] = {}
    for u in urls:
        try:
            doc = httpx.get(f"http://{u}/v2/models/stats", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            continue
        for m in doc.get("model_stats", []):
            d = out.setdefault(m["name"], {})
            st = m.get("inference_stats", {})
            for k in ("success",) + STAGES:
                d[k + "_n"] = d.get(k + "_n", 0) + int(st.get(k, {}).get("count", 0))
                d[k + "_ns"] = d.get(k + "_ns", 0) + int(st.get(k, {}).get("ns", 0))
            d["inferences"] = d.get("inferences", 0) + int(m.get("inference_count", 0))
            d["executions"] = d.get("executions", 0) + int(m.get("execution_count", 0))
    return out


def stage_ms(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model over a point: mean ms per request in Triton's queue and in each compute stage
    (compute_infer is the whole batch's run, charged to each of its requests), and the mean batch."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        d = {k: a.get(k, 0) - b.get(k, 0) for k in a}
        if d.get("success_n", 0) <= 0:
            continue
        r = {s: round(d[s + "_ns"] / d[s + "_n"] / 1e6, 2) for s in STAGES if d[s + "_n"] > 0}
        r["batch"] = round(d["inferences"] / d["executions"], 1) if d["executions"] else 0.0
        out[name] = r
    return out


def router_counts(metrics_text: str) -> dict[str, tuple[float, float]]:
    """Per model, the router's (requests received, answered within the SLO) from its /metrics text."""
    from controlplane.live import router_arrivals, router_counter

    met = router_counter(metrics_text, "router_slo_met")
    return {m: (r, met.get(m, 0.0)) for m, r in router_arrivals(metrics_text).items()}


def router_attainment(before: dict, after: dict) -> dict[str, float]:
    """Per model over a point: the share of the requests the router received that it answered within the
    SLO, timed from arrival at the router to its answer. Beside the client's attainment it says where the
    misses are: inside (router, gpu-lets, GPU) or outside (client, the hop to the router)."""
    out = {}
    for m, (r1, m1) in after.items():
        r0, m0 = before.get(m, (0.0, 0.0))
        if r1 - r0 > 0:
            out[m] = round((m1 - m0) / (r1 - r0), 4)
    return out


# --------------------------------------------------------------------------- measuring


def measure(system, dep: Deployment, scale: float, duration: float, direct: bool = False, seed: int = 1) -> dict:
    """One point: Poisson load at `scale` x the mix's rates; per target (model or app) attainment and what the
    client sent, and Triton's stage times per model (an app's: per step, under its ``steps``)."""
    from controlplane import loadgen as lg

    tg = targets(dep)
    slo = {t.name: t.slo_ms for t in tg}
    ends = system.urls(direct)
    results: list = [None] * len(ends)

    def one(i: int, url: str, frac: dict[str, float]) -> None:
        rates = {t.name: t.rate * scale * frac[t.name] for t in tg if frac.get(t.name)}
        try:
            results[i] = lg.run(url, rates, duration, protocol=PROTOCOL, slo_ms=slo, seed=seed + 97 * i)
        except Exception as e:  # noqa: BLE001 - raised below, in the caller's thread
            results[i] = e

    threads = [threading.Thread(target=one, args=(i, u, f)) for i, (u, f) in enumerate(ends)]
    servers = system.servers()
    at_router = None if direct else getattr(system, "router_metrics", None)
    r0 = router_counts(at_router()) if at_router else {}
    t0 = triton_stats(servers)
    with CpuMeter() as cpu:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for r in results:
        if isinstance(r, Exception):
            raise r
    models = merge_results(results)
    ok = all(d["attainment"] >= ATTAIN and not d["behind"] for d in models.values())
    stages = stage_ms(t0, triton_stats(servers))
    inside = router_attainment(r0, router_counts(at_router())) if at_router else {}
    steps = {a.name: [st.model for st in a.steps] for a in dep.apps}
    for t in tg:
        if t.name not in models:
            continue
        if t.app:
            models[t.name]["app"] = True
            models[t.name]["steps"] = {m: stages.get(m, {}) for m in steps[t.name]}
        elif t.name in stages:
            models[t.name]["triton_ms"] = stages[t.name]
        if t.name in inside:
            models[t.name]["router_attainment"] = inside[t.name]
    return {"scale": round(scale, 4), "pass": ok, "models": models, "cpu": cpu.result}


def merge_results(results: list) -> dict[str, dict]:
    """Per target over the endpoints it was sent to: counts summed, attainment weighted by requests sent,
    the worst p99, behind when any client was."""
    models: dict[str, dict] = {}
    for res in results:
        for name, r in res.models.items():
            d = models.setdefault(name, {"offered": 0.0, "sent_rate": 0.0, "sent": 0, "ok": 0, "dropped": 0,
                                         "errors": 0, "met": 0.0, "p99_ms": 0.0, "behind": False, "errs": []})
            d["offered"] += r.rate
            d["sent_rate"] += r.sent_rate
            d["sent"] += r.sent
            d["ok"] += r.ok
            d["dropped"] += r.dropped
            d["errors"] += r.errors
            d["met"] += (r.slo_attainment or 0.0) * r.sent
            d["p99_ms"] = max(d["p99_ms"], r.p99_ms or 0.0)
            d["behind"] = d["behind"] or r.behind
            d["errs"] += r.error_samples[:2]
    for d in models.values():
        d["attainment"] = d.pop("met") / d["sent"] if d["sent"] else 0.0
    return models


def point_line(p: dict) -> str:
    """One point for the log: per target its attainment, p99 and Triton's queue / run ms and mean batch
    (an app's per step model)."""
    def stage(name: str, st: dict) -> str:
        return (f"{name} q {st.get('queue', 0):.1f} run {st.get('compute_infer', 0):.1f} "
                f"b {st.get('batch', 0):g}")

    parts = []
    for n, d in p["models"].items():
        where = ("; ".join(stage(m, st) for m, st in d.get("steps", {}).items()) if d.get("app")
                 else stage("", d.get("triton_ms", {})).strip())
        at_router = f" router {100 * d['router_attainment']:.1f}%" if "router_attainment" in d else ""
        parts.append(f"{n} {100 * d['attainment']:.1f}%{'(behind)' if d['behind'] else ''}"
                     f"[p99 {d['p99_ms']:.0f}{at_router} {where}]")
    cores = " ".join(f"{k} {v:g}" for k, v in p["cpu"]["cores"].items())
    return (f"{'PASS' if p['pass'] else 'fail'}  {' '.join(parts)}  | cores: {cores}, "
            f"machine {100 * p['cpu']['machine_busy']:.0f}% busy")


#: the search's step from its first point to a bracket: the first point is a prediction or an earlier
#: run's result, within 20-30 % of the answer as a rule, so a small step brackets it in one or two points
#: and leaves the rest for bisection (with x1.5 steps and 3 points, run 15's brackets were 15-25 % wide)
STEP = 1.25


def search(probe, guess: float, points: int, below: bool = False) -> dict:
    """Max scale with >= 99 % attainment for every target: from `guess`, x:data:`STEP` steps to a bracket, then
    bisection. ``probe(scale)`` measures one point and returns it (its ``pass`` says whether it held).

    below: `guess` is a better system's max scale; when this one fails there, one more point (/STEP) says
    where it stands and the search stops (its max is below the other's; device time goes elsewhere)."""
    lo, hi, s = 0.0, math.inf, guess
    tried = []
    for i in range(points):
        if below and i == 2 and not tried[0]["pass"]:
            break
        p = probe(s)
        tried.append(p)
        if p["pass"]:
            lo = s
        else:
            hi = s
        s = s * STEP if hi == math.inf else (s / STEP if lo == 0 else (lo + hi) / 2)
    return {"max_scale": lo, "fail_scale": None if hi == math.inf else hi, "points": tried}


def prober(system, dep: Deployment, duration: float, record, direct: bool = False):
    """``search``'s probe for a running system: measure a point, record it, log it."""
    def probe(s: float) -> dict:
        p = measure(system, dep, s, duration, direct)
        record(p)
        log(f"  x{s:.3g}: {point_line(p)}")
        return p
    return probe


# --------------------------------------------------------------------------- driver


def plan_line(plan: Plan | None) -> str:
    """A plan in one line (``--plan-only``): each gpu-let's share and models (batch, planned req/s), each app's
    SLO split."""
    if plan is None:
        return "none fits"
    gl = "; ".join(f"{g.id} {g.share}%: " + ", ".join(f"{a.model} b{a.batch} {a.rate:.0f}/s" for a in g.models)
                   for g in plan.gpulets)
    apps = "; ".join(f"app {n} {a.rate:.0f}/s budgets " + ", ".join(f"{m} {v:.1f} ms" for m, v in a.budgets_ms.items())
                     for n, a in plan.apps.items())
    return gl + (f" | {apps}" if apps else "")


def load_mixes(names: list[str]) -> dict[str, Deployment]:
    """Each mix's deployment by its name (a mix's name, or a deployment file), before anything starts."""
    deps = [load_deployment(MIXES.get(mix) or mix) for mix in names]
    return {dep.name: dep for dep in deps}


def mix_doc(dep: Deployment) -> dict:
    """What the JSON says of a mix before any point: its targets' rates and SLOs (x1), and its apps' steps."""
    tg = targets(dep)
    d = {"rates": {t.name: t.rate for t in tg}, "slo_ms": {t.name: t.slo_ms for t in tg}, "systems": {}}
    if dep.apps:
        d["apps"] = {a.name: [st.model for st in a.steps] for a in dep.apps}
    return d


def make_system(sysname: str, dep: Deployment, store, plans: dict, pred: dict, done: dict, entry: dict, args,
                on_gpu: bool):
    """The system to measure, where its search starts, and the scale a better system reached (for ``below``);
    (None, note) when it cannot run. ``done``: the mix's systems measured so far; ``entry``: this one's JSON.
    Plain Triton holds the planner's models (:func:`served`: an app's steps), starting from triton1's max
    scale where known."""
    work = args.work / dep.name / sysname
    if sysname in ("gpulet", "temporal", "turns"):
        if plans[sysname] is None:
            return None, f"the {sysname} planner fits no scale of this mix on {GPUS} GPU(s)"
        guess = pred[sysname]
        if sysname == "temporal":   # its ratio to the gpu-let's max is what is asked: start there
            guess = done.get("gpulet", {}).get("max_scale") or guess
        planned, _ = as_planned(sysname, dep)
        return (Deployed(scaled(planned, pred[sysname]), plans[sysname], work), guess, None), None
    plain = served(dep, store)
    best = done.get("triton1", {}).get("max_scale")
    if sysname == "split":
        entry["groups"] = groups = even_split(plain, store, GPUS)
        return (PlainTriton(plain, 1, work, on_gpu, groups=groups), best or args.triton_guess, None), None
    if sysname == "mps-split":
        if len(plain.models) < 2:
            return None, "one model: nothing to split"
        groups = hand_split(plain)
        entry.update(groups=groups, shares=HAND_SHARES)
        return (PlainTriton(plain, 1, work, on_gpu, groups=groups, shares=HAND_SHARES), best or args.triton_guess,
                None), None
    return (PlainTriton(plain, int(sysname.removeprefix("triton")), work, on_gpu), best or args.triton_guess,
            best), None


def run(args) -> dict:
    from controlplane.profiles import ProfileStore

    store = ProfileStore.load(args.profile)
    gpu = gpu_name()
    on_gpu = gpu != "no GPU"
    mixes = load_mixes(args.mixes)
    why = missing_profiles(mixes, store, args.profile)
    if why:
        raise SystemExit(f"serving.py: {why}")
    out: Path = args.out
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
           "commit": _commit(),
           "command": " ".join(sys.argv), "protocol": PROTOCOL, "cpus": os.cpu_count(), "profile": str(args.profile), "profile_device": store.device,
           "duration_s": args.duration, "attainment": ATTAIN, "gpus": GPUS, "mixes": {}}
    jpath = out / "serving.json"
    if jpath.exists() and args.resume:
        prev = json.loads(jpath.read_text())
        doc["mixes"] = prev.get("mixes", {})
        doc["command"] = f"{prev['command']} && {doc['command']}"    # one run over several calls
        if prev.get("commit", doc["commit"]) != doc["commit"]:
            doc["commit"] = f"{prev['commit']} then {doc['commit']}"
    deadline = time.monotonic() + args.budget_s

    def save() -> None:
        if not args.plan_only:          # --plan-only writes nothing
            out.mkdir(parents=True, exist_ok=True)
            jpath.write_text(json.dumps(doc, indent=1))

    for mix, dep in mixes.items():
        mdoc = doc["mixes"].setdefault(mix, mix_doc(dep))
        pred = {}
        plans = {}
        for algo in ("gpulet", "temporal", "turns"):
            planned, planner = as_planned(algo, dep)
            s, plan = planner_max(planned, store, planner)
            pred[algo], plans[algo] = s, plan
            log(f"{mix}: planner's max scale with {algo}: {s:.3g}")
        mdoc["predicted"] = pred
        if args.plan_only:
            for algo, plan in plans.items():
                log(f"{mix}: {algo} plan at x{pred[algo]:.3g}: {plan_line(plan)}")
            continue
        for sysname in args.systems:
            if sysname in mdoc["systems"] and args.resume:
                continue
            if sysname == "direct" and dep.apps:
                mdoc["systems"]["direct"] = {"points": [], "note": NO_DIRECT}
                continue
            if time.monotonic() > deadline:
                log(f"budget spent: {mix}/{sysname} not run")
                continue
            if sysname == "direct" or (sysname == "split" and GPUS == 1) or (sysname == "mps-split" and GPUS > 1):
                continue   # direct: measured with gpulet's servers, below; split: one GPU has nothing to split
            entry = mdoc["systems"][sysname] = {"points": []}
            made, note = make_system(sysname, dep, store, plans, pred, mdoc["systems"], entry, args, on_gpu)
            if made is None:
                entry["note"] = note
                save()
                continue
            system, guess, best = made
            if sysname in plans:
                entry["plan"] = json.loads(plans[sysname].model_dump_json())
            log(f"{mix}/{sysname}: starting")
            try:
                system.start()
                entry["up_s"] = round(system.up_s, 1)
                # warm-up, results discarded: the batch sizes the load will make (CUDA kernels, allocator)
                measure(system, dep, guess * 0.5, 3.0, seed=7)
                measure(system, dep, guess, 4.0, seed=8)
                mem = gpu_memory()      # after the warm-up: the batches the load makes are allocated
                by_port = {u.rsplit(":", 1)[-1]: name for name, u in system.server_names().items()}
                entry["gpu_memory_mib"] = {"gpus": mem["gpus"],
                                           "servers": {by_port.get(k, k): v for k, v in mem["servers"].items()}}
                entry.update(search(prober(system, dep, args.duration, entry["points"].append), guess, args.points,
                                    below=sysname in ("triton2", "triton4") and bool(best)))
                save()
                log(f"{mix}/{sysname}: max scale {entry['max_scale']:.3g}")
                if sysname == "gpulet" and "direct" in args.systems and not dep.apps:
                    d = mdoc["systems"]["direct"] = {"points": []}
                    d.update(search(prober(system, dep, args.duration, d["points"].append, direct=True),
                                    max(entry["max_scale"], guess * 0.5), args.points))
                    log(f"{mix}/direct: max scale {d['max_scale']:.3g}")
                    save()
                entry["router_drops"] = [ln for ln in system.router_metrics().splitlines()
                                         if ln.startswith("router_drops_total")]
            except Exception as e:  # noqa: BLE001 - record and go on with the next system
                entry["error"] = f"{type(e).__name__}: {e}"
                log(f"{mix}/{sysname}: ERROR {entry['error']}")
            finally:
                system.stop()
                save()
    save()
    return doc


def _commit() -> str:
    """The source tree's commit (with "+" when it has changes); $BENCH_COMMIT where the tree is a copy
    without .git (the GPU machine), else ""."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_name() -> str:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return p.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "no GPU"


def render(doc: dict) -> str:
    gpus = doc.get("gpus", 1)
    apps = " (an app: end to end)" if any(m.get("apps") for m in doc["mixes"].values()) else ""
    lines = [f"Run {doc['date']} on {gpus} x {doc['gpu']} ({doc.get('cpus', '?')} cores); `{doc['command']}`; clients over "
             f"{doc.get('protocol', 'grpc')}; plans from `{doc['profile']}` "
             f"({doc['profile_device']}); {doc['duration_s']:g} s per point, pass = every model{apps} >= "
             f"{100 * doc['attainment']:g} % within its SLO and the client on schedule.", ""]
    cols = [k for k in SYSTEMS if (k != "split" or gpus > 1) and (k != "mps-split" or gpus == 1)]
    hand = "mps-split" if gpus == 1 else "split"
    lines.append("| mix | predicted (gpu-let plan) | " + " | ".join(cols) +
                 f" | gpu-let / predicted | gpu-let / best tritonN | gpu-let / {hand} | gpu-let / temporal"
                 " | router / direct | gpu-let / turns |")
    lines.append("| --- " * (len(cols) + 8) + "|")
    for mix, m in doc["mixes"].items():
        ss = m["systems"]

        def mx(k: str) -> float | None:
            e = ss.get(k)
            return None if e is None or "max_scale" not in e else e["max_scale"]

        def cell(k: str) -> str:
            if k in ss and not ss[k].get("points") and "error" not in ss[k] and "note" not in ss[k]:
                return "not run"
            v = mx(k)
            if v is None:
                return "error" if k in ss and "error" in ss[k] else ("n/a" if k in ss else "—")
            return f"{v:.3g}" + (f"–{ss[k]['fail_scale']:.3g}" if ss[k].get("fail_scale") else "")

        def ratio(a: float | None, b: float | None) -> str:
            return "—" if not a or not b else f"{a / b:.2f}x"

        tritons = [v for v in map(mx, TRITONS) if v]
        pred = m.get("predicted", {}).get("gpulet", 0)
        lines.append(f"| {mix} | {pred:.3g} | " + " | ".join(cell(k) for k in cols) +
                     f" | {ratio(mx('gpulet'), pred)} | {ratio(mx('gpulet'), max(tritons) if tritons else None)}"
                     f" | {ratio(mx('gpulet'), mx(hand))} | {ratio(mx('gpulet'), mx('temporal'))}"
                     f" | {ratio(mx('gpulet'), mx('direct'))} | {ratio(mx('gpulet'), mx('turns'))} |")
    lines += [ln for mix, m in doc["mixes"].items() if m.get("apps") for ln in ["", app_note(mix, m)]]
    lines += ["", "Cells: highest passing scale – lowest failing scale tried (x the mix's rates in its deployment "
              "file). Per-point attainment, offered vs sent rates and plans are in the JSON beside this table."]
    return "\n".join(lines)


def app_note(mix: str, m: dict) -> str:
    """An app mix below the table: its apps, the end-to-end attainment of each at the gpu-let plan's rate
    (the search's first point is the planner's max scale, the rate the deployed plan was made for), and how
    the other systems chain the steps."""
    rates = m["rates"]
    pred = m.get("predicted", {}).get("gpulet") or 0.0
    first = next(iter(m["systems"].get("gpulet", {}).get("points", [])), None)
    at_plan = first is not None and pred and abs(first["scale"] - round(pred, 4)) < 1e-9
    out = []
    for app, steps in m["apps"].items():
        s = f"app `{app}` ({', '.join(steps)}; {rates[app]:g} req/s x scale, SLO {m['slo_ms'][app]:g} ms end to end)"
        if at_plan and app in first["models"]:
            d = first["models"][app]
            s += (f": through the gpu-let plan at its planned rate (x{pred:.3g}, {rates[app] * pred:.0f} req/s) "
                  f"{100 * d['attainment']:.2f} % within the SLO{' (client behind)' if d['behind'] else ''}")
        out.append(s)
    return (f"{mix}: " + "; ".join(out) + ". direct: n/a (without the router nothing chains the steps). Plain "
            "Triton: no ensemble; the apps' steps chained by the same router code, a `controlplane router` in "
            "front of the plain tritonserver(s).")


def write_docs(doc: dict) -> None:
    from benchlib import write_section

    gpus = doc.get("gpus", 1)
    where = "one GPU" if gpus == 1 else f"{gpus} GPUs of one host"
    write_section(*markers(gpus), render(doc), f"## Serving: max load at the SLOs on {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("serving-out"), help="where serving.json goes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpulet-serving"),
                    help="generated repositories, plans and logs (large: model copies)")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per point")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http", help="the clients' protocol")
    ap.add_argument("--router-workers", type=int, default=0, help="router processes (0: the default)")
    ap.add_argument("--points", type=int, default=4, help="tests per system")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs every system gets (plans, plain tritonservers)")
    ap.add_argument("--profile", type=Path, default=ROOT / "profiles" / "h200")
    ap.add_argument("--triton-guess", type=float, default=1.0)
    ap.add_argument("--budget-s", type=float, default=math.inf, help="start no system after this many seconds")
    ap.add_argument("--resume", action="store_true", help="keep systems already in OUT/serving.json")
    ap.add_argument("--render", type=Path, help="only write docs/benchmarks.md from this serving.json")
    ap.add_argument("--plan-only", action="store_true",
                    help="check the profile and print each mix's predicted max scales and plans; start nothing "
                         "(no GPU needed: try a new profile before spending device time)")
    args = ap.parse_args()
    global PROTOCOL, ROUTER_WORKERS, GPUS
    PROTOCOL, ROUTER_WORKERS, GPUS = args.protocol, args.router_workers, args.gpus
    if args.render:
        doc = json.loads(args.render.read_text())
    else:
        args.mixes = [m for m in args.mixes.split(",") if m]
        args.systems = [s for s in args.systems.split(",") if s]
        doc = run(args)
    print(render(doc))
    if args.render:
        write_docs(doc)


if __name__ == "__main__":
    main()
