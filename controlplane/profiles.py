"""Latency profiles: how long one batch of a model takes on a share of a device.

The scheduler needs ``latency(model, share, batch)`` for shares and batches that
were never measured: profiling every (share, batch) pair of nine models costs
hours, and the GPU-let prototype's share interpolation was broken, so it
needed every share it might pick profiled. Here a profile is a sparse table and
the store interpolates:

* over **batch**, linearly between the two nearest profiled batches (latency of
  a DNN batch is close to affine in the batch size once kernels are launched);
  beyond the largest profiled batch it extrapolates along the last segment
  (never below the last point), below the smallest it clamps.
* over **share**, linearly in ``1/share`` between the two nearest profiled
  shares. A kernel limited to a fraction ``s`` of the SMs runs in about
  ``a + b/s`` (fixed launch/memory part ``a``, parallel part ``b``), so a line in
  ``1/s`` is exact for that model and never invents a speed-up that the
  neighbouring measurements do not show. Above the largest profiled share it
  clamps (a bigger share is assumed no faster: conservative); below the smallest
  it scales by ``s_min/s`` (all time parallel: the most pessimistic case of
  ``a + b/s``).

Files: ``profiles/<device-slug>/latency.csv``, columns exactly
:data:`COLUMNS` with a header row (the format agreed with the profiler). Bad rows
raise :class:`ProfileError` whose message starts with ``path:line``.

:func:`synthetic_store` builds a plausible H100 profile for the nine zoo models
in memory, for tests and for the benchmark until measured profiles exist.
"""

from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

COLUMNS = [
    "device", "model", "share", "batch", "p50_ms", "p99_ms", "mean_ms",
    "runs", "memory_mb", "precision", "tool_version", "date",
]
PRECISIONS = ("fp32", "fp16")

#: GPU memory in MB of device types we know; the memory check uses it.
DEVICE_MEMORY_MB = {"h100": 80 * 1024, "h200": 141 * 1024, "2080ti": 11000, "3080": 10200}


class ProfileError(ValueError):
    """A profile file or row that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class ProfileRow:
    """One measured point: a batch of ``batch`` on ``share`` % of ``device``."""

    device: str
    model: str
    share: int
    batch: int
    p50_ms: float
    p99_ms: float
    mean_ms: float = 0.0
    runs: int = 0
    memory_mb: float | None = None
    precision: str = "fp32"
    tool_version: str = ""
    date: str = ""

    def as_csv(self) -> list[str]:
        mem = "" if self.memory_mb is None else f"{self.memory_mb:g}"
        return [self.device, self.model, str(self.share), str(self.batch), f"{self.p50_ms:.6g}",
                f"{self.p99_ms:.6g}", f"{self.mean_ms:.6g}", str(self.runs), mem, self.precision,
                self.tool_version, self.date]


def device_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu-epyc' stays; used for directory names."""
    d = device.lower()
    for known in ("h100", "h200", "a100", "2080ti", "3080"):
        if known in d.replace(" ", ""):
            return known
    out = "".join(c if c.isalnum() else "-" for c in d).strip("-")
    while "--" in out:
        out = out.replace("--", "-")
    return out or "unknown"


def _parse_row(rec: dict[str, str], where: str) -> ProfileRow:
    def num(key: str, kind: Callable[[str], float | int], *, low: float | None = None, strict_low: bool = False):
        raw = (rec.get(key) or "").strip()
        try:
            v = kind(raw)
        except ValueError:
            raise ProfileError(f"{where}: column {key!r}: expected {kind.__name__}, got {raw!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise ProfileError(f"{where}: column {key!r}: not a finite number: {raw!r}")
        if low is not None and (v <= low if strict_low else v < low):
            raise ProfileError(f"{where}: column {key!r}: must be {'>' if strict_low else '>='} {low}, got {raw}")
        return v

    device = (rec.get("device") or "").strip()
    model = (rec.get("model") or "").strip()
    if not device:
        raise ProfileError(f"{where}: column 'device' is empty")
    if not model:
        raise ProfileError(f"{where}: column 'model' is empty")
    share = num("share", int, low=0, strict_low=True)
    if share > 100:
        raise ProfileError(f"{where}: column 'share': must be <= 100 (%), got {share}")
    batch = num("batch", int, low=1)
    p50 = num("p50_ms", float, low=0, strict_low=True)
    p99 = num("p99_ms", float, low=0, strict_low=True)
    if p99 < p50:
        raise ProfileError(f"{where}: p99_ms ({p99}) is below p50_ms ({p50})")
    mean_raw = (rec.get("mean_ms") or "").strip()
    mean = num("mean_ms", float, low=0) if mean_raw else 0.0
    runs_raw = (rec.get("runs") or "").strip()
    runs = num("runs", int, low=0) if runs_raw else 0
    mem_raw = (rec.get("memory_mb") or "").strip()
    mem = num("memory_mb", float, low=0) if mem_raw else None
    precision = (rec.get("precision") or "fp32").strip() or "fp32"
    if precision not in PRECISIONS:
        raise ProfileError(f"{where}: column 'precision': expected one of {PRECISIONS}, got {precision!r}")
    return ProfileRow(device, model, share, batch, p50, p99, mean, runs, mem, precision,
                      (rec.get("tool_version") or "").strip(), (rec.get("date") or "").strip())


def read_csv(path: str | Path) -> list[ProfileRow]:
    """Read and validate one latency.csv; errors name ``path:line``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"{path}: cannot read: {e.strerror}") from None
    lines = text.splitlines()
    if not lines:
        raise ProfileError(f"{path}:1: empty file; expected header {','.join(COLUMNS)}")
    header = next(csv.reader([lines[0]]))
    if [h.strip() for h in header] != COLUMNS:
        raise ProfileError(f"{path}:1: header must be exactly {','.join(COLUMNS)}, got {','.join(header)}")
    rows: list[ProfileRow] = []
    for lineno, rec in enumerate(csv.reader(lines[1:]), start=2):
        if not rec or all(not c.strip() for c in rec):
            continue
        where = f"{path}:{lineno}"
        if len(rec) != len(COLUMNS):
            raise ProfileError(f"{where}: expected {len(COLUMNS)} columns, got {len(rec)}")
        rows.append(_parse_row(dict(zip(COLUMNS, rec)), where))
    return rows


def write_csv(path: str | Path, rows: Iterable[ProfileRow]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(r.as_csv())


@dataclass
class _Table:
    """Latencies of one model: share -> sorted batches and their (p50, p99)."""

    by_share: dict[int, tuple[list[int], list[float], list[float]]] = field(default_factory=dict)
    memory_mb: float | None = None


def _interp_batch(batches: list[int], vals: list[float], batch: float) -> float:
    if len(batches) == 1:
        # One point: assume latency grows linearly from a zero-size batch, never below the point.
        return vals[0] * max(1.0, batch / batches[0])
    if batch <= batches[0]:
        return vals[0]
    i = bisect.bisect_left(batches, batch)
    if i < len(batches) and batches[i] == batch:
        return vals[i]
    if i >= len(batches):
        i = len(batches) - 1  # extrapolate along the last segment
    b0, b1, v0, v1 = batches[i - 1], batches[i], vals[i - 1], vals[i]
    v = v0 + (v1 - v0) * (batch - b0) / (b1 - b0)
    return max(v, vals[-1]) if batch > batches[-1] else v


class ProfileStore:
    """Latency of (model, share %, batch) on one device type, interpolated.

    Build one from rows (:meth:`from_rows`), from CSV files (:meth:`load`) or
    synthetically (:func:`synthetic_store`). ``device`` is the device name the
    rows came from; ``memory_mb_total`` the memory of one device (for the
    scheduler's memory check; ``None`` skips it).
    """

    def __init__(self, rows: Iterable[ProfileRow], device: str | None = None,
                 memory_mb_total: float | None = None, precision: str = "fp32") -> None:
        # One precision per store: fp16 rows share (model, share, batch) keys with fp32 ones.
        rows = [r for r in rows if r.precision == precision]
        devices = sorted({r.device for r in rows})
        if device is None:
            if len(devices) > 1:
                raise ProfileError(f"profiles of several devices {devices}; pass device= to pick one")
            device = devices[0] if devices else "unknown"
        else:      # by name, else by GPU model ('H200' of a fleet description finds 'NVIDIA H200' rows)
            rows = ([r for r in rows if r.device == device]
                    or [r for r in rows if device_slug(r.device) == device_slug(device)])
        self.device = device
        self.memory_mb_total = memory_mb_total if memory_mb_total is not None else DEVICE_MEMORY_MB.get(device_slug(device))
        self.rows = rows
        raw: dict[str, dict[int, dict[int, tuple[float, float]]]] = {}
        mem: dict[str, float] = {}
        for r in rows:
            raw.setdefault(r.model, {}).setdefault(r.share, {})[r.batch] = (r.p50_ms, r.p99_ms)
            if r.memory_mb is not None:
                mem[r.model] = max(mem.get(r.model, 0.0), r.memory_mb)
        self._tables: dict[str, _Table] = {}
        for model, shares in raw.items():
            t = _Table(memory_mb=mem.get(model))
            for s, pts in shares.items():
                bs = sorted(pts)
                t.by_share[s] = (bs, [pts[b][0] for b in bs], [pts[b][1] for b in bs])
            self._tables[model] = t
        self._cache: dict[tuple[str, float, float, str], float] = {}
        self._aliases: dict[str, str] = {}
        #: the device's own interference model (loaded from interference.json beside
        #: latency.csv when present); the scheduler prefers it over the paper's 2080 Ti model
        self.interference = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_rows(cls, rows: Iterable[ProfileRow], device: str | None = None, **kw) -> "ProfileStore":
        return cls(rows, device, **kw)

    def scaled(self, factors: Mapping[str, float]) -> "ProfileStore":
        """A copy whose latencies of the given (source) models are multiplied by their factor: online
        recalibration, measured serving time over this profile's (:mod:`controlplane.live`)."""
        rows = [replace(r, p50_ms=r.p50_ms * f, p99_ms=r.p99_ms * f, mean_ms=r.mean_ms * f)
                if (f := factors.get(r.model, 1.0)) != 1.0 else r for r in self.rows]
        out = ProfileStore(rows, self.device, memory_mb_total=self.memory_mb_total)
        out.interference = self.interference
        out._aliases = dict(self._aliases)
        return out

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, **kw) -> "ProfileStore":
        """Load a latency.csv, or every ``*/latency.csv`` and ``latency.csv`` under a directory."""
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("latency.csv")) + sorted(path.glob("*/latency.csv"))
            if not files:
                raise ProfileError(f"{path}: no latency.csv found (expected {path}/<device>/latency.csv)")
        else:
            files = [path]
        rows: list[ProfileRow] = []
        for f in files:
            rows.extend(read_csv(f))
        if not rows:
            raise ProfileError(f"{path}: no profile rows")
        store = cls(rows, device, **kw)
        fitted = [f.parent / "interference.json" for f in files if (f.parent / "interference.json").is_file()]
        if fitted:
            from .interference import load_interference

            try:
                store.interference = load_interference(fitted[0])
            except (ValueError, KeyError) as e:
                raise ProfileError(f"{fitted[0]}: not a usable interference model: {e}") from None
        return store

    def save(self, path: str | Path) -> None:
        write_csv(path, self.rows)

    def alias(self, name: str, model: str) -> "ProfileStore":
        """Let ``name`` use ``model``'s profile (e.g. game's lenet1..lenet6 backed by lenet)."""
        if model not in self._tables:
            raise ProfileError(f"cannot alias {name!r}: no profile for {model!r}")
        self._aliases[name] = model
        return self

    # ------------------------------------------------------------------ queries

    def _resolve(self, model: str) -> str:
        return self._aliases.get(model, model)

    def models(self) -> list[str]:
        return sorted(set(self._tables) | set(self._aliases))

    def has(self, model: str) -> bool:
        return self._resolve(model) in self._tables

    def _table(self, model: str) -> _Table:
        try:
            return self._tables[self._resolve(model)]
        except KeyError:
            raise ProfileError(
                f"no profile for model {model!r} on {self.device}; profiled: {', '.join(self.models()) or 'none'}"
            ) from None

    def shares(self, model: str) -> list[int]:
        return sorted(self._table(model).by_share)

    def batches(self, model: str) -> list[int]:
        return sorted({b for bs, _, _ in self._table(model).by_share.values() for b in bs})

    def max_batch(self, model: str) -> int:
        return max(self.batches(model))

    def memory_mb(self, model: str) -> float | None:
        return self._table(model).memory_mb

    def latency(self, model: str, share: float, batch: float, pct: str = "p99") -> float:
        """Latency in ms of one batch of ``batch`` requests on ``share`` % (see module doc)."""
        if pct not in ("p50", "p99"):
            raise ValueError(f"pct must be 'p50' or 'p99', got {pct!r}")
        if share <= 0 or batch <= 0:
            raise ValueError(f"share and batch must be positive, got share={share} batch={batch}")
        key = (model, share, batch, pct)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        t = self._table(model)
        k = 1 if pct == "p50" else 2
        shares = sorted(t.by_share)

        def at(s: int) -> float:
            tab = t.by_share[s]
            return _interp_batch(tab[0], tab[k], batch)

        if share in t.by_share:
            v = at(int(share))
        elif share > shares[-1]:
            v = at(shares[-1])
        elif share < shares[0]:
            v = at(shares[0]) * shares[0] / share
        else:
            i = bisect.bisect_left(shares, share)
            s0, s1 = shares[i - 1], shares[i]
            v0, v1 = at(s0), at(s1)
            w = (1 / share - 1 / s1) / (1 / s0 - 1 / s1)
            v = v1 + (v0 - v1) * w
        self._cache[key] = v
        return v

    def throughput(self, model: str, share: float, batch: int, pct: str = "p99") -> float:
        """Requests/s of back-to-back batches."""
        return 1000.0 * batch / self.latency(model, share, batch, pct)


# --------------------------------------------------------------------------- synthetic

#: Synthetic H100 latency model per zoo model: (fixed ms, ms per item at 100 %,
#: batch at which the model fills the whole GPU, memory MB). Chosen so that
#: batch-1 latencies on a full H100 behind Triton's python backend land near
#: what such servers show (lenet well under 1 ms, vgg16/densenet a few ms) and
#: batch 32 shows the usual sub-linear growth. Replace with profiles/h100.
SYNTHETIC_H100: dict[str, tuple[float, float, float, float]] = {
    "lenet": (0.35, 0.012, 64, 50),
    "googlenet": (1.6, 0.30, 24, 1720),
    "resnet50": (1.8, 0.55, 16, 1820),
    "ssd-mobilenet": (2.2, 0.70, 16, 640),
    "vgg16": (2.0, 1.40, 8, 2920),
    "mnasnet1_0": (1.5, 0.28, 32, 1550),
    "mobilenet_v2": (1.4, 0.26, 32, 464),
    "densenet161": (6.0, 1.00, 16, 1220),
    "bert": (2.0, 0.40, 12, 500),
}
SYNTHETIC_SHARES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
SYNTHETIC_BATCHES = (1, 2, 4, 8, 16, 32)


def synthetic_latency(fixed_ms: float, per_item_ms: float, full_batch: float, share: float, batch: float) -> float:
    """Roofline-ish latency of one batch on ``share`` % of a GPU.

    A fixed part (launches, copies; a little slower on small shares) plus the
    parallel part: a share processes items at ``share/100`` of the full GPU's
    rate (``1/per_item_ms`` items per ms), but a batch narrower than the GPU
    cannot use all of it, so the parallel part never drops below the time of
    one "wave" (half the width of the GPU, ``full_batch``/2 items, plus half the
    batch). This gives real profiles' knee: small batches gain nothing from a
    large share, large batches scale with it."""
    s = share / 100.0
    parallel = per_item_ms * max(batch / s, 0.5 * full_batch + 0.5 * batch)
    return fixed_ms * (1.0 + 0.15 * max(0.0, 1.0 - s)) + parallel


def synthetic_rows(params: dict[str, tuple[float, float, float, float]] | None = None,
                   device: str = "synthetic-h100", shares: Iterable[int] = SYNTHETIC_SHARES,
                   batches: Iterable[int] = SYNTHETIC_BATCHES, p99_over_p50: float = 1.08) -> list[ProfileRow]:
    params = SYNTHETIC_H100 if params is None else params
    rows = []
    for model, (fixed, per_item, full, mem) in params.items():
        for s in shares:
            for b in batches:
                p50 = synthetic_latency(fixed, per_item, full, s, b)
                rows.append(ProfileRow(device, model, int(s), int(b), round(p50, 4), round(p50 * p99_over_p50, 4),
                                       round(p50 * 1.02, 4), 0, mem, "fp32", "synthetic", ""))
    return rows


def synthetic_store(params: dict[str, tuple[float, float, float, float]] | None = None, *,
                    device: str = "synthetic-h100", memory_mb_total: float | None = 80 * 1024,
                    **kw) -> ProfileStore:
    """An in-memory profile of the nine zoo models (or of ``params``) on a made-up H100."""
    return ProfileStore(synthetic_rows(params, device, **kw), device, memory_mb_total=memory_mb_total)


def store_from_function(fn: Callable[[str, int, int], float], models: Iterable[str], *,
                        shares: Iterable[int] = (20, 40, 50, 60, 80, 100), batches: Iterable[int] = range(1, 33),
                        device: str = "test", memory_mb: dict[str, float] | None = None,
                        memory_mb_total: float | None = None) -> ProfileStore:
    """A store whose p50 = p99 = ``fn(model, share, batch)`` on a grid; for hand-computed tests."""
    rows = []
    for m in models:
        for s in shares:
            for b in batches:
                v = float(fn(m, s, b))
                rows.append(ProfileRow(device, m, int(s), int(b), v, v, v, 0,
                                       (memory_mb or {}).get(m), "fp32", "test", ""))
    return ProfileStore(rows, device, memory_mb_total=memory_mb_total)
