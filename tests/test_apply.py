"""`controlplane apply`: a running deployment moves to a changed file without failing a request.

Real tritonservers, the real router (two processes), real clients sending without pause while
gpu-lets are added, replaced and removed; every answer is checked against TorchScript.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from controlplane import zoo

from helpers import Traffic, metrics, run_cli, tritonserver_pids

DEPLOYMENT = """\
name: live
models:
{models}
devices: cpu
router: {{http_port: 0, grpc_port: 0, workers: 2}}
scheduler: {{algorithm: trivial}}
run_dir: {run_dir}
"""
LENET = "  - {name: lenet, rate: 10, slo_ms: %d}"
MOBILENET = "  - {name: mobilenet_v2, rate: 2, slo_ms: 5000}"


def _write(path: Path, *models: str) -> Path:
    path.write_text(DEPLOYMENT.format(models="\n".join(models), run_dir=path.parent / "run"))
    return path


def _state(path: Path) -> dict:
    return json.loads((path.parent / "run" / "state.json").read_text())


def _pids(state: dict) -> dict[str, int]:
    return {gid: g["pid"] for gid, g in state["gpulets"].items()}


def test_apply_adds_replaces_and_removes_gpulets_without_a_failed_request(tmp_path):
    path = _write(tmp_path / "live.yaml", LENET % 2000)
    proc = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        first = _state(path)
        r = first["router"]
        (lenet_gid, lenet_pid), = _pids(first).items()
        with Traffic(f"127.0.0.1:{r['http_port']}", f"127.0.0.1:{r['grpc_port']}") as traffic:
            # 1. a model added: a gpu-let of its own starts; lenet's keeps running (same process)
            _write(path, LENET % 2000, MOBILENET)
            out = run_cli("apply", "-f", str(path), timeout=400)
            assert out.returncode == 0, out.stdout + out.stderr
            added = _state(path)
            assert _pids(added)[lenet_gid] == lenet_pid and len(added["gpulets"]) == 2
            assert {m for g in added["plan"]["gpulets"] for m in (a["model"] for a in g["models"])} == \
                {"lenet", "mobilenet_v2"}
            http = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")
            assert http.is_model_ready("mobilenet_v2")
            x = zoo.example_input("mobilenet_v2", 1, seed=1).numpy()
            inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            assert http.infer("mobilenet_v2", [inp]).as_numpy("OUTPUT").shape[0] == 1

            # 2. lenet's SLO changed: its server is replaced (new one ready first, old one stopped after)
            _write(path, LENET % 1500, MOBILENET)
            out = run_cli("apply", "-f", str(path), timeout=400)
            assert out.returncode == 0, out.stdout + out.stderr
            replaced = _pids(_state(path))
            assert lenet_gid not in replaced and len(replaced) == 2
            assert lenet_pid not in tritonserver_pids(str(tmp_path))

            # 3. a model removed: its server stops
            mobilenet_pid = next(p for g, p in replaced.items() if g in added["gpulets"] and g != lenet_gid)
            _write(path, LENET % 1500)
            out = run_cli("apply", "-f", str(path), timeout=400)
            assert out.returncode == 0, out.stdout + out.stderr
            assert len(_state(path)["gpulets"]) == 1
            assert mobilenet_pid not in tritonserver_pids(str(tmp_path))
            assert not http.is_model_ready("mobilenet_v2")

            # 4. a change apply cannot make is refused and nothing moves
            bad = tmp_path / "bad.yaml"
            bad.write_text(path.read_text().replace("workers: 2", "workers: 1"))
            before = _pids(_state(path))
            out = run_cli("apply", "-f", str(bad), timeout=120)
            assert out.returncode == 1 and "'router' differs" in out.stderr, out.stdout + out.stderr
            assert _pids(_state(path)) == before
        assert traffic.ok > 0 and traffic.failures == [], traffic.failures[:5]
        m = metrics(f"127.0.0.1:{r['http_port']}")
        assert m[("controlplane_replans_total", (("cause", "controlplane apply"),))] == 3
        assert m[("controlplane_replans_refused_total", (("cause", "controlplane apply"),))] == 1
        assert m[("controlplane_gpulets_started_total", ())] == 2       # mobilenet_v2's, then lenet's new one
        assert m[("controlplane_gpulets_stopped_total", ())] == 2       # lenet's old one, then mobilenet_v2's
        assert m[("controlplane_gpulets", ())] == 1
        assert sorted(tritonserver_pids(str(tmp_path))) == sorted(before.values())
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []


def test_apply_to_a_deployment_that_is_not_running(tmp_path):
    path = _write(tmp_path / "live.yaml", LENET % 2000)
    out = run_cli("apply", "-f", str(path), timeout=120)
    assert out.returncode == 3 and "is not running" in out.stdout


@pytest.fixture(autouse=True)
def _no_servers_left(tmp_path):
    yield
    assert tritonserver_pids(str(tmp_path)) == []
