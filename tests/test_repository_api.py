"""The repository API through the router: tritonclient's load_model / unload_model / index, unchanged.

A real `controlplane up` (CPU, real tritonservers, the router in two processes) with
`router: {repository_api: true}`; lenet traffic runs the whole time and must see no failure while
mobilenet_v2 is loaded (its gpu-let started, its answers equal to TorchScript) and unloaded again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from controlplane import zoo
from controlplane.repository import SourceRepository

from helpers import Traffic, run_cli, tritonserver_pids

DEPLOYMENT = """\
name: repo-api
models:
  - {{name: lenet, rate: 10, slo_ms: 2000}}
devices: cpu
router: {{http_port: 0, grpc_port: 0, workers: 2, repository_api: true}}
scheduler: {{algorithm: trivial}}
run_dir: {run_dir}
"""


def _state(tmp: Path) -> dict:
    return json.loads((tmp / "run" / "state.json").read_text())


def _index(client) -> dict[str, dict]:
    rows = client.get_model_repository_index()
    if not isinstance(rows, list):          # gRPC: a RepositoryIndexResponse
        rows = [{"name": m.name, "state": m.state, "reason": m.reason} for m in rows.models]
    return {r["name"]: r for r in rows}


def test_load_and_unload_through_the_router_without_a_failed_request(tmp_path):
    path = tmp_path / "repo-api.yaml"
    path.write_text(DEPLOYMENT.format(run_dir=tmp_path / "run"))
    proc = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        r = _state(tmp_path)["router"]
        http_url, grpc_url = f"127.0.0.1:{r['http_port']}", f"127.0.0.1:{r['grpc_port']}"
        http = httpclient.InferenceServerClient(http_url, network_timeout=400)
        grpc = grpcclient.InferenceServerClient(grpc_url)
        assert "model_repository" in http.get_server_metadata()["extensions"]
        index = _index(http)
        assert index["lenet"]["state"] == "READY"
        assert index["mobilenet_v2"]["state"] == "UNAVAILABLE" and index["mobilenet_v2"]["reason"] == "not loaded"
        assert set(index) == set(SourceRepository().names())

        with Traffic(http_url, grpc_url) as traffic:
            # load over HTTP: the controller plans it, starts its gpu-let, routes to it, then answers
            http.load_model("mobilenet_v2")
            assert http.is_model_ready("mobilenet_v2") and grpc.is_model_ready("mobilenet_v2")
            assert {a["model"] for g in _state(tmp_path)["plan"]["gpulets"] for a in g["models"]} == \
                {"lenet", "mobilenet_v2"}
            x = zoo.example_input("mobilenet_v2", 2, seed=1).numpy()
            inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            ts = torch.jit.load(str(SourceRepository()["mobilenet_v2"].artifact()))
            with torch.no_grad():
                want = ts(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(http.infer("mobilenet_v2", [inp]).as_numpy("OUTPUT"), want,
                                       rtol=1e-4, atol=1e-5)
            assert _index(grpc)["mobilenet_v2"]["state"] == "READY"
            http.load_model("mobilenet_v2")             # already served: nothing changes
            pids = sorted(tritonserver_pids(str(tmp_path)))
            assert len(pids) == 2

            # what cannot be done is refused with the reason, and nothing moves
            with pytest.raises(InferenceServerException, match="no model 'nope' in the repository"):
                http.load_model("nope")
            with pytest.raises(InferenceServerException, match="not supported"):
                http.load_model("resnet50", config=json.dumps({"max_batch_size": 4}))

            # unload over gRPC: its server stops, it is gone from routing
            grpc.unload_model("mobilenet_v2")
            assert len(tritonserver_pids(str(tmp_path))) == 1 and set(tritonserver_pids(str(tmp_path))) < set(pids)
            with pytest.raises(InferenceServerException, match="only model") as e:
                grpc.unload_model("lenet")
            assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert not http.is_model_ready("mobilenet_v2")
            with pytest.raises(InferenceServerException, match="unknown model 'mobilenet_v2'"):
                http.infer("mobilenet_v2", [inp])
            assert _index(http)["mobilenet_v2"]["state"] == "UNAVAILABLE"
        assert traffic.ok > 0 and traffic.failures == [], traffic.failures[:5]
        assert len(_state(tmp_path)["gpulets"]) == 1
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []
