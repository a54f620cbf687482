"""The router against a real tritonserver: one CPU gpu-let serving lenet and mobilenet_v2.

The router passes requests through: HTTP infer bodies and gRPC ModelInferRequest bytes go to
the gpu-let's tritonserver as they came and its answers come back as Triton wrote them.
So unmodified tritonclient clients (HTTP and gRPC, sync and asyncio, JSON and binary) get
the same outputs as the TorchScript run in-process, and bit for bit the answer the gpu-let
gives them directly; bad requests get Triton's own KServe errors (or the router's 404, 413,
503) and the router keeps serving; several router processes on the same ports count every
request once.

No assertion depends on timing (the suite runs on 2 shared cores): batching is Triton's, and
where drops are wanted the SLO is one no gpu-let can meet (the router's in-flight limit is 1).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
import tritonclient.http.aio as tha
from tritonclient.utils import InferenceServerException

from controlplane.router import RouterServer, RoutingTable
from controlplane.spec import RouterSpec

from helpers import metrics
from router_helpers import MAX_BODY, deployment, example, free_endpoint, one_gpulet_plan, reference, start_servers

RTOL, ATOL = 1e-4, 1e-5
GPULET = "cpu0-a"     # the gpu-let of the `backend` fixture (conftest.py)


@pytest.fixture(scope="module")
def repo(backend):
    return backend[2]


@pytest.fixture(scope="module")
def direct(backend):
    """The gpu-let's own tritonserver (what the router forwards to)."""
    return backend[1][GPULET]


def _close(a, b):
    return np.allclose(a, b, rtol=RTOL, atol=ATOL)


def _m(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _stats(url: str, model: str) -> dict:
    r = httpx.get(f"http://{url}/v2/models/{model}/stats")
    assert r.status_code == 200, r.text
    (entry,) = r.json()["model_stats"]
    return entry


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
    # compressed request body (Triton inflates it) and compressed answer
    r = c.infer("lenet", [i], request_compression_algorithm="gzip", response_compression_algorithm="gzip")
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
    assert len(results) == 3 and all(e is None for _, e in results), [str(e) for _, e in results]
    assert sorted(res.get_response().id for res, _ in results) == ["0", "1", "2"]
    assert all(_close(res.as_numpy("OUTPUT"), reference(repo, "lenet", xl)) for res, _ in results)
    stats = g.get_inference_statistics("lenet")
    assert stats.model_stats[0].inference_count > 0


@pytest.mark.parametrize("protocol", ["http-json", "http-binary", "grpc"])
@pytest.mark.parametrize("model", ["lenet", "mobilenet_v2"])
def test_pass_through_is_bit_identical_to_the_gpulet(server, direct, repo, model, protocol):
    """The same request through the router and straight to the gpu-let's tritonserver: the same answer,
    bit for bit (the router neither decodes nor re-encodes a tensor)."""
    x = example(model, 2 if model == "lenet" else 1, seed=11)    # mobilenet in JSON: 3 MB a row; limit 4 MB
    if protocol == "grpc":
        def ask(url):
            with tg.InferenceServerClient(url) as c:
                i = tg.InferInput("INPUT", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                return c.infer(model, [i], outputs=[tg.InferRequestedOutput("OUTPUT")], request_id="same")

        via, own = ask(server.grpc_url), ask(direct.grpc)
        assert via.get_response() == own.get_response()     # the ModelInferResponse messages, raw bytes included
        assert via.get_response().raw_output_contents[0] == own.get_response().raw_output_contents[0]
    else:
        binary = protocol == "http-binary"
        i = th.InferInput("INPUT", list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=binary)
        body, json_size = th.InferenceServerClient.generate_request_body(
            [i], outputs=[th.InferRequestedOutput("OUTPUT", binary_data=binary)], request_id="same")
        headers = {"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {}

        def ask(url):
            r = httpx.post(f"http://{url}/v2/models/{model}/infer", content=body, headers=headers)
            assert r.status_code == 200, r.text
            hl = r.headers.get("Inference-Header-Content-Length")
            return r, th.InferenceServerClient.parse_response_body(
                r.content, header_length=int(hl) if hl is not None else None)

        (rv, via), (ro, own) = ask(server.http_url), ask(direct.http)
        assert rv.content == ro.content
        assert rv.headers.get("Inference-Header-Content-Length") == ro.headers.get("Inference-Header-Content-Length")
        out = via.get_response()["outputs"][0]
        assert ("binary_data_size" in out.get("parameters", {})) == binary and ("data" in out) != binary
    a, b = via.as_numpy("OUTPUT"), own.as_numpy("OUTPUT")
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (x.shape[0], 10 if model == "lenet" else 1000)
    assert np.array_equal(a, b)
    assert _close(a, reference(repo, model, x))


def test_concurrent_clients_get_their_own_rows_and_every_request_is_counted(server, direct, repo):
    """Many concurrent requests of varied batch sizes (HTTP and gRPC, asyncio clients): each gets its own
    rows back; the router counts each once and sends each to the gpu-let once; the statistics the router
    gives are the gpu-let's (Triton's dynamic batcher did the batching: at most one execution per request)."""
    xs = [example("lenet", 1 + k % 3, seed=100 + k) for k in range(48)]
    rows = sum(x.shape[0] for x in xs)
    m0, s0 = metrics(server.http_url), _stats(server.http_url, "lenet")

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

    m1 = metrics(server.http_url)
    for name, labels in (("router_requests_total", {"model": "lenet"}),
                         ("router_success_total", {"model": "lenet"}),
                         ("router_gpulet_requests_total", {"gpulet": GPULET, "model": "lenet"})):
        assert _m(m1, name, **labels) - _m(m0, name, **labels) == len(xs), name
    assert _m(m1, "router_gpulet_requests_total", gpulet=GPULET, model="mobilenet_v2") == \
        _m(m0, "router_gpulet_requests_total", gpulet=GPULET, model="mobilenet_v2")
    assert _m(m1, "router_inflight", gpulet=GPULET) == 0

    s1 = _stats(server.http_url, "lenet")
    assert s1 == _stats(direct.http, "lenet")          # one gpu-let: its statistics, as Triton gives them
    assert int(s1["inference_count"]) - int(s0["inference_count"]) == rows
    assert s1["inference_stats"]["success"]["count"] - s0["inference_stats"]["success"]["count"] == len(xs)
    assert 1 <= int(s1["execution_count"]) - int(s0["execution_count"]) <= len(xs)
    # over gRPC too, from the same numbers
    with tg.InferenceServerClient(server.grpc_url) as g, tg.InferenceServerClient(direct.grpc) as d:
        assert g.get_inference_statistics("lenet") == d.get_inference_statistics("lenet")


def test_request_larger_than_planned_batch(server, repo):
    x = example("lenet", 20, seed=5)   # planned batch 8; Triton takes requests up to the model's own limit (32)
    c = th.InferenceServerClient(server.http_url)
    i = th.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    assert _close(c.infer("lenet", [i]).as_numpy("OUTPUT"), reference(repo, "lenet", x))


def test_metrics(server):
    i = th.InferInput("INPUT", list(_X.shape), "FP32")      # one request of its own: passes run alone too
    i.set_data_from_numpy(_X)
    th.InferenceServerClient(server.http_url).infer("lenet", [i])
    m = metrics(server.http_url)
    requests = _m(m, "router_requests_total", model="lenet")
    met = _m(m, "router_slo_met_total", model="lenet")
    assert requests > 0 and _m(m, "router_success_total", model="lenet") > 0
    assert 0 < met <= requests                      # attainment = slo_met / requests
    assert _m(m, "router_gpulet_requests_total", gpulet=GPULET, model="lenet") > 0
    assert _m(m, "router_gpulet_ready", gpulet=GPULET) == 1.0
    assert _m(m, "router_request_latency_seconds_count", model="lenet") == _m(m, "router_success_total",
                                                                              model="lenet")
    assert not any(name.startswith("router_slo_attainment") for name, _ in m)


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


# Triton validates; it answers these 400 {"error": ...} and the router relays that.
BAD = {
    "wrong dtype": _json_input(datatype="INT32", data=[1] * 784),
    "unknown dtype": _json_input(datatype="FP8"),
    "wrong shape": _json_input(shape=[1, 28, 28]),
    "missing input": _json_input(name="OTHER"),
    "byte size": _binary(_HEAD, _X.tobytes()[:-4]),
    "trailing bytes": _binary(_HEAD, _X.tobytes() + b"xxxx"),
    "header length past body": (b"{}", {"Inference-Header-Content-Length": "999"}),
    "unknown output": (json.dumps({"inputs": json.loads(_json_input()[0])["inputs"],
                                   "outputs": [{"name": "NOPE"}]}).encode(), {}),
    "bad gzip": (b"not gzip", {"Content-Encoding": "gzip"}),
}
# Client errors that Triton 2.51 answers with 500 (its JSON parser's errors: "failed to parse the request
# JSON buffer", "Unable to parse 'inputs'", "Unable to parse 'data'"); the router answers them 400 with
# Triton's message (a 5xx would make clients retry a request that cannot succeed).
TRITON_500 = {
    "malformed json": (b'{"inputs": [', {}),
    "not an object": (b"[1, 2]", {}),
    "no inputs": (b"{}", {}),
    "shape/data mismatch": _json_input(shape=[2, 1, 28, 28]),
    "strings as data": _json_input(data="abc"),
    "33 dimensions": _json_input(shape=[1] * 33, data=[0.0]),
    "nested 1000 deep": (b'{"inputs": [' + b"[" * 1000 + b"]" * 1000 + b"]}", {}),
}


def _cases(router_own: bool = True):
    for name, (body, headers) in {**BAD, **TRITON_500}.items():
        if router_own or name != "bad gzip":     # compressed bodies are inflated (within the limit) by the router
            yield pytest.param(body, headers, id=name)


def _post(url: str, model: str, body: bytes, headers: dict) -> httpx.Response:
    return httpx.post(f"http://{url}/v2/models/{model}/infer", content=body, headers=headers)


@pytest.mark.parametrize("body,headers", list(_cases()))
def test_bad_requests_get_kserve_errors(server, body, headers):
    r = _post(server.http_url, "lenet", body, headers)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]


@pytest.mark.parametrize("body,headers", list(_cases(router_own=False)))
def test_bad_requests_get_tritons_own_answer(server, direct, body, headers):
    """Validation is Triton's: the router's answer to a bad request is the gpu-let's message (its 500s for
    requests it cannot parse become 400)."""
    r, d = _post(server.http_url, "lenet", body, headers), _post(direct.http, "lenet", body, headers)
    assert r.content == d.content
    assert r.status_code == (400 if d.status_code == 500 else d.status_code) and isinstance(r.json()["error"], str)


def test_unknown_model_version_and_size_limit(server):
    body, h = _json_input()
    r = httpx.post(f"http://{server.http_url}/v2/models/nope/infer", content=body, headers=h)
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/versions/7/infer", content=body, headers=h)
    assert r.status_code == 404 and "version" in r.json()["error"]
    big = b"0" * (MAX_BODY + 10)
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/infer", content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # a body that says it is over the limit is refused before it is sent
    with socket.create_connection((server.host, server.http_port), timeout=30) as s:
        s.sendall(b"POST /v2/models/lenet/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % len(big))
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    r = httpx.get(f"http://{server.http_url}/v2/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    # still serving
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/infer", content=body)
    assert r.status_code == 200


def test_gzip_bomb_is_a_client_error(server):
    big = b"0" * (MAX_BODY + 10)
    r = httpx.post(f"http://{server.http_url}/v2/models/lenet/infer", content=gzip.compress(big),
                   headers={"Content-Encoding": "gzip"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)


def _raw_grpc_infer(url: str, request: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(url) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(request, timeout=30)
    return e.value


def test_grpc_errors(server):
    g = tg.InferenceServerClient(server.grpc_url)
    x = example("lenet", 1).astype(np.float64)
    i = tg.InferInput("INPUT", list(x.shape), "FP64")
    i.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        g.infer("lenet", [i])
    assert "INVALID_ARGUMENT" in str(e.value.status()) and "data-type" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        g.infer("nope", [i])
    assert "NOT_FOUND" in str(e.value.status())
    with pytest.raises(InferenceServerException) as e:
        g.infer("lenet", [i], model_version="7")
    assert "NOT_FOUND" in str(e.value.status())
    # serialized requests the router cannot read the model of: its own INVALID_ARGUMENT
    for raw in (b"\xff\xff\xff", b"\x0a\x05lenet\xff\xff\xff"):
        err = _raw_grpc_infer(server.grpc_url, raw)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.details()
    err = _raw_grpc_infer(server.grpc_url, b"")          # no model name
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = _raw_grpc_infer(server.grpc_url, b"\x0a\x05lenet")     # no inputs: Triton's answer
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in err.details()
    i = tg.InferInput("INPUT", [1, 1, 28, 28], "FP32")
    i.set_data_from_numpy(example("lenet", 1))
    assert g.infer("lenet", [i]).as_numpy("OUTPUT").shape == (1, 10)


def test_grpc_typed_contents_reach_the_gpulet_as_sent(server, direct):
    """Requests with typed ``contents`` (not raw bytes) go to the gpu-let over gRPC as they came; requests with
    raw tensors go over HTTP (cheaper for the router): either way the answer is the gpu-let's, bit for bit."""
    from tritonclient.grpc import service_pb2 as pb

    x = example("lenet", 1, seed=5)
    req = pb.ModelInferRequest(model_name="lenet", id="typed")
    t = req.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    answers = []
    for url in (server.grpc_url, direct.grpc):
        with grpc.insecure_channel(url) as ch:
            answers.append(ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(req.SerializeToString(),
                                                                                        timeout=60))
    assert answers[0] == answers[1]
    resp = pb.ModelInferResponse.FromString(answers[0])
    assert resp.id == "typed" and resp.outputs[0].name == "OUTPUT" and list(resp.outputs[0].shape) == [1, 10]


def test_grpc_malformed_request_is_invalid_argument(server):
    err = _raw_grpc_infer(server.grpc_url, b"\x0a\x05lenet\x22\x05abc")   # inputs field cut short
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())


# --------------------------------------------------------------------------- load generator


def test_loadgen_http_and_grpc(server, tmp_path):
    from controlplane import loadgen

    for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        res = loadgen.run(url, {"lenet": 60.0}, duration_s=1.5, protocol=proto, slo_ms={"lenet": 500.0}, seed=1)
        r = res.models["lenet"]
        assert 50 <= r.sent <= 140, r.sent           # Poisson around 90
        assert r.errors == 0 and r.ok > 0 and r.ok + r.dropped == r.sent, r.error_samples
        assert 0 < r.p50_ms <= r.p99_ms
        assert 0.0 <= r.slo_attainment <= 1.0
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


# An SLO no gpu-let can meet: the router lets a gpu-let hold at most planned throughput x SLO x 1.5
# requests of a model (200/s x 0.05 ms x 1.5: rounded up to 1), so every request that arrives while
# another is in flight is refused at once (503 / UNAVAILABLE) rather than answered late.
TINY_SLO_MS = 0.05


@pytest.fixture(scope="module")
def tiny_slo_server(tmp_path_factory):
    plan = one_gpulet_plan({"lenet": 8}, gid="cpu0-t")
    slo = {"lenet": TINY_SLO_MS}
    rt, eps, repo = start_servers(plan, tmp_path_factory.mktemp("tiny-slo"), slo_ms=slo)
    try:
        table = RoutingTable.from_plan(plan, eps, repo, deployment(slo))
        with RouterServer(table, RouterSpec(http_port=0, grpc_port=0, workers=1)) as srv:
            yield srv
    finally:
        rt.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_loadgen_reports_drops_under_overload(tiny_slo_server, protocol):
    from controlplane import loadgen

    url = tiny_slo_server.http_url if protocol == "http" else tiny_slo_server.grpc_url
    res = loadgen.run(url, {"lenet": 200.0}, duration_s=1.0, protocol=protocol, seed=2, workers=1)
    r = res.models["lenet"]
    assert r.dropped > 0 and r.ok + r.dropped == r.sent, (r, r.error_samples)


def test_every_refused_or_answered_request_is_counted_once(tiny_slo_server):
    """A burst beyond the in-flight limit over HTTP and gRPC: each request is answered or refused with
    a KServe 503 / UNAVAILABLE, and the router counts each once (requests = success + drops + failures)."""
    srv = tiny_slo_server
    x = example("lenet", 1, seed=31)
    m0 = metrics(srv.http_url)

    async def run():
        hc = tha.InferenceServerClient(srv.http_url)
        gc = tga.InferenceServerClient(srv.grpc_url)
        try:
            async def one(k):
                mod = tha if k % 2 else tga
                i = mod.InferInput("INPUT", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                try:
                    await (hc if k % 2 else gc).infer("lenet", [i])
                    return "ok", ""
                except InferenceServerException as e:
                    return str(e.status()), e.message()

            return await asyncio.gather(*(one(k) for k in range(40)))
        finally:
            await hc.close()
            await gc.close()

    res = asyncio.run(run())
    ok = sum(s == "ok" for s, _ in res)
    refused = [(s, msg) for s, msg in res if s != "ok"]
    assert all(s in ("503", "StatusCode.UNAVAILABLE") and "SLO" in msg for s, msg in refused), refused
    assert refused and ok                                  # the first one in is answered
    m1 = metrics(srv.http_url)

    def delta(name, **labels):
        return _m(m1, name, **labels) - _m(m0, name, **labels)

    assert delta("router_requests_total", model="lenet") == len(res)
    assert delta("router_success_total", model="lenet") == ok
    assert delta("router_drops_total", model="lenet", reason="admission") == len(refused)
    assert delta("router_drops_total", model="lenet", reason="deadline") == 0
    assert delta("router_failures_total", model="lenet") == 0
    assert delta("router_gpulet_requests_total", gpulet="cpu0-t", model="lenet") == ok   # refused ones never left
    assert _m(m1, "router_inflight", gpulet="cpu0-t") == 0


# --------------------------------------------------------------------------- several router processes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def _listens(pid: int, port: int) -> bool:
    """Whether process pid holds a TCP socket listening on port."""
    try:
        inodes = _socket_inodes(pid)
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                return True
    return False


def _requests_per_pid(metrics_dir: str, model: str) -> dict[int, float]:
    """router_requests_total of the model in each router process's multiprocess file."""
    from prometheus_client.mmap_dict import MmapedDict

    out: dict[int, float] = {}
    for p in Path(metrics_dir).glob("counter_*.db"):
        pid = int(p.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(p)):
            _, name, labels, _ = json.loads(key)
            if name == "router_requests_total" and labels == {"model": model}:
                out[pid] = out.get(pid, 0.0) + value
    return out


def _spawned_children() -> list[int]:
    """Live processes of ours started by multiprocessing's spawn (router workers are)."""
    me, found = str(os.getpid()), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            status = Path(f"/proc/{d}/status").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")), None)
        state = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("State:")), "")
        if ppid == me and b"spawn_main" in cmd and state != "Z":
            found.append(int(d))
    return found


def test_router_processes_share_the_ports_and_sum_their_metrics(backend, repo):
    """workers=2: two router processes on the same HTTP and gRPC ports (SO_REUSEPORT). Requests over fresh
    connections land on both; /metrics, whichever process answers it, counts each request once; the
    worker processes are gone once the router stops."""
    plan, eps, _ = backend
    table = RoutingTable.from_plan(plan, eps, repo, deployment())
    srv = RouterServer(table, RouterSpec(http_port=0, grpc_port=0, workers=2))
    srv.start_in_thread(timeout=120)
    try:
        children = list(srv._children)
        assert len(children) == 1 and children[0].is_alive()
        pids = [os.getpid(), children[0].pid]
        metrics_dir = srv._metrics_dir
        # the worker binds the same ports once it has started (spawned: it imports everything first)
        t0 = time.monotonic()
        while not (_listens(pids[1], srv.http_port) and _listens(pids[1], srv.grpc_port)):
            assert children[0].is_alive(), "router worker exited"
            assert time.monotonic() - t0 < 120, "router worker never listened on the router's ports"
            time.sleep(0.2)

        x = example("lenet", 1, seed=21)
        ref = reference(repo, "lenet", x)
        n = 0
        for k in range(20):          # a new client, so a new connection, every time
            with th.InferenceServerClient(srv.http_url) as c:
                i = th.InferInput("INPUT", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                assert _close(c.infer("lenet", [i]).as_numpy("OUTPUT"), ref)
            with tg.InferenceServerClient(srv.grpc_url) as g:
                i = tg.InferInput("INPUT", list(x.shape), "FP32")
                i.set_data_from_numpy(x)
                assert _close(g.infer("lenet", [i]).as_numpy("OUTPUT"), ref)
            n += 2

        for _ in range(6):           # each on a new connection: answered by either process
            m = metrics(srv.http_url)
            assert _m(m, "router_requests_total", model="lenet") == n
            assert _m(m, "router_success_total", model="lenet") == n
            assert _m(m, "router_gpulet_requests_total", gpulet=GPULET, model="lenet") == n
            assert _m(m, "router_requests_total", model="mobilenet_v2") == 0
        per_pid = _requests_per_pid(metrics_dir, "lenet")
        assert sum(per_pid.values()) == n
        # 40 connections spread by the kernel's hash: both processes served some (all on one: p < 1e-11)
        assert set(pids) <= {pid for pid, v in per_pid.items() if v > 0}, per_pid
    finally:
        srv.stop()
    assert srv._thread is None
    assert not children[0].is_alive() and children[0].exitcode is not None
    assert _spawned_children() == []                  # no router worker left behind
    assert not Path(metrics_dir).exists()


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
    assert r.status_code in (200, 400, 404, 413, 503), (r.status_code, r.text)
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
    m = metrics(server.http_url)
    assert _m(m, "router_gpulet_ready", gpulet=GPULET) == 1.0
    assert _m(m, "router_gpulet_errors_total", gpulet=GPULET) == 0     # no broken connection to the gpu-let


def test_create_app_alone_without_ready_gpulets():
    """create_app(table, spec) owns its router; with no gpu-let up it is live, not ready, and says why."""
    from fastapi.testclient import TestClient

    from controlplane.repository import SourceRepository
    from controlplane.router import create_app

    plan = one_gpulet_plan()
    table = RoutingTable.from_plan(plan, {GPULET: free_endpoint()}, SourceRepository(), deployment())
    with TestClient(create_app(table, RouterSpec())) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/models/lenet/ready").status_code == 503
        assert c.get("/v2/models/lenet").json()["inputs"][0]["shape"] == [-1, 1, 28, 28]
        body, _ = _json_input()
        r = c.post("/v2/models/lenet/infer", content=body)
        assert r.status_code == 503 and "no ready gpu-let" in r.json()["error"]


def test_inflight_limit_leaves_room_for_a_random_spread():
    """Little's-law budget per router process plus two standard deviations of a Poisson count: a small
    budget is not a hard cap at its mean, a large one grows by little, and an impossible SLO stays at 1."""
    from controlplane.router.core import inflight_limit

    assert inflight_limit(351, 22, processes=4) == 7          # n = 2.9: was 3 (1.1 % refused on the H200)
    assert inflight_limit(2000, 100, processes=1) == 335      # n = 300: +35
    assert inflight_limit(200, TINY_SLO_MS) == 1
    assert inflight_limit(0, 22) is None and inflight_limit(100, None) is None
    assert inflight_limit(1000, 50, processes=4) < inflight_limit(1000, 50, processes=1)


def test_requests_follow_the_plans_split_between_gpulets(repo):
    """Three gpu-lets planned 300 / 100 / 100 req/s of lenet: of every 5 requests a router process sends,
    3, 1 and 1 go to them, interleaved, as clients splitting by the plan would send (on the H200 the
    fewest-in-flight rule sent a router process's requests mostly to the largest); a gpu-let out of the
    rotation gets none and the others keep their ratio."""
    from collections import Counter

    from controlplane.router.core import Router
    from controlplane.router.errors import RouterError
    from controlplane.spec import Assignment, GpuLet, Plan

    plan = Plan(gpus=1, gpulets=[GpuLet(id=f"cpu0-{c}", gpu=0, share=30, models=[
        Assignment(model="lenet", batch=4, rate=r, throughput=2 * r)]) for c, r in zip("abc", (300.0, 100.0, 100.0))])
    table = RoutingTable.from_plan(plan, {g.id: free_endpoint() for g in plan.gpulets}, repo, deployment())

    async def picks() -> tuple[list[str], list[str]]:
        router = Router(table)
        await router.set_table(table)            # nothing listens there: every gpu-let out of the rotation
        try:
            with pytest.raises(RouterError, match="no ready gpu-let"):
                router.pick("lenet")
            for be in router.servers.values():
                be.set_ready(True)
            first = [router.pick("lenet").backend.id for _ in range(500)]
            router.servers["cpu0-a"].set_ready(False)
            return first, [router.pick("lenet").backend.id for _ in range(100)]
        finally:
            await router.close()

    first, without_a = asyncio.run(picks())
    for k in range(0, len(first), 5):
        assert Counter(first[k:k + 5]) == {"cpu0-a": 3, "cpu0-b": 1, "cpu0-c": 1}, first[k:k + 5]
    assert Counter(without_a) == {"cpu0-b": 50, "cpu0-c": 50}


def test_stalled_bodies_time_out_and_others_keep_being_served(backend, repo):
    """Connections that send part of a body and stall get 408 once body_timeout_s passes with nothing
    received, and are closed; a correct client is answered meanwhile."""
    from router_helpers import deployment

    plan, eps, _ = backend
    table = RoutingTable.from_plan(plan, eps, repo, deployment())
    with RouterServer(table, RouterSpec(http_port=0, grpc_port=0, workers=1, body_timeout_s=1.0)) as srv:
        stalled = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", srv.http_port))
            s.sendall(b"POST /v2/models/lenet/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
            stalled.append(s)
        client = th.InferenceServerClient(srv.http_url)
        x = np.zeros((1, 1, 28, 28), np.float32)
        inp = th.InferInput("INPUT", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("lenet", [inp]).as_numpy("OUTPUT").shape == (1, 10)   # not starved
        for s in stalled:
            s.settimeout(10)
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 408"), head[:200]
            assert b"stalled" in head or b"stalled" in s.recv(4096)
            s.close()


def test_repository_load_is_refused_while_the_api_is_off(server):
    """load / unload change what runs: without `router.repository_api` they answer 403 /
    PERMISSION_DENIED with how to turn them on; the index still lists what is served."""
    c = th.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="repository API is off"):
        c.load_model("mobilenet_v2")
    g = tg.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="repository API is off") as e:
        g.unload_model("lenet")
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    assert [m["name"] for m in c.get_model_repository_index()] == sorted(server.table.models)
    assert "model_repository(index)" in c.get_server_metadata()["extensions"]
    r = httpx.post(f"http://{server.http_url}/v2/repository/models/lenet/load", content=b"[1")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]


def test_ten_thousand_stalled_bodies_do_not_starve_a_correct_client(backend, repo):
    """10,000 connections that each send a request head and part of its body, then stall, held while a
    correct client sends requests one after another: >= 99 % of its requests are answered correctly.
    (The router runs in two processes, as `up` runs it; both share the connections.)"""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 10_000
    if hard < 2 * n:            # this process holds the clients' ends and one router process's
        pytest.skip(f"needs {2 * n} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * n), hard))
    plan, eps, _ = backend
    table = RoutingTable.from_plan(plan, eps, repo, deployment())
    stalled: list[socket.socket] = []
    try:
        with RouterServer(table, RouterSpec(http_port=0, grpc_port=0, workers=2, body_timeout_s=120)) as srv:
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", srv.http_port), timeout=30)
                s.sendall(b"POST /v2/models/lenet/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
                stalled.append(s)
            client = th.InferenceServerClient(srv.http_url, network_timeout=30)
            x = example("lenet", 1, seed=4)
            inp = th.InferInput("INPUT", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            want = reference(repo, "lenet", x)
            ok, failures = 0, []
            for _ in range(200):
                try:
                    assert _close(client.infer("lenet", [inp]).as_numpy("OUTPUT"), want)
                    ok += 1
                except Exception as e:  # noqa: BLE001 - counted
                    failures.append(f"{type(e).__name__}: {e}")
            assert ok >= 198, failures[:5]
    finally:
        for s in stalled:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
