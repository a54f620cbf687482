"""Router CPU per request, HTTP and gRPC, against the same tritonserver addressed directly.

    python benchmarks/router_cpu.py [--model lenet] [--rate 300] [--duration 6]

Starts one CPU gpu-let (lenet, mobilenet_v2) and a router in this process (one router process),
sends Poisson load to one of them (lenet: 3 KB requests; mobilenet_v2: 600 KB, an ImageNet image) from `controlplane loadgen` worker processes, and reads this
process's CPU time: with the load going to the router, that is the router's cost; going
direct, it is the baseline (near zero). Prints ms of router CPU per request and latencies.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet", choices=["lenet", "mobilenet_v2"])
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--duration", type=float, default=6.0)
    args = ap.parse_args()
    from router_helpers import deployment, one_gpulet_plan, start_servers

    from controlplane import loadgen as lg
    from controlplane.router import RouterServer, RoutingTable
    from controlplane.spec import RouterSpec

    plan = one_gpulet_plan()
    rt, eps, repo = start_servers(plan, Path(tempfile.mkdtemp(prefix="router-cpu-")))
    try:
        table = RoutingTable.from_plan(plan, eps, repo, deployment())
        with RouterServer(table, RouterSpec(http_port=0, grpc_port=0, workers=1)) as srv:
            ep = eps["cpu0-a"]
            print("| path | protocol | sent | ok | p50 ms | p99 ms | CPU of this process, ms per request |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for path, proto, url in (("direct", "http", ep.http), ("router", "http", srv.http_url),
                                     ("direct", "grpc", ep.grpc), ("router", "grpc", srv.grpc_url)):
                lg.run(url, {args.model: min(50.0, args.rate)}, 2.0, protocol=proto, workers=2)          # warm-up
                t0 = time.process_time()
                r = lg.run(url, {args.model: args.rate}, args.duration, protocol=proto, workers=2).models[args.model]
                cpu = (time.process_time() - t0) * 1000 / max(r.sent, 1)
                print(f"| {path} | {proto} | {r.sent} | {r.ok} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {cpu:.3f} |")
    finally:
        rt.stop()


if __name__ == "__main__":
    main()
