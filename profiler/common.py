"""Shared bits: device names, where profiles live, the latency CSV (append, resume)."""

from __future__ import annotations

import csv
import datetime as _dt
import os
from collections.abc import Iterable
from pathlib import Path

from controlplane.profiles import COLUMNS, ProfileRow, device_slug, read_csv

DEFAULT_SHARES: tuple[int, ...] = (20, 40, 50, 60, 80, 100)
DEFAULT_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)

#: Key of one measured point; rows with a key already in the CSV are not measured again.
Key = tuple[str, str, int, int, str]  # device, model, share, batch, precision


def gpu_name(index: int = 0) -> str | None:
    """The GPU's name from NVML ('NVIDIA H100 80GB HBM3'), or None without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
        return name if isinstance(name, str) else name.decode()
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def cpu_device_name() -> str:
    """Device type of this CPU; the same string the control plane looks profiles up by."""
    try:
        from controlplane.devices import cpu_name

        return cpu_name()
    except ImportError:  # pragma: no cover - older tree
        return f"cpu-{len(os.sched_getaffinity(0))}c"


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def device_name(device: str, gpu_index: int = 0) -> str:
    """'cpu' -> the CPU's device type; 'gpu'/'cuda' -> the GPU's NVML name."""
    if device == "cpu":
        return cpu_device_name()
    name = gpu_name(gpu_index)
    if name is None:
        raise RuntimeError("no NVIDIA GPU visible through NVML; profile with --device cpu")
    return name


def profile_dir(root: str | Path, device: str) -> Path:
    """profiles/<slug> for a device name ('NVIDIA H100 80GB HBM3' -> profiles/h100)."""
    return Path(root) / device_slug(device)


def today() -> str:
    return _dt.date.today().isoformat()


def row_key(r: ProfileRow) -> Key:
    return (r.device, r.model, int(r.share), int(r.batch), r.precision)


def existing_rows(path: str | Path) -> list[ProfileRow]:
    """Rows already in a latency CSV (validated: a corrupt file raises ProfileError with its line)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    return read_csv(path)


def append_rows(path: str | Path, rows: Iterable[ProfileRow]) -> None:
    """Append rows (header first if the file is new); flushed so an interrupted run resumes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for r in rows:
            w.writerow(r.as_csv())
        f.flush()
        os.fsync(f.fileno())
