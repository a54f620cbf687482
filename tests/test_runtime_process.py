"""The process runtime against real tritonserver processes (CPU gpu-lets)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from controlplane import zoo
from controlplane.repository import SourceRepository, build_artifacts, write_gpulet_repositories
from controlplane.runtime.base import Launch, ReplicaState, StartError, cpu_cores_for, gpulet_env, stop_all
from controlplane.runtime.process import ProcessRuntime
from controlplane.spec import Assignment, GpuLet, Plan

from helpers import tritonserver_pids


def _plan() -> Plan:
    return Plan(gpus=1, gpulets=[GpuLet(id="gpu0-a", gpu=0, share=100, models=[
        Assignment(model="lenet", batch=8, rate=10), Assignment(model="mobilenet_v2", batch=4, rate=1)])])


def _launches(plan: Plan, tmp_path) -> list[Launch]:
    repo = SourceRepository()
    build_artifacts(repo, plan.model_names())
    repos = write_gpulet_repositories(repo, plan, tmp_path / "repos", on_gpu=False)
    cores = cpu_cores_for(plan.gpulets)
    return [Launch(gpulet=g, repository=repos[g.id], log_path=tmp_path / f"{g.id}.log", cores=cores[g.id],
                   env=gpulet_env(g, None, cores[g.id], None)) for g in plan.gpulets]


def _infer(addr: str, model: str, batch: int) -> tuple[np.ndarray, np.ndarray]:
    x = zoo.example_input(model, batch, seed=batch).numpy()
    c = httpclient.InferenceServerClient(addr)
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = c.infer(model, [inp]).as_numpy("OUTPUT")
    ref = torch.jit.load(str(SourceRepository()[model].artifact()))(torch.from_numpy(x)).detach().numpy()
    return got, ref


def test_cpu_cores_follow_shares():
    gl = [GpuLet(id=i, gpu=0, share=s, models=[Assignment(model="m", batch=1, rate=1)]) for i, s in
          (("gpu0-a", 50), ("gpu0-b", 50))] + [GpuLet(id="gpu1-a", gpu=1, share=25,
                                                       models=[Assignment(model="m", batch=1, rate=1)])]
    cores = cpu_cores_for(gl, available=[0, 1, 2, 3])
    assert cores == {"gpu0-a": [0, 1], "gpu0-b": [2, 3], "gpu1-a": [0]}
    env = gpulet_env(gl[1], None, cores["gpu0-b"], None)
    assert env["OMP_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == ""
    genv = gpulet_env(gl[0], 3, None, "/tmp/pipe")
    assert genv["CUDA_VISIBLE_DEVICES"] == "3" and genv["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert genv["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/pipe"


def test_a_transitions_old_gpulets_stop_together():
    """stop_all (a re-plan's removal, the process runtime's stop) kills its replicas at once, not one after
    the other: each kill here waits until every other has begun, which one after the other never happens."""
    reps = [SimpleNamespace(state=ReplicaState.READY) for _ in range(3)]
    gone = SimpleNamespace(state=ReplicaState.STOPPED)          # already stopped: not killed again
    together = threading.Barrier(len(reps), timeout=30)
    killed = []

    def kill(r) -> None:
        assert r.state is ReplicaState.STOPPING and r is not gone
        together.wait()                 # BrokenBarrierError, raised by stop_all, when the kills run in turn
        killed.append(r)

    stop_all(reps + [gone], kill)
    assert len(killed) == 3 and all(r.state is ReplicaState.STOPPED for r in reps + [gone])


def test_serves_restarts_and_stops(tmp_path):
    rt = ProcessRuntime(startup_timeout_s=120)
    try:
        eps = rt.start(_launches(_plan(), tmp_path))
        addr = eps["gpu0-a"].http
        for model, batch in (("lenet", 3), ("mobilenet_v2", 2)):
            got, ref = _infer(addr, model, batch)
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        st = rt.status()["gpu0-a"]
        assert st.state is ReplicaState.READY and st.pid in tritonserver_pids(str(tmp_path))
        # each model says in the server's log how long it took to be ready, by stage
        log = (tmp_path / "gpu0-a.log").read_text()
        for model in ("lenet", "mobilenet_v2"):
            assert re.search(rf"{model}: initialized in [0-9.]+ s \(stub [0-9.]+ s: import torch [0-9.]+ s; "
                             r"load [0-9.]+ s, prepare [0-9.]+ s: warm-up\) "
                             r"on cpu", log), log[-2000:]

        # what the control plane never asks a gpu-let's server for is refused to anyone who finds its ports
        r = httpx.post(f"http://{addr}/v2/repository/models/lenet/unload")
        assert r.status_code == 403 and "restricted" in r.text, r.text
        assert httpx.post(f"http://{addr}/v2/logging", json={"log_verbose_level": 1}).status_code == 403
        g = grpcclient.InferenceServerClient(eps["gpu0-a"].grpc)
        with pytest.raises(InferenceServerException, match="restricted"):
            g.unload_model("lenet")
        assert g.is_model_ready("lenet") and httpclient.InferenceServerClient(addr).is_model_ready("lenet")

        # Kill the server outright: supervise() brings it back, on fresh ports (the old may be taken).
        os.kill(st.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        restarted: list[str] = []
        while not restarted and time.monotonic() < deadline:  # the kill lands asynchronously
            restarted = rt.supervise()
            time.sleep(0.1)
        assert restarted == ["gpu0-a"]
        st2 = rt.status()["gpu0-a"]
        assert st2.state is ReplicaState.READY and st2.restarts == 1 and st2.pid != st.pid
        assert st2.endpoint != st.endpoint
        got, ref = _infer(st2.endpoint.http, "lenet", 1)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    finally:
        rt.stop()
    assert rt.status()["gpu0-a"].state is ReplicaState.STOPPED
    assert not tritonserver_pids(str(tmp_path))


def test_failed_start_reports_log_tail_and_leaves_nothing(tmp_path):
    plan = Plan(gpus=2, gpulets=[
        GpuLet(id="gpu0-a", gpu=0, share=100, models=[Assignment(model="lenet", batch=4, rate=1)]),
        GpuLet(id="gpu1-a", gpu=1, share=100, models=[Assignment(model="lenet", batch=4, rate=1)]),
    ])
    launches = _launches(plan, tmp_path)
    # Break the second gpu-let's model so its tritonserver exits on load.
    (launches[1].repository / "lenet" / "config.pbtxt").write_text('name: "lenet"\nbackend: "python"\nmax_batch_size: -3\n')
    rt = ProcessRuntime(startup_timeout_s=120)
    with pytest.raises(StartError) as e:
        rt.start(launches)
    msg = str(e.value)
    assert "gpu1-a" in msg and "exited with code" in msg
    assert "failed to load" in msg  # the server's own words, from its log tail
    assert all(s.state in (ReplicaState.STOPPED, ReplicaState.FAILED) for s in rt.status().values())
    assert not tritonserver_pids(str(tmp_path))


def test_mps_dirs_must_be_private(tmp_path):
    """The MPS dirs have predictable names under /tmp: one left open to others (or made by someone else)
    is refused before any daemon there is used; a new one is made 0700."""
    from controlplane.runtime.mps import Daemon, MPSNotActive, private_dir

    open_dir = tmp_path / "open" / "pipe"
    open_dir.mkdir(parents=True)
    open_dir.chmod(0o777)
    with pytest.raises(MPSNotActive, match="not a private directory"):
        Daemon(open_dir, tmp_path / "open" / "log").start()
    fresh = tmp_path / "fresh" / "pipe"
    private_dir(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o700
