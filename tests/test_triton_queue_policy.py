"""Triton's dynamic batcher and queue policy, as the gpu-let repositories configure them,
checked against a real tritonserver (CPU, python backend).

What Triton 2.51 answers when its queue policy rejects a request whose timeout expired
(recorded here, asserted below): HTTP 503 with the JSON body
``{"error":"Request timeout expired"}`` (Content-Type text/plain); gRPC status
UNAVAILABLE with details ``Request timeout expired``.

The rejected request is made deterministic without timing thresholds: it carries Triton's
own ``timeout`` parameter of 1 µs (``allow_timeout_override``), and it cannot leave the queue
within that microsecond: the model's instance is busy with batches sent before it, and even
when it is not, a lone batch-1 request is held up to ``max_queue_delay_microseconds`` (5 ms
here) for its preferred batch of 4, and Triton re-applies the policy before dispatching it.
"""

from __future__ import annotations

import json
import queue

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from controlplane.spec import Assignment, GpuLet, Plan

from router_helpers import example, reference, start_servers

MODEL = "mobilenet_v2"
BATCH = 4
# A generous SLO, so the requests that are not meant to expire never do, however slow the
# shared CPU: T = s - L = 599.9 s, D = min(0.1 (s - 2L), 5 ms) = 5 ms.
SLO_MS, LATENCY_MS = 600_000.0, 100.0
TIMEOUT_US, DELAY_US = 599_900_000, 5_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    plan = Plan(gpus=1, gpulets=[GpuLet(id="cpu0-q", gpu=0, share=100, models=[
        Assignment(model=MODEL, batch=BATCH, rate=10.0, latency_ms=LATENCY_MS)])])
    rt, eps, repo = start_servers(plan, tmp_path_factory.mktemp("queue"), slo_ms={MODEL: SLO_MS})
    try:
        yield eps["cpu0-q"], repo
    finally:
        rt.stop()


def _http_inputs(x: np.ndarray):
    i = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return [i]


def _grpc_inputs(x: np.ndarray):
    i = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return [i]


def test_loaded_config_has_the_plans_batcher_and_queue_policy(server):
    ep, _ = server
    with httpclient.InferenceServerClient(ep.http) as c:
        cfg = c.get_model_config(MODEL)
    assert cfg["max_batch_size"] == 32                      # the model's own limit, above the planned 4
    db = cfg["dynamic_batching"]
    assert db["preferred_batch_size"] == [BATCH]
    assert db["max_queue_delay_microseconds"] == DELAY_US
    assert db["default_queue_policy"] == {"timeout_action": "REJECT", "default_timeout_microseconds": TIMEOUT_US,
                                          "allow_timeout_override": True, "max_queue_size": 0}
    # the same over gRPC, as the proto (REJECT is the enum's zero, which JSON renderings may omit)
    with grpcclient.InferenceServerClient(ep.grpc) as c:
        g = c.get_model_config(MODEL).config
    assert list(g.dynamic_batching.preferred_batch_size) == [BATCH]
    assert g.dynamic_batching.max_queue_delay_microseconds == DELAY_US
    q = g.dynamic_batching.default_queue_policy
    assert q.timeout_action == mc.ModelQueuePolicy.REJECT
    assert q.default_timeout_microseconds == TIMEOUT_US and q.allow_timeout_override


def test_expired_request_is_rejected_503_over_http_and_unavailable_over_grpc(server):
    ep, repo = server
    busy_x = example(MODEL, BATCH, seed=1)
    x = example(MODEL, 1, seed=2)
    http_c = httpclient.InferenceServerClient(ep.http, network_timeout=600)
    grpc_c = grpcclient.InferenceServerClient(ep.grpc)
    done: queue.Queue = queue.Queue()
    try:
        # keep the model's one instance busy: full preferred batches, sent first
        for _ in range(4):
            grpc_c.async_infer(MODEL, _grpc_inputs(busy_x), lambda result, error: done.put((result, error)))
        with pytest.raises(InferenceServerException) as h:
            http_c.infer(MODEL, _http_inputs(x), timeout=1)
        with pytest.raises(InferenceServerException) as g:
            grpc_c.infer(MODEL, _grpc_inputs(x), timeout=1)
        # the raw HTTP answer, as a pass-through router would relay it
        body = {"inputs": [{"name": "INPUT", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}], "parameters": {"timeout": 1}}
        raw = httpx.post(f"http://{ep.http}/v2/models/{MODEL}/infer", json=body, timeout=600)
        answers = [done.get(timeout=600) for _ in range(4)]
        assert (h.value.status(), h.value.message()) == ("503", "Request timeout expired")
        assert (g.value.status(), g.value.message()) == ("StatusCode.UNAVAILABLE", "Request timeout expired")
        assert raw.status_code == 503 and json.loads(raw.text) == {"error": "Request timeout expired"}
        # the batches that kept it busy were served, and so is the same request without the 1 µs timeout
        want = reference(repo, MODEL, busy_x)
        for result, error in answers:
            assert error is None
            np.testing.assert_allclose(result.as_numpy("OUTPUT"), want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(grpc_c.infer(MODEL, _grpc_inputs(x)).as_numpy("OUTPUT"),
                                   reference(repo, MODEL, x), rtol=1e-4, atol=1e-4)
    finally:
        http_c.close()
        grpc_c.close()
