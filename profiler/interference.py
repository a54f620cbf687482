"""Co-location interference: pairs of models at complementary shares, each one's slowdown.

For each split (50/50, 40/60, 20/80) two serve-mode workers run on the GPU at
the same time, A at the first share and B at the second (both MPS clients). For
a pair configuration (model_a, batch_a, model_b, batch_b):

1. each worker times its model *alone* for ``duration_s`` just before (the
   other is loaded but idle),
2. both run back-to-back batches over the same wall-clock window (a shared
   start time), and
3. slowdown = mean latency together / mean latency alone, for each side.

With ``graphs`` (default) each side replays a CUDA graph of its forward pass, so
what is timed is the GPU work that interference slows, not the host's launch
overhead (whose jitter, on the H100 machine, was larger than the effect).

Rows go to ``interference_pairs.csv`` (PAIR_COLUMNS, resumable). The fit is the
scheduler's :func:`controlplane.interference.fit_pairs`; held-out
error is measured on a seeded split of the pair rows.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .latency import Worker, check_mps, worker_env

SPLITS: tuple[tuple[int, int], ...] = ((50, 50), (40, 60), (20, 80))
PAIR_BATCHES: tuple[int, ...] = (1, 4, 16, 32)


def _pair_columns() -> list[str]:
    try:
        from controlplane.interference import PAIR_COLUMNS

        return list(PAIR_COLUMNS)
    except ImportError:  # pragma: no cover
        return ["device", "model_a", "share_a", "batch_a", "model_b", "share_b", "batch_b", "slowdown_a", "slowdown_b"]


def pair_configs(models: Sequence[str], splits: Sequence[tuple[int, int]] = SPLITS,
                 batches: Sequence[int] = PAIR_BATCHES, per_split: int = 40, seed: int = 0) -> list[tuple]:
    """A seeded sample of (share_a, share_b, model_a, batch_a, model_b, batch_b), ``per_split`` per split.

    Ordered pairs (A gets the first share), so 40/60 and 20/80 see each model on both sides.
    """
    rng = random.Random(seed)
    out = []
    for sa, sb in splits:
        every = [(ma, ba, mb, bb) for ma in models for mb in models for ba in batches for bb in batches]
        rng.shuffle(every)
        out += [(sa, sb, *c) for c in every[:per_split]]
    return out


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols = _pair_columns()
    for i, r in enumerate(rows, start=2):
        missing = [c for c in cols if (r.get(c) or "") == ""]
        if missing:
            raise ValueError(f"{path}:{i}: missing {missing}")
        for c in ("share_a", "share_b", "batch_a", "batch_b", "slowdown_a", "slowdown_b"):
            try:
                float(r[c])
            except ValueError:
                raise ValueError(f"{path}:{i}: column {c!r}: not a number: {r[c]!r}") from None
    return rows


def _key(device: str, sa, sb, ma, ba, mb, bb) -> tuple:
    return (device, int(sa), int(sb), ma, int(ba), mb, int(bb))


def pending(configs: Sequence[tuple], device: str, out_csv: Path,
            progress: Callable[[dict], None] | None = None) -> dict[tuple[int, int], list[tuple]]:
    """The configurations ``out_csv`` does not hold yet, by split (resuming), said through ``progress``."""
    done = {_key(r["device"], r["share_a"], r["share_b"], r["model_a"], r["batch_a"], r["model_b"], r["batch_b"])
            for r in read_pairs(out_csv)}
    todo = [c for c in configs if _key(device, *c) not in done]
    if progress:
        progress({"type": "plan", "total": len(todo), "done": len(configs) - len(todo)})
    out: dict[tuple[int, int], list[tuple]] = {}
    for c in todo:
        out.setdefault((c[0], c[1]), []).append(c)
    return out


def append_pair(out_csv: Path, row: dict) -> None:
    """One measured pair appended to ``out_csv`` (its header first in a new file)."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out_csv.exists() or out_csv.stat().st_size == 0
    with out_csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_pair_columns())
        if new_file:
            w.writeheader()
        w.writerow(row)


def measure_pairs(configs: Sequence[tuple], device: str, out_csv: str | Path, mps_pipe_dir: str | Path,
                  gpu_index: int = 0, duration_s: float = 0.4, precision: str = "fp32", graphs: bool = True,
                  progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Measure pair configurations on the GPU; append rows to ``out_csv``; return the new rows."""
    out_csv = Path(out_csv)
    by_split = pending(configs, device, out_csv, progress)
    if not by_split:
        return []
    check_mps([s for split in by_split for s in split], True, mps_pipe_dir)
    new = []
    for (sa, sb), cs in by_split.items():
        models_a = sorted({c[2] for c in cs})
        models_b = sorted({c[4] for c in cs})
        wa = Worker({"mode": "serve", "device": "gpu", "share": sa, "preload": [[m, precision] for m in models_a], "graphs": graphs},
                    worker_env(sa, True, gpu_index, mps_pipe_dir), interactive=True)
        wb = Worker({"mode": "serve", "device": "gpu", "share": sb, "preload": [[m, precision] for m in models_b], "graphs": graphs},
                    worker_env(sb, True, gpu_index, mps_pipe_dir), interactive=True)
        try:
            for w in (wa, wb):
                msg = w.next()
                while "ready" not in msg:
                    if "fatal" in msg:
                        raise RuntimeError(f"pair worker failed: {msg['fatal']}\n{w.log_tail()}")
                    msg = w.next()
            warmed: set[tuple[str, str, int]] = set()

            def alone_ms(w: Worker, side: str, m: str, b: int) -> float:
                if (side, m, b) not in warmed:
                    _reply(w, {"cmd": "warm", "model": m, "batch": b, "precision": precision, "seconds": 0.3})
                    warmed.add((side, m, b))
                r = _reply(w, {"cmd": "run", "model": m, "batch": b, "precision": precision,
                               "start_at": time.time(), "duration": duration_s})
                return r["mean_ms"]

            for (_, _, ma, ba, mb, bb) in cs:
                la = alone_ms(wa, "a", ma, ba)
                lb = alone_ms(wb, "b", mb, bb)
                start = time.time() + 0.05
                for w, m, b in ((wa, ma, ba), (wb, mb, bb)):
                    w.proc.stdin.write(json.dumps({"cmd": "run", "model": m, "batch": b, "precision": precision,
                                                   "start_at": start, "duration": duration_s}) + "\n")
                    w.proc.stdin.flush()
                ra, rb = _reply(wa), _reply(wb)
                row = {"device": device, "model_a": ma, "share_a": sa, "batch_a": ba, "model_b": mb, "share_b": sb,
                       "batch_b": bb, "slowdown_a": round(ra["mean_ms"] / la, 4),
                       "slowdown_b": round(rb["mean_ms"] / lb, 4)}
                append_pair(out_csv, row)
                new.append(row)
                if progress:
                    progress({"type": "pair", "row": row, "alone_a_ms": la, "alone_b_ms": lb,
                              "together_a_ms": ra["mean_ms"], "together_b_ms": rb["mean_ms"]})
        finally:
            wa.close()
            wb.close()
    return new


def _reply(w: Worker, cmd: dict | None = None) -> dict:
    """Send a command (if any) and return the next answer, skipping warnings."""
    msg = w.send(cmd) if cmd is not None else w.next()
    while "warning" in msg:
        msg = w.next()
    if "error" in msg or "fatal" in msg:
        raise RuntimeError(f"pair worker: {msg}\n{w.log_tail()}")
    return msg


def fit_and_evaluate(rows: Sequence[dict], holdout: float = 0.25, seed: int = 0) -> tuple[object, dict]:
    """Fit on a seeded (1 - holdout) of the pair rows, report error on the rest; return (fit on all rows, report).

    Errors are of the slowdown factor (absolute: 0.05 = 5 percentage points).
    """
    from controlplane.interference import fit_pairs, prediction_errors

    rows = list(rows)
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, int(round(holdout * len(rows))))
    test = [rows[i] for i in idx[:n_test]]
    train = [rows[i] for i in idx[n_test:]]
    held = prediction_errors(fit_pairs(train), test)
    train_err = prediction_errors(fit_pairs(train), train)
    full = fit_pairs(rows)
    slow = [float(r["slowdown_a"]) for r in rows] + [float(r["slowdown_b"]) for r in rows]
    report = {"n_pairs": len(rows), "n_train_pairs": len(train), "n_test_pairs": len(test), "seed": seed,
              "heldout": held, "train": train_err,
              "measured_slowdown": {"mean": sum(slow) / len(slow), "max": max(slow), "min": min(slow)},
              "baseline_no_interference_heldout": prediction_errors(_NoInt(), test)}
    return full, report


class _NoInt:
    name = "none"

    def slowdown(self, *a, **k) -> float:
        return 1.0


def save_fit(model, report: dict, path: str | Path) -> None:
    data = model.to_json()
    data["evaluation"] = report
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
