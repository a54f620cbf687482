"""Re-planning from the measured load: when the rates a plan was made for stop matching the traffic.

GPU-let's frontend re-schedules every epoch on the highest rate of a recent window. Here the
controller reads the router's arrival counters (``router_requests_total``, every router process
summed) every second into a :class:`LoadWindow`, whose rates are taken over spans of
:data:`RATE_SPAN_S` seconds, so a step in the load is seen at its new rate within a few seconds,
whenever in the epoch it comes. :func:`grow`: a model whose rate exceeds what a Poisson stream at
its planned rate reaches in 99 % of its seconds needs a new plan at once (the controller checks
every second, and acts on two spans in a row). :func:`shrink`: one whose padded peak over a full
window fell under SHRINK_BELOW of its planned rate gives share back (checked every second too, and only
once the window is full of measurements: a deployment whose load has just started is not shrunk on
a window that is mostly before its traffic; the epoch paces recalibration). Between the two the plan stays (hysteresis, so a noisy
rate does not make it flap). The new rates are the peaks padded to the Poisson 99th
percentile of a second's arrivals, as in the prototype. Pure: counts and times come in as arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

#: rate (req/s) a model is planned for however idle it is: every model keeps a gpu-let
MIN_RATE = 1.0
#: a model's padded peak under this fraction of its planned rate gives share back. Not 0.5: after a
#: step to 2x and back, the padded 1x peak is just over half the padded 2x plan, and at 0.5 the share
#: was never given back (benchmarks/live.py on the H200, run 14)
SHRINK_BELOW = 2 / 3


#: the span a rate is measured over (s): long enough that a second's Poisson noise is averaged
#: (at 100 req/s its standard deviation is 7 %, well under the pad), short enough to see a step at once
RATE_SPAN_S = 2.0


@dataclass
class LoadWindow:
    """Arrival counts per model, sampled every second or so; rates over the last ``window_s`` seconds."""

    window_s: float
    samples: deque = field(default_factory=deque)       # (time s, {model: arrivals so far})

    def add(self, t: float, counts: Mapping[str, float]) -> None:
        self.samples.append((t, dict(counts)))
        # keep one sample older than the window: the first span inside it needs its start
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()

    def _rates(self, i: int) -> dict[str, float]:
        """Rates over the span ending at sample ``i``: from the latest sample at least RATE_SPAN_S
        older (or the oldest kept)."""
        t1, c1 = self.samples[i]
        j = i - 1
        while j > 0 and t1 - self.samples[j][0] < RATE_SPAN_S:
            j -= 1
        t0, c0 = self.samples[j]
        if t1 <= t0:
            return {}
        # a counter that went down (a router process restarted) counts from zero
        return {m: (n - c0.get(m, 0.0) if n >= c0.get(m, 0.0) else n) / (t1 - t0) for m, n in c1.items()}

    def peak_rates(self) -> dict[str, float]:
        """Each model's highest rate over a span (RATE_SPAN_S) within the window (req/s); {} before two
        samples."""
        peak: dict[str, float] = {}
        for i in range(1, len(self.samples)):
            for m, r in self._rates(i).items():
                peak[m] = max(peak.get(m, 0.0), r)
        return peak

    def last_rates(self) -> dict[str, float]:
        """Each model's rate over the latest span; {} before two samples."""
        return self._rates(len(self.samples) - 1) if len(self.samples) > 1 else {}

    def span_s(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0

    def full(self) -> bool:
        """Whether the samples cover the whole window (what a decision to give share back needs)."""
        return self.span_s() >= 0.9 * self.window_s


def padded(rate: float) -> float:
    from .scheduler import poisson_pad

    return max(MIN_RATE, poisson_pad(rate))


def over_plan(planned: Mapping[str, float], rates: Mapping[str, float]) -> list[str]:
    """The models whose measured rate exceeds their padded planned rate (the Poisson 99th percentile of a
    second's arrivals at that rate: a plan made for a rate serves its bursts)."""
    return [m for m, r in planned.items() if rates.get(m, 0.0) > padded(r)]


def grow(planned: Mapping[str, float], rates: Mapping[str, float]) -> tuple[dict[str, float] | None, str]:
    """New rates when a model is over its plan (None: keep the plan), and the reason in words.

    planned: the rate each model's current plan was made for; rates: measured (req/s, a model with no
    arrivals counted is at 0). A model :func:`over_plan` is planned for its padded rate, the others keep
    theirs."""
    up = over_plan(planned, rates)
    if not up:
        return None, ""
    return ({m: padded(rates.get(m, 0.0)) if m in up else r for m, r in planned.items()},
            "; ".join(f"{m} at {rates.get(m, 0.0):.3g} req/s > planned {planned[m]:.3g}" for m in up))


def shrink(planned: Mapping[str, float], peak: Mapping[str, float]) -> tuple[dict[str, float] | None, str]:
    """New rates when a model's padded peak over a full window is under SHRINK_BELOW of its planned rate
    (None: keep the plan), and the reason in words; it is planned for its padded peak, the others keep
    theirs. Between :func:`grow`'s threshold and this one the plan stays (hysteresis)."""
    down = [m for m, r in planned.items() if padded(peak.get(m, 0.0)) < SHRINK_BELOW * r]
    if not down:
        return None, ""
    return ({m: padded(peak.get(m, 0.0)) if m in down else r for m, r in planned.items()},
            "; ".join(f"{m} at {peak.get(m, 0.0):.3g} req/s < {SHRINK_BELOW:.2g} x planned {planned[m]:.3g}"
                      for m in down))


def router_counter(metrics_text: str, counter: str = "router_requests") -> dict[str, float]:
    """The router's counter ``counter`` (``<counter>_total``) per model from its /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name != counter:
            continue
        for s in fam.samples:
            if s.name == f"{counter}_total" and "model" in s.labels:
                out[s.labels["model"]] = out.get(s.labels["model"], 0.0) + s.value
    return out


def router_arrivals(metrics_text: str) -> dict[str, float]:
    """``router_requests_total`` per model from the router's /metrics text."""
    return router_counter(metrics_text, "router_requests")


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


def planned_slowdown(latency_ms: float, profile_ms: float, margin: float, factor: float = 1.0) -> float:
    """The interference slowdown a plan priced into an assignment: its ``latency_ms`` over the profile's
    latency of its batch (the percentile the planner used) x ``latency_margin`` x the calibration
    ``factor`` it was planned with; 1 where the plan has no latency. Measured batch times are compared
    with the profile x this, so what the interference model already explains is not calibrated twice."""
    base = profile_ms * margin * factor
    return max(1.0, latency_ms / base) if latency_ms > 0 and base > 0 else 1.0


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
