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


def load_profiles_for(dep: Deployment, devices: DeviceSet, log=print, profile_missing: bool = True):
    """The ProfileStore for this device type (None for the trivial planner).

    Profiles live in ``<profiles>/<device slug>/latency.csv``. When models of the
    deployment have no profile on a CPU, they are profiled first (and cached
    there); on a GPU the profiler must be run explicitly (`controlplane profile`).
    """
    if dep.scheduler.algorithm == "trivial":
        return None
    from .profiles import ProfileStore, device_slug

    folder = profile_root(dep) / device_slug(devices.name)
    names = list(dict.fromkeys(m.source for m in dep.models))
    store = ProfileStore.load(folder, device=devices.name) if (folder / "latency.csv").exists() else None
    missing = [n for n in names if store is None or n not in store.models()]
    if missing and profile_missing and not devices.on_gpu:
        try:
            from profiler.ensure import ensure_profile
        except ImportError:
            ensure_profile = None
        if ensure_profile is not None:
            log(f"no {devices.name} profile for {', '.join(missing)}: profiling them first ...")
            ensure_profile(missing, device="cpu", profiles_root=profile_root(dep), shares=dep.scheduler.shares,
                           batches=[b for b in (1, 2, 4, 8, 16, 32) if b <= dep.scheduler.max_batch])
            store = ProfileStore.load(folder, device=devices.name)
            missing = [n for n in names if n not in store.models()]
    if missing:
        raise ValueError(f"no {devices.name} profile for model(s) {', '.join(missing)} in {folder}; "
                         f"run `controlplane profile --device {'gpu' if devices.on_gpu else 'cpu'} "
                         f"{' '.join(missing)}` or use `scheduler: {{algorithm: trivial}}`")
    return alias_models(store, dep)
