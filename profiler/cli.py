"""``controlplane profile``: latency tables, interference pairs and their fit, plots.

The lead's CLI mounts :func:`profile` (``app.command("profile")(profile)``); it
also runs alone: ``python -m profiler.cli --help``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help=__doc__)


def _splits(text: str) -> list[tuple[int, int]]:
    """``--splits``: "50/50,40/60" -> [(50, 50), (40, 60)], each share 1-100."""
    out = []
    for part in (x for x in text.replace(" ", "").split(",") if x):
        try:
            a, b = (int(v) for v in part.split("/"))
        except ValueError:
            raise typer.BadParameter(f"splits: expected A/B pairs of integers like 40/60, got {part!r}") from None
        if not (1 <= a <= 100 and 1 <= b <= 100):
            raise typer.BadParameter(f"splits: shares are 1-100 %, got {part!r}")
        out.append((a, b))
    if not out:
        raise typer.BadParameter("splits: empty")
    return out


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise typer.BadParameter(f"{what}: empty")
    return vals


@app.command()
def profile(
    models: str = typer.Option("all", "--models", "-m", help="comma-separated zoo models, or 'all'"),
    device: str = typer.Option("auto", "--device", help="'auto' (GPU if NVML sees one), 'gpu' or 'cpu'"),
    shares: str = typer.Option("20,40,50,60,80,100", help="shares in % (MPS on GPU, cores on CPU)"),
    batches: str = typer.Option("1,2,4,8,16,32", help="batch sizes"),
    precisions: str = typer.Option("fp32", help="'fp32', 'fp16' or 'fp32,fp16' (fp16 on GPU only, where the model holds)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="profiles root; files go to <out>/<device-slug>/ "
                                    "(default $CONTROLPLANE_CACHE/profiles, where `plan` and `up` look)"),
    csv_path: Path | None = typer.Option(None, "--csv", help="latency CSV (default <out>/<slug>/latency.csv)"),
    mode: str = typer.Option("inprocess", help="'inprocess' (one worker per share) or 'serving' (tritonserver per "
                             "share; with --interference, each pair's two sides are tritonservers too)"),
    source: str = typer.Option("zoo", help="in-process models: 'zoo' (seeded build) or 'torchscript' (the repository's model.pt)"),
    runs: int = typer.Option(100, help="timed runs per point (at most)"),
    min_runs: int = typer.Option(20, help="timed runs per point (at least)"),
    warmup: int = typer.Option(5, help="warm-up runs per point"),
    point_budget_s: float = typer.Option(1.0, help="stop timing a point after this long once min-runs are in"),
    start_mps: bool = typer.Option(True, help="GPU: start an MPS control daemon on the project's dirs if none answers (and stop it after)"),
    mps_dir: Path | None = typer.Option(None, help="MPS base dir (pipe/ and log/ under it); default $CONTROLPLANE_MPS_DIR or /tmp/gpulet-mps-profile-<uid>"),
    gpu_index: int = typer.Option(0, help="which GPU"),
    interference: bool = typer.Option(False, help="GPU: also measure co-located pairs and fit the interference model"),
    pairs_per_split: int = typer.Option(40, help="pair configurations per share split"),
    splits: str = typer.Option("50/50,40/60,20/80", help="share splits A/B (%) pairs run at; a sum over 100 "
                               "oversubscribes the GPU's SMs, as a gpu-let's models running at once can "
                               "(scheduler.colocation), e.g. 20/20,60/60,100/100"),
    pair_batches: str = typer.Option("1,4,16,32", help="batches pairs are drawn from"),
    pair_duration_s: float = typer.Option(0.4, help="seconds each pair (and each model alone) is timed"),
    skip_latency: bool = typer.Option(False, help="only the interference part"),
    parallel_start: bool = typer.Option(True, help="start every share's worker at once (start-up overlaps; timing stays one share at a time)"),
    plots: bool = typer.Option(True, help="write latency_<prec>.png and throughput_<prec>.png"),
    summary_out: Path | None = typer.Option(None, "--summary", help="write a summary (timings, errors) as JSON here"),
) -> None:
    """Profile latency per (model, share, batch) on this machine's GPU or CPU; resumable."""
    from rich.console import Console

    from controlplane import zoo

    from .common import device_name, existing_rows, profile_dir
    from controlplane.runtime.mps import Daemon, MPSNotActive, default_dirs

    con = Console(stderr=True)
    if out is None:
        from controlplane.paths import measured_profiles

        out = measured_profiles()
    names = zoo.names() if models == "all" else [m for m in models.split(",") if m]
    unknown = [m for m in names if m not in zoo.names()]
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {unknown}; known: {', '.join(zoo.names())}")
    if device == "auto":
        from .common import gpu_name

        device = "gpu" if gpu_name(gpu_index) else "cpu"
    if device not in ("gpu", "cpu"):
        raise typer.BadParameter(f"--device must be auto, gpu or cpu, got {device!r}")
    share_l, batch_l = _ints(shares, "shares"), _ints(batches, "batches")
    split_l, pair_batch_l = _splits(splits), _ints(pair_batches, "pair-batches")     # checked before any timing
    if mode not in ("inprocess", "serving"):
        raise typer.BadParameter(f"--mode must be inprocess or serving, got {mode!r}")
    prec_l = [p for p in precisions.split(",") if p]
    bad = [p for p in prec_l if p not in ("fp32", "fp16")]
    if bad:
        raise typer.BadParameter(f"precisions: unknown {bad}")
    on_gpu = device == "gpu"
    try:
        dev = device_name(device, gpu_index)
    except RuntimeError as e:
        con.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    pdir = profile_dir(out, dev)
    csv_file = csv_path or pdir / "latency.csv"
    summary: dict = {"device": dev, "csv": str(csv_file), "models": names}

    daemon = None
    pipe_dir = None
    if on_gpu:
        pipe, log = default_dirs(mps_dir)
        import os

        daemon = Daemon(pipe, log, private=mps_dir is None and not os.environ.get("CONTROLPLANE_MPS_DIR"))
        if start_mps:
            daemon.start()
        pipe_dir = daemon.pipe_dir
    try:
        if not skip_latency:
            t0 = time.perf_counter()
            if mode == "serving":
                from .serving import profile_serving

                res = profile_serving(names, device=device, shares=share_l, batches=batch_l, out_csv=csv_file,
                                      runs=runs, min_runs=min_runs, warmup=warmup, point_budget_s=point_budget_s,
                                      mps_pipe_dir=pipe_dir, gpu_index=gpu_index, device_label=dev,
                                      progress=_printer(con))
            else:
                from .latency import profile_latency

                res = profile_latency(names, device=device, shares=share_l, batches=batch_l, precisions=prec_l,
                                      out_csv=csv_file, runs=runs, min_runs=min_runs, warmup=warmup,
                                      point_budget_s=point_budget_s, source=source, mps_pipe_dir=pipe_dir,
                                      gpu_index=gpu_index, device_label=dev, progress=_printer(con),
                                      parallel_start=parallel_start)
            summary["latency"] = {"seconds": time.perf_counter() - t0, "measured": len(res.measured),
                                  "per_model_s": res.per_model_s, "skipped": res.skipped}
            con.print(f"latency: {len(res.measured)} new row(s) in {time.perf_counter() - t0:.1f} s -> {csv_file}")
            for s in res.skipped:
                con.print(f"[yellow]skipped[/] {s['model']} {s['precision']} at {s['share']}%: {s['reason']}")
            if plots:
                from .plots import plot_tables

                rows = existing_rows(csv_file)
                if rows:
                    for p in plot_tables(rows, csv_file.parent):
                        con.print(f"plot: {p} ({p.stat().st_size // 1024} KB)")
        if interference:
            if not on_gpu and mode != "serving":
                raise typer.BadParameter("--interference needs a GPU (pairs of MPS clients), or --mode serving "
                                         "(pairs of tritonservers, on the CPU side by side on its cores)")
            from .interference import fit_and_evaluate, measure_pairs, pair_configs, read_pairs, save_fit

            t0 = time.perf_counter()
            cfgs = pair_configs(names, split_l, batches=pair_batch_l, per_split=pairs_per_split)
            if mode == "serving":       # through two gpu-let tritonservers: what a deployment's models meet
                from .serving import measure_pairs_serving

                pairs_csv = pdir / "interference_pairs_serving.csv"
                measure_pairs_serving(cfgs, dev, pairs_csv, on_gpu, pipe_dir, gpu_index, seconds=pair_duration_s,
                                      progress=_printer(con))
            else:
                pairs_csv = pdir / "interference_pairs.csv"
                measure_pairs(cfgs, dev, pairs_csv, pipe_dir, gpu_index, pair_duration_s, progress=_printer(con))
            rows = [r for r in read_pairs(pairs_csv) if r["device"] == dev]
            fit, report = fit_and_evaluate(rows)
            report["pairs"] = pairs_csv.name          # which measurement the planner's fit comes from
            save_fit(fit, report, pdir / "interference.json")
            summary["interference"] = {"seconds": time.perf_counter() - t0, **report}
            h = report["heldout"]
            con.print(f"interference: {len(rows)} pairs; held-out slowdown error mean {h['mae']:.4f}, "
                      f"max {h['max_abs']:.4f} (MAPE {100 * h['mape']:.2f} %) -> {pdir / 'interference.json'}")
    except MPSNotActive as e:
        con.print(f"[red]refused:[/] {e}")
        raise typer.Exit(2) from None
    finally:
        if daemon is not None:
            daemon.stop()
    if summary_out:
        summary_out.parent.mkdir(parents=True, exist_ok=True)
        summary_out.write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _printer(con):
    def ev(e: dict) -> None:
        t = e.get("type")
        if t == "plan":
            con.print(f"plan: {e['total']} point(s) to measure, {e.get('done', 0)} already done")
        elif t == "share":
            con.print(f"share {e['share']}%: {e['points']} point(s)" + (f", cores {e['cores']}" if e.get("cores") else ""))
        elif t == "row":
            r = e["row"]
            con.print(f"  {r.model:<14} {r.precision} s{r.share:>3} b{r.batch:>3}  p50 {r.p50_ms:9.3f}  "
                      f"p99 {r.p99_ms:9.3f} ms  runs {r.runs}", highlight=False)
        elif t == "pair":
            r = e["row"]
            con.print(f"  pair {r['model_a']}/{r['batch_a']}@{r['share_a']} + {r['model_b']}/{r['batch_b']}@{r['share_b']}:"
                      f" slowdown {r['slowdown_a']:.3f} / {r['slowdown_b']:.3f}", highlight=False)
        elif t == "skipped":
            con.print(f"  [yellow]skipped[/] {e['model']} {e['precision']}: {e['reason']}")

    return ev


if __name__ == "__main__":
    app()
