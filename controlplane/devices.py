"""Which devices a deployment runs on: the GPUs pynvml sees, or this machine's CPU."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    index: int
    uuid: str
    name: str
    memory_mb: float


@dataclass(frozen=True)
class DeviceSet:
    kind: str                 # "gpu" or "cpu"
    name: str                 # device type: the GPU's name, or "cpu-<n>c"
    gpus: tuple[GPU, ...] = ()
    cores: tuple[int, ...] = ()
    fleet: bool = False       # GPUs described, not found on this machine: plan and render only

    @property
    def on_gpu(self) -> bool:
        return self.kind == "gpu"

    def count(self) -> int:
        return len(self.gpus)


def list_gpus() -> list[GPU]:
    """GPUs visible through NVML; empty when there is no driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**20
            out.append(GPU(i, uuid if isinstance(uuid, str) else uuid.decode(),
                           name if isinstance(name, str) else name.decode(), mem))
        return out
    finally:
        pynvml.nvmlShutdown()


def cpu_name() -> str:
    """A stable device type for this CPU, e.g. 'cpu-2c'; profiles are kept per device type."""
    return f"cpu-{len(os.sched_getaffinity(0))}c"


def resolve(devices) -> DeviceSet:
    """'auto' -> all GPUs, or the CPU when there are none; 'cpu'; a list of GPU indices; or a fleet
    described ({gpus, model}: that many GPUs of that model, not looked for on this machine)."""
    cores = tuple(sorted(os.sched_getaffinity(0)))
    if hasattr(devices, "gpus") and hasattr(devices, "model"):       # spec.FleetSpec: a fleet described
        from .profiles import DEVICE_MEMORY_MB, device_slug

        mem = DEVICE_MEMORY_MB.get(device_slug(devices.model), 0.0)
        return DeviceSet("gpu", devices.model, gpus=tuple(GPU(i, "", devices.model, mem) for i in range(devices.gpus)),
                         cores=cores, fleet=True)
    if devices == "cpu":
        return DeviceSet("cpu", cpu_name(), cores=cores)
    gpus = list_gpus()
    if devices == "auto":
        if not gpus:
            return DeviceSet("cpu", cpu_name(), cores=cores)
        chosen = gpus
    else:
        by_index = {g.index: g for g in gpus}
        missing = [i for i in devices if i not in by_index]
        if missing:
            raise ValueError(f"devices: GPU(s) {missing} not found; this host has {len(gpus)} GPU(s)"
                             f" on {platform.node()}")
        chosen = [by_index[i] for i in devices]
    names = {g.name for g in chosen}
    if len(names) > 1:
        raise ValueError(f"devices: mixed GPU types {sorted(names)}; list GPUs of one type")
    return DeviceSet("gpu", chosen[0].name, gpus=tuple(chosen), cores=cores)


def free_memory_mb(indices) -> dict[int, float]:
    """Free memory (MiB) of the given GPUs as NVML reports it now; {} without NVML or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return {}
    try:
        return {i: pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free / 2**20 for i in indices}
    finally:
        pynvml.nvmlShutdown()


#: what one gpu-let's processes hold beyond their models' profiled memory (the tritonserver's and each
#: python-backend stub's CUDA context and allocator pools; H200, 2026-11-29: ~0.5 GB per process)
GPULET_OVERHEAD_MB = 1024.0


def memory_shortfall(need_mb: dict[int, float], free_mb: dict[int, float]) -> list[str]:
    """What does not fit: for each GPU whose new gpu-lets need more than it has free, a sentence.
    Pure: the needs (per GPU index) and NVML's free memory come in as arguments."""
    return [f"GPU {i} has {free_mb[i]:.0f} MiB free, the gpu-lets to start there need {need:.0f} MiB"
            for i, need in sorted(need_mb.items()) if i in free_mb and need > free_mb[i]]
