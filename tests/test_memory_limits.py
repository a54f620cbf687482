"""Per-gpu-let memory limits: a model that allocates past its limit fails alone (issue 14).

On the CPU the limit is each server process's data limit (RLIMIT_DATA through ``prlimit``, inherited
by the python-backend stubs); on a GPU it is the MPS client's pinned device memory limit, whose
environment is checked here and whose effect is a GPU benchmark's to show.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from controlplane.runtime.base import gpulet_env, memory_base_mb, memory_limit_mb
from controlplane.spec import Assignment, GpuLet

from helpers import run_cli

#: a Triton python model that reserves SIZE_MB of memory per request (np.empty: reserved, not touched, so
#: without a limit it costs nothing; a data limit counts it all the same)
HOG = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            mb = pb_utils.get_input_tensor_by_name(r, "SIZE_MB").as_numpy()
            try:
                block = np.empty(int(mb.max()) << 20, dtype=np.uint8)
                del block
            except MemoryError:
                out.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"out of memory reserving {int(mb.max())} MB")))
                continue
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", mb.astype(np.float32))]))
        return out
'''

NEIGHBOUR = '''\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * 2)])
                for r in requests]
'''


def test_the_limit_is_twice_the_largest_model_plus_a_base_and_reaches_mps_on_a_gpu():
    assert memory_limit_mb([None, 0.0], on_gpu=True) is None          # nothing known: no limit
    assert memory_limit_mb([500.0, 2920.0, None], on_gpu=True) == 2 * 2920 + 1024
    # the CPU's base: 2 GB and 16 MB per core (thread stacks count in a data limit)
    assert memory_limit_mb([50.0], on_gpu=False) == int(2 * 50 + 2048 + 16 * os.cpu_count()) == \
        int(2 * 50 + memory_base_mb(False))
    g = GpuLet(id="gpu0-a", gpu=0, share=40, models=[Assignment(model="bert", batch=8, rate=100.0)])
    env = gpulet_env(g, 3, None, "/tmp/pipe", 2048)
    # the process sees one GPU (CUDA_VISIBLE_DEVICES=3): its ordinal 0 is the one limited
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048MB"
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in gpulet_env(g, 3, None, "/tmp/pipe", None)
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in gpulet_env(g, None, [0], None, 2048)   # CPU: prlimit


def _data_limit(pid: int) -> int | None:
    """The soft 'Max data size' of a process, in bytes (None: unlimited)."""
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max data size"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    raise AssertionError(f"no data limit line for {pid}")


def test_a_model_past_its_memory_limit_fails_alone_and_its_neighbour_keeps_serving(tmp_path):
    """Two python models on two CPU gpu-lets; the hog declares 64 MB (`repo add --memory-mb`), so its
    processes may hold 2 x 64 MB + the base. Asking it to reserve 4 GB fails that request with a clear
    error (without the limit the reservation succeeds); the neighbour answers throughout and the hog
    itself answers small requests again, with no restart."""
    import psutil

    repo = tmp_path / "repo"
    for name, src, tensors in (("hog", HOG, ["--input", "SIZE_MB:INT64:1", "--output", "Y:FP32:1",
                                             "--memory-mb", "64"]),
                               ("neighbour", NEIGHBOUR, ["--input", "X:FP32:4", "--output", "Y:FP32:4"])):
        d = tmp_path / name
        d.mkdir()
        (d / "model.py").write_text(src)
        add = run_cli("repo", "add", name, "--python", str(d), *tensors, "--max-batch", "4",
                      "--repository", str(repo), timeout=240)
        assert add.returncode == 0, add.stdout + add.stderr
    assert 'key: "memory_mb"' in (repo / "hog" / "config.pbtxt").read_text()
    bad = run_cli("repo", "add", "x", "--python", str(tmp_path / "hog"), "--input", "SIZE_MB:INT64:1",
                  "--output", "Y:FP32:1", "--memory-mb", "-1", "--repository", str(repo), timeout=60)
    assert bad.returncode == 2 and "memory -1 MB: must be positive" in bad.stderr, bad.stdout + bad.stderr

    dep = tmp_path / "mem.yaml"
    dep.write_text(f"""\
name: mem
models:
  - {{name: hog, rate: 5, slo_ms: 5000}}
  - {{name: neighbour, rate: 5, slo_ms: 5000}}
devices: cpu
router: {{http_port: 0, grpc_port: 0, workers: 1}}
scheduler: {{algorithm: trivial}}
repository: {repo}
run_dir: {tmp_path / "run"}
""")
    up = run_cli("up", "-f", str(dep), "--detach", timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        hog_gpulet = next(gid for gid, g in state["gpulets"].items()
                          if any(a["model"] == "hog" for p in state["plan"]["gpulets"] if p["id"] == gid
                                 for a in p["models"]))
        server = psutil.Process(state["gpulets"][hog_gpulet]["pid"])
        stub = next(c for c in server.children(recursive=True) if c.name().startswith("triton_python_b"))
        limit = int(2 * 64 + memory_base_mb(False)) * 2**20
        assert _data_limit(server.pid) == limit and _data_limit(stub.pid) == limit
        status = json.loads(run_cli("status", "-f", str(dep), "--json").stdout)
        assert {g["gpulet"]: g["memory_limit_mb"] for g in status["gpulets"]} == \
            {gid: (limit >> 20 if gid == hog_gpulet else None) for gid in state["gpulets"]}   # the neighbour: none known

        http = httpclient.InferenceServerClient(f"127.0.0.1:{state['router']['http_port']}")

        def hog(mb: int):
            x = httpclient.InferInput("SIZE_MB", [1, 1], "INT64")
            x.set_data_from_numpy(np.array([[mb]], dtype=np.int64))
            return http.infer("hog", [x]).as_numpy("Y")

        def neighbour() -> None:
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            inp = httpclient.InferInput("X", [2, 4], "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_array_equal(http.infer("neighbour", [inp]).as_numpy("Y"), x * 2)

        assert hog(16).tolist() == [[16.0]]
        neighbour()
        with pytest.raises(InferenceServerException, match="out of memory reserving 4096 MB"):
            hog(4096)
        neighbour()
        assert hog(16).tolist() == [[16.0]]          # the hog itself recovers: the failed request alone failed
        assert server.is_running() and stub.is_running()
    finally:
        down = run_cli("down", "-f", str(dep), timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
