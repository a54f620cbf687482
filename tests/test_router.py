"""The router against a real tritonserver: one CPU gpu-let serving lenet and mobilenet_v2.

Unmodified tritonclient clients (HTTP and gRPC, sync and asyncio, JSON and
binary) must get the same outputs as the TorchScript run in-process; bad
requests get a KServe error and the router keeps serving.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
import tritonclient.http.aio as tha
from tritonclient.utils import InferenceServerException

from controlplane.router import Router, RouterOptions, RouterServer, RoutingTable
from controlplane.spec import RouterSpec

from router_helpers import deployment, example, one_gpulet_plan, reference, start_servers

MAX_BODY = 4 * 1024 * 1024
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    plan = one_gpulet_plan()
    rt, eps, repo = start_servers(plan, tmp_path_factory.mktemp("router"))
    try:
        yield plan, eps, repo
    finally:
        rt.stop()


@pytest.fixture(scope="module")
def server(backend):
    plan, eps, repo = backend
    table = RoutingTable.from_plan(plan, eps, repo, deployment())
    srv = RouterServer(table, RouterSpec(http_port=0, grpc_port=0, max_body_bytes=MAX_BODY)).start_in_thread()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def repo(backend):
    return backend[2]


def _close(a, b):
    return np.allclose(a, b, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- health and metadata


def test_health_and_metadata(server):
    c = th.InferenceServerClient(server.http_url)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("lenet") and not c.is_model_ready("nope")
    md = c.get_model_metadata("mobilenet_v2")
    assert md["inputs"] == [{"name": "INPUT", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert md["outputs"][0]["shape"] == [-1, 1000]
    assert c.get_model_config("lenet")["max_batch_size"] >= 8
    assert {m["name"] for m in c.get_model_repository_index()} == {"lenet", "mobilenet_v2"}
    assert c.get_server_metadata()["name"] == "gpulet-router"

    g = tg.InferenceServerClient(server.grpc_url)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("lenet")
    gm = g.get_model_metadata("lenet")
    assert gm.inputs[0].name == "INPUT" and list(gm.inputs[0].shape) == [-1, 1, 28, 28]
    assert g.get_model_config("mobilenet_v2").config.name == "mobilenet_v2"
    with pytest.raises(InferenceServerException, match="unknown model"):
        g.get_model_metadata("nope")
    assert httpx.get(f"http://{server.http_url}/openapi.json").json()["paths"]["/v2/models/{model}/infer"]


# --------------------------------------------------------------------------- correct outputs


def test_http_sync_binary_and_json(server, repo):
    c = th.InferenceServerClient(server.http_url)
    x = example("lenet", 3, seed=1)
    ref = reference(repo, "lenet", x)
    for in_binary in (True, False):
        for out_binary in (True, False):
            i = th.InferInput("INPUT", list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=in_binary)
            r = c.infer("lenet", [i], outputs=[th.InferRequestedOutput("OUTPUT", binary_data=out_binary)],
                        request_id="r1")
            assert r.get_response()["id"] == "r1"
            assert _close(r.as_numpy("OUTPUT"), ref), (in_binary, out_binary)
    # no requested outputs: all outputs, binary by default
    i = th.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    assert _close(c.infer("lenet", [i]).as_numpy("OUTPUT"), ref)
    # compressed request body
    r = c.infer("lenet", [i], request_compression_algorithm="gzip")
    assert _close(r.as_numpy("OUTPUT"), ref)


def test_http_json_by_hand(server, repo):
    x = example("lenet", 1, seed=2)
    body = {"inputs": [{"name": "INPUT", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "OUTPUT" and out["shape"] == [1, 10] and out["datatype"] == "FP32"
    assert _close(np.array(out["data"], dtype=np.float32).reshape(1, 10), reference(repo, "lenet", x))


def test_grpc_sync_and_stream(server, repo):
    g = tg.InferenceServerClient(server.grpc_url)
    x = example("mobilenet_v2", 2, seed=3)
    i = tg.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    r = g.infer("mobilenet_v2", [i], outputs=[tg.InferRequestedOutput("OUTPUT")])
    assert _close(r.as_numpy("OUTPUT"), reference(repo, "mobilenet_v2", x))

    xl = example("lenet", 2, seed=4)
    il = tg.InferInput("INPUT", list(xl.shape), "FP32")
    il.set_data_from_numpy(xl)
    results = []
    g.start_stream(callback=lambda result, error: results.append((result, error)))
    for k in range(3):
        g.async_stream_infer("lenet", [il], request_id=str(k))
    g.stop_stream()
    assert len(results) == 3 and all(e is None for _, e in results)
    assert all(_close(res.as_numpy("OUTPUT"), reference(repo, "lenet", xl)) for res, _ in results)
    stats = g.get_inference_statistics("lenet")
    assert stats.model_stats[0].inference_count > 0


def test_asyncio_clients_concurrent_batching(server, repo):
    """Many concurrent requests of varied batch sizes: each gets its own rows back, and they were batched."""
    xs = [example("lenet", 1 + k % 3, seed=100 + k) for k in range(48)]

    async def run():
        hc = tha.InferenceServerClient(server.http_url)
        gc = tga.InferenceServerClient(server.grpc_url)
        try:
            async def via_http(x):
                i = tha.InferInput("INPUT", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                return (await hc.infer("lenet", [i])).as_numpy("OUTPUT")

            async def via_grpc(x):
                i = tga.InferInput("INPUT", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                return (await gc.infer("lenet", [i])).as_numpy("OUTPUT")

            return await asyncio.gather(*((via_http if k % 2 else via_grpc)(x) for k, x in enumerate(xs)))
        finally:
            await hc.close()
            await gc.close()

    outs = asyncio.run(run())
    for x, out in zip(xs, outs):
        assert out.shape == (x.shape[0], 10)
        assert _close(out, reference(repo, "lenet", x))
    text = httpx.get(f"http://{server.http_url}/metrics").text
    count = float(re.search(r'router_batch_size_count\{gpulet="cpu0-a",model="lenet"\} (\S+)', text).group(1))
    total = float(re.search(r'router_batch_size_sum\{gpulet="cpu0-a",model="lenet"\} (\S+)', text).group(1))
    assert total / count > 1.0, "concurrent requests should have been batched"
    # never above the planned batch (8)
    over = float(re.search(r'router_batch_size_bucket\{gpulet="cpu0-a",le="8.0",model="lenet"\} (\S+)', text).group(1))
    assert over == count


def test_request_larger_than_planned_batch(server, repo):
    x = example("lenet", 20, seed=5)   # planned batch 8: split into chunks at the router
    c = th.InferenceServerClient(server.http_url)
    i = th.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    assert _close(c.infer("lenet", [i]).as_numpy("OUTPUT"), reference(repo, "lenet", x))


def test_metrics(server):
    text = httpx.get(f"http://{server.http_url}/metrics").text
    assert re.search(r'router_requests_total\{model="lenet"\} [1-9]', text)
    assert 'router_gpulet_ready{gpulet="cpu0-a"} 1.0' in text
    assert "router_request_latency_seconds_bucket" in text and "router_slo_attainment" in text


# --------------------------------------------------------------------------- bad requests

_X = example("lenet", 1)
_HEAD = {"inputs": [{"name": "INPUT", "shape": [1, 1, 28, 28], "datatype": "FP32",
                     "parameters": {"binary_data_size": _X.nbytes}}]}


def _binary(head: dict, payload: bytes) -> tuple[bytes, dict]:
    h = json.dumps(head).encode()
    return h + payload, {"Inference-Header-Content-Length": str(len(h))}


def _json_input(**kw):
    d = {"name": "INPUT", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": _X.reshape(-1).tolist()}
    d.update(kw)
    return json.dumps({"inputs": [d]}).encode(), {}


BAD = {
    "malformed json": (b'{"inputs": [', {}, 400),
    "not an object": (b"[1, 2]", {}, 400),
    "no inputs": (b"{}", {}, 400),
    "wrong dtype": (_json_input(datatype="INT32", data=[1] * 784), 400),
    "unknown dtype": (_json_input(datatype="FP8"), 400),
    "wrong shape": (_json_input(shape=[1, 28, 28]), 400),
    "shape/data mismatch": (_json_input(shape=[2, 1, 28, 28]), 400),
    "strings as data": (_json_input(data="abc"), 400),
    "missing input": (_json_input(name="OTHER"), 400),
    "byte size": (_binary(_HEAD, _X.tobytes()[:-4]), 400),
    "trailing bytes": (_binary(_HEAD, _X.tobytes() + b"xxxx"), 400),
    "header length past body": (b"{}", {"Inference-Header-Content-Length": "999"}, 400),
    "unknown output": (json.dumps({"inputs": json.loads(_json_input()[0])["inputs"],
                                   "outputs": [{"name": "NOPE"}]}).encode(), {}, 400),
    "bad gzip": (b"not gzip", {"Content-Encoding": "gzip"}, 400),
}


def _cases():
    for name, case in BAD.items():
        if len(case) == 2:
            (body, headers), status = case
        else:
            body, headers, status = case
        yield pytest.param(body, headers, status, id=name)


@pytest.mark.parametrize("body,headers,status", list(_cases()))
def test_bad_requests_get_kserve_errors(server, body, headers, status):
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_unknown_model_version_and_size_limit(server):
    body, h = _json_input()
    r = httpx.post(f"http://{server.http_url}/v2/models/nope/infer", content=body, headers=h)
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/versions/7/infer", content=body, headers=h)
    assert r.status_code == 404 and "version" in r.json()["error"]
    big = b"0" * (MAX_BODY + 10)
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/infer", content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # a gzip bomb is cut at the limit too
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/infer", content=gzip.compress(big),
                   headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413
    r = httpx.get(f"http://{server.http_url}/v2/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    # still serving
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/infer", content=body)
    assert r.status_code == 200


def test_grpc_errors(server):
    g = tg.InferenceServerClient(server.grpc_url)
    x = example("lenet", 1).astype(np.float64)
    i = tg.InferInput("INPUT", list(x.shape), "FP64")
    i.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        g.infer("lenet", [i])
    assert "INVALID_ARGUMENT" in str(e.value.status()) and "datatype" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        g.infer("nope", [i])
    assert "NOT_FOUND" in str(e.value.status())
    i = tg.InferInput("INPUT", [1, 1, 28, 28], "FP32")
    i.set_data_from_numpy(example("lenet", 1))
    assert g.infer("lenet", [i]).as_numpy("OUTPUT").shape == (1, 10)


# --------------------------------------------------------------------------- deadlines


def test_overload_drops_early_and_admitted_meet_deadline(server):
    """More mobilenet requests than fit in 400 ms: some are dropped with 503, the rest finish in time."""
    x = example("mobilenet_v2", 1)
    timeout_ms = 400.0

    async def run():
        c = tha.InferenceServerClient(server.http_url, conn_limit=200)
        try:
            async def one():
                i = tha.InferInput("INPUT", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                t0 = time.monotonic()
                try:
                    await c.infer("mobilenet_v2", [i], timeout=int(timeout_ms * 1000))
                    return "ok", (time.monotonic() - t0) * 1000
                except InferenceServerException as e:
                    return e.status(), (time.monotonic() - t0) * 1000

            return await asyncio.gather(*(one() for _ in range(48)))
        finally:
            await c.close()

    # warm up: one request measures mobilenet's batch time (until then the router cannot tell early)
    c = th.InferenceServerClient(server.http_url)
    i = th.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    c.infer("mobilenet_v2", [i])
    res = asyncio.run(run())
    ok = [ms for s, ms in res if s == "ok"]
    dropped = [ms for s, ms in res if s == "503"]
    assert len(ok) + len(dropped) == len(res), res
    assert dropped, "overload must drop some requests"
    assert ok, "some requests must be served"
    # The admitted ones meet their deadline. The router counts from a request's arrival; the client,
    # in this same process on 2 shared cores, also waits to upload its burst of 600 KB tensors, which
    # the router cannot see: hence the slack (x1.25) and 80 % rather than all.
    assert sum(ms <= timeout_ms * 1.25 for ms in ok) >= 0.8 * len(ok), sorted(ok)
    # drops are early: most are refused long before the deadline
    assert np.median(dropped) < timeout_ms


def test_no_drop_when_dropping_is_off(backend):
    plan, eps, repo = backend
    table = RoutingTable.from_plan(plan, eps, repo, deployment({"lenet": 200.0, "mobilenet_v2": 1.0}))
    x = example("mobilenet_v2", 1)

    async def run():
        r = Router(table, RouterOptions(drop=False))
        await r.start()
        try:
            outs = await asyncio.gather(*(r.infer("mobilenet_v2", {"INPUT": x}) for _ in range(6)))
        finally:
            await r.close()
        return outs

    outs = asyncio.run(run())   # SLO of 1 ms is impossible, but nothing is dropped
    assert len(outs) == 6 and all(o["OUTPUT"].shape == (1, 1000) for o in outs)

    async def run_drop():
        r = Router(table, RouterOptions(drop=True))
        await r.start()
        try:
            await r.infer("mobilenet_v2", {"INPUT": x})   # measures the service time (may be dropped or not)
        except Exception:
            pass
        try:
            return await asyncio.gather(*(r.infer("mobilenet_v2", {"INPUT": x}) for _ in range(6)),
                                        return_exceptions=True)
        finally:
            await r.close()

    res = asyncio.run(run_drop())
    assert all(getattr(e, "status", None) == 503 for e in res), res


# --------------------------------------------------------------------------- load generator


def test_loadgen_http_and_grpc(server, tmp_path):
    from controlplane import loadgen

    for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        res = loadgen.run(url, {"lenet": 60.0}, duration_s=1.5, protocol=proto, slo_ms={"lenet": 500.0}, seed=1)
        r = res.models["lenet"]
        assert 50 <= r.sent <= 140, r.sent           # Poisson around 90
        assert r.ok == r.sent and r.errors == 0 and r.dropped == 0, r.error_samples
        assert 0 < r.p50_ms <= r.p99_ms < 500
        assert r.slo_attainment == 1.0
    const = loadgen.run(server.http_url, {"lenet": 40.0}, duration_s=1.0, arrival="constant")
    assert const.models["lenet"].sent == 40
    assert const.models["lenet"].slo_ms == 5.0          # from the model config's slo_ms parameter
    js = loadgen.write_json(res, tmp_path / "r.json")
    assert json.loads(js.read_text())["models"]["lenet"]["ok"] == r.ok
    png = loadgen.write_cdf_png(res, tmp_path / "cdf.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(loadgen.render_table(res))
    assert "lenet" in console.export_text()


def test_loadgen_reports_drops_under_overload(server):
    from controlplane import loadgen

    # far beyond capacity: the backlog exceeds mobilenet's SLO at the router (5 s) well within the run
    res = loadgen.run(server.http_url, {"mobilenet_v2": 600.0}, duration_s=1.5, slo_ms={"mobilenet_v2": 2000.0})
    r = res.models["mobilenet_v2"]
    assert r.dropped > 0 and r.ok > 0 and r.errors == 0, (r, r.error_samples)
    assert r.ok + r.dropped == r.sent


# --------------------------------------------------------------------------- fuzz

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_DTYPES = ["FP32", "FP64", "INT32", "INT64", "BOOL", "BYTES", "UINT8", "FP16", "BF16", "fp32", ""]
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=5))
_json = st.recursive(_json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=12)
_input = st.fixed_dictionaries(
    {"name": st.sampled_from(["INPUT", "OTHER"]) | st.text(max_size=6),
     "shape": st.sampled_from([[1, 1, 28, 28], [2, 1, 28, 28], [0, 1, 28, 28], [1, 28, 28]])
     | st.lists(st.integers(-2, 40), max_size=5),
     "datatype": st.sampled_from(_DTYPES)},
    optional={"data": _json | st.lists(st.floats(-10, 10, width=32), min_size=784, max_size=784),
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-5, 5000) | _json})
              | _json})
_request = st.fixed_dictionaries(
    {"inputs": st.lists(_input, max_size=3) | _json},
    optional={"outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["OUTPUT", "X"])},
                                                         optional={"parameters": _json}), max_size=2) | _json,
              "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "timeout", "x"]), _json,
                                            max_size=2) | _json,
              "id": _json})


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(req=_request | _json, model=st.sampled_from(["lenet", "lenet", "mobilenet_v2", "nope", "le%20net"]),
       tail=st.binary(max_size=64), header=st.sampled_from([None, "json", "junk", "-1"]))
def test_fuzz_infer_never_crashes(server, fuzz_client, req, model, tail, header):
    head = json.dumps(req).encode()
    headers = {}
    if header == "json":
        headers["Inference-Header-Content-Length"] = str(len(head))
    elif header is not None:
        headers["Inference-Header-Content-Length"] = header
    body = head + tail if header else head
    r = fuzz_client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert r.status_code in (200, 400, 404, 413, 429, 503), (r.status_code, r.text)
    if r.status_code != 200:
        assert isinstance(r.json()["error"], str)


@pytest.fixture(scope="module")
def fuzz_client(server):
    with httpx.Client(base_url=f"http://{server.http_url}") as c:
        yield c


def test_still_serving_after_fuzz(server, repo):
    c = th.InferenceServerClient(server.http_url)
    x = example("lenet", 2, seed=9)
    i = th.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    assert _close(c.infer("lenet", [i]).as_numpy("OUTPUT"), reference(repo, "lenet", x))
    assert c.is_server_ready()


def test_create_app_alone_without_ready_gpulets():
    """create_app(table, spec) owns its router; with no gpu-let up it is live, not ready, and says why."""
    from fastapi.testclient import TestClient

    from controlplane.repository import SourceRepository
    from router_helpers import free_endpoint

    plan = one_gpulet_plan()
    table = RoutingTable.from_plan(plan, {"cpu0-a": free_endpoint()}, SourceRepository(), deployment())
    from controlplane.router import create_app

    with TestClient(create_app(table, RouterSpec())) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/models/lenet/ready").status_code == 503
        assert c.get("/v2/models/lenet").json()["inputs"][0]["shape"] == [-1, 1, 28, 28]
        body, _ = _json_input()
        r = c.post("/v2/models/lenet/infer", content=body)
        assert r.status_code == 503 and "no ready gpu-let" in r.json()["error"]


# --------------------------------------------------------------------------- duty cycle (no tritonserver)


def test_models_of_a_gpulet_take_turns_within_the_duty_cycle(monkeypatch):
    """A flood of one model does not starve the other model of its gpu-let: batches alternate, one
    gpu-let batch at a time, each up to its model's planned size."""
    from controlplane.repository import TensorInfo
    from controlplane.router import core
    from controlplane.router.table import GpuletRoute, ModelRoute
    from router_helpers import free_endpoint

    calls: list[tuple[str, int]] = []
    state = {"inflight": 0, "max": 0}

    class FakeClient:
        async def infer(self, model, inputs, outputs):
            state["inflight"] += 1
            state["max"] = max(state["max"], state["inflight"])
            rows = inputs["X"].shape[0]
            calls.append((model, rows))
            await asyncio.sleep(0.004 if model == "a" else 0.002)
            state["inflight"] -= 1
            return {"Y": inputs["X"] * 2}

        async def close(self):
            pass

    class FakeHealth:
        async def is_server_ready(self):
            return True

        async def close(self):
            pass

    async def fake_open(self):
        self._client, self._health = FakeClient(), FakeHealth()

    monkeypatch.setattr(core.Backend, "open", fake_open)
    ep = free_endpoint()
    t = [TensorInfo("X", "FP32", (3,))]
    o = [TensorInfo("Y", "FP32", (3,))]
    table = RoutingTable({
        name: ModelRoute(name, t, o, max_batch_size=8, slo_ms=10000.0,
                         gpulets=[GpuletRoute("g", ep, batch=b, duty_cycle_ms=12.0, rate=100, throughput=500)])
        for name, b in (("a", 4), ("b", 2))})

    async def run():
        r = Router(table, RouterOptions(drop=False))
        await r.start()
        try:
            xs = [np.full((1, 3), k, np.float32) for k in range(40)]
            fa = [asyncio.ensure_future(r.infer("a", {"X": x})) for x in xs]
            await asyncio.sleep(0)
            fb = [asyncio.ensure_future(r.infer("b", {"X": x})) for x in xs[:6]]
            outs = await asyncio.gather(*fa, *fb)
            return xs, outs
        finally:
            await r.close()

    xs, outs = asyncio.run(run())
    for x, out in zip(xs + xs[:6], outs):
        assert np.array_equal(out["Y"], x * 2)
    assert state["max"] == 1, "one batch at a time on the gpu-let"
    assert all(rows <= (4 if m == "a" else 2) for m, rows in calls), calls
    seq = [m for m, _ in calls]
    bs = [i for i, m in enumerate(seq) if m == "b"]
    assert len(bs) == 3 and sum(rows for m, rows in calls if m == "b") == 6, calls
    # round-robin: b's batches come one turn apart, not after a's flood is drained
    assert bs[0] <= 2 and all(j - i == 2 for i, j in zip(bs, bs[1:])), seq
