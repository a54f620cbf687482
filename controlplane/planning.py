"""Planning: a deployment, on the devices it resolves to (or against a named profile), to a Plan.

The one door to the scheduler for ``up``, ``plan``, ``compose`` and the benchmarks, so that the
same file on the same host gets the same plan from each (the same algorithm, GPU cap and batch
limits). The scheduler proper (:mod:`controlplane.scheduler`) stays pure — workload and profiles
in, plan out; this module does the I/O around it: it finds the profile, and measures what is
missing only when asked to.

Where profiles live (:func:`profile_dirs`; :mod:`controlplane.paths`):

* measured on this machine: ``<cache>/profiles/<device>/`` — ``controlplane profile`` and ``up``
  write there;
* shipped with the project: ``profiles/<device>/`` in the source tree, read only;
* a deployment's ``profiles:`` folder replaces both, for reading and for writing.

Rows measured here win over shipped ones for the same (model, share, batch). Beside them, in the
folder written to, ``calibration.json``: the factors a running deployment's recalibration measured
(serving time over profile, per model), which later plans on that device start from
(:func:`saved_calibration`) until the profile they were measured against changes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .devices import DeviceSet
from .profiles import ProfileStore, device_slug
from .paths import SHIPPED_PROFILES, measured_profiles, write_json
from .repository import SourceRepository, repository_for
from .spec import Assignment, Deployment, GpuLet, ModelSummary, Plan, gpulet_id


class MissingProfile(ValueError):
    """The device's profile lacks models the deployment plans; the message says how to make it."""

    def __init__(self, models: list[str], device: str, on_gpu: bool, where: Path) -> None:
        self.models = models
        super().__init__(
            f"no {device} profile for model(s) {', '.join(models)} (looked in {where}); measure them with "
            f"`controlplane profile --device {'gpu' if on_gpu else 'cpu'} --models {','.join(models)}` or "
            f"`controlplane plan --profile-missing`, or plan with `scheduler: {{algorithm: trivial}}`")


def profile_dirs(dep: Deployment, device: str) -> list[Path]:
    """The folders a device's profile is read from, the one that wins last."""
    slug = device_slug(device)
    if dep.profiles:
        return [Path(dep.profiles) / slug]
    return [SHIPPED_PROFILES / slug, measured_profiles(dep) / slug]


CALIBRATION_FILE = "calibration.json"


def _profile_stamp(dep: Deployment, device: str) -> list[list]:
    """What the device's profile is, for a saved calibration to know it still applies: each
    latency.csv read, with its size and modification time."""
    out = []
    for d in profile_dirs(dep, device):
        f = d / "latency.csv"
        if f.is_file():
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def calibration_file(dep: Deployment, device: str) -> Path:
    """Where recalibration is saved: beside the profile, in the folder this deployment writes to."""
    return profile_dirs(dep, device)[-1] / CALIBRATION_FILE


def saved_calibration(dep: Deployment, device: str, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """The per-model factors saved by :func:`save_calibration` ({} when there are none, or when the
    profile has changed since: re-measured rows replace what the factors corrected)."""
    path = calibration_file(dep, device)
    try:
        doc = json.loads(path.read_text())
        factors = {str(m): float(f) for m, f in doc["factors"].items() if float(f) > 0}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if log:
            log(f"ignoring {path}: not a calibration file ({type(e).__name__}: {e})")
        return {}
    if doc.get("profile") != _profile_stamp(dep, device):
        if log:
            log(f"ignoring {path}: the profile has changed since it was measured")
        return {}
    return factors


def starting_calibration(dep: Deployment, device: str, log: Callable[[str], None]) -> dict[str, float]:
    """:func:`saved_calibration`, saying so when there is one (what a new plan on this machine starts from)."""
    factors = saved_calibration(dep, device, log)
    if factors:
        log(f"planning with the recalibration saved in {calibration_file(dep, device)}: "
            + ", ".join(f"{m} x{f:.3g}" for m, f in sorted(factors.items())))
    return factors


def save_calibration(dep: Deployment, device: str, factors: Mapping[str, float], reason: str) -> Path:
    """Save recalibration factors beside the device's profile, so the next plan starts from them."""
    path = calibration_file(dep, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": device, "factors": dict(sorted(factors.items())), "reason": reason,
           "deployment": dep.name, "saved": time.strftime("%Y-%m-%d %H:%M:%S"), "profile": _profile_stamp(dep, device)}
    write_json(path, doc, indent=1)
    return path


def alias_models(store: ProfileStore, dep: Deployment) -> ProfileStore:
    """Models served as copies (`base:`) plan with their base model's profile."""
    for m in dep.models:
        if m.base and m.base in store.models():
            store.alias(m.name, m.base)
    return store


def load_profiles(dep: Deployment, device: str) -> ProfileStore | None:
    """The device's profile from :func:`profile_dirs` (None when there is none), with aliases: the
    rows of every folder, later ones replacing earlier ones, and the last fitted interference model."""
    stores = [ProfileStore.load(d / "latency.csv", device=device)
              for d in profile_dirs(dep, device) if (d / "latency.csv").is_file()]
    if not stores:
        return None
    store = ProfileStore.from_rows([r for s in stores for r in s.rows], device=device)
    store.interference = next((s.interference for s in reversed(stores) if s.interference is not None), None)
    return alias_models(store, dep)


def measure(dep: Deployment, devices: DeviceSet, models: list[str]) -> None:
    """Profile models on these devices into :func:`~controlplane.paths.measured_profiles` (resumable, with a progress bar).

    On a GPU, shares only take effect under MPS: a daemon is started on a private pipe directory
    for the profiling run and stopped after it (``up`` starts its own later).
    """
    from profiler.ensure import ensure_profile

    kw = dict(profiles_root=measured_profiles(dep), shares=dep.scheduler.shares,
              batches=[b for b in (1, 2, 4, 8, 16, 32) if b <= dep.scheduler.max_batch])
    # absolute: the profiler's workers run elsewhere, and a relative `repository:` means this directory
    kw["repository"] = str(Path(dep.repository).absolute()) if dep.repository else None
    if not devices.on_gpu:
        ensure_profile(models, device="cpu", **kw)
        return
    import tempfile

    from .runtime.mps import Daemon

    tmp = Path(tempfile.mkdtemp(prefix="gpulet-prof-"))
    daemon = Daemon(tmp / "pipe", tmp / "log")
    daemon.start()
    try:
        ensure_profile(models, device="gpu", mps_pipe_dir=daemon.pipe_dir, gpu_index=devices.gpus[0].index, **kw)
    finally:
        daemon.stop()


def trivial_plan(deployment: Deployment, device: str = "cpu", max_batch: dict[str, int] | None = None) -> Plan:
    """Each model alone on a full-share gpu-let of its own (the baseline of one Triton per model)."""
    gpulets, models = [], {}
    for i, m in enumerate(deployment.models):
        batch = min(m.max_batch or deployment.scheduler.max_batch, (max_batch or {}).get(m.name) or 1024)
        gpulets.append(GpuLet(id=gpulet_id(device, i, 0), gpu=i, share=100, duty_cycle_ms=0.0,
                              models=[Assignment(model=m.name, batch=batch, rate=m.rate)]))
        models[m.name] = ModelSummary(rate=m.rate, slo_ms=m.slo_ms, throughput=0.0, worst_latency_ms=0.0)
    return Plan(deployment=deployment.name, device=device, algorithm="trivial", gpus=len(gpulets),
                gpulets=gpulets, models=models)


def make_plan(dep: Deployment, devices: DeviceSet | None = None, *, profile: str | Path | ProfileStore | None = None,
              algorithm: str | None = None, gpus: int | None = None, repo: SourceRepository | None = None,
              profile_missing: bool = False, log: Callable[[str], None] = print,
              calibration: Mapping[str, float] | None = None, previous: Plan | None = None) -> Plan:
    """Plan a deployment (:func:`plan_models`); its apps first: checked against the repository, each
    app's SLO split over its steps by their profiled latencies (batch 1, the largest share), and the
    steps' models planned at the app's rate with their budgets as SLOs (``plan.apps`` says the split)."""
    from .repository import with_repository_slos

    dep = with_repository_slos(dep, repo)
    kw = dict(profile=profile, algorithm=algorithm, gpus=gpus, repo=repo, profile_missing=profile_missing, log=log,
              calibration=calibration, previous=previous)
    if not dep.apps:
        return plan_models(dep, devices, **kw)
    from . import apps as appmod
    from .spec import AppSummary

    rows = appmod.check(dep, repo or repository_for(dep))
    if isinstance(profile, ProfileStore):
        store = profile
    elif profile is not None:
        store = ProfileStore.load(profile)
    else:
        if devices is None:
            from . import devices as devmod

            devices = devmod.resolve(dep.devices)
        store = load_profiles(dep, devices.name)
        if profile_missing and (algorithm or dep.scheduler.algorithm) != "trivial":
            # the split weighs the steps by their latencies: measure the steps' models first, or a
            # step without a profile would weigh as the mean of the others
            steps = appmod.expand(dep, {a.name: {st.model: a.slo_ms for st in a.steps} for a in dep.apps})
            store = _with_missing_measured(steps, devices, store, log)

    steps, split = split_apps(dep, store, rows)
    plan = plan_models(steps, devices, **kw)
    summaries = {a.name: AppSummary(rate=a.rate, slo_ms=a.slo_ms, budgets_ms={m: round(v, 3) for m, v in split[a.name][0].items()},
                                    critical_path=split[a.name][1], fan_out_rows=rows[a.name]) for a in dep.apps}
    return plan.model_copy(update={"apps": summaries})


def split_apps(dep: Deployment, store: ProfileStore | None, rows: Mapping[str, Mapping[str, int]] | None = None):
    """The deployment the planner plans (:func:`controlplane.apps.expand`: each app's steps at its rate, their
    SLOs its budgets) and each app's split (budgets, critical path), the steps weighed by their profiled
    latency at batch 1 on the largest share (a step ``store`` lacks weighs as the mean of the others)."""
    from . import apps as appmod

    def latency(model: str) -> float | None:
        src = dep.model(model).source if model in {m.name for m in dep.models} else model
        if store is None or src not in store.models():
            return None
        return store.latency(src, max(store.shares(src)), 1)

    split = {a.name: appmod.split_slo(a, latency) for a in dep.apps}
    return appmod.expand(dep, {n: b for n, (b, _) in split.items()}, rows), split


def plan_models(dep: Deployment, devices: DeviceSet | None = None, *, profile: str | Path | ProfileStore | None = None,
                algorithm: str | None = None, gpus: int | None = None, repo: SourceRepository | None = None,
                profile_missing: bool = False, log: Callable[[str], None] = print,
                calibration: Mapping[str, float] | None = None, previous: Plan | None = None) -> Plan:
    """Plan a deployment's models.

    devices: what it runs on (resolved from ``dep.devices`` when not given). profile: plan against
    this profile (a device folder such as ``profiles/h100``, a latency.csv, or a loaded store)
    instead of this machine's — then nothing about the local devices matters. gpus: at most this many; default
    the deployment's ``scheduler.gpus``, else (on GPUs, planning for them) how many there are.
    profile_missing: measure models the profile lacks (logged first) instead of raising
    :class:`MissingProfile`. calibration: per source model, measured serving time over the
    profile's; the profile's latencies are scaled by it (a running deployment's recalibration);
    None: this machine's saved one (:func:`saved_calibration`), where it plans with this machine's profile.
    previous: the running plan, whose gpu-lets of unchanged models are kept where that costs no GPU
    (:mod:`controlplane.scheduler.incremental`).
    """
    algorithm = algorithm or dep.scheduler.algorithm
    gpus = gpus or dep.scheduler.gpus
    if profile is not None:
        store = alias_models(profile if isinstance(profile, ProfileStore) else ProfileStore.load(profile), dep)
        if calibration:
            store = store.scaled(calibration)
        if algorithm == "trivial":
            return trivial_plan(dep, store.device, _model_limits(dep, repo))
        from . import scheduler

        return scheduler.plan(dep, store, algorithm=algorithm, gpus=gpus, previous=previous)
    if devices is None:
        from . import devices as devmod

        devices = devmod.resolve(dep.devices)
    if algorithm == "trivial":
        return trivial_plan(dep, devices.name, _model_limits(dep, repo))
    names = list(dict.fromkeys(m.source for m in dep.models))
    store = load_profiles(dep, devices.name)
    if profile_missing:
        store = _with_missing_measured(dep, devices, store, log)
    missing = [n for n in names if store is None or n not in store.models()]
    if missing:
        raise MissingProfile(missing, devices.name, devices.on_gpu, profile_dirs(dep, devices.name)[-1])
    if calibration is None:
        calibration = starting_calibration(dep, devices.name, log)
    if calibration:
        store = store.scaled(calibration)
    from . import scheduler

    return scheduler.plan(dep, store, algorithm=algorithm, gpus=gpus or (devices.count() if devices.on_gpu else None),
                          previous=previous)


def _with_missing_measured(dep: Deployment, devices: DeviceSet, store: ProfileStore | None,
                           log: Callable[[str], None]) -> ProfileStore | None:
    """``store`` (this machine's profile) after measuring the deployment's models it lacks (logged first)."""
    missing = [n for n in dict.fromkeys(m.source for m in dep.models) if store is None or n not in store.models()]
    if not missing:
        return store
    log(f"no {devices.name} profile for {', '.join(missing)}: measuring them into "
        f"{measured_profiles(dep) / device_slug(devices.name)} ...")
    measure(dep, devices, missing)
    return load_profiles(dep, devices.name)


def _model_limits(dep: Deployment, repo: SourceRepository | None) -> dict[str, int]:
    """Each model's own max_batch_size (its repository config), the trivial plan's batch cap."""
    repo = repo or repository_for(dep)
    return {m.name: repo[m.name].max_batch_size or 1 for m in dep.models}
