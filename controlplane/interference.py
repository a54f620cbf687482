"""Interference models: how much slower a model runs when other gpu-lets share its GPU.

MPS isolates SMs but not the L2 cache or DRAM bandwidth, so two gpu-lets on one
GPU slow each other down. The scheduler multiplies a model's profiled latency by
``slowdown(model, share, batch, others)`` (>= 1), where ``others`` lists what
runs on the other gpu-lets of the same GPU as ``(model, share, batch)``.

Three models, all behind :class:`InterferenceModel`:

* :class:`NoInterference` — slowdown 1 (the "noint" configuration of the paper).
* :class:`LinearUtilInterference` — the paper's linear model over L2 and DRAM
  utilisation of the model and its co-runners, with the RTX 2080 Ti numbers by
  default (see :mod:`.glet_2080ti`). Co-runners' utilisations are summed and
  capped at 1 (more than one co-runner can only add pressure).
* :class:`FittedInterference` — fitted from measured pairs by :func:`fit_pairs`
  (rows as the profiler writes them), saved/loaded as JSON. Form: the excess
  slowdown ``slowdown - 1`` of model A next to B is
  ``k0 + sens[A] + press[B] + k_sa*share_a + k_sb*share_b + k_ba*log2(batch_a) + k_bb*log2(batch_b)``
  (shares as fractions), clamped at 0; a model seen in no pair gets the mean
  sensitivity/pressure (0). With several co-runners the excesses add. It is
  linear least squares (with a little ridge), so it fits in microseconds, and
  per-model terms capture what the paper's utilisations stood for without
  needing Nsight counters on the target GPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from . import glet_2080ti

Other = tuple[str, float, float]  # (model, share %, batch)

PAIR_COLUMNS = ["device", "model_a", "share_a", "batch_a", "model_b", "share_b", "batch_b", "slowdown_a", "slowdown_b"]


@runtime_checkable
class InterferenceModel(Protocol):
    name: str

    def slowdown(self, model: str, share: float, batch: float, others: Sequence[Other]) -> float:
        """Factor >= 1 by which ``model``'s latency grows next to ``others``."""
        ...


class NoInterference:
    """Gpu-lets do not disturb each other."""

    name = "none"

    def slowdown(self, model: str, share: float, batch: float, others: Sequence[Other]) -> float:
        return 1.0


def _interp_util(table: Mapping[int, tuple[float, float]], batch: float) -> tuple[float, float]:
    bs = sorted(table)
    if batch <= bs[0]:
        return table[bs[0]]
    if batch >= bs[-1]:
        return table[bs[-1]]
    for b0, b1 in zip(bs, bs[1:]):
        if b0 <= batch <= b1:
            w = (batch - b0) / (b1 - b0)
            u0, u1 = table[b0], table[b1]
            return (u0[0] + w * (u1[0] - u0[0]), u0[1] + w * (u1[1] - u0[1]))
    return table[bs[-1]]  # pragma: no cover


@dataclass
class LinearUtilInterference:
    """The paper's linear model over L2 and DRAM utilisation (default: RTX 2080 Ti numbers).

    ``aliases`` maps model names without utilisation data to one that has it
    (e.g. game's lenet1 -> lenet); unknown models get the mean utilisation of the table.
    """

    coef: tuple[float, float, float, float, float] = (
        glet_2080ti.C_L2_SELF, glet_2080ti.C_L2_OTHER, glet_2080ti.C_DRAM_SELF,
        glet_2080ti.C_DRAM_OTHER, glet_2080ti.C_CONST,
    )
    util: Mapping[str, Mapping[int, tuple[float, float]]] = field(default_factory=lambda: glet_2080ti.UTIL)
    aliases: dict[str, str] = field(default_factory=dict)
    name: str = "linear-2080ti"

    def _u(self, model: str, batch: float) -> tuple[float, float]:
        model = self.aliases.get(model, model)
        if model not in self.util:
            for known in self.util:  # lenet3 -> lenet, resnet50-a -> resnet50
                if model.startswith(known):
                    model = known
                    break
        if model in self.util:
            return _interp_util(self.util[model], batch)
        vals = [_interp_util(t, batch) for t in self.util.values()]
        return (sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals))

    def slowdown(self, model: str, share: float, batch: float, others: Sequence[Other]) -> float:
        if not others:
            return 1.0
        l2s, drs = self._u(model, batch)
        l2o = min(1.0, sum(self._u(m, b)[0] for m, _, b in others))
        dro = min(1.0, sum(self._u(m, b)[1] for m, _, b in others))
        c = self.coef
        return max(1.0, c[0] * l2s + c[1] * l2o + c[2] * drs + c[3] * dro + c[4])


def _features(share_a: float, batch_a: float, share_b: float, batch_b: float) -> list[float]:
    return [1.0, share_a / 100.0, share_b / 100.0, math.log2(max(batch_a, 1.0)), math.log2(max(batch_b, 1.0))]


_GLOBAL = ["k0", "k_share_a", "k_share_b", "k_log2batch_a", "k_log2batch_b"]


@dataclass
class FittedInterference:
    """Slowdown fitted from measured pairs (see module doc for the form)."""

    coef: dict[str, float]
    sensitivity: dict[str, float]
    pressure: dict[str, float]
    device: str = ""
    n_rows: int = 0
    name: str = "fitted"

    def excess(self, model: str, share: float, batch: float, other: Other) -> float:
        om, os_, ob = other
        f = _features(share, batch, os_, ob)
        v = sum(self.coef[k] * x for k, x in zip(_GLOBAL, f))
        v += self.sensitivity.get(model, 0.0) + self.pressure.get(om, 0.0)
        return max(0.0, v)

    def slowdown(self, model: str, share: float, batch: float, others: Sequence[Other]) -> float:
        return 1.0 + sum(self.excess(model, share, batch, o) for o in others)

    def predict(self, row: Mapping[str, object]) -> tuple[float, float]:
        """(slowdown_a, slowdown_b) predicted for one pair row (PAIR_COLUMNS keys)."""
        a = (str(row["model_a"]), float(row["share_a"]), float(row["batch_a"]))
        b = (str(row["model_b"]), float(row["share_b"]), float(row["batch_b"]))
        return self.slowdown(*a, [b]), self.slowdown(*b, [a])

    def to_json(self) -> dict:
        return {"kind": "fitted-pairs", "device": self.device, "n_rows": self.n_rows, "coef": self.coef,
                "sensitivity": self.sensitivity, "pressure": self.pressure}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, data: Mapping) -> "FittedInterference":
        if data.get("kind") != "fitted-pairs":
            raise ValueError(f"not a fitted interference model (kind={data.get('kind')!r})")
        return cls(dict(data["coef"]), dict(data["sensitivity"]), dict(data["pressure"]),
                   data.get("device", ""), int(data.get("n_rows", 0)))

    @classmethod
    def load(cls, path: str | Path) -> "FittedInterference":
        return cls.from_json(json.loads(Path(path).read_text()))


def _as_samples(rows: Iterable[Mapping[str, object]]) -> list[tuple[str, float, float, str, float, float, float]]:
    """Each pair row gives two samples: A's slowdown next to B, and B's next to A."""
    out = []
    for i, r in enumerate(rows):
        missing = [c for c in PAIR_COLUMNS[1:] if c not in r or r[c] in (None, "")]
        if missing:
            raise ValueError(f"pair row {i}: missing {missing}")
        ma, sa, ba = str(r["model_a"]), float(r["share_a"]), float(r["batch_a"])
        mb, sb, bb = str(r["model_b"]), float(r["share_b"]), float(r["batch_b"])
        out.append((ma, sa, ba, mb, sb, bb, float(r["slowdown_a"])))
        out.append((mb, sb, bb, ma, sa, ba, float(r["slowdown_b"])))
    return out


def fit_pairs(rows: Iterable[Mapping[str, object]], ridge: float = 1e-3) -> FittedInterference:
    """Least-squares fit of :class:`FittedInterference` to measured pairs (pure; no I/O).

    ``rows``: mappings with PAIR_COLUMNS (values may be strings, as csv.DictReader gives).
    """
    rows = list(rows)
    samples = _as_samples(rows)
    if not samples:
        raise ValueError("fit_pairs needs at least one pair row")
    models = sorted({s[0] for s in samples} | {s[3] for s in samples})
    idx = {m: i for i, m in enumerate(models)}
    ng, nm = len(_GLOBAL), len(models)
    X = np.zeros((len(samples), ng + 2 * nm))
    y = np.zeros(len(samples))
    for j, (ma, sa, ba, mb, sb, bb, sd) in enumerate(samples):
        X[j, :ng] = _features(sa, ba, sb, bb)
        X[j, ng + idx[ma]] = 1.0
        X[j, ng + nm + idx[mb]] = 1.0
        y[j] = sd - 1.0
    # Ridge on everything but the intercept keeps the per-model terms identifiable
    # (they are collinear with it) and shrinks models seen in few pairs toward the mean.
    R = np.sqrt(ridge) * np.eye(X.shape[1])
    R[0, 0] = 0.0
    A = np.vstack([X, R])
    bvec = np.concatenate([y, np.zeros(X.shape[1])])
    w, *_ = np.linalg.lstsq(A, bvec, rcond=None)
    devices = sorted({str(r.get("device", "")) for r in rows})
    return FittedInterference(
        coef={k: float(w[i]) for i, k in enumerate(_GLOBAL)},
        sensitivity={m: float(w[ng + idx[m]]) for m in models},
        pressure={m: float(w[ng + nm + idx[m]]) for m in models},
        device=",".join(d for d in devices if d),
        n_rows=len(rows),
    )


def prediction_errors(model: InterferenceModel, rows: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Held-out error of any interference model on pair rows.

    Returns mean absolute error and worst absolute error of the slowdown, mean
    absolute percentage error, and how often the prediction is >= the measurement
    (under-prediction is what breaks SLOs)."""
    errs, rel, over = [], [], 0
    for ma, sa, ba, mb, sb, bb, sd in _as_samples(rows):
        p = model.slowdown(ma, sa, ba, [(mb, sb, bb)])
        errs.append(abs(p - sd))
        rel.append(abs(p - sd) / sd)
        over += p >= sd - 1e-12
    n = len(errs)
    if not n:
        raise ValueError("no rows")
    return {"n": float(n), "mae": sum(errs) / n, "max_abs": max(errs), "mape": sum(rel) / n,
            "frac_not_under": over / n}


def load_interference(path: str | Path) -> InterferenceModel:
    """Load an interference model saved as JSON (currently: fitted pairs)."""
    return FittedInterference.load(path)


def by_name(name: str) -> InterferenceModel:
    """'none', 'linear-2080ti' (alias 'paper'), or a path to a fitted JSON file."""
    if name in ("none", "off", "false"):
        return NoInterference()
    if name in ("linear-2080ti", "paper", "linear"):
        return LinearUtilInterference()
    if Path(name).is_file():
        return load_interference(name)
    raise ValueError(f"unknown interference model {name!r}: use 'none', 'linear-2080ti' or a fitted JSON file")
