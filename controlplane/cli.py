"""`controlplane`: plan, launch and serve many models on few GPUs.

Commands: up, apply, down, status, plan, repo build|list, profile, loadgen, compose, render, logs.
Every command that reads a deployment file exits with status 2 and a message
naming the file, the field and the problem when the file is invalid.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli_base import FileOpt, console, err, fail, read_deployment
from .spec import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
repo_app = typer.Typer(no_args_is_help=True, help="Model repositories: the zoo, or yours (`repository:` in a deployment).")
app.add_typer(repo_app, name="repo")

# --------------------------------------------------------------------------- up / down / status


@app.command()
def up(
    file: str = FileOpt,
    detach: bool = typer.Option(False, "--detach", "-d", help="run in the background; stop with `controlplane down`"),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="use this plan (JSON) instead of planning"),
) -> None:
    """Plan, launch one tritonserver per gpu-let, and serve every model behind one KServe v2 endpoint."""
    dep = read_deployment(file)
    from .deploy import Controller, hold_run_lock, pid_alive, read_state
    from .paths import RunPaths

    paths = RunPaths.for_deployment(dep)
    state = read_state(paths)
    if state and pid_alive(state.pid, state.started):
        fail(f"deployment {dep.name!r} is already up (pid {state.pid}); run `controlplane down -f {file}` first", 1)
    lock = hold_run_lock(paths)   # held by this process until it exits (the detached child takes its own)
    if lock is None:
        fail(f"deployment {dep.name!r}: another `controlplane up` is starting or running it (it holds "
             f"{paths.lock}); nothing was changed", 1)
    if state is not None:        # left by a controller that was killed: stop what it left running first
        from .deploy import stop_deployment

        for what in stop_deployment(paths):
            console.print(f"cleaned up after a previous run: stopped {what}")
    if detach:
        lock.close()
        _detach(file, paths, plan_file)
        return

    from .repository import RepositoryError
    from .runtime.base import StartError
    from .spec import load_plan

    stop = threading.Event()

    def interrupt(signum, _frame):  # while starting: abandon the start
        raise KeyboardInterrupt

    def on_signal(signum, _frame):  # once serving: leave the supervision loop and tear down
        stop.set()

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    ctl = Controller(dep, log=lambda m: console.print(m, highlight=False))
    try:
        plan = ctl.prepare(load_plan(plan_file) if plan_file else None)
        _print_plan(plan)
        ctl.start()
    except (StartError, RepositoryError, SpecError, ValueError, RuntimeError, OSError) as e:
        ctl.shutdown()
        fail(str(e), 1)
    except KeyboardInterrupt:
        ctl.shutdown()
        err.print("interrupted while starting; everything started was stopped")
        raise typer.Exit(130)
    except BaseException:
        ctl.shutdown()
        raise
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    r = ctl.router
    host, hport, gport = dep.router.host, getattr(r, "http_port", dep.router.http_port), getattr(r, "grpc_port", dep.router.grpc_port)
    m = dep.models[0].name
    example = ctl.write_example_request(m)
    console.print(f"[bold green]ready[/]: KServe v2 HTTP at http://{host}:{hport}, gRPC at {host}:{gport}")
    console.print(f"  metadata: curl -s http://{host}:{hport}/v2/models/{m}", highlight=False, soft_wrap=True)
    console.print(f"  infer:    curl -s -X POST http://{host}:{hport}/v2/models/{m}/infer "
                  f"-H 'Content-Type: application/json' -d @{example}", highlight=False, soft_wrap=True)
    console.print(f"  stop: Ctrl-C, or `controlplane down -f {file}`", highlight=False)
    try:
        ctl.serve(stop)
    finally:
        console.print("stopping ...")
        ctl.shutdown()
        console.print("stopped")


def _detach(file: str, paths, plan_file: Optional[Path]) -> None:
    from .deploy import pid_alive, read_state

    paths.root.mkdir(parents=True, exist_ok=True)
    log = paths.root / "controlplane.log"
    cmd = [sys.executable, "-m", "controlplane", "up", "-f", file] + (["--plan", str(plan_file)] if plan_file else [])
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    while True:
        time.sleep(0.5)
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            fail(f"controlplane up exited with code {proc.returncode}; {log}:\n{tail}", 1)
        state = read_state(paths)
        if state and state.state == "ready" and state.pid == proc.pid and pid_alive(proc.pid):
            break
    console.print(log.read_text(errors="replace").rstrip(), highlight=False)
    console.print(f"running in the background (pid {proc.pid}); log: {log}")


@app.command()
def down(file: str = FileOpt) -> None:
    """Stop a deployment: its router, every gpu-let's server, and the MPS daemon it started."""
    dep = read_deployment(file)
    from .deploy import stop_deployment
    from .paths import RunPaths

    stopped = stop_deployment(RunPaths.for_deployment(dep))
    if not stopped:
        console.print(f"deployment {dep.name!r} is not running")
        return
    for s in stopped:
        console.print(f"stopped {s}")


@app.command()
def apply(file: str = FileOpt,
          timeout: float = typer.Option(600.0, help="seconds to wait for the running deployment to take it")) -> None:
    """Change a running deployment to this file (models, rates, SLOs): re-plan, start what the new plan
    adds, move traffic, stop what it drops; requests keep being answered. Exit 1 if it was refused
    (the previous plan keeps serving)."""
    from .deploy import pid_alive, read_state
    from .paths import RunPaths

    dep = read_deployment(file)
    paths = RunPaths.for_deployment(dep)
    state = read_state(paths)
    if not state or not pid_alive(state.pid, state.started) or state.state != "ready":
        console.print(f"deployment {dep.name!r} is not running (start it with `controlplane up -f {file}`)")
        raise typer.Exit(3)
    if paths.apply_request.exists() or paths.apply_request.with_name(paths.apply_request.name + ".taken").exists():
        fail(f"another apply of {dep.name!r} is in progress; try again when it is done", code=1)
    paths.apply_result.unlink(missing_ok=True)
    tmp = paths.apply_request.with_suffix(".tmp")
    tmp.write_text(dep.model_dump_json())        # validated and complete (YAML is a superset of JSON)
    tmp.replace(paths.apply_request)
    deadline = time.monotonic() + timeout
    with console.status(f"applying {file} to {dep.name!r} ..."):
        while not paths.apply_result.exists():
            if time.monotonic() > deadline or not pid_alive(state.pid, state.started):
                paths.apply_request.unlink(missing_ok=True)
                fail(f"deployment {dep.name!r} did not take the change within {timeout:g} s", code=1)
            time.sleep(0.2)
    result = json.loads(paths.apply_result.read_text())
    if not result.get("ok"):
        fail(f"apply refused, the previous plan keeps serving: {result.get('error')}", code=1)
    from .spec import Plan

    _print_plan(Plan.model_validate(result["plan"]))


@app.command()
def status(file: str = FileOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Gpu-lets of a running deployment: share, models, ports, health."""
    from .deploy import pid_alive, read_state
    from .paths import RunPaths
    from .runtime.base import server_ready as ready
    from .spec import GpuletState

    dep = read_deployment(file)
    state = read_state(RunPaths.for_deployment(dep))
    if not state or not pid_alive(state.pid, state.started):
        console.print(f"deployment {dep.name!r} is not running")
        raise typer.Exit(3)

    router_addr = f"{state.router.host}:{state.router.http_port}"
    rows = []
    for g in state.plan.gpulets:
        info = state.gpulets.get(g.id, GpuletState())
        rows.append({
            "gpulet": g.id, "gpu": g.gpu, "share": g.share,
            "models": ", ".join(f"{a.model}(b{a.batch})" for a in g.models),
            "http": info.http, "grpc": info.grpc, "pid": info.pid,
            "restarts": info.restarts, "memory_limit_mb": info.memory_limit_mb, "ready": ready(info.http),
            **({"node": info.node, "node_gpu": info.node_gpu} if state.runtime == "ray" else {}),
        })
    if as_json:
        console.print_json(json.dumps({"deployment": dep.name, "state": state.state, "router": router_addr,
                                       "router_ready": ready(router_addr), "gpulets": rows,
                                       "rates": {n: s.rate for n, s in state.plan.models.items()},
                                       "replans": state.replans, "last_replan": state.last_replan,
                                       "changing": state.changing}))
        return
    console.print(f"deployment [bold]{dep.name}[/] ({state.state}, {state.runtime} runtime, "
                  f"device {state.device}); router http://{router_addr} "
                  f"{'ready' if ready(router_addr) else 'NOT ready'}")
    on_ray = state.runtime == "ray"       # a node of the cluster (and its GPU) instead of a local pid
    t = Table("gpu-let", "GPU", *(("node", "node GPU") if on_ray else ()), "share %", "models (batch)", "HTTP",
              "gRPC", *(() if on_ray else ("pid",)), "restarts", "memory limit", "health")
    for row in rows:
        where = ((str(row["node"]), "-" if row["node_gpu"] is None else str(row["node_gpu"])) if on_ray
                 else ())
        t.add_row(row["gpulet"], str(row["gpu"]), *where, str(row["share"]), row["models"], str(row["http"]),
                  str(row["grpc"]), *(() if on_ray else (str(row["pid"]),)), str(row["restarts"]),
                  "-" if row["memory_limit_mb"] is None else f"{row['memory_limit_mb']} MB / process",
                  "[green]ready[/]" if row["ready"] else "[red]not ready[/]")
    console.print(t)
    if state.replans:
        console.print(f"re-planned {state.replans} time(s); last: {state.last_replan}")
    if state.changing:      # the table is the target plan; what still runs of the old one, until it is stopped:
        old = sorted(set(state.gpulets) - {g.id for g in state.plan.gpulets})
        console.print(f"changing: {state.changing}" + (f"; still serving from the previous plan: {', '.join(old)}"
                                                        if old else ""), highlight=False)


@app.command()
def logs(gpulet: str, file: str = FileOpt, tail: int = typer.Option(100, "--tail", "-n")) -> None:
    """The log of one gpu-let's tritonserver."""
    from .deploy import read_state
    from .paths import RunPaths

    dep = read_deployment(file)
    state = read_state(RunPaths.for_deployment(dep))
    info = state.gpulets.get(gpulet) if state else None
    if info and info.container:
        from .runtime.docker import container_logs

        console.print(container_logs(info.container, tail), highlight=False, markup=False)
        return
    path = Path(info.log) if info and info.log else RunPaths.for_deployment(dep).logs / f"{gpulet}.log"
    if not path.exists():
        where = f" (on node {info.node})" if info and info.node else ""
        fail(f"no log for gpu-let {gpulet!r} at {path}{where}", 1)
    console.print("\n".join(path.read_text(errors="replace").splitlines()[-tail:]), highlight=False, markup=False)


@app.command("router")
def router_cmd(
    file: str = FileOpt,
    plan_file: Path = typer.Option(..., "--plan", help="plan (JSON)"),
    endpoints: Path = typer.Option(..., "--endpoints", help="JSON: gpu-let id -> {host, http_port, grpc_port, metrics_port}"),
    host: Optional[str] = typer.Option(None, "--host", help="bind address (default: the deployment's)"),
) -> None:
    """Run only the router, in front of gpu-lets started elsewhere (e.g. by docker compose)."""
    from .repository import repository_for
    from .router import RouterServer, RoutingTable
    from .runtime.base import Endpoint
    from .spec import load_plan

    dep = read_deployment(file)
    try:
        plan = load_plan(plan_file)
        eps = {k: Endpoint(**v) for k, v in json.loads(endpoints.read_text()).items()}
    except (SpecError, OSError, ValueError, TypeError) as e:
        fail(f"{e}")
    spec = dep.router.model_copy(update={"host": host}) if host else dep.router
    server = RouterServer(RoutingTable.from_plan(plan, eps, repository_for(dep), dep), spec)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start_in_thread()
    console.print(f"router: KServe v2 HTTP at http://{spec.host}:{server.http_port}, gRPC at {spec.host}:{server.grpc_port}")
    stop.wait()
    server.stop()


# --------------------------------------------------------------------------- plan


def oversubscription(plan) -> list[str]:
    """One line per GPU whose models run at once with caps adding up to more than its SMs: each model
    is an MPS client of its own capped at its gpu-let's share, so a GPU of five 20 % gpu-lets holding
    nine models may have 180 % of its SMs asked for at once (the interference model prices that)."""
    if plan.colocation != "concurrent":
        return []
    out = []
    for gpu in sorted({g.gpu for g in plan.gpulets}):
        lets = [g for g in plan.gpulets if g.gpu == gpu]
        clients = sum(len(g.models) for g in lets)
        caps = sum(g.share * len(g.models) for g in lets)
        if caps > 100:
            out.append(f"GPU {gpu}: {clients} models run at once as MPS clients whose caps add up to {caps} % "
                       f"of its SMs")
    return out


def _print_plan(plan) -> None:
    t = Table("gpu-let", "GPU", "share %", "duty cycle ms", "model", "batch", "planned for req/s", "throughput req/s",
              "latency ms", title=f"plan: {plan.gpus} GPU(s), {len(plan.gpulets)} gpu-let(s), algorithm {plan.algorithm}, "
                    + ("a gpu-let's models run at once" if plan.colocation == "concurrent"
                       else "a gpu-let's models take turns"))
    for g in plan.gpulets:
        for i, a in enumerate(g.models):
            t.add_row(g.id if i == 0 else "", str(g.gpu) if i == 0 else "", str(g.share) if i == 0 else "",
                      f"{a.duty_cycle_ms:.1f}" if a.duty_cycle_ms else f"{g.duty_cycle_ms:.1f}" if i == 0 else "",
                      a.model, str(a.batch), f"{a.rate:.1f}",
                      f"{a.throughput:.1f}", f"{a.latency_ms:.2f}")
    console.print(t)
    for line in oversubscription(plan):
        console.print(line)
    if any(m.throughput for m in plan.models.values()):
        s = Table("model", "planned for req/s", "planned throughput", "worst latency ms", "SLO ms", "meets SLO",
                  caption="planned for: the deployment's rate padded for Poisson bursts within half the SLO "
                          "(scheduler.burst_pct); worst latency includes scheduler.overhead_ms")
        for name, m in plan.models.items():
            s.add_row(name, f"{m.rate:.1f}", f"{m.throughput:.1f}", f"{m.worst_latency_ms:.1f}", f"{m.slo_ms:g}",
                      "yes" if m.worst_latency_ms <= m.slo_ms and m.throughput >= m.rate * (1 - 1e-9) else "[red]no[/]")
        console.print(s)
    if plan.apps:
        a = Table("app", "req/s", "SLO ms", "step: budget ms (planned worst latency ms)", "critical path",
                  "steps within budget", title="apps: each SLO split over its steps")
        for name, app in plan.apps.items():
            worst = {m: plan.models[m].worst_latency_ms if m in plan.models else None for m in app.budgets_ms}
            steps = ", ".join(f"{m}: {b:.1f}" + (f" ({worst[m]:.1f})" if worst[m] else "")
                              for m, b in app.budgets_ms.items())
            within = all(w is None or w == 0 or w <= app.budgets_ms[m] + 1e-6 for m, w in worst.items())
            a.add_row(name, f"{app.rate:g}", f"{app.slo_ms:g}", steps, " → ".join(app.critical_path),
                      "yes" if within else "[red]no[/]")
        console.print(a)


@app.command("plan")
def plan_cmd(
    file: str = FileOpt,
    algorithm: Optional[str] = typer.Option(None, "--algorithm", "-a", help="gpulet, temporal, greedy, ideal, trivial"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="at most this many GPUs"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    png: Optional[Path] = typer.Option(None, "--png", help="draw the plan into this PNG file"),
    profile: Optional[Path] = typer.Option(
        None, "--profile", help="plan with this profile (a device folder such as profiles/h100, or a latency.csv) "
        "instead of the one of this machine's devices"),
    profile_missing: bool = typer.Option(
        False, "--profile-missing", help="measure the models this machine's profile lacks first (minutes per model); "
        "without it, plan names them and stops"),
) -> None:
    """Plan a deployment without launching anything."""
    dep = read_deployment(file)
    from .planning import make_plan

    try:
        p = make_plan(dep, profile=profile, gpus=gpus, algorithm=algorithm, profile_missing=profile_missing,
                      log=lambda m: err.print(m))
    except ValueError as e:
        fail(str(e), 1)
    if png:
        from .plot import plot

        plot(p, png)
        err.print(f"plan drawn to {png}")
    if as_json:
        print(p.model_dump_json(indent=2))
    else:
        _print_plan(p)


# --------------------------------------------------------------------------- repo


@repo_app.command("list")
def repo_list(path: Optional[Path] = typer.Option(None, "--repository", help="source repository")) -> None:
    """Models of the source repository: where they come from, their versions (* served), inputs, outputs,
    default SLO, build state and the devices whose profiles have them (shipped, or measured here)."""
    from .paths import SHIPPED_PROFILES, measured_profiles
    from .profiles import ProfileError, read_csv
    from .repository import RepositoryError, SourceRepository

    try:
        repo = SourceRepository(path)
    except RepositoryError as e:
        fail(str(e))
    profiled: dict[str, set[str]] = {}
    for csv in sorted([*SHIPPED_PROFILES.glob("*/latency.csv"), *measured_profiles().glob("*/latency.csv")]):
        try:
            for row in read_csv(csv):
                profiled.setdefault(row.model, set()).add(csv.parent.name)
        except (ProfileError, OSError):
            continue
    t = Table("model", "source", "versions", "inputs", "outputs", "max batch", "SLO ms", "built", "profiled on")
    for info in repo.models.values():
        io = lambda ts: ", ".join(f"{x.name} {x.datatype}{list(x.shape)}" for x in ts)  # noqa: E731
        src = info.config.parameters["source"].string_value.split(":")[0] if "source" in info.config.parameters \
            else ("zoo" if not info.versions() else info.artifact().suffix.lstrip("."))
        versions = ", ".join(v + ("*" if v == info.version else "") for v in info.versions()) or "-"
        t.add_row(info.name, src, versions, io(info.inputs), io(info.outputs), str(info.max_batch_size),
                  f"{info.slo_ms:g}" if info.slo_ms else "-", "yes" if info.is_built() else "no",
                  ", ".join(sorted(profiled.get(info.source or info.name, ()))) or "-")
    console.print(t)


@repo_app.command("build")
def repo_build(
    names: Optional[list[str]] = typer.Argument(None, help="models to build (default: all)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if built"),
    path: Optional[Path] = typer.Option(None, "--repository", help="source repository"),
) -> None:
    """Build zoo models (TorchScript, seeded weights) into the cache."""
    from .repository import RepositoryError, SourceRepository, build_artifacts

    repo = SourceRepository(path)
    try:
        for n in names or []:
            repo[n]
        built = build_artifacts(repo, names or None, force=force, progress=lambda n: console.print(f"building {n} ..."))
    except RepositoryError as e:
        fail(str(e))
    for p in built:
        console.print(f"{p.parent.name}: {p}")


def _user_repository(path: Optional[Path], file: Optional[str]) -> Path:
    """The repository ``repo add`` / ``rm`` change: --repository, else the deployment's ``repository:``."""
    if path is not None:
        return path
    if file is None:
        fail("name the repository to change: --repository DIR, or -f FILE whose deployment has `repository:`")
    from .spec import load_deployment

    try:
        dep = load_deployment(file)
    except SpecError as e:
        fail(str(e))
    if not dep.repository:
        fail(f"{file}: the deployment serves the zoo (no `repository:`); add `repository: DIR` or use --repository")
    return Path(dep.repository)


@repo_app.command("add")
def repo_add(
    name: str = typer.Argument(..., help="the model's name in the repository (and in requests)"),
    torchscript: Optional[Path] = typer.Option(None, "--torchscript", help="TorchScript file (torch.jit.save), batch first"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="ONNX file, batch first (served through onnxruntime)"),
    python: Optional[Path] = typer.Option(None, "--python", help="a Triton python model: a folder with model.py "
                                          "(TritonPythonModel) and what it imports, or a model folder in Triton's "
                                          "layout; checked in a real tritonserver"),
    inputs: Optional[list[str]] = typer.Option(None, "--input", help="TorchScript only: NAME:DTYPE:SHAPE without the "
                                               "batch, e.g. INPUT:FP32:3x224x224 (DTYPE: FP32, FP16, INT64, INT32); "
                                               "one per input, in order"),
    outputs: Optional[list[str]] = typer.Option(None, "--output", help="TorchScript: output names, in order "
                                                "(default: OUTPUT, or OUTPUT0, OUTPUT1, ...; dtypes and shapes come "
                                                "from running one batch); python: NAME:DTYPE:SHAPE"),
    max_batch: int = typer.Option(32, "--max-batch", help="largest batch a client may send and the batcher may form"),
    slo_ms: Optional[float] = typer.Option(None, "--slo-ms", help="default SLO (a deployment's slo_ms wins)"),
    memory_mb: Optional[float] = typer.Option(None, "--memory-mb", help="memory one instance of the model holds "
                                              "(GPU memory on a GPU); its gpu-let's processes are limited to twice "
                                              "this plus a base where no profile says (runtime.memory_limits)"),
    replace: bool = typer.Option(False, "--replace", help="replace a model of that name (with --version: that version)"),
    version: Optional[str] = typer.Option(None, "--version", help="add as this version folder beside the model's "
                                          "others (same inputs and outputs); served: the latest, or the config's "
                                          "version_policy; `load_model` moves a running deployment to it"),
    path: Optional[Path] = typer.Option(None, "--repository", help="the repository to add to"),
    file: Optional[str] = typer.Option(None, "-f", "--file", help="deployment file whose `repository:` to add to"),
) -> None:
    """Add a TorchScript, ONNX or Triton python model to a repository, after loading it and running one batch."""
    from .model_add import add_model, add_python_model, parse_tensor
    from .repository import RepositoryError

    if sum(x is not None for x in (torchscript, onnx, python)) != 1:
        fail("give the model: --torchscript FILE, --onnx FILE or --python DIR (one of them)")
    root = _user_repository(path, file)
    try:
        if python is not None:
            added = add_python_model(root, name, python, [parse_tensor(i) for i in inputs or []],
                                     [parse_tensor(o, "output") for o in outputs or []], max_batch=max_batch,
                                     slo_ms=slo_ms, replace=replace, version=version, memory_mb=memory_mb)
        else:
            added = add_model(root, name, torchscript or onnx, "torchscript" if torchscript else "onnx",
                              [parse_tensor(i) for i in inputs or []], outputs or None,
                              max_batch=max_batch, slo_ms=slo_ms, replace=replace, version=version,
                              memory_mb=memory_mb)
    except RepositoryError as e:
        fail(str(e))
    io = lambda ts: ", ".join(f"{x.name} {x.datatype}{list(x.shape)}" for x in ts)  # noqa: E731
    console.print(f"added {name} to {root}: inputs {io(added.inputs)}; outputs {io(added.outputs)}")
    console.print(f"serve it: list it under `models:` of a deployment with `repository: {root}`, then `controlplane up -f FILE`")


@repo_app.command("show")
def repo_show(
    name: str = typer.Argument(...),
    path: Optional[Path] = typer.Option(None, "--repository", help="source repository (default: the zoo)"),
) -> None:
    """One model: where it is, its artifact, inputs, outputs, max batch, SLO and config."""
    from google.protobuf import text_format

    from .repository import RepositoryError, SourceRepository

    try:
        info = SourceRepository(path)[name]
    except RepositoryError as e:
        fail(str(e))
    console.print(f"model {info.name}: {info.path}")
    console.print(f"artifact: {info.artifact()} ({'present' if info.is_built() else 'not built: controlplane repo build'})")
    for kind, ts in (("input", info.inputs), ("output", info.outputs)):
        for t in ts:
            console.print(f"{kind} {t.name}: {t.datatype} {list(t.shape)} (batch first, up to {info.max_batch_size})")
    console.print(f"SLO: {f'{info.slo_ms:g} ms' if info.slo_ms else 'none'}")
    console.print(text_format.MessageToString(info.config), highlight=False, markup=False)


@repo_app.command("rm")
def repo_rm(
    name: str = typer.Argument(...),
    version: Optional[str] = typer.Option(None, "--version", help="remove only this version folder"),
    path: Optional[Path] = typer.Option(None, "--repository", help="the repository to remove from"),
    file: Optional[str] = typer.Option(None, "-f", "--file", help="deployment file whose `repository:` to change"),
) -> None:
    """Remove a model from a repository (a deployment serving it keeps running until `down` or `apply`)."""
    from .model_add import remove
    from .repository import RepositoryError

    root = _user_repository(path, file)
    try:
        gone = remove(root, name, version)
    except RepositoryError as e:
        fail(str(e))
    console.print(f"removed {name} ({gone})")


# --------------------------------------------------------------------------- optional parts


def _mount() -> None:
    """Commands that live in their own modules. A broken import fails here, loudly."""
    from profiler.cli import profile

    from .compose import compose_command
    from .k8s import render_command
    from .loadgen_cli import loadgen

    app.command("profile")(profile)
    app.command("loadgen")(loadgen)
    app.command("compose")(compose_command)
    app.command("render")(render_command)


_mount()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
