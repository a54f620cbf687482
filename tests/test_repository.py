"""The model zoo and the repositories generated from a plan."""

from __future__ import annotations

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from controlplane import zoo
from controlplane.repository import (
    DEFAULT_SOURCE,
    SourceRepository,
    build_artifacts,
    gpulet_config,
    plan_slos,
    queue_delay_us,
    repository_for,
    write_gpulet_repositories,
)
from controlplane.spec import Assignment, Deployment, GpuLet, ModelSummary, Plan

SLOS = {"lenet": 5, "googlenet": 66, "resnet50": 108, "ssd-mobilenet": 202, "vgg16": 142, "mnasnet1_0": 62,
        "mobilenet_v2": 64, "densenet161": 202, "bert": 22}
_TORCH = {"FP32": torch.float32, "INT64": torch.int64}
HEAVY = {"resnet50", "vgg16", "densenet161", "bert"}


def test_zoo_has_the_papers_nine_models_with_their_slos_and_the_traffic_crop():
    repo = SourceRepository()
    assert sorted(repo.names()) == sorted([*SLOS, "crop"]) == sorted(zoo.names())
    assert {n: repo[n].slo_ms for n in SLOS} == SLOS
    assert repo["crop"].slo_ms is None           # not the prototype's: an app gives it its budget


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in [*SLOS, "crop"]])
def test_config_matches_the_network(name):
    """config.pbtxt's inputs and outputs are what the seeded network takes and returns, and its TorchScript
    (traced on a batch of 2) answers the same for another batch size."""
    info = SourceRepository()[name]
    assert [(t.name, _TORCH[t.datatype], t.shape) for t in info.inputs] == zoo.INPUTS[name]
    (out,) = info.outputs
    xs = zoo.example_inputs(name, 3)
    with torch.no_grad():
        y = zoo.build(name)(*xs)
        traced = zoo.trace(name)(*xs)
    assert tuple(y.shape) == (3, *out.shape) and _TORCH[out.datatype] == y.dtype
    torch.testing.assert_close(traced, y, rtol=1e-4, atol=1e-5)


def test_crop_cuts_the_first_box_out_of_the_frame():
    """A box's raw (x, y, w, h) through a sigmoid: (-20, -20, 0, 0) is the frame's top-left quarter, the
    next frame's (20, 20, 0, 0) its bottom-right one; the other boxes do not count."""
    frame = torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(1))
    boxes = torch.rand(2, 3000, 4, generator=torch.Generator().manual_seed(2)) * 40 - 20
    boxes[0, 0] = torch.tensor([-20.0, -20.0, 0.0, 0.0])
    boxes[1, 0] = torch.tensor([20.0, 20.0, 0.0, 0.0])
    with torch.no_grad():
        crop = zoo.trace("crop")(frame, boxes)
    quarters = (frame[:1, :, :150, :150], frame[1:, :, 150:, 150:])
    want = torch.cat([torch.nn.functional.interpolate(q, size=(224, 224), mode="bilinear") for q in quarters])
    # but for the edge that blends in the pixel beyond the box: row and column 150, and 149
    torch.testing.assert_close(crop[:1, :, :-1, :-1], want[:1, :, :-1, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(crop[1:, :, 1:, 1:], want[1:, :, 1:, 1:], rtol=1e-4, atol=1e-4)


def test_build_is_reproducible():
    a, b = zoo.build("lenet"), zoo.build("lenet")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def _config(path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_gpulet_repository_has_batcher_placement_and_aliases(tmp_path):
    dep = Deployment.model_validate({"models": [
        {"name": "lenet1", "base": "lenet", "rate": 10, "slo_ms": 50},
        {"name": "mobilenet_v2", "rate": 1, "slo_ms": 500}]})
    repo = repository_for(dep)
    build_artifacts(repo, ["lenet1", "mobilenet_v2"])
    plan = Plan(gpus=1, gpulets=[
        GpuLet(id="gpu0-a", gpu=0, share=40, models=[Assignment(model="lenet1", batch=6, rate=10, latency_ms=4)]),
        GpuLet(id="gpu0-b", gpu=0, share=60, models=[Assignment(model="mobilenet_v2", batch=3, rate=1)])])
    slos = {m.name: m.slo_ms for m in dep.models}
    dirs = write_gpulet_repositories(repo, plan, tmp_path, on_gpu=True, slo_ms=slos)
    cfg = _config(dirs["gpu0-a"] / "lenet1" / "config.pbtxt")
    # clients may send up to the model's own limit (32); Triton batches what is queued, no preferred size
    assert cfg.name == "lenet1" and cfg.max_batch_size == 32 and cfg.backend == "python"
    db = cfg.dynamic_batching
    assert not db.preferred_batch_size
    assert db.max_queue_delay_microseconds == 4200                  # 0.1 * (50 - 2 * 4) ms
    assert not db.HasField("default_queue_policy")                  # see gpulet_config: no queue policy
    (group,) = cfg.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0]
    # the alias serves lenet's artifact, byte for byte
    assert (dirs["gpu0-a"] / "lenet1" / "1" / "model.pt").read_bytes() == repo["lenet"].artifact().read_bytes()
    assert (dirs["gpu0-a"] / "lenet1" / "1" / "model.py").exists()
    assert sorted(p.name for p in dirs["gpu0-b"].iterdir()) == ["mobilenet_v2"]
    cpu = write_gpulet_repositories(repo, plan, tmp_path / "cpu", on_gpu=False, slo_ms=slos)
    cfg = _config(cpu["gpu0-b"] / "mobilenet_v2" / "config.pbtxt")
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and cfg.max_batch_size == 32
    db = cfg.dynamic_batching  # no predicted latency: the whole SLO may be spent queueing
    assert not db.preferred_batch_size and db.max_queue_delay_microseconds == 5000


@pytest.mark.parametrize("slo, latency, delay_us", [
    (100, 20, 5_000),    # ample slack: D capped at 5 ms
    (50, 4, 4_200),      # D = 0.1 (s - 2L)
    (10, 6, 0),          # no slack for a second batch: no delay
    (10, 30, 0),         # L above s (an infeasible plan): no delay
    (5, 0, 500),         # no prediction
    (None, 3, 0),        # no SLO: no delay
])
def test_queue_delay_rule(slo, latency, delay_us):
    assert queue_delay_us(slo, latency) == delay_us


def test_batch_above_the_models_limit_raises_max_batch_size():
    info = SourceRepository()["lenet"]
    cfg = gpulet_config(info, Assignment(model="lenet", batch=64, rate=1), on_gpu=False, slo_ms=None)
    assert cfg.max_batch_size == 64 and not cfg.dynamic_batching.preferred_batch_size
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
    assert info.config.max_batch_size == 32 and not info.config.HasField("dynamic_batching")  # source untouched


def test_slo_comes_from_the_deployment_then_the_plan_then_the_model_config():
    repo = SourceRepository()
    plan = Plan(gpus=1, gpulets=[GpuLet(id="gpu0-a", gpu=0, share=100, models=[
        Assignment(model=m, batch=1, rate=1) for m in ("lenet", "mobilenet_v2", "googlenet")])],
        models={n: ModelSummary(rate=1, slo_ms=s, throughput=1, worst_latency_ms=1)
                for n, s in {"lenet": 40.0, "mobilenet_v2": 80.0}.items()})
    assert plan_slos(repo, plan, {"lenet": 20.0}) == {"lenet": 20.0, "mobilenet_v2": 80.0, "googlenet": 66.0}
    assert plan_slos(repo, plan) == {"lenet": 40.0, "mobilenet_v2": 80.0, "googlenet": 66.0}


def test_a_repository_written_without_slos_does_not_hold_batches(tmp_path):
    """What the serving profiler writes: each request runs as the batch it is."""
    from controlplane.repository import write_gpulet_repository

    repo = SourceRepository()
    build_artifacts(repo, ["lenet"])
    g = GpuLet(id="p", gpu=0, share=100, models=[Assignment(model="lenet", batch=8, rate=0)])
    cfg = _config(write_gpulet_repository(repo, g, tmp_path / "p", on_gpu=False) / "lenet" / "config.pbtxt")
    db = cfg.dynamic_batching
    assert cfg.max_batch_size == 32 and db.max_queue_delay_microseconds == 0


def test_unbuilt_model_is_a_clear_error(tmp_path, monkeypatch):
    from controlplane.repository import RepositoryError

    monkeypatch.setenv("CONTROLPLANE_CACHE", str(tmp_path / "empty"))
    plan = Plan(gpus=1, gpulets=[GpuLet(id="gpu0-a", gpu=0, share=100, models=[Assignment(model="lenet", batch=1, rate=1)])])
    with pytest.raises(RepositoryError, match=r"not built; run `controlplane repo build lenet`"):
        write_gpulet_repositories(SourceRepository(), plan, tmp_path / "r", on_gpu=False)


def test_the_served_version_follows_tritons_version_policy(tmp_path):
    """The highest version folder by default (Triton's `latest`), the highest listed one under
    `version_policy { specific }`; the gpu-let's repository holds that version only, under its number."""
    from controlplane.repository import write_gpulet_repository

    m = tmp_path / "repo" / "lenet"
    for v in ("1", "2", "10"):
        (m / v).mkdir(parents=True)
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(m / v / "model.pt"))
    cfg = (DEFAULT_SOURCE / "lenet" / "config.pbtxt").read_text()
    (m / "config.pbtxt").write_text(cfg)
    info = SourceRepository(tmp_path / "repo")["lenet"]
    assert info.versions() == ["1", "2", "10"] and info.version == "10" and info.artifact() == m / "10" / "model.pt"
    (m / "config.pbtxt").write_text(cfg + "\nversion_policy { specific { versions: [1, 2, 7] } }\n")
    info = SourceRepository(tmp_path / "repo")["lenet"]
    assert info.version == "2" and info.artifact() == m / "2" / "model.pt"
    g = GpuLet(id="cpu0-a", gpu=0, share=100, models=[Assignment(model="lenet", batch=4, rate=1)])
    out = write_gpulet_repository(SourceRepository(tmp_path / "repo"), g, tmp_path / "gl", on_gpu=False)
    assert sorted(p.name for p in (out / "lenet").iterdir() if p.is_dir()) == ["2"]
    assert "version_policy" not in (out / "lenet" / "config.pbtxt").read_text()
