"""Applications: pipelines of models served as one KServe model with one SLO (issue 16).

A two-step app (lenet, then a head on lenet's scores) and a fan-out app (lenet's scores to two heads
at once) on real tritonservers through the router, over HTTP (binary and JSON) and gRPC, against the
same models run in sequence in-process; the SLO split; invalid apps refused with the field named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from controlplane import zoo
from controlplane.apps import split_slo
from controlplane.repository import DEFAULT_SOURCE, SourceRepository
from controlplane.spec import AppSpec

from helpers import metrics, run_cli, tritonserver_pids

APPS = """\
  - name: digits
    rate: 5
    slo_ms: 2000
    steps:
      - {model: lenet, inputs: {INPUT: IMAGE}}
      - {model: head, inputs: {X: lenet.OUTPUT}}
    outputs: {SCORES: lenet.OUTPUT, LABEL: head.Y}
  - name: fan
    rate: 5
    slo_ms: 2000
    steps:
      - {model: lenet, inputs: {INPUT: IMAGE}}
      - {model: head, inputs: {X: lenet.OUTPUT}}
      - {model: head2, inputs: {X: lenet.OUTPUT}}
    outputs: {A: head.Y, B: head2.Y}
"""

DEPLOYMENT = """\
name: apps
models:
  - {{name: lenet, rate: 5, slo_ms: 2000}}
apps:
{apps}
devices: cpu
router: {{http_port: 0, grpc_port: 0, workers: 2}}
scheduler: {{algorithm: trivial}}
repository: {repo}
run_dir: {run}
"""


def _head(path: Path, n_out: int, seed: int) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    m = torch.jit.trace(torch.nn.Sequential(torch.nn.Linear(10, n_out), torch.nn.Softmax(dim=-1)).eval(),
                        torch.rand(2, 10))
    torch.jit.save(m, str(path))
    return m


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """lenet from the zoo (its config; the artifact is built into the cache) and two heads of the user's."""
    tmp = tmp_path_factory.mktemp("apps-repo")
    root = tmp / "repo"
    (root / "lenet").mkdir(parents=True)
    shutil.copy(DEFAULT_SOURCE / "lenet" / "config.pbtxt", root / "lenet" / "config.pbtxt")
    for name, n, seed in (("head", 3, 1), ("head2", 2, 2)):
        _head(tmp / f"{name}.pt", n, seed)
        add = run_cli("repo", "add", name, "--torchscript", str(tmp / f"{name}.pt"), "--input", "X:FP32:10",
                      "--output", "Y", "--max-batch", "32", "--slo-ms", "2000", "--repository", str(root), timeout=120)
        assert add.returncode == 0, add.stdout + add.stderr
    return root


def test_the_slo_is_split_along_the_slowest_path():
    chain = AppSpec(name="c", rate=1, slo_ms=100, steps=[{"model": "lenet", "inputs": {"INPUT": "IMAGE"}},
                                                         {"model": "head", "inputs": {"X": "lenet.OUTPUT"}}],
                    outputs={"Y": "head.Y"})
    budgets, critical = split_slo(chain, {"lenet": 1.0, "head": 3.0}.get)
    assert budgets == pytest.approx({"lenet": 25.0, "head": 75.0}) and critical == ["lenet", "head"]
    fan = AppSpec(name="f", rate=1, slo_ms=100, steps=[{"model": "lenet", "inputs": {"INPUT": "IMAGE"}},
                                                       {"model": "head", "inputs": {"X": "lenet.OUTPUT"}},
                                                       {"model": "head2", "inputs": {"X": "lenet.OUTPUT"}}],
                  outputs={"A": "head.Y", "B": "head2.Y"})
    budgets, critical = split_slo(fan, {"lenet": 1.0, "head": 3.0, "head2": 1.0}.get)
    assert budgets == pytest.approx({"lenet": 25.0, "head": 75.0, "head2": 50.0})
    assert budgets["lenet"] + budgets["head2"] <= 100 and critical == ["lenet", "head"]
    budgets, _ = split_slo(chain, lambda m: None)          # no profile: equal weights
    assert budgets == pytest.approx({"lenet": 50.0, "head": 50.0})


@pytest.mark.parametrize("apps, needle", [
    ("  - {name: a, rate: 1, slo_ms: 9, steps: [{model: nope, inputs: {INPUT: IMAGE}}], outputs: {Y: nope.OUTPUT}}",
     "apps[0].steps[0].model: no model 'nope'"),
    ("  - {name: a, rate: 1, slo_ms: 9, steps: [{model: lenet, inputs: {INPUT: head.Y}}, "
     "{model: head, inputs: {X: lenet.OUTPUT}}], outputs: {Y: head.Y}}", "wait on each other"),
    ("  - {name: a, rate: 1, slo_ms: 9, steps: [{model: head, inputs: {X: other.Y}}], outputs: {Y: head.Y}}",
     "'other.Y' names no step"),
    ("  - {name: a, rate: 1, slo_ms: 9, steps: [{model: head, inputs: {X: IMAGE}}, "
     "{model: lenet, inputs: {INPUT: head.Y}}], outputs: {Y: lenet.OUTPUT}}",
     "apps[0].steps[1].inputs.INPUT: 'head.Y' is FP32[3] but 'lenet' takes FP32[1, 28, 28]"),
    ("  - {name: a, rate: 1, slo_ms: 9, steps: [{model: lenet, inputs: {IMG: IMAGE}}], outputs: {Y: lenet.OUTPUT}}",
     "apps[0].steps[0].inputs.IMG: 'lenet' has no input 'IMG'"),
    ("  - {name: a, rate: 1, slo_ms: 9, steps: [{model: lenet, inputs: {INPUT: IMAGE}}], outputs: {Y: lenet.NOPE}}",
     "apps[0].outputs.Y: 'lenet' has no output 'NOPE'"),
    ("  - {name: lenet, rate: 1, slo_ms: 9, steps: [{model: lenet, inputs: {INPUT: IMAGE}}], "
     "outputs: {Y: lenet.OUTPUT}}", "apps[0].name"),
    ("  - {name: a, rate: 1, slo_ms: 9, steps: [{model: head, inputs: {X: IMAGE}, fan_out: true}], "
     "outputs: {Y: head.Y}}", "apps[0].steps[0].inputs.X: a fan-out step takes its inputs from other steps"),
    ("  - {name: a, rate: 1, slo_ms: 9, steps: [{model: lenet, inputs: {INPUT: IMAGE}}, "
     "{model: head, inputs: {X: lenet.OUTPUT}, fan_out: true}], outputs: {Y: head.Y}}",
     "'lenet.OUTPUT' is FP32[] per row but 'head' takes FP32[10]"),
])
def test_invalid_apps_are_refused_with_the_field_named(repo, tmp_path, apps, needle):
    path = tmp_path / "d.yaml"
    path.write_text(DEPLOYMENT.format(apps=apps, repo=repo, run=tmp_path / "run"))
    out = run_cli("plan", "-f", str(path), timeout=120)
    assert out.returncode != 0 and needle in out.stdout + out.stderr, out.stdout + out.stderr


def test_apps_are_served_through_the_router_like_the_models_in_sequence(repo, tmp_path):
    path = tmp_path / "apps.yaml"
    path.write_text(DEPLOYMENT.format(apps=APPS, repo=repo, run=tmp_path / "run"))
    plan = run_cli("plan", "-f", str(path), timeout=120)
    assert plan.returncode == 0 and "apps: each SLO split" in plan.stdout, plan.stdout + plan.stderr
    assert "lenet: 1000.0" in plan.stdout and "lenet → head" in plan.stdout, plan.stdout
    up = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        r = json.loads((tmp_path / "run" / "state.json").read_text())["router"]
        http = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{r['grpc_port']}")
        x = zoo.example_input("lenet", 3, seed=5).numpy()
        src = SourceRepository(repo)
        with torch.no_grad():
            scores = torch.jit.load(str(src["lenet"].artifact()))(torch.from_numpy(x))
            want = {"SCORES": scores.numpy(), "LABEL": torch.jit.load(str(src["head"].artifact()))(scores).numpy(),
                    "A": torch.jit.load(str(src["head"].artifact()))(scores).numpy(),
                    "B": torch.jit.load(str(src["head2"].artifact()))(scores).numpy()}

        meta = http.get_model_metadata("digits")
        assert [i["name"] for i in meta["inputs"]] == ["IMAGE"] and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
        assert {o["name"] for o in meta["outputs"]} == {"SCORES", "LABEL"}
        assert http.is_model_ready("fan") and grpc.is_model_ready("digits")
        for app, outs in (("digits", ("SCORES", "LABEL")), ("fan", ("A", "B"))):
            for binary in (True, False):        # binary tensors, and JSON both ways
                inp = httpclient.InferInput("IMAGE", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                res = http.infer(app, [inp], outputs=[httpclient.InferRequestedOutput(o, binary_data=binary)
                                                      for o in outs])
                for o in outs:
                    np.testing.assert_allclose(res.as_numpy(o), want[o], rtol=1e-4, atol=1e-6)
            gi = grpcclient.InferInput("IMAGE", list(x.shape), "FP32")
            gi.set_data_from_numpy(x)
            res = grpc.infer(app, [gi])
            for o in outs:
                np.testing.assert_allclose(res.as_numpy(o), want[o], rtol=1e-4, atol=1e-6)

        assert http.get_model_config("digits")["parameters"]["slo_ms"]["string_value"] == "2000"
        assert grpc.get_model_config("fan").config.input[0].dims == [1, 28, 28]
        lg = run_cli("loadgen", "-f", str(path), "--rate", "digits=20", "--duration", "2", "--workers", "1",
                     "--json", timeout=240)
        assert lg.returncode == 0, lg.stdout + lg.stderr
        d = json.loads(lg.stdout)["models"]["digits"]
        assert d["sent"] > 0 and d["ok"] == d["sent"] and d["errors"] == 0, d

        bad = httpclient.InferInput("PIXELS", list(x.shape), "FP32")
        bad.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match="takes inputs IMAGE") as e:
            http.infer("digits", [bad])
        assert e.value.status() == "400"
        m = metrics(f"127.0.0.1:{r['http_port']}")
        n = d["sent"]
        assert m[("router_requests_total", (("model", "digits"),))] == 4 + n      # 3 + loadgen's answered, 1 refused
        assert m[("router_success_total", (("model", "digits"),))] == 3 + n
        assert m[("router_requests_total", (("model", "lenet"),))] == 6 + n       # the steps of the apps' answers
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []


def test_a_fan_out_step_runs_once_per_row_in_batches_the_model_takes(repo, tmp_path):
    """fan_out: a step fed [K, *s] per request runs its model on K rows of [*s] (here 3 per request, in
    requests of at most its max batch 4: 9 rows as 4 + 4 + 1) and answers [K, *o]; planned at K times
    the app's rate."""
    class Splitter(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x, 2 * x, 3 * x], dim=1)

    torch.jit.save(torch.jit.script(Splitter()), str(tmp_path / "splitter.pt"))
    head = _head(tmp_path / "head4.pt", 3, 4)
    for name, f, extra in (("splitter", "splitter.pt", ["--output", "Y"]), ("head4", "head4.pt", ["--output", "Y"])):
        if not (repo / name).exists():
            add = run_cli("repo", "add", name, "--torchscript", str(tmp_path / f), "--input", "X:FP32:10", *extra,
                          "--max-batch", "4" if name == "head4" else "32", "--slo-ms", "2000",
                          "--repository", str(repo), timeout=120)
            assert add.returncode == 0, add.stdout + add.stderr
    apps = """\
  - name: crops
    rate: 4
    slo_ms: 2000
    steps:
      - {model: splitter, inputs: {X: IN}}
      - {model: head4, inputs: {X: splitter.Y}, fan_out: true}
    outputs: {PARTS: splitter.Y, SCORES: head4.Y}
"""
    path = tmp_path / "crops.yaml"
    path.write_text(DEPLOYMENT.format(apps=apps, repo=repo, run=tmp_path / "run"))
    plan = run_cli("plan", "-f", str(path), "--json", timeout=120)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    doc = json.loads(plan.stdout)
    assert doc["apps"]["crops"]["fan_out_rows"] == {"head4": 3} and doc["models"]["head4"]["rate"] == 12
    up = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        r = json.loads((tmp_path / "run" / "state.json").read_text())["router"]
        http = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")
        assert {o["name"]: o["shape"] for o in http.get_model_metadata("crops")["outputs"]} == \
            {"PARTS": [-1, 3, 10], "SCORES": [-1, 3, 3]}
        x = np.random.default_rng(2).random((3, 10), dtype=np.float32)
        with torch.no_grad():
            parts = torch.jit.load(str(tmp_path / "splitter.pt"))(torch.from_numpy(x))
            want = head(parts.reshape(-1, 10)).reshape(3, 3, 3).numpy()
        inp = httpclient.InferInput("IN", [3, 10], "FP32")
        inp.set_data_from_numpy(x)
        res = http.infer("crops", [inp])
        np.testing.assert_allclose(res.as_numpy("PARTS"), parts.numpy(), rtol=1e-6)
        np.testing.assert_allclose(res.as_numpy("SCORES"), want, rtol=1e-4, atol=1e-6)
        m = metrics(f"127.0.0.1:{r['http_port']}")
        assert m[("router_requests_total", (("model", "head4"),))] == 3      # 9 rows: 4 + 4 + 1
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []


TRAFFIC = """\
name: traffic
models:
  - {{name: ssd-mobilenet, rate: 0, slo_ms: 202}}
apps:
{apps}
devices: cpu
router: {{http_port: 0, grpc_port: 0, workers: 1}}
scheduler: {{algorithm: trivial}}
repository: {repo}
run_dir: {run}
"""


def test_traffic_is_served_as_the_detector_crop_and_classifiers_in_sequence(tmp_path):
    """deployments/traffic.yaml's app (ssd-mobilenet -> crop -> googlenet | vgg16, 202 ms) on the zoo, on
    CPU gpu-lets, against the four seeded networks run one after the other in-process."""
    from controlplane.spec import load_deployment

    app = load_deployment(Path(__file__).resolve().parents[1] / "deployments" / "traffic.yaml").apps[0]
    block = "  - " + json.dumps(app.model_dump(mode="json", exclude_none=True) | {"rate": 2})
    repo = tmp_path / "repo"          # the zoo's configs but max_batch_size 2: each server warms up on a batch
    for m in ("ssd-mobilenet", "crop", "googlenet", "vgg16"):      # of it, vgg16's of 32 takes seconds on 2 cores
        (repo / m).mkdir(parents=True)
        cfg = (DEFAULT_SOURCE / m / "config.pbtxt").read_text()
        (repo / m / "config.pbtxt").write_text(cfg.replace("max_batch_size: 32", "max_batch_size: 2"))
    path = tmp_path / "traffic.yaml"
    path.write_text(TRAFFIC.format(apps=block, repo=repo, run=tmp_path / "run"))
    plan = run_cli("plan", "-f", str(path), "--json", timeout=120)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    doc = json.loads(plan.stdout)
    split = doc["apps"]["traffic"]
    # no CPU profile of these four here: equal weights, a third of 202 ms each along either path
    assert split["budgets_ms"] == pytest.approx({m: 202 / 3 for m in ("ssd-mobilenet", "crop", "googlenet", "vgg16")},
                                                abs=1e-3)
    assert split["critical_path"][:2] == ["ssd-mobilenet", "crop"]
    assert {m: doc["models"][m]["rate"] for m in split["budgets_ms"]} == {m: 2 for m in split["budgets_ms"]}

    up = run_cli("up", "-f", str(path), "--detach", timeout=400)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        r = json.loads((tmp_path / "run" / "state.json").read_text())["router"]
        http = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}", network_timeout=120)
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{r['grpc_port']}")
        frame = zoo.example_input("ssd-mobilenet", 2, seed=6)
        with torch.no_grad():
            boxes = zoo.build("ssd-mobilenet")(frame)
            crop = zoo.build("crop")(frame, boxes)
            want = {"BOXES": boxes.numpy(), "GOOGLENET": zoo.build("googlenet")(crop).numpy(),
                    "VGG16": zoo.build("vgg16")(crop).numpy()}

        meta = http.get_model_metadata("traffic")
        assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [("FRAME", [-1, 3, 300, 300])]
        assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
            "BOXES": [-1, 3000, 4], "GOOGLENET": [-1, 1000], "VGG16": [-1, 1000]}
        x = frame.numpy()
        inp = httpclient.InferInput("FRAME", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        gi = grpcclient.InferInput("FRAME", list(x.shape), "FP32")
        gi.set_data_from_numpy(x)
        for res in (http.infer("traffic", [inp]), grpc.infer("traffic", [gi], client_timeout=120)):
            for name, w in want.items():
                np.testing.assert_allclose(res.as_numpy(name), w, rtol=1e-4, atol=1e-6, err_msg=name)
        m = metrics(f"127.0.0.1:{r['http_port']}")
        for model in ("traffic", "ssd-mobilenet", "crop", "googlenet", "vgg16"):
            assert m[("router_success_total", (("model", model),))] == 2, model
    finally:
        run_cli("down", "-f", str(path))
    assert tritonserver_pids(str(tmp_path)) == []


def test_steps_without_a_profile_are_measured_before_the_slo_is_split(repo, tmp_path):
    """As `up` plans (profile_missing): head has no profile on this machine, so it is measured first, and
    the SLO is split by what was measured, not with head weighed as the mean of the others."""
    import yaml

    from controlplane import devices as devmod
    from controlplane.planning import load_profiles, make_plan
    from controlplane.spec import Deployment

    doc = yaml.safe_load(DEPLOYMENT.format(apps=APPS.split("  - name: fan")[0], repo=repo, run=tmp_path / "run"))
    doc["scheduler"] = {"algorithm": "gpulet", "shares": [100], "max_batch": 2}
    doc["profiles"] = str(tmp_path / "profiles")
    dep = Deployment.model_validate(doc)
    devices = devmod.resolve("cpu")
    logs: list[str] = []
    plan = make_plan(dep, devices, repo=SourceRepository(repo), profile_missing=True, log=logs.append)
    assert any("measuring" in line and "head" in line for line in logs), logs
    store = load_profiles(dep, devices.name)
    assert store.has("head") and store.has("lenet")
    want, critical = split_slo(dep.apps[0], lambda m: store.latency(m, 100, 1))
    assert plan.apps["digits"].budgets_ms == pytest.approx(want, abs=1e-3)
    assert plan.apps["digits"].critical_path == critical == ["lenet", "head"]
    assert want["head"] != pytest.approx(1000.0)         # the equal split an unmeasured head would get
