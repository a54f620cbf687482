"""Re-planning from the measured load: when the rates a plan was made for stop matching the traffic.

GPU-let's frontend re-schedules every epoch on the highest rate of a recent window. Here the
controller reads the router's arrival counters (``router_requests_total``, every router process
summed) once per epoch (:class:`LoadWindow`), and :func:`decide` says whether the running plan
still fits: a model whose peak rate exceeds what the plan was made for needs a new plan at once; one
whose padded peak fell under half of it gives share back. Between the two the plan stays (hysteresis,
so a noisy rate does not make it flap). The new rates are the peaks padded to the Poisson 99th
percentile of a second's arrivals, as in the prototype. Pure: counts and times come in as arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

#: rate (req/s) a model is planned for however idle it is: every model keeps a gpu-let
MIN_RATE = 1.0
#: a model's padded peak under this fraction of its planned rate gives share back
SHRINK_BELOW = 0.5


@dataclass
class LoadWindow:
    """Arrival counts per model, sampled once per epoch; rates over the last ``window_s`` seconds."""

    window_s: float
    samples: deque = field(default_factory=deque)       # (time s, {model: arrivals so far})

    def add(self, t: float, counts: Mapping[str, float]) -> None:
        self.samples.append((t, dict(counts)))
        # keep one sample older than the window: the first interval inside it needs its start
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()

    def peak_rates(self) -> dict[str, float]:
        """Each model's highest rate over one epoch within the window (req/s); {} before two samples."""
        peak: dict[str, float] = {}
        pairs = zip(list(self.samples)[:-1], list(self.samples)[1:])
        for (t0, c0), (t1, c1) in pairs:
            if t1 <= t0:
                continue
            for m, n in c1.items():
                # a counter that went down (a router process restarted) counts from zero
                d = n - c0.get(m, 0.0) if n >= c0.get(m, 0.0) else n
                peak[m] = max(peak.get(m, 0.0), d / (t1 - t0))
        return peak

    def span_s(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0


def padded(rate: float) -> float:
    from .scheduler import poisson_pad

    return max(MIN_RATE, poisson_pad(rate))


def decide(planned: Mapping[str, float], peak: Mapping[str, float]) -> tuple[dict[str, float] | None, str]:
    """New rates for the models of ``planned`` (None: keep the plan) and the reason, in words.

    planned: the rate each model's current plan was made for. peak: measured peak rates; a model
    with no arrivals counted is at 0."""
    up = [m for m, r in planned.items() if peak.get(m, 0.0) > r]
    down = [m for m, r in planned.items() if padded(peak.get(m, 0.0)) < SHRINK_BELOW * r]
    if not up and not down:
        return None, ""
    rates = {m: padded(peak.get(m, 0.0)) for m in planned}
    parts = [f"{m} at {peak.get(m, 0.0):.3g} req/s > planned {planned[m]:.3g}" for m in up]
    parts += [f"{m} at {peak.get(m, 0.0):.3g} req/s < {SHRINK_BELOW:g} x planned {planned[m]:.3g}" for m in down]
    return rates, "; ".join(parts)


def router_arrivals(metrics_text: str) -> dict[str, float]:
    """``router_requests_total`` per model from the router's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name != "router_requests":
            continue
        for s in fam.samples:
            if s.name == "router_requests_total" and "model" in s.labels:
                out[s.labels["model"]] = out.get(s.labels["model"], 0.0) + s.value
    return out


# --------------------------------------------------------------------------- recalibration

#: batches of a model measured in one epoch before they count
MIN_BATCHES = 20
#: a measured factor this far (either way) from the one the running plan used makes a new plan
RECALIBRATE_BEYOND = 1.25


def batch_stats(model_stats: Mapping) -> dict[int, tuple[int, int]]:
    """Triton's executions per batch size from one ``/v2/models/{m}/stats`` entry: {batch: (count, ns)},
    ns the instance's compute_input + compute_infer + compute_output (what the profile times)."""
    out: dict[int, tuple[int, int]] = {}
    for b in model_stats.get("batch_stats", []):
        n = int(b["compute_infer"]["count"])
        ns = sum(int(b[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output"))
        out[int(b["batch_size"])] = (n, ns)
    return out


def measured_vs_predicted(before: Mapping[int, tuple[int, int]], after: Mapping[int, tuple[int, int]],
                          predicted_ms) -> tuple[int, float, float]:
    """(batches, measured ms, predicted ms) summed over the batches run between two readings;
    predicted_ms(batch) is the profile's time for one batch of that size on the gpu-let's share."""
    n_all, measured, predicted = 0, 0.0, 0.0
    for b, (n1, ns1) in after.items():
        n0, ns0 = before.get(b, (0, 0))
        n = n1 - n0
        if n <= 0:
            continue
        n_all += n
        measured += (ns1 - ns0) / 1e6
        predicted += n * predicted_ms(b)
    return n_all, measured, predicted


def recalibrate(current: Mapping[str, float], observed: Mapping[str, tuple[int, float, float]]
                ) -> tuple[dict[str, float] | None, str]:
    """New per-model factors (measured over profile) when a model with enough batches measured runs
    RECALIBRATE_BEYOND off the factor the running plan used; None: keep them.

    observed: per model, (batches, measured ms, predicted ms) of the epoch (:func:`measured_vs_predicted`,
    the profile unscaled)."""
    new = dict(current)
    parts = []
    for m, (n, meas, pred) in observed.items():
        if n < MIN_BATCHES or pred <= 0 or meas <= 0:
            continue
        f = meas / pred
        old = current.get(m, 1.0)
        if f > old * RECALIBRATE_BEYOND or f < old / RECALIBRATE_BEYOND:
            new[m] = round(f, 3)
            parts.append(f"{m} ran {f:.2g}x its profile (plan used {old:.2g}x)")
    return (new, "; ".join(parts)) if parts else (None, "")
