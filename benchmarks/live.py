"""Live re-planning on a rate trace: a deployment that re-plans from its measured load, against two static plans.

    python benchmarks/live.py --out DIR [--deployment deployments/gpu-run.yaml] [--segment-s 20] [--epoch-s 10]
                              [--systems live,static-peak,static-start] [--resume]
    python benchmarks/live.py --render DIR/live.json    # its table into docs/benchmarks.md ("Live re-planning")

The trace, in segments of ``--segment-s`` seconds, each a factor on the deployment's rates: steady (1x),
a step to 2x on the first model, back to 1x, then the second model ramping 1x -> 2x over three segments.
Systems, each brought up with `controlplane up` and driven by the same trace (Poisson, HTTP, through the router):

- ``live``: planned for the start rates, with ``scheduler.epoch_s`` set: re-plans from the router's measured
  arrivals (issue 12), incrementally first;
- ``static-peak``: planned once for the trace's peak rates of every model, never re-planned;
- ``static-start``: planned once for the start rates, never re-planned.

Per segment and model: offered and sent rates, SLO attainment (answered within the SLO over sent),
failed requests (errors other than the router's or Triton's deadline refusals). Per system: GPU-share
seconds held (the running plan's shares summed, / 100, integrated over the trace; read from the
deployment's state file twice a second) and, for ``live``, the time from each load change to the first
re-plan after it. A PNG of attainment and share over time goes to DIR (not into the repository).
A system takes about 10 segments plus its start (~260 s with 20 s segments on the H200): on a GPU machine
whose calls are limited to 10 minutes, run the systems over several calls with ``--resume``, which keeps
the systems already in DIR/live.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.spec import Deployment, load_deployment  # noqa: E402

BEGIN, END = "<!-- live-table:begin -->", "<!-- live-table:end -->"
SYSTEMS = ["live", "static-peak", "static-start"]


def trace(models: list[str]) -> list[dict[str, float]]:
    """Per segment, the factor on each model's rate (module doc)."""
    first, second = models[0], models[1 % len(models)]
    steady = {m: 1.0 for m in models}
    out = [steady, steady, {**steady, first: 2.0}, {**steady, first: 2.0}, steady, steady]
    out += [{**steady, second: f} for f in (1.33, 1.67, 2.0, 2.0)]
    return out


def deployment_for(dep: Deployment, system: str, segments: list[dict[str, float]], epoch_s: float,
                   run_dir: Path) -> Deployment:
    d = dep.model_dump(mode="json", exclude_none=True)
    d["name"] = f"{dep.name}-{system}"
    d["run_dir"] = str(run_dir / system)
    d["router"] = {"http_port": 0, "grpc_port": 0}
    peak = {m["name"]: max(s[m["name"]] for s in segments) for m in d["models"]}
    for m in d["models"]:
        if system == "static-peak":
            m["rate"] = m["rate"] * peak[m["name"]]
    d.setdefault("scheduler", {})
    d["scheduler"]["epoch_s"] = epoch_s if system == "live" else None
    d["scheduler"]["window_s"] = epoch_s * 1.5
    return Deployment.model_validate(d)


class StateWatch(threading.Thread):
    """Reads the deployment's state file twice a second: (time, shares held / 100, re-plans so far)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.samples, self.stop_at = path, [], False

    def run(self) -> None:
        while not self.stop_at:
            try:
                st = json.loads(self.path.read_text())
                shares = sum(g["share"] for g in st["plan"]["gpulets"]) / 100.0
                self.samples.append((time.monotonic(), shares, st.get("replans", 0), st.get("last_replan")))
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.5)


def run_system(dep: Deployment, base: dict[str, float], segments: list[dict[str, float]], seg_s: float,
               log) -> dict:
    """Bring ``dep`` up, drive it with the trace (``base`` rates x each segment's factors), bring it down."""
    from controlplane import loadgen as lg
    from controlplane.paths import RunPaths

    import yaml

    run_dir = Path(dep.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = run_dir.parent / f"{dep.name}.yaml"
    f.write_text(yaml.safe_dump(dep.model_dump(mode="json", exclude_none=True), sort_keys=False))
    p = subprocess.run([sys.executable, "-m", "controlplane", "up", "-f", str(f), "--detach"],
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        return {"error": f"up failed: {p.stdout[-1500:]} {p.stderr[-1500:]}"}
    out: dict = {"segments": []}
    state_path = RunPaths.for_deployment(dep).state
    watch = StateWatch(state_path)
    try:
        st = json.loads(state_path.read_text())
        url = f"{st['router']['host']}:{st['router']['http_port']}"
        slo = {m.name: m.slo_ms for m in dep.models}
        lg.run(url, {m: r * 0.5 for m, r in base.items()}, 3.0, slo_ms=slo, seed=5)       # warm-up
        watch.start()
        t0 = time.monotonic()
        for i, seg in enumerate(segments):
            ts = time.monotonic() - t0
            r = lg.run(url, {m: base[m] * seg[m] for m in base}, seg_s, slo_ms=slo, seed=11 + i)
            row = {"t_s": round(ts, 1), "factors": seg, "models": {}}
            for name, mr in r.models.items():
                row["models"][name] = {"offered": round(mr.rate, 2), "sent_rate": round(mr.sent_rate, 2),
                                       "sent": mr.sent, "ok": mr.ok, "dropped": mr.dropped, "errors": mr.errors,
                                       "attainment": mr.slo_attainment, "p99_ms": mr.p99_ms, "behind": mr.behind,
                                       "errs": mr.error_samples[:2]}
            out["segments"].append(row)
            log(f"  {dep.name} segment {i} ({', '.join(f'{m} x{f:g}' for m, f in seg.items())}): " +
                " ".join(f"{n} {100 * (d['attainment'] or 0):.1f}% fail {d['errors']}" for n, d in row["models"].items()))
        t_end = time.monotonic()
    finally:
        watch.stop_at = True
        subprocess.run([sys.executable, "-m", "controlplane", "down", "-f", str(f)], capture_output=True,
                       text=True, timeout=300)
    s = [x for x in watch.samples if x[0] >= t0]
    held = sum(a[1] * (b[0] - a[0]) for a, b in zip(s, s[1:])) + (s[-1][1] * (t_end - s[-1][0]) if s else 0.0)
    out["gpu_share_seconds"] = round(held, 1)
    out["shares"] = [(round(x[0] - t0, 1), x[1]) for x in s]
    # each re-plan at the moment its new plan began serving: the state shows it once the change has
    # ended, which is after the old gpu-lets stopped (the controller says how long that took)
    out["replans"] = [(round(x[0] - t0 - stopped_s(x[3]), 1), x[3]) for a, x in zip(s, s[1:]) if x[2] != a[2]]
    out["reaction_s"] = reactions(out["segments"], segments, out["replans"])
    out["transition_s"] = [transition_s(why) for _, why in out["replans"]]
    return out


def reactions(rows: list[dict], segments: list[dict[str, float]], replans: list) -> list[float | None]:
    """Per load change (a segment whose factors differ from the one before), seconds from the change to the
    first re-plan serving after it that names a model whose load changed (``resnet50 at ... req/s``): a
    re-plan for another model does not count as the answer to it (run 17 credited vgg16's step to
    resnet50's step back, which landed first)."""
    out = []
    for i in range(1, len(segments)):
        moved = [m for m, f in segments[i].items() if f != segments[i - 1].get(m)]
        if not moved:
            continue
        c = rows[i]["t_s"]
        out.append(next((round(t - c, 1) for t, why in replans
                         if t >= c and any(f"{m} at " in (why or "") for m in moved)), None))
    return out


def transition_s(last_replan: str | None) -> float | None:
    """Seconds a re-plan took from its decision to the router sending by the new plan, as the controller
    states it (``... (serving after T s: plan P s, start S s, route R s)``); None where it does
    not (an older controller)."""
    m = re.search(r"\(serving after ([0-9.]+) s[:)]", last_replan or "")
    return float(m.group(1)) if m else None


def stopped_s(last_replan: str | None) -> float:
    """Seconds from a re-plan's switch to its old gpu-lets stopped, as the controller states it
    (``...; old gpu-lets stopped T s after)``); 0 where it does not (none stopped, an older controller)."""
    m = re.search(r"old gpu-lets stopped ([0-9.]+) s after", last_replan or "")
    return float(m.group(1)) if m else 0.0


def summary(sys_out: dict) -> dict:
    sent = sum(d["sent"] for seg in sys_out["segments"] for d in seg["models"].values())
    met = sum((d["attainment"] or 0) * d["sent"] for seg in sys_out["segments"] for d in seg["models"].values())
    failed = sum(d["errors"] for seg in sys_out["segments"] for d in seg["models"].values())
    worst = min(((d["attainment"] or 0), i, n) for i, seg in enumerate(sys_out["segments"]) for n, d in seg["models"].items())
    return {"sent": sent, "attainment": met / sent if sent else 0.0, "failed": failed,
            "worst_segment": {"attainment": worst[0], "segment": worst[1], "model": worst[2]}}


def render(doc: dict) -> str:
    lines = [f"Run {doc['date']} on {doc['machine']}; `{doc['command']}`; {doc['segment_s']:g} s segments, "
             f"re-planning epoch {doc['epoch_s']:g} s.", "",
             "| system | GPU-share-seconds | attainment, whole trace | worst segment | failed requests | re-plans | "
             "load change -> new plan serving (s) | each re-plan's transition (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in doc["systems"].items():
        if "error" in s:
            lines.append(f"| {name} | error | | | | | | |")
            continue
        sm = summary(s)
        w = sm["worst_segment"]
        lines.append(f"| {name} | {s['gpu_share_seconds']:g} | {100 * sm['attainment']:.2f} % | "
                     f"{100 * w['attainment']:.1f} % ({w['model']}, segment {w['segment']}) | {sm['failed']} | "
                     f"{len(s['replans'])} | {', '.join('—' if r is None else f'{r:g}' for r in s['reaction_s'])} | "
                     f"{', '.join('?' if r is None else f'{r:g}' for r in s.get('transition_s', [])) or '—'} |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, s in doc["systems"].items():
        if "error" in s:
            continue
        for m in s["segments"][0]["models"]:
            a1.step([seg["t_s"] for seg in s["segments"]], [100 * (seg["models"][m]["attainment"] or 0)
                                                          for seg in s["segments"]], where="post",
                    label=f"{name} {m}")
        a2.step([t for t, _ in s["shares"]], [v for _, v in s["shares"]], where="post", label=name)
    a1.set_ylabel("SLO attainment %")
    a2.set_ylabel("GPUs held (shares / 100)")
    a2.set_xlabel("s")
    a1.legend(fontsize=6)
    a2.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("live-out"))
    ap.add_argument("--deployment", type=Path, default=ROOT / "deployments" / "gpu-run.yaml")
    ap.add_argument("--segment-s", type=float, default=20.0)
    ap.add_argument("--epoch-s", type=float, default=10.0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpulet-live"), help="run directories")
    ap.add_argument("--resume", action="store_true", help="keep the systems already in OUT/live.json")
    ap.add_argument("--render", type=Path, help="only write docs/benchmarks.md from this live.json")
    args = ap.parse_args()
    if args.render:
        doc = json.loads(args.render.read_text())
        write_docs(doc)
        print(render(doc))
        return
    dep = load_deployment(args.deployment)
    segments = trace([m.name for m in dep.models])
    from serving import gpu_name     # noqa: E402 - the serving benchmark's machine description

    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{gpu_name()} ({os.cpu_count()} cores)", "command": " ".join(sys.argv),
           "segment_s": args.segment_s, "epoch_s": args.epoch_s, "trace": segments, "systems": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    jpath = args.out / "live.json"
    if args.resume and jpath.exists():
        prev = json.loads(jpath.read_text())
        doc["systems"] = prev["systems"]
        doc["command"] = f"{prev['command']} && {doc['command']}"      # one run over several calls
    for system in [s for s in args.systems.split(",") if s and s not in doc["systems"]]:
        d = deployment_for(dep, system, segments, args.epoch_s, args.work)
        print(time.strftime("%H:%M:%S"), f"{system}: up", flush=True)
        doc["systems"][system] = run_system(d, {m.name: m.rate for m in dep.models}, segments, args.segment_s,
                                            lambda *a: print(time.strftime("%H:%M:%S"), *a, flush=True))
        jpath.write_text(json.dumps(doc, indent=1))
    print(render(doc))
    try:
        plot(doc, args.out / "live.png")
    except ImportError as e:     # a GPU machine without matplotlib: the JSON has it all
        print(f"no plot: {e}")


def write_docs(doc: dict) -> None:
    from benchlib import write_section

    write_section(BEGIN, END, render(doc), "## Live re-planning on a rate trace (issue 12)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
