"""Router overhead: one model, one tritonserver, one client; through the router vs directly.

    python benchmarks/router.py [--model lenet] [--duration 5] [--concurrency 1 16] [--batch 8]
                                [--repeat 3] [--compare OTHER_TREE] [--json out.json]

Starts one tritonserver (a CPU gpu-let serving the model, --batch its planned
batch: Triton's preferred batch) and the router in a separate process (so client
and router do not share a GIL), then for HTTP and gRPC and each concurrency runs a
closed loop of tritonclient asyncio requests (batch 1) for --duration seconds
against the tritonserver directly and through the router, and prints throughput
and p50/p99.
Targets (issue #5): through the router >= 0.8x direct throughput, <= 1 ms added p50.

The machine may be shared and noisy: ``--repeat N`` interleaves N rounds of
(direct, router[, baseline]) per protocol and concurrency and reports medians;
``--compare TREE`` also runs the router of another source tree (e.g. the last
commit, ``git archive HEAD | tar -x -C /tmp/before``) in its own process, so a
change is measured against its baseline in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def serve_router(args) -> None:
    """Child process: run the router for the given endpoint until stdin closes."""
    if args.root:
        sys.path.insert(0, args.root)
        for k in [k for k in sys.modules if k == "controlplane" or k.startswith("controlplane.")]:
            del sys.modules[k]
    from controlplane.repository import SourceRepository
    from controlplane.router import RouterServer, RoutingTable
    from controlplane.runtime.base import Endpoint
    from controlplane.spec import Assignment, Deployment, GpuLet, ModelSpec, Plan, RouterSpec

    ep = Endpoint(**json.loads(args.endpoint))
    plan = Plan(gpus=1, gpulets=[GpuLet(id="bench", gpu=0, share=100,
                                        models=[Assignment(model=args.model, batch=args.batch, rate=1)])])
    dep = Deployment(models=[ModelSpec(name=args.model, rate=1, slo_ms=60000)])
    table = RoutingTable.from_plan(plan, {"bench": ep}, SourceRepository(), dep)
    srv = RouterServer(table, RouterSpec(http_port=0, grpc_port=0)).start_in_thread()
    print(json.dumps({"http": srv.http_url, "grpc": srv.grpc_url}), flush=True)
    sys.stdin.read()
    srv.stop()


async def closed_loop(url: str, protocol: str, model: str, x: np.ndarray, concurrency: int, duration: float):
    if protocol == "grpc":
        import tritonclient.grpc.aio as client
        c = client.InferenceServerClient(url)
    else:
        import tritonclient.http.aio as client
        c = client.InferenceServerClient(url, conn_limit=concurrency)
    inp = client.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    lat: list[float] = []
    try:
        for _ in range(5):                 # warm up
            await c.infer(model, [inp])
        end = time.perf_counter() + duration

        async def worker():
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await c.infer(model, [inp])
                lat.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        await c.close()
    a = np.array(lat)
    return {"throughput": len(a) / elapsed, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "n": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--batch", type=int, default=8, help="planned batch (Triton's preferred batch size)")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds per cell (medians reported)")
    ap.add_argument("--compare", metavar="TREE", help="also run the router of this source tree ('before')")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--serve-router", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_router:
        serve_router(args)
        return

    from controlplane import zoo
    from controlplane.repository import SourceRepository, build_artifacts, write_gpulet_repositories
    from controlplane.runtime.base import Launch, gpulet_env
    from controlplane.runtime.process import ProcessRuntime
    from controlplane.spec import Assignment, GpuLet, Plan

    repo = SourceRepository()
    build_artifacts(repo, [args.model])
    plan = Plan(gpus=1, gpulets=[GpuLet(id="bench", gpu=0, share=100,
                                        models=[Assignment(model=args.model, batch=args.batch, rate=1)])])
    tmp = Path(tempfile.mkdtemp(prefix="router-bench-"))
    repos = write_gpulet_repositories(repo, plan, tmp / "repos", on_gpu=False)
    rt = ProcessRuntime()
    g = plan.gpulets[0]
    eps = rt.start([Launch(gpulet=g, repository=repos[g.id], log_path=tmp / "bench.log",
                           env=gpulet_env(g, None, None, None))])
    ep = eps["bench"]
    def spawn(root: str | None):
        cmd = [sys.executable, __file__, "--serve-router", "--model", args.model, "--batch", str(args.batch),
               "--endpoint", json.dumps(ep.__dict__)]
        if root:
            cmd += ["--root", str(Path(root).resolve())]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        return p, json.loads(p.stdout.readline())

    procs = []
    rows = []
    try:
        targets = {}
        p, targets["router"] = spawn(None)
        procs.append(p)
        if args.compare:
            p, targets["before"] = spawn(args.compare)
            procs.append(p)
        x = zoo.example_input(args.model, 1).numpy()
        print(f"model {args.model}, batch-1 requests, {args.duration:g} s per run, {args.repeat} round(s), "
              f"{os.cpu_count()} CPUs")
        print(f"{'protocol':8} {'conc':>4} {'target':7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for protocol in ("http", "grpc"):
            for conc in args.concurrency:
                runs: dict[str, list[dict]] = {}
                for _ in range(args.repeat):
                    for target, urls in (("direct", {"http": ep.http, "grpc": ep.grpc}), *targets.items()):
                        r = asyncio.run(closed_loop(urls[protocol], protocol, args.model, x, conc, args.duration))
                        runs.setdefault(target, []).append(r)
                        print(f"{protocol:8} {conc:>4} {target:7} {r['throughput']:9.1f} {r['p50_ms']:8.3f} "
                              f"{r['p99_ms']:8.3f}", flush=True)
                res = {t: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for t, rs in runs.items()}
                row = {"protocol": protocol, "concurrency": conc,
                       **{f"{t}_{k}": v for t, d in res.items() for k, v in d.items()}}
                for t in targets:
                    # ratios per round (direct and router measured back to back), then the median
                    ratio = float(np.median([r["throughput"] / d["throughput"]
                                             for r, d in zip(runs[t], runs["direct"])]))
                    added = float(np.median([r["p50_ms"] - d["p50_ms"] for r, d in zip(runs[t], runs["direct"])]))
                    print(f"{'':8} {'':4} {t[:7]:7} {ratio:9.2f}x {added:+8.3f} (added p50 ms, medians)")
                    sfx = "" if t == "router" else f"_{t}"
                    row[f"throughput_ratio{sfx}"] = ratio
                    row[f"added_p50_ms{sfx}"] = added
                rows.append(row)
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(15)
        rt.stop()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
