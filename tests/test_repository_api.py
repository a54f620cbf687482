"""The repository API through the router: tritonclient's load_model / unload_model / index, unchanged.

A real `controlplane up` (CPU, real tritonservers, the router in two processes) with
`router: {repository_api: true}`; lenet traffic runs the whole time and must see no failure while
mobilenet_v2 is loaded (its gpu-let started, its answers equal to TorchScript) and unloaded again.
"""

from __future__ import annotations

import json
import threading
import time
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
            # load over HTTP, its SLO and largest batch set by a config override: the controller plans it,
            # starts its gpu-let, routes to it, then answers
            http.load_model("mobilenet_v2", config=json.dumps(
                {"max_batch_size": 4, "parameters": {"slo_ms": {"string_value": "3000"}}}))
            assert http.is_model_ready("mobilenet_v2") and grpc.is_model_ready("mobilenet_v2")
            plan = _state(tmp_path)["plan"]
            assert {a["model"] for g in plan["gpulets"] for a in g["models"]} == {"lenet", "mobilenet_v2"}
            assert plan["models"]["mobilenet_v2"]["slo_ms"] == 3000
            assert [a["batch"] for g in plan["gpulets"] for a in g["models"] if a["model"] == "mobilenet_v2"] == [4]
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
            with pytest.raises(InferenceServerException, match="'instance_group' is not taken"):
                grpc.load_model("resnet50", config=json.dumps({"instance_group": [{"count": 2}]}))

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

            # a load that arrives while another change is being applied is refused, and changes nothing
            more = tmp_path / "more.yaml"
            more.write_text(path.read_text().replace("slo_ms: 2000}", "slo_ms: 2000}\n  - {name: mobilenet_v2, "
                                                     "rate: 2, slo_ms: 5000}"))
            assert "mobilenet_v2" in more.read_text()
            applied: list = []
            t = threading.Thread(target=lambda: applied.append(run_cli("apply", "-f", str(more), timeout=400)))
            t.start()
            taken = tmp_path / "run" / "apply.yaml.taken"
            while not taken.exists() and t.is_alive():
                time.sleep(0.02)
            with pytest.raises(InferenceServerException, match="while another change was being applied") as e:
                http.load_model("googlenet")
            assert e.value.status() == "409"
            t.join(400)
            assert applied and applied[0].returncode == 0, applied
        assert traffic.ok > 0 and traffic.failures == [], traffic.failures[:5]
        models = {a["model"] for g in _state(tmp_path)["plan"]["gpulets"] for a in g["models"]}
        assert models == {"lenet", "mobilenet_v2"}
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []


def _scorer(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 3).eval(), torch.rand(2, 4)), str(path))
    return path


def test_a_new_version_replaces_the_served_one_without_a_failed_request(tmp_path):
    """`repo add --version 2` then load_model of the served model: new gpu-lets with version 2 start,
    traffic moves to them, the old ones drain and stop; every answer is version 1's or version 2's, and
    once load_model returns, version 2's (the model's metadata says so). Removing version 2 and loading
    again goes back to version 1 the same way."""
    v1, v2 = _scorer(tmp_path / "v1.pt", 1), _scorer(tmp_path / "v2.pt", 2)
    x = np.random.default_rng(0).random((2, 4), dtype=np.float32)
    with torch.no_grad():
        want = {v: torch.jit.load(str(f))(torch.from_numpy(x)).numpy() for v, f in (("v1", v1), ("v2", v2))}
    add = ("repo", "add", "scorer", "--input", "X:FP32:4", "--output", "Y", "--max-batch", "8", "--slo-ms", "1000",
           "--repository", str(tmp_path / "repo"))
    assert run_cli(*add, "--torchscript", str(v1), timeout=120).returncode == 0
    path = tmp_path / "d.yaml"
    path.write_text(DEPLOYMENT.replace("lenet, rate: 10, slo_ms: 2000", "scorer, rate: 10, slo_ms: 1000")
                    .format(run_dir=tmp_path / "run") + f"repository: {tmp_path / 'repo'}\n")
    proc = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        r = _state(tmp_path)["router"]
        http = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}", network_timeout=400)
        inp = httpclient.InferInput("X", [2, 4], "FP32")
        inp.set_data_from_numpy(x)

        def version() -> str:
            y = http.infer("scorer", [inp]).as_numpy("Y")
            return next(v for v, w in want.items() if np.allclose(y, w, rtol=1e-4, atol=1e-6))

        assert version() == "v1"
        (old_pid,) = tritonserver_pids(str(tmp_path))
        replaced = run_cli(*add, "--torchscript", str(v2), "--version", "2", timeout=120)
        assert replaced.returncode == 0, replaced.stdout + replaced.stderr
        assert sorted(p.name for p in (tmp_path / "repo" / "scorer").iterdir() if p.is_dir()) == ["1", "2"]
        assert version() == "v1"                    # the running server keeps what it loaded
        seen, failures = [], []
        stop = threading.Event()

        def send() -> None:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{r['grpc_port']}")
            gi = grpcclient.InferInput("X", [2, 4], "FP32")
            gi.set_data_from_numpy(x)
            while not stop.is_set():
                try:
                    y = client.infer("scorer", [gi]).as_numpy("Y")
                    seen.append(next(v for v, w in want.items() if np.allclose(y, w, rtol=1e-4, atol=1e-6)))
                except Exception as e:  # noqa: BLE001 - every failure fails the test
                    failures.append(f"{type(e).__name__}: {e}")

        t = threading.Thread(target=send, daemon=True)
        t.start()
        try:
            http.load_model("scorer")                # served already: reloaded from the repository
            assert version() == "v2" and http.get_model_metadata("scorer")["versions"] == ["2"]
            with pytest.raises(InferenceServerException, match="no version '1'"):
                http.infer("scorer", [inp], model_version="1")
            assert http.infer("scorer", [inp], model_version="2").as_numpy("Y") is not None
            assert old_pid not in tritonserver_pids(str(tmp_path)) and len(tritonserver_pids(str(tmp_path))) == 1
            # and back: version 2 removed, version 1 served again
            rm = run_cli("repo", "rm", "scorer", "--version", "2", "--repository", str(tmp_path / "repo"), timeout=60)
            assert rm.returncode == 0, rm.stdout + rm.stderr
            http.load_model("scorer")
            assert version() == "v1" and http.get_model_metadata("scorer")["versions"] == ["1"]
        finally:
            stop.set()
            t.join(30)
        assert failures == [] and "v2" in seen and seen[-1] == "v1", (failures[:5], seen[:3], seen[-3:])
        only = run_cli("repo", "rm", "scorer", "--version", "1", "--repository", str(tmp_path / "repo"), timeout=60)
        assert only.returncode == 2 and "the only one" in only.stderr, only.stdout + only.stderr
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []
