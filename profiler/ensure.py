"""``ensure_profile``: profile what a deployment needs and is missing, with a progress bar.

``controlplane up`` on a device with no (or an incomplete) profile calls this
first; rows already in the CSV are skipped, so it is cheap once done. On a GPU the
table is measured through the serving path (:mod:`profiler.serving`: a tritonserver
per share, Triton's own time per batch): measured on the H200, the in-process
forward pass left out the python backend's per-batch input and output work, which
capped resnet50 near half of what the in-process table promised, so plans from it
were not what deployments served. On the CPU the in-process table is kept (CI's
profiles and tests plan from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .common import DEFAULT_BATCHES, DEFAULT_SHARES, existing_rows, profile_dir, row_key

#: Rough seconds per point for the first estimate (before any point was measured); refined as it goes.
_FIRST_GUESS_S = {"cpu": 0.6, "gpu": 0.5}
_WORKER_START_S = {"cpu": 3.0, "gpu": 6.0}


def estimate_seconds(points: int, shares: int, device: str, point_budget_s: float) -> float:
    kind = "cpu" if device == "cpu" else "gpu"
    return points * min(point_budget_s, _FIRST_GUESS_S[kind]) + shares * _WORKER_START_S[kind]


def ensure_profile(models: Sequence[str], device: str = "cpu", shares: Sequence[int] = DEFAULT_SHARES,
                   batches: Sequence[int] = DEFAULT_BATCHES, progress: bool = True, *,
                   profiles_root: str | Path = "profiles", precisions: Sequence[str] = ("fp32",),
                   runs: int = 50, min_runs: int = 10, point_budget_s: float = 0.5,
                   mps_pipe_dir: str | Path | None = None, gpu_index: int = 0, console=None,
                   repository: str | None = None) -> Path:
    """Make sure ``profiles/<device>/latency.csv`` has every (model, share, batch); return its path.

    ``device``: 'cpu' or 'gpu'. ``progress``: show a rich progress bar with a time estimate
    (or pass a callable taking the profiler's event dicts). GPU shares < 100 need a running MPS
    daemon on ``mps_pipe_dir`` (see :class:`controlplane.runtime.mps.Daemon`); without one MPSNotActive is raised.
    ``repository``: where models the zoo cannot build live (``repo add``).
    """
    from .common import device_name
    from .latency import profile_latency
    from .serving import profile_serving

    on_gpu = device != "cpu"
    dev = device_name("gpu" if on_gpu else "cpu", gpu_index)
    csv_path = profile_dir(profiles_root, dev) / "latency.csv"
    have = {row_key(r) for r in existing_rows(csv_path)}
    precs = ["fp32"] if on_gpu else [p for p in precisions if p != "fp16"]   # the serving path is fp32
    missing = [(m, s, b, p) for m in models for s in shares for b in batches for p in precs
               if (dev, m, int(s), int(b), p) not in have]
    if not missing:
        return csv_path
    kw = dict(device="gpu" if on_gpu else "cpu", shares=shares, batches=batches, out_csv=csv_path,
              runs=runs, min_runs=min_runs, point_budget_s=point_budget_s, mps_pipe_dir=mps_pipe_dir,
              gpu_index=gpu_index, device_label=dev)
    kw["repository"] = repository
    if on_gpu:
        profile = profile_serving
    else:
        profile, kw["precisions"] = profile_latency, precs
        python = _python_models(models, repository)
        if python:      # a Triton python model runs only inside tritonserver: its CPU profile is the serving one
            skw = {k: v for k, v in kw.items() if k != "precisions"}
            profile_serving(python, progress=progress if callable(progress) else None, **skw)
            models = [m for m in models if m not in python]
            if not models:
                return csv_path
    if callable(progress):
        profile(models, progress=progress, **kw)
        return csv_path
    if not progress:
        profile(models, **kw)
        return csv_path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    n_shares = len({s for _, s, _, _ in missing})
    est = estimate_seconds(len(missing), n_shares, device, point_budget_s)
    console.print(f"[bold]profiling[/] {len(missing)} missing point(s) of {', '.join(models)} on {dev} "
                  f"(shares {sorted(set(shares))}, batches {sorted(set(batches))}); estimated ~{est:.0f} s; "
                  f"results cached in {csv_path}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task("profile", total=len(missing))

        def on_event(ev: dict) -> None:
            t = ev.get("type")
            if t == "share":
                bar.update(task, description=f"share {ev['share']:>3}%")
            elif t == "row":
                r = ev["row"]
                bar.update(task, advance=1, description=f"share {r.share:>3}% {r.model} b{r.batch}")
            elif t == "skipped":
                bar.update(task, advance=ev.get("n", 0))
                bar.console.print(f"[yellow]skipped[/] {ev.get('n', 0)} point(s) of {ev.get('model')} at share "
                                  f"{ev.get('share')}%: {ev.get('reason')}", highlight=False)

        profile(models, progress=on_event, **kw)
    return csv_path


def _python_models(models: Sequence[str], repository: str | None) -> list[str]:
    """The models of ``repository`` that are Triton python models of the user's (`repo add --python`)."""
    from controlplane.repository import RepositoryError, SourceRepository

    try:
        repo = SourceRepository(repository)
    except RepositoryError:
        return []
    return [m for m in models if m in repo.names() and repo[m].is_python()]
