"""One planning entry point: `plan` and `up` make the same plan; a missing profile is named, not measured."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from controlplane import devices as devmod
from controlplane.deploy import Controller
from controlplane.paths import SHIPPED_PROFILES
from controlplane.planning import MissingProfile, make_plan
from controlplane.profiles import device_slug, read_csv, write_csv
from controlplane.spec import load_deployment

from helpers import run_cli

DEPLOYMENT = """\
name: planning-{algorithm}
models:
  - {{name: lenet, rate: 50, slo_ms: 50}}
  - {{name: mobilenet_v2, rate: 5, slo_ms: 500}}
devices: cpu
router: {{http_port: 0, grpc_port: 0}}
scheduler: {{algorithm: {algorithm}}}
profiles: {profiles}
run_dir: {run_dir}
"""


@pytest.fixture()
def profiles(tmp_path) -> Path:
    """The shipped 2-core CPU profile, relabelled for this machine's CPU (CI's may differ)."""
    name = devmod.resolve("cpu").name
    rows = [dataclasses.replace(r, device=name) for r in read_csv(SHIPPED_PROFILES / "cpu-2c" / "latency.csv")]
    root = tmp_path / "profiles"
    (root / device_slug(name)).mkdir(parents=True)
    write_csv(root / device_slug(name) / "latency.csv", rows)
    return root


@pytest.mark.parametrize("algorithm", ["gpulet", "temporal", "trivial"])
def test_plan_command_makes_the_plan_up_runs(tmp_path, profiles, algorithm):
    path = tmp_path / "dep.yaml"
    path.write_text(DEPLOYMENT.format(algorithm=algorithm, profiles=profiles, run_dir=tmp_path / "run"))
    printed = json.loads(run_cli("plan", "-f", str(path), "--json", check=True).stdout)
    prepared = Controller(load_deployment(path), log=lambda m: None).prepare()   # what `up` launches
    assert printed == json.loads(prepared.model_dump_json())
    assert printed["algorithm"] == algorithm and printed["gpulets"]
    assert all(g["id"].startswith("cpu0-") or g["id"][:3] == "cpu" for g in printed["gpulets"])   # named for the device


def test_plan_without_a_profile_names_the_models_and_the_command(tmp_path):
    empty = tmp_path / "profiles"
    empty.mkdir()
    path = tmp_path / "dep.yaml"
    path.write_text(DEPLOYMENT.format(algorithm="gpulet", profiles=empty, run_dir=tmp_path / "run")
                    .replace("mobilenet_v2", "resnet50"))
    proc = run_cli("plan", "-f", str(path))
    assert proc.returncode == 1
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "lenet, resnet50" in out and "controlplane profile --device cpu --models lenet,resnet50" in out, out
    assert "--profile-missing" in out
    assert not any(empty.rglob("*"))                # nothing was measured or written
    with pytest.raises(MissingProfile) as e:
        make_plan(load_deployment(path))
    assert e.value.models == ["lenet", "resnet50"]


def test_measured_rows_win_over_shipped_ones(tmp_path, monkeypatch):
    """Rows measured on this machine (the cache) replace the shipped ones for the same point."""
    from controlplane.planning import load_profiles

    monkeypatch.setenv("CONTROLPLANE_CACHE", str(tmp_path / "cache"))
    shipped = read_csv(SHIPPED_PROFILES / "cpu-2c" / "latency.csv")
    slow = [dataclasses.replace(r, p50_ms=r.p50_ms * 10, p99_ms=r.p99_ms * 10) for r in shipped if r.model == "lenet"]
    (tmp_path / "cache" / "profiles" / "cpu-2c").mkdir(parents=True)
    write_csv(tmp_path / "cache" / "profiles" / "cpu-2c" / "latency.csv", slow)
    dep = load_deployment(Path("deployments/default.yaml"))
    store = load_profiles(dep, "cpu-2c")
    base = {(r.share, r.batch): r.p99_ms for r in shipped if r.model == "lenet"}
    for (share, batch), p99 in base.items():
        assert store.latency("lenet", share, batch) == pytest.approx(10 * p99, rel=1e-6)
    assert "mobilenet_v2" in store.models()         # still there, from the shipped rows


def test_gpulets_per_gpu_lets_a_host_bound_model_use_several_servers():
    """On the H200's serving-path profile resnet50 tops out near 1,300 images/s at any share (its
    python-backend pipeline, not the GPU): gpu-run at x2.2 fits one GPU only as more than two
    gpu-lets, resnet50 in two of them; the paper's limit of two gpu-lets per GPU cannot place it (its
    models taking turns, as in the paper, and no interference model: the host's limit alone)."""
    from controlplane.scheduler import SchedulingError

    dep = load_deployment(Path(__file__).parent.parent / "deployments" / "gpu-run.yaml")
    doc = dep.model_dump(mode="json", exclude_none=True)
    doc["scheduler"]["colocation"] = "turns"
    doc["scheduler"]["interference"] = False
    doc["scheduler"]["latency_margin"] = 1.1        # the planner's default: the host's limit alone
    for m in doc["models"]:
        m["rate"] *= 2.2
    many = type(dep).model_validate(doc)
    assert many.scheduler.gpulets_per_gpu == 5
    plan = make_plan(many, profile=SHIPPED_PROFILES / "h200", gpus=1)
    assert len(plan.gpulets) > 2 and sum(g.share for g in plan.gpulets) <= 100
    assert sum(1 for g in plan.gpulets for a in g.models if a.model == "resnet50") >= 2
    doc["scheduler"]["gpulets_per_gpu"] = 2
    with pytest.raises(SchedulingError):
        make_plan(type(dep).model_validate(doc), profile=SHIPPED_PROFILES / "h200", gpus=1)


def test_plan_says_when_a_gpus_concurrent_caps_oversubscribe_it():
    """A concurrent plan's models are MPS clients each capped at the share: `plan` says when their caps on
    a GPU add up to more than 100 %; a plan whose models take turns never does."""
    from controlplane.cli import oversubscription

    dep = load_deployment(Path(__file__).parent.parent / "deployments" / "gpu-run.yaml")
    doc = dep.model_dump(mode="json", exclude_none=True)
    for m in doc["models"]:
        m["rate"] *= 2.5
    plan = make_plan(type(dep).model_validate(doc), profile=SHIPPED_PROFILES / "h200", gpus=1)
    clients = sum(len(g.models) for g in plan.gpulets)
    caps = sum(g.share * len(g.models) for g in plan.gpulets)
    assert plan.colocation == "concurrent" and caps > 100
    assert oversubscription(plan) == [f"GPU 0: {clients} models run at once as MPS clients whose caps add up "
                                      f"to {caps} % of its SMs"]
    doc["scheduler"]["colocation"] = "turns"
    for m in doc["models"]:
        m["rate"] /= 2.5
    assert oversubscription(make_plan(type(dep).model_validate(doc), profile=SHIPPED_PROFILES / "h200", gpus=1)) == []


def test_a_limit_on_gpulets_per_gpu_is_a_most_the_planner_falls_back_to_fewer():
    """The gpulet heuristic's packing is not monotonic in gpulets_per_gpu: on the H200 profile bert-heavy at
    x2.7 does not pack into five gpu-lets on one GPU, but does into three; a plan allowed five finds it."""
    from controlplane.profiles import ProfileStore
    from controlplane.scheduler import ALGORITHMS, SchedulingError, make_ctx

    dep = load_deployment(Path(__file__).parent.parent / "deployments" / "bert-heavy.yaml")
    doc = dep.model_dump(mode="json", exclude_none=True)
    for m in doc["models"]:
        m["rate"] *= 2.7
    dep = type(dep).model_validate(doc)
    assert dep.scheduler.gpulets_per_gpu == 5
    store = ProfileStore.load(SHIPPED_PROFILES / "h200")
    with pytest.raises(SchedulingError):        # the heuristic alone, allowed five
        ALGORITHMS["gpulet"](make_ctx(dep, store), 1)
    plan = make_plan(dep, profile=SHIPPED_PROFILES / "h200", gpus=1)
    assert plan.gpus == 1 and 1 < len(plan.gpulets) < 5 and sum(g.share for g in plan.gpulets) <= 100
    assert {a.model for g in plan.gpulets for a in g.models} == {"bert", "densenet161", "vgg16"}
