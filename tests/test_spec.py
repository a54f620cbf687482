"""Deployment files: valid ones load; invalid ones exit non-zero naming the file and the field."""

from __future__ import annotations

import pytest

from controlplane.spec import Deployment, GpuLet, Plan, Assignment, SpecError, load_deployment

from helpers import run_cli

GOOD = """\
name: t
models:
  - {name: lenet, rate: 10, slo_ms: 50}
  - {name: mobilenet_v2, rate: 2.5, slo_ms: 500, max_batch: 8}
devices: cpu
runtime: process
"""


def test_valid_deployment_loads(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text(GOOD)
    d = load_deployment(p, known_models=["lenet", "mobilenet_v2"])
    assert [m.name for m in d.models] == ["lenet", "mobilenet_v2"]
    assert d.models[1].max_batch == 8
    assert d.runtime.kind == "process" and d.router.host == "127.0.0.1"
    assert d.scheduler.shares == [20, 40, 50, 60, 80, 100]


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("lenet, rate: 10", "lenett, rate: 10"),
         ["models[0].name", "unknown model 'lenett'", "known models:", "mobilenet_v2"]),
        (GOOD.replace("rate: 2.5", "rate: -1"), ["models[1].rate", "greater than or equal to 0"]),
        (GOOD.replace(", slo_ms: 50}", ", slo_ms: 0}"), ["models[0].slo_ms", "greater than 0"]),
        (GOOD.replace("devices: cpu", "devices: [cpu"), ["broken YAML", "line"]),
        (GOOD.replace("runtime: process", "runtime: kubernetes"), ["runtime.kind", "'process', 'docker' or 'ray'"]),
        (GOOD + "colour: blue\n", ["colour", "unknown field"]),
        ("- just\n- a list\n", ["expected a mapping"]),
        (GOOD.replace("name: t\n", "name: t\n").replace("mobilenet_v2, rate", "lenet, rate"), ["listed twice"]),
    ],
    ids=["unknown-model", "negative-rate", "zero-slo", "broken-yaml", "bad-runtime", "unknown-field", "not-a-mapping",
         "duplicate-model"],
)
def test_invalid_deployment_is_rejected_by_the_cli(tmp_path, text, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    proc = run_cli("plan", "-f", str(p), "--algorithm", "trivial")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    msg = " ".join(proc.stderr.split())  # rich may wrap long lines
    assert str(p.name) in msg
    for e in expected:
        assert e in msg, f"{e!r} not in {msg!r}"


def test_missing_file_is_an_error(tmp_path):
    proc = run_cli("up", "-f", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr


def test_plan_rejects_oversubscribed_gpu():
    with pytest.raises(ValueError, match="more than 100"):
        Plan(gpus=1, gpulets=[
            GpuLet(id="gpu0-a", gpu=0, share=60, models=[Assignment(model="a", batch=1, rate=1)]),
            GpuLet(id="gpu0-b", gpu=0, share=50, models=[Assignment(model="b", batch=1, rate=1)]),
        ])


def test_runtime_shorthand_and_error_type():
    d = Deployment.model_validate({"models": [{"name": "x", "rate": 1, "slo_ms": 1}], "runtime": "docker"})
    assert d.runtime.kind == "docker"
    with pytest.raises(SpecError):
        from controlplane.spec import parse_deployment

        parse_deployment({"models": []}, "x.yaml")


def test_base_names_the_repository_model(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("models:\n  - {name: lenet1, base: lenet, rate: 1, slo_ms: 9}\n  - {name: x, base: nope, rate: 1, slo_ms: 9}\n")
    proc = run_cli("plan", "-f", str(p), "--algorithm", "trivial")
    assert proc.returncode == 2
    assert "models[1].base: unknown model 'nope'" in " ".join(proc.stderr.split())


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", ".hidden", "x..y", "lenet/", "a b", "x" * 129])
def test_model_names_that_could_escape_a_directory_are_refused(tmp_path, name):
    """A model name becomes a folder of generated repositories and a URL segment: anything but a plain
    name is refused naming the field, before anything is planned or written."""
    run_dir = tmp_path / "run"
    p = tmp_path / "bad.yaml"
    p.write_text(f"name: t\nmodels:\n  - {{name: {name!r}, base: lenet, rate: 1, slo_ms: 50}}\n"
                 f"devices: cpu\nrun_dir: {run_dir}\n")
    with pytest.raises(SpecError, match=r"models\[0\]\.name"):
        load_deployment(p)
    proc = run_cli("up", "-f", str(p), "--detach")
    assert proc.returncode == 2 and "models[0].name" in " ".join(proc.stderr.split()), proc.stdout + proc.stderr
    assert not run_dir.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["lenet", "mobilenet_v2", "ssd-mobilenet", "resnet50.v2", "Model_1-b"])
def test_plain_model_names_are_accepted(name):
    from controlplane.spec import ModelSpec

    assert ModelSpec(name=name, rate=1, slo_ms=10).name == name


def test_a_models_slo_defaults_to_its_repository_configs(tmp_path):
    """slo_ms left out: the model config's slo_ms parameter (the zoo's lenet: 5 ms); a model whose config
    has none is refused with the field named."""
    import json
    import shutil

    from controlplane.repository import DEFAULT_SOURCE

    d = tmp_path / "d.yaml"
    d.write_text("models: [{name: lenet, rate: 10}]\ndevices: cpu\nscheduler: {algorithm: trivial}\n")
    out = run_cli("plan", "-f", str(d), "--json", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["models"]["lenet"]["slo_ms"] == 5.0
    repo = tmp_path / "repo" / "plain"
    repo.mkdir(parents=True)
    cfg = (DEFAULT_SOURCE / "lenet" / "config.pbtxt").read_text().replace('name: "lenet"', 'name: "plain"')
    cfg = cfg[:cfg.index("parameters")] if "parameters" in cfg else cfg          # no slo_ms parameter
    (repo / "config.pbtxt").write_text(cfg)
    shutil.copytree(tmp_path / "repo", tmp_path / "repo2")
    d.write_text(f"models: [{{name: plain, rate: 10}}]\ndevices: cpu\nrepository: {tmp_path / 'repo2'}\n"
                 "scheduler: {algorithm: trivial}\n")
    out = run_cli("plan", "-f", str(d), timeout=120)
    assert out.returncode == 2 and "models[0].slo_ms: not given" in out.stderr, out.stdout + out.stderr
