"""Health rotation: a dead gpu-let leaves the rotation, its traffic goes to the model's other
gpu-let, and it comes back once the runtime has restarted it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import numpy as np
import tritonclient.grpc.aio as tga

from controlplane.router import RouterOptions, RouterServer, RoutingTable
from controlplane.spec import Assignment, GpuLet, Plan, RouterSpec

from router_helpers import deployment, example, reference, start_servers


def _sent(server, gid: str) -> float:
    """Requests of lenet the router sent to gpu-let gid."""
    text = httpx.get(f"http://{server.http_url}/metrics").text
    m = re.search(rf'router_gpulet_requests_total\{{gpulet="{gid}",model="lenet"\}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _errors(server, gid: str) -> float:
    """Broken connections to gpu-let gid the router met (each one a request it sent again elsewhere)."""
    text = httpx.get(f"http://{server.http_url}/metrics").text
    m = re.search(rf'router_gpulet_errors_total\{{gpulet="{gid}"\}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _ready(server) -> int:
    return httpx.get(f"http://{server.http_url}/v2/health/ready").status_code


def _wait(pred, timeout: float = 60.0) -> bool:
    """Poll pred until true (a bound on waiting, not on the router's speed: generous for shared cores)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _burst(server, n: int, x: np.ndarray) -> list:
    async def run():
        c = tga.InferenceServerClient(server.grpc_url)
        try:
            async def one():
                i = tga.InferInput("INPUT", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                try:
                    return (await c.infer("lenet", [i])).as_numpy("OUTPUT")
                except Exception as e:  # noqa: BLE001
                    return e
            return await asyncio.gather(*(one() for _ in range(n)))
        finally:
            await c.close()

    return asyncio.run(run())


def test_dead_gpulet_leaves_and_rejoins_rotation(tmp_path):
    plan = Plan(gpus=1, gpulets=[
        GpuLet(id=g, gpu=0, share=50, models=[Assignment(model="lenet", batch=4, rate=50, throughput=100)])
        for g in ("cpu0-a", "cpu0-b")])
    rt, eps, repo = start_servers(plan, tmp_path)
    try:
        table = RoutingTable.from_plan(plan, eps, repo, deployment({"lenet": 2000.0}))
        with RouterServer(table, RouterSpec(http_port=0, grpc_port=0, workers=1),
                          RouterOptions(health_interval_s=0.2)) as server:
            x = example("lenet", 1, seed=7)
            ref = reference(repo, "lenet", x)
            assert _ready(server) == 200
            outs = _burst(server, 40, x)
            assert all(isinstance(o, np.ndarray) and np.allclose(o, ref, rtol=1e-4, atol=1e-5) for o in outs)
            # concurrent requests go to the gpu-let with fewer in flight: both get some, each request once
            assert _sent(server, "cpu0-a") > 0 and _sent(server, "cpu0-b") > 0
            assert _sent(server, "cpu0-a") + _sent(server, "cpu0-b") == 40
            # the model's statistics are Triton's, summed over its gpu-lets
            own = [httpx.get(f"http://{eps[g].http}/v2/models/lenet/stats").json()["model_stats"][0]
                   for g in ("cpu0-a", "cpu0-b")]
            via = httpx.get(f"http://{server.http_url}/v2/models/lenet/stats").json()["model_stats"][0]
            assert int(via["inference_count"]) == sum(int(s["inference_count"]) for s in own) == 40
            assert int(via["execution_count"]) == sum(int(s["execution_count"]) for s in own)
            assert via["inference_stats"]["success"]["count"] == 40
            assert via["inference_stats"]["success"]["ns"] == sum(s["inference_stats"]["success"]["ns"] for s in own)
            assert via["name"] == "lenet" and via["version"] == "1"

            # kill b: the router stops being ready, lenet keeps being served by a
            os.killpg(rt.replicas["cpu0-b"].proc.pid, signal.SIGKILL)
            assert _wait(lambda: _ready(server) == 503), "router must not be ready with a dead gpu-let"
            assert httpx.get(f"http://{server.http_url}/v2/models/lenet/ready").status_code == 200
            before_b = _sent(server, "cpu0-b")
            outs = _burst(server, 30, x)
            assert all(isinstance(o, np.ndarray) for o in outs), [o for o in outs if not isinstance(o, np.ndarray)]
            assert _sent(server, "cpu0-b") == before_b

            # the runtime restarts it on fresh ports and the router is told (as the controller does): it rejoins
            assert rt.supervise() == ["cpu0-b"]
            now = {g: st.endpoint for g, st in rt.status().items()}
            assert now["cpu0-b"] != eps["cpu0-b"] and now["cpu0-a"] == eps["cpu0-a"]
            server.update(RoutingTable.from_plan(plan, now, repo, deployment({"lenet": 2000.0})))
            assert _wait(lambda: _ready(server) == 200), "gpu-let b should rejoin the rotation"
            outs = _burst(server, 40, x)
            assert all(isinstance(o, np.ndarray) for o in outs)
            assert _sent(server, "cpu0-b") > before_b
    finally:
        rt.stop()


def test_requests_in_flight_on_a_dying_gpulet_are_rerouted(tmp_path):
    """Kill a gpu-let while traffic flows: the requests it had, or was sent before the router saw it
    die, reach the router as broken connections and are retried on the other gpu-let; nothing fails."""
    plan = Plan(gpus=1, gpulets=[
        GpuLet(id=g, gpu=0, share=50, models=[Assignment(model="lenet", batch=2, rate=50, throughput=100)])
        for g in ("cpu0-c", "cpu0-d")])
    rt, eps, repo = start_servers(plan, tmp_path)
    try:
        table = RoutingTable.from_plan(plan, eps, repo, deployment({"lenet": 5000.0}))
        with RouterServer(table, RouterSpec(http_port=0, grpc_port=0, workers=1)) as server:
            x = example("lenet", 1, seed=8)

            async def run():
                c = tga.InferenceServerClient(server.grpc_url)
                try:
                    async def one(k):
                        await asyncio.sleep(k * 0.005)
                        i = tga.InferInput("INPUT", list(x.shape), "FP32")
                        i.set_data_from_numpy(x)
                        try:
                            return (await c.infer("lenet", [i])).as_numpy("OUTPUT")
                        except Exception as e:  # noqa: BLE001
                            return e

                    async def killer():
                        await asyncio.sleep(0.1)
                        os.killpg(rt.replicas["cpu0-d"].proc.pid, signal.SIGKILL)

                    res = await asyncio.gather(killer(), *(one(k) for k in range(100)))
                    return res[1:]
                finally:
                    await c.close()

            outs = asyncio.run(run())
            failed = [o for o in outs if not isinstance(o, np.ndarray)]
            assert not failed, failed[:3]
            ref = reference(repo, "lenet", x)
            assert all(np.allclose(o, ref, rtol=1e-4, atol=1e-5) for o in outs)
            assert _sent(server, "cpu0-d") > 0 and _errors(server, "cpu0-d") >= 1   # something was rerouted
            assert _errors(server, "cpu0-c") == 0
            assert _wait(lambda: _ready(server) == 503)
    finally:
        rt.stop()
