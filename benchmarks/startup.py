"""Where a gpu-let's start goes: the time from spawning its tritonserver to its answering ready, by stage.

    python benchmarks/startup.py --out DIR [--deployment deployments/gpu-run.yaml] [--rounds 2] [--render DIR/startup.json]

A re-plan serves its new plan only once the gpu-lets it adds are ready (issue 12: 9-14 s of every
transition on the H200 in live runs 16-17, 5-10 s in run 18), so this plans the deployment as `up` would, starts the MPS daemon,
and starts each of the plan's gpu-lets with the process runtime: alone, ``--rounds`` times (the first
finds cold caches), once more with Triton's auto-complete of the configs on (as the runtime ran them until
2026-11-30: a stub per model that imports torch only to complete a config), then all of them at once (as a
re-plan that adds several does). Each start is cut
into stages from its server's own log, whose lines carry the time:

- ``spawn -> loading``: the process up to Triton's first model load (libraries, backends, CUDA);
- per model, ``model.py``'s line (controlplane/templates/model.py): its stub's own start-up, of which
  importing torch; loading the weights onto the device; preparing (CUDA graphs of every batch size, or
  a warm-up run);
- ``last model -> HTTP``: the rest of the server's start; ``HTTP -> ready``: until the runtime saw it ready.

On a GPU it then captures each model's CUDA graphs in a process of its own at its gpu-let's share, as
``model.py`` does and as it did before (:data:`PROBES`), and checks replays against the eager forward.
Prints a table; writes DIR/startup.json and the table to docs/benchmarks.md ("Start-up").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BEGIN, END = "<!-- startup-table:begin -->", "<!-- startup-table:end -->"
#: how the probe captures a model's CUDA graphs: model.py until 2026-11-30 (two warm-ups before every size,
#: torch.cuda.graph), then each of the two changes made that day (CudaGraphs' docstring)
PROBES = {"before": ["--warmups", "2", "--torch-graph"], "no warm-ups": ["--warmups", "0", "--torch-graph"],
          "model.py": ["--warmups", "0"]}
LINE = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+) \d+ \S+\] (.*)$")
MODEL_LINE = re.compile(r'"(\S+): initialized in ([0-9.]+) s \((?:stub ([0-9.]+) s: import torch ([0-9.]+) s; )?'
                        r'load ([0-9.]+) s, prepare ([0-9.]+) s: ([^)]*)\)')


def _clock(h: str, m: str, s: str, near: float) -> float:
    """A log line's time of day as a Unix time, on the day of ``near`` (local time, as Triton writes it)."""
    day = dt.datetime.fromtimestamp(near).replace(hour=0, minute=0, second=0, microsecond=0)
    t = day.timestamp() + int(h) * 3600 + int(m) * 60 + float(s)
    return t - 86400 if t - near > 43200 else t


def stages(log: str, spawned: float, ready: float) -> dict:
    """One start's stages (seconds) from the last section of a server's log (module doc)."""
    section = log.rsplit("=== controlplane: starting", 1)[-1]
    loading = http = None
    models: dict[str, dict] = {}
    last_loaded = spawned
    for raw in section.splitlines():
        m = LINE.match(raw)
        if not m:
            continue
        t, text = _clock(*m.groups()[:3], near=spawned), m.group(4)
        if "loading: " in text and loading is None:
            loading = t
        elif (mm := MODEL_LINE.search(text)) is not None:
            name, total, stub, imp, load, prep, what = mm.groups()
            models[name] = {"total": float(total), "stub": float(stub or 0), "import_torch": float(imp or 0),
                            "load": float(load), "prepare": float(prep), "prepare_what": what,
                            "done_after": round(t - spawned, 2)}
            last_loaded = max(last_loaded, t)
        elif "Started HTTPService" in text:
            http = t
    out = {"total": round(ready - spawned, 2), "models": models}
    if loading is not None:
        out["spawn_to_loading"] = round(loading - spawned, 2)
        if models:
            out["loading_to_stubs"] = round(min(last_loaded - loading - m["total"] for m in models.values()), 2)
    if http is not None:
        out["models_to_http"] = round(http - last_loaded, 2)
        out["http_to_ready"] = round(ready - http, 2)
    return out


def _row(launch, spawned: float, ready: float) -> dict:
    """One start of a gpu-let: what it runs and its stages (:func:`stages`)."""
    g = launch.gpulet
    return {"gpulet": g.id, "share": g.share, "models": [a.model for a in g.models],
            **stages(launch.log_path.read_text(errors="replace"), spawned, ready)}


def start_one(runtime, launch) -> dict:
    """Start one gpu-let, wait until ready, read its stages, stop it."""
    spawned = time.time()
    runtime.start([launch])
    try:
        return _row(launch, spawned, time.time())
    finally:
        runtime.remove([launch.gpulet.id])


def start_together(runtime, launches) -> list[dict]:
    """Start every gpu-let at once (each waited for on its own thread, so each has its own ready time)."""
    def one(ln):
        spawned = time.time()
        runtime.start([ln])
        return _row(ln, spawned, time.time())

    try:
        with ThreadPoolExecutor(len(launches)) as pool:
            return list(pool.map(one, launches))
    finally:
        runtime.remove([ln.gpulet.id for ln in launches])


# --------------------------------------------------------------------------- CUDA graphs, in-process


def probe(folder: Path, warmups_after_first: int, lean: bool) -> dict:
    """In this process (an MPS client at the share its environment sets): import torch, load the model,
    capture its CUDA graphs as model.py does, and compare replays with the eager forward."""
    t0 = time.monotonic()
    import torch

    from model_steps import load_model_py     # model.py as a module, without Triton

    t_import = time.monotonic()
    cfg = json.loads((folder / "config.json").read_text())
    mod = load_model_py()
    dev = torch.device("cuda", 0)
    torch.set_num_threads(1)
    torch.zeros(1, device=dev)
    t_cuda = time.monotonic()
    model = torch.jit.load(str(folder / "model.pt"), map_location=dev).eval()
    torch.cuda.synchronize(dev)
    t_load = time.monotonic()
    shapes = [(tuple(s), mod.DTYPES.get(dt, torch.float32)) for s, dt in cfg["inputs"]]   # as model.py maps them
    graphs = mod.CudaGraphs(model, shapes, cfg["max_batch"], dev, warmups_after_first=warmups_after_first, lean=lean)
    t_graphs = time.monotonic()
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for b in sorted({1, max(1, cfg["max_batch"] // 4) + 1, cfg["max_batch"]}):
        xs = [(torch.rand((b, *s), generator=gen) * 2).to(dt) if dt.is_floating_point
              else torch.randint(0, 100, (b, *s), generator=gen, dtype=dt) for s, dt in shapes]
        with torch.inference_mode():
            ref = model(*[x.to(dev) for x in xs])
            ref = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
            ref = [r.float().cpu() for r in ref]
        got = [o.float().cpu() for o in graphs(xs)]
        worst = max(worst, max(float((g - r).abs().max()) for g, r in zip(got, ref)))
    return {"import_torch": round(t_import - t0, 2), "cuda_init": round(t_cuda - t_import, 2),
            "load": round(t_load - t_cuda, 2), "graphs": round(t_graphs - t_load, 2),
            "max_abs_diff": worst}


def probe_models(launches, work: Path, env_base: dict) -> list[dict]:
    """Each model of the plan (once, at the share of the first gpu-let that has it): ``probe`` in a process
    of its own, with two warm-ups before every size and with none after the largest."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    out, seen = [], set()
    for ln in launches:
        for a in ln.gpulet.models:
            if a.model in seen:
                continue
            seen.add(a.model)
            folder = next((ln.repository / a.model).glob("[0-9]*"))
            cfg = text_format.Parse((ln.repository / a.model / "config.pbtxt").read_text(), mc.ModelConfig())
            cfg = {"max_batch": cfg.max_batch_size,
                   "inputs": [[list(i.dims), mc.DataType.Name(i.data_type)] for i in cfg.input]}
            probe_dir = work / "probe" / a.model
            probe_dir.mkdir(parents=True, exist_ok=True)
            (probe_dir / "config.json").write_text(json.dumps(cfg))
            (probe_dir / "model.pt").unlink(missing_ok=True)
            os.symlink(folder / "model.pt", probe_dir / "model.pt")
            row = {"model": a.model, "share": ln.gpulet.share, "max_batch": cfg["max_batch"]}
            for variant, args in PROBES.items():
                p = subprocess.run([sys.executable, __file__, "--probe", str(probe_dir), *args],
                                   capture_output=True, text=True, timeout=300, env={**env_base, **ln.env})
                try:
                    row[variant] = json.loads(p.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    row[variant] = {"error": (p.stdout + p.stderr)[-800:]}
            print(f"  probe {a.model}: {row}", flush=True)
            out.append(row)
    return out


# --------------------------------------------------------------------------- report


def _table_row(kind: str, s: dict) -> str:
    ms = s["models"]
    per = "; ".join(f"{n}: stub {m['stub']:.1f} (torch {m['import_torch']:.1f}), load {m['load']:.1f}, "
                    f"prepare {m['prepare']:.1f}" for n, m in ms.items())
    g = lambda k: f"{s[k]:.1f}" if k in s else "—"   # noqa: E731
    return (f"| {kind} | {s['gpulet']} ({s['share']} %) | {s['total']:.1f} | {g('spawn_to_loading')} | "
            f"{g('loading_to_stubs')} | {per} | {g('models_to_http')} | {g('http_to_ready')} |")


def render(doc: dict) -> str:
    lines = [f"Run {doc['date']} on {doc['machine']}, source {doc.get('commit', '?')}; `{doc['command']}`; "
             f"deployment `{doc['deployment']}`. Seconds.", "",
             "| start | gpu-let | spawn -> ready | spawn -> loading | loading -> stubs up | per model (stub, of "
             "which import torch; load; prepare) | last model -> HTTP | HTTP -> ready seen |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, rnd in enumerate(doc["alone"]):
        lines += [_table_row(f"alone, round {i + 1}", s) for s in rnd]
    lines += [_table_row("alone, Triton's auto-complete on", s) for s in doc.get("auto_complete", [])]
    lines += [_table_row("all at once", s) for s in doc.get("together", [])]
    if doc.get("probes"):
        names = [v for v in PROBES if any(v in p for p in doc["probes"])]
        lines += ["", "CUDA graphs of every batch size, captured in a process of its own at the gpu-let's share: "
                  "seconds to capture them all (largest difference of a replay from the eager forward). "
                  "before: two eager warm-ups before every size, `torch.cuda.graph`; no warm-ups: none after the "
                  "largest size; model.py: and `capture_begin`/`capture_end` on its own stream.", "",
                  "| model | share | batches | import torch | CUDA init | load | " + " | ".join(names) + " |",
                  "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for p in doc["probes"]:
            first = next((p[v] for v in names if "import_torch" in p.get(v, {})), {})
            f = lambda d, k: f"{d[k]:.2f}" if k in d else "—"   # noqa: E731
            cells = [f"{p[v]['graphs']:.2f} ({p[v]['max_abs_diff']:.2g})" if "graphs" in p.get(v, {}) else "error"
                     for v in names]
            lines.append(f"| {p['model']} | {p['share']} % | 1-{p['max_batch']} | {f(first, 'import_torch')} | "
                         f"{f(first, 'cuda_init')} | {f(first, 'load')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("startup-out"))
    ap.add_argument("--deployment", type=Path, default=ROOT / "deployments" / "gpu-run.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpulet-startup"), help="run directory")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--render", type=Path, help="only write docs/benchmarks.md from this startup.json")
    ap.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--warmups", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--torch-graph", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.warmups, lean=not args.torch_graph)))
        return
    if args.render:
        doc = json.loads(args.render.read_text())
        from benchlib import write_section

        write_section(BEGIN, END, render(doc), "## Start-up of a gpu-let (issue 12)")
        print(render(doc))
        return

    from controlplane.deploy import Controller
    from controlplane.spec import load_deployment
    from serving import gpu_name

    dep = load_deployment(args.deployment)
    dep = dep.model_copy(update={"run_dir": str(args.work / "run")})
    ctl = Controller(dep)
    plan = ctl.prepare()
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{gpu_name()} ({os.cpu_count()} cores)", "commit": os.environ.get("BENCH_COMMIT", "?"),
           "command": " ".join(["benchmarks/startup.py", *sys.argv[1:]]), "deployment": str(args.deployment),
           "plan": [{"gpulet": g.id, "share": g.share, "models": [a.model for a in g.models]} for g in plan.gpulets],
           "alone": [], "together": []}
    mps = None
    try:
        if ctl.devices.on_gpu:
            from controlplane.runtime.mps import Daemon

            mps = Daemon(ctl._mps_pipe_dir(), ctl.paths.mps(dep.name) / "log", private=True).start()
        runtime = ctl.runtime = ctl._make_runtime()
        launches = ctl.launches()
        for i in range(args.rounds):
            doc["alone"].append([start_one(runtime, ln) for ln in launches])
            print(f"round {i + 1}: {json.dumps(doc['alone'][-1])}", flush=True)
        # the same, with Triton's auto-complete of the configs on (as before the runtime turned it off)
        command = runtime._command
        runtime._command = lambda r: [a for a in command(r) if a != "--disable-auto-complete-config"]
        doc["auto_complete"] = [start_one(runtime, ln) for ln in launches]
        runtime._command = command
        print(f"auto-complete on: {json.dumps(doc['auto_complete'])}", flush=True)
        doc["together"] = start_together(runtime, launches)
        print(f"together: {json.dumps(doc['together'])}", flush=True)
        runtime.stop()
        if ctl.devices.on_gpu:
            from controlplane.runtime.process import server_env

            doc["probes"] = probe_models(launches, args.work, server_env(runtime.install, {}))
    finally:
        if ctl.runtime is not None:
            ctl.runtime.stop()
        if mps is not None:
            mps.stop()
    from benchlib import report

    report(render(doc), doc, args.out / "startup.json",
           (BEGIN, END, "## Start-up of a gpu-let (issue 12)") if ctl.devices.on_gpu else None)


if __name__ == "__main__":
    main()
