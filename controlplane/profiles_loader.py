"""Finding the profile for the devices a deployment resolved to (I/O at the edge)."""

from __future__ import annotations

from pathlib import Path

from .devices import DeviceSet
from .spec import Deployment


def profile_dir(dep: Deployment) -> Path:
    return Path(dep.profiles) if dep.profiles else Path(__file__).resolve().parent.parent / "profiles"


def load_profiles_for(dep: Deployment, devices: DeviceSet, log=print):
    """The ProfileStore for this device type, or None (then only the trivial planner runs)."""
    if dep.scheduler.algorithm == "trivial":
        return None
    try:
        from .profiles import ProfileStore
    except ImportError:
        return None
    return ProfileStore.for_device(profile_dir(dep), devices.name) if hasattr(ProfileStore, "for_device") else None
