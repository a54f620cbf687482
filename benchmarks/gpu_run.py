"""A real `controlplane up` on the GPUs of this host, driven by `controlplane loadgen`.

Run on a GPU machine (the lent H100; see docs/benchmarks.md for the exact call):

    python benchmarks/gpu_run.py --out DIR [--gpus N] [--duration 20] [--deployment FILE] [--plan PLAN.json]

It brings the deployment up (MPS daemon, one tritonserver per gpu-let), then
checks what each server really got — CUDA_VISIBLE_DEVICES,
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE and CUDA_MPS_PIPE_DIRECTORY read back from
/proc/<pid>/environ, the MPS server's client list, GPU memory per process from
NVML — drives Poisson load at the planned rates through the router, compares
per-model throughput, p99 and SLO attainment with what the plan predicted,
brings everything down and checks nothing is left. Results: DIR/gpu_run.json
and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sh(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    print("+", " ".join(args), flush=True)
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        print(p.stdout[-4000:], p.stderr[-4000:], flush=True)
        raise SystemExit(f"failed: {' '.join(args)}")
    return p


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)


def gpu_memory_by_pid() -> dict[int, float]:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    out: dict[int, float] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            for fn in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetMPSComputeRunningProcesses):
                try:
                    for p in fn(h):
                        if p.usedGpuMemory is not None:
                            out[p.pid] = out.get(p.pid, 0.0) + p.usedGpuMemory / 2**20
                except pynvml.NVMLError:
                    pass
    finally:
        pynvml.nvmlShutdown()
    return out


def descendants(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().split(")")[-1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(d.name))
                kids += descendants(int(d.name))
    return kids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deployment", type=Path, default=ROOT / "deployments" / "gpu-run.yaml")
    ap.add_argument("--plan", type=Path, default=None, help="use this plan instead of planning")
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--protocol", default="grpc")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every model's rate")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "controlplane"]

    import yaml

    from controlplane.spec import load_deployment

    dep = load_deployment(args.deployment)
    if args.scale != 1.0:
        doc = dep.model_dump(mode="json", exclude_none=True)
        for m in doc["models"]:
            m["rate"] *= args.scale
        doc["name"] = f"{dep.name}-x{args.scale:g}"
        scaled = args.out / f"{doc['name']}.yaml"
        scaled.write_text(yaml.safe_dump(doc, sort_keys=False))
        args.deployment = scaled
        dep = load_deployment(scaled)
    dep_path = str(args.deployment)
    plan_file = args.plan
    if plan_file is None:
        planned = sh(*cli, "plan", "-f", dep_path, "--json", "--profile-missing",
                     *(["--gpus", str(args.gpus)] if args.gpus else []))
        plan_file = args.out / "plan.json"
        plan_file.write_text(planned.stdout)
    plan = json.loads(Path(plan_file).read_text())

    t0 = time.monotonic()
    up = sh(*cli, "up", "-f", dep_path, "--detach", "--plan", str(plan_file), timeout=900)
    up_s = time.monotonic() - t0
    print(up.stdout[-3000:], flush=True)
    from controlplane.paths import RunPaths

    state = json.loads(RunPaths.for_deployment(dep).state.read_text())

    mem = gpu_memory_by_pid()
    gpulets = {}
    for g in plan["gpulets"]:
        pid = state["gpulets"][g["id"]]["pid"]
        env = environ(pid)
        family = [pid] + descendants(pid)
        gpulets[g["id"]] = {
            "gpu": g["gpu"], "share": g["share"], "models": [(a["model"], a["batch"]) for a in g["models"]],
            "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES"),
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
            "CUDA_MPS_PIPE_DIRECTORY": env.get("CUDA_MPS_PIPE_DIRECTORY"),
            "gpu_memory_mb": round(sum(mem.get(p, 0.0) for p in family), 1),
            "pids": family,
        }
    pipe = next(iter(gpulets.values()))["CUDA_MPS_PIPE_DIRECTORY"]
    mps = ["nvidia-cuda-mps-control"] if pipe else ["true"]
    servers = subprocess.run(mps, input="get_server_list\n", text=True, capture_output=True,
                             env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe or ""}).stdout.split()
    clients = {}
    for s in servers:
        clients[s] = subprocess.run(mps, input=f"get_client_list {s}\n", text=True,
                                    capture_output=True, env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe or ""}).stdout.split()

    from controlplane import loadgen as lg

    r = state["router"]
    url = f"{r['host']}:{r['grpc_port'] if args.protocol == 'grpc' else r['http_port']}"
    rates = {m.name: m.rate for m in dep.models}
    slo = {m.name: m.slo_ms for m in dep.models}
    lg.run(url, {k: min(v, 20.0) for k, v in rates.items()}, 3.0, protocol=args.protocol, slo_ms=slo)  # warm-up
    result = lg.run(url, rates, args.duration, protocol=args.protocol, slo_ms=slo, seed=1)
    lg.write_json(result, args.out / "loadgen.json")
    try:
        lg.write_cdf_png(result, args.out / "latency_cdf.png")
    except Exception as e:  # plotting is a nicety
        print("cdf plot:", e)

    import httpx

    metrics = httpx.get(f"http://{r['host']}:{r['http_port']}/metrics", timeout=10).text
    drops = [line for line in metrics.splitlines() if line.startswith("router_drops_total")]
    (args.out / "router_metrics.txt").write_text(metrics)
    down = sh(*cli, "down", "-f", dep_path)
    time.sleep(2)
    left = [p for g in gpulets.values() for p in g["pids"] if Path(f"/proc/{p}").exists()]

    doc = {
        "device": state["device"], "up_seconds": round(up_s, 1), "plan": plan, "gpulets": gpulets,
        "mps_servers": servers, "mps_clients": clients, "loadgen": result.to_dict(), "down": down.stdout,
        "left_running": left, "router_drops": drops,
    }
    (args.out / "gpu_run.json").write_text(json.dumps(doc, indent=2))

    print(f"\ndevice {state['device']}; up in {up_s:.0f} s; MPS servers {servers} clients {clients}")
    print("\n| gpu-let | GPU | share % | models (batch) | CUDA_VISIBLE_DEVICES | MPS % (read back) | GPU memory MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for gid, g in gpulets.items():
        print(f"| {gid} | {g['gpu']} | {g['share']} | {', '.join(f'{m}({b})' for m, b in g['models'])} | "
              f"{g['CUDA_VISIBLE_DEVICES']} | {g['CUDA_MPS_ACTIVE_THREAD_PERCENTAGE']} | {g['gpu_memory_mb']} |")
    print("\n| model | rate req/s | planned throughput | throughput | p99 ms | predicted worst ms | SLO ms | SLO attainment | drops |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m in result.models.items():
        pm = plan["models"].get(name, {})
        print(f"| {name} | {m.rate:.0f} | {pm.get('throughput', 0):.0f} | {m.throughput:.1f} | "
              f"{m.p99_ms if m.p99_ms is None else round(m.p99_ms, 1)} | {pm.get('worst_latency_ms', 0):.1f} | "
              f"{m.slo_ms:g} | {m.slo_attainment if m.slo_attainment is None else round(100 * m.slo_attainment, 1)} % | {m.dropped} |")
    print(f"\nleft running after down: {left}")
    print("router drops by reason:", "; ".join(drops) or "none")


if __name__ == "__main__":
    main()
