"""Finding the profile for the devices a deployment resolved to (I/O at the edge)."""

from __future__ import annotations

from pathlib import Path

from .devices import DeviceSet
from .spec import Deployment


def profile_root(dep: Deployment) -> Path:
    return Path(dep.profiles) if dep.profiles else Path(__file__).resolve().parent.parent / "profiles"


def alias_models(store, dep: Deployment):
    """Models served as copies (`base:`) plan with their base model's profile."""
    for m in dep.models:
        if m.base and m.base in store.models():
            store.alias(m.name, m.base)
    return store


def _profile(ensure_profile, models: list[str], dep: Deployment, devices: DeviceSet) -> None:
    """Measure the missing models (resumable; cached under the profile root).

    On a GPU, shares only take effect under MPS: a daemon is started on a private pipe
    directory for the profiling run and stopped after it (`up` starts its own later).
    """
    kw = dict(profiles_root=profile_root(dep), shares=dep.scheduler.shares,
              batches=[b for b in (1, 2, 4, 8, 16, 32) if b <= dep.scheduler.max_batch])
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


def load_profiles_for(dep: Deployment, devices: DeviceSet, log=print, profile_missing: bool = True):
    """The ProfileStore for this device type (None for the trivial planner).

    Profiles live in ``<profiles>/<device slug>/latency.csv``. Models of the
    deployment without a profile for this device are profiled first, with a
    progress bar, and cached there.
    """
    if dep.scheduler.algorithm == "trivial":
        return None
    from .profiles import ProfileStore, device_slug

    folder = profile_root(dep) / device_slug(devices.name)
    names = list(dict.fromkeys(m.source for m in dep.models))
    store = ProfileStore.load(folder, device=devices.name) if (folder / "latency.csv").exists() else None
    missing = [n for n in names if store is None or n not in store.models()]
    if missing and profile_missing:
        try:
            from profiler.ensure import ensure_profile
        except ImportError:
            ensure_profile = None
        if ensure_profile is not None:
            log(f"no {devices.name} profile for {', '.join(missing)}: profiling them first ...")
            _profile(ensure_profile, missing, dep, devices)
            store = ProfileStore.load(folder, device=devices.name)
            missing = [n for n in names if n not in store.models()]
    if missing:
        raise ValueError(f"no {devices.name} profile for model(s) {', '.join(missing)} in {folder}; "
                         f"run `controlplane profile --device {'gpu' if devices.on_gpu else 'cpu'} "
                         f"-m {','.join(missing)}` or use `scheduler: {{algorithm: trivial}}`")
    return alias_models(store, dep)
