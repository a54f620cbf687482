"""The model zoo and the repositories generated from a plan."""

from __future__ import annotations

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from controlplane import zoo
from controlplane.repository import SourceRepository, build_artifacts, repository_for, write_gpulet_repositories
from controlplane.spec import Assignment, Deployment, GpuLet, Plan

SLOS = {"lenet": 5, "googlenet": 66, "resnet50": 108, "ssd-mobilenet": 202, "vgg16": 142, "mnasnet1_0": 62,
        "mobilenet_v2": 64, "densenet161": 202, "bert": 22}
_TORCH = {"FP32": torch.float32, "INT64": torch.int64}
HEAVY = {"resnet50", "vgg16", "densenet161", "bert"}


def test_zoo_has_the_papers_nine_models_with_their_slos():
    repo = SourceRepository()
    assert sorted(repo.names()) == sorted(SLOS) == sorted(zoo.names())
    assert {n: repo[n].slo_ms for n in SLOS} == SLOS


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in SLOS])
def test_config_matches_the_network(name):
    """config.pbtxt's inputs and outputs are what the seeded network takes and returns."""
    info = SourceRepository()[name]
    (inp,), (out,) = info.inputs, info.outputs
    in_name, in_dtype, in_shape = zoo.INPUTS[name]
    assert (inp.name, _TORCH[inp.datatype], inp.shape) == (in_name, in_dtype, in_shape)
    x = zoo.example_input(name, 2)
    with torch.no_grad():
        y = zoo.build(name)(x)
    assert tuple(y.shape) == (2, *out.shape) and _TORCH[out.datatype] == y.dtype


def test_build_is_reproducible():
    a, b = zoo.build("lenet"), zoo.build("lenet")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_gpulet_repository_has_planned_batch_placement_and_aliases(tmp_path):
    dep = Deployment.model_validate({"models": [
        {"name": "lenet1", "base": "lenet", "rate": 10, "slo_ms": 50},
        {"name": "mobilenet_v2", "rate": 1, "slo_ms": 500}]})
    repo = repository_for(dep)
    build_artifacts(repo, ["lenet1", "mobilenet_v2"])
    plan = Plan(gpus=1, gpulets=[
        GpuLet(id="gpu0-a", gpu=0, share=40, models=[Assignment(model="lenet1", batch=6, rate=10)]),
        GpuLet(id="gpu0-b", gpu=0, share=60, models=[Assignment(model="mobilenet_v2", batch=3, rate=1)])])
    dirs = write_gpulet_repositories(repo, plan, tmp_path, on_gpu=True)
    cfg = text_format.Parse((dirs["gpu0-a"] / "lenet1" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.name == "lenet1" and cfg.max_batch_size == 6 and cfg.backend == "python"
    assert not cfg.HasField("dynamic_batching")
    (group,) = cfg.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0]
    # the alias serves lenet's artifact, byte for byte
    assert (dirs["gpu0-a"] / "lenet1" / "1" / "model.pt").read_bytes() == repo["lenet"].artifact().read_bytes()
    assert (dirs["gpu0-a"] / "lenet1" / "1" / "model.py").exists()
    assert sorted(p.name for p in dirs["gpu0-b"].iterdir()) == ["mobilenet_v2"]
    cpu = write_gpulet_repositories(repo, plan, tmp_path / "cpu", on_gpu=False)
    cfg = text_format.Parse((cpu["gpu0-b"] / "mobilenet_v2" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and cfg.max_batch_size == 3


def test_unbuilt_model_is_a_clear_error(tmp_path, monkeypatch):
    from controlplane.repository import RepositoryError

    monkeypatch.setenv("CONTROLPLANE_CACHE", str(tmp_path / "empty"))
    plan = Plan(gpus=1, gpulets=[GpuLet(id="gpu0-a", gpu=0, share=100, models=[Assignment(model="lenet", batch=1, rate=1)])])
    with pytest.raises(RepositoryError, match=r"not built; run `controlplane repo build lenet`"):
        write_gpulet_repositories(SourceRepository(), plan, tmp_path / "r", on_gpu=False)
