"""`controlplane repo add/show/rm`: a user's TorchScript and ONNX models into their own repository,
profiled, planned and served by `up` through the router; bad input refused with the problem named,
the repository left as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from helpers import run_cli


class Scorer(torch.nn.Module):
    """A small user model: 12 features in, 4 class probabilities out."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return torch.softmax(self.body(x), dim=-1)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("user-model")
    torch.manual_seed(3)
    path = tmp / "scorer.pt"
    torch.jit.save(torch.jit.trace(Scorer().eval(), torch.rand(2, 12)), str(path))
    (tmp / "broken.pt").write_bytes(b"not a model")
    return path


class Tagger(torch.nn.Module):
    """A small user model exported to ONNX: 3x8x8 images and a scale in (two inputs: `up` profiles it
    on the CPU with both), 5 scores and a mean out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, image, scale):
        y = self.head(torch.relu(self.conv(image)).flatten(1)) * scale
        return y, y.mean(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    import warnings

    tmp = tmp_path_factory.mktemp("user-onnx")
    torch.manual_seed(4)
    path = tmp / "tagger.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tagger().eval(), (torch.rand(2, 3, 8, 8), torch.rand(2, 1)), str(path),
                          input_names=["IMAGE", "SCALE"], output_names=["SCORES", "MEAN"],
                          dynamic_axes={n: {0: "batch"} for n in ("IMAGE", "SCALE", "SCORES", "MEAN")},
                          dynamo=False)
    return path


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_bad_input_is_refused_with_the_problem_named_and_the_repository_unchanged(user_model, tmp_path):
    repo = tmp_path / "repo"
    ok = run_cli("repo", "add", "scorer", "--torchscript", str(user_model), "--input", "X:FP32:12",
                 "--repository", str(repo), timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    before = _digest(repo)
    cases = [
        (["scorer", "--torchscript", str(user_model), "--input", "X:FP32:12"], "already in the repository"),
        (["other", "--torchscript", str(user_model), "--input", "X:FP32:13"], "running one batch of 2"),
        (["other", "--torchscript", str(user_model.parent / "broken.pt"), "--input", "X:FP32:12"],
         "not a TorchScript file"),
        (["other", "--torchscript", str(user_model.parent / "missing.pt"), "--input", "X:FP32:12"], "no such file"),
        (["other", "--torchscript", str(user_model), "--input", "X:FP99:12"], "dtype FP99"),
        (["other", "--torchscript", str(user_model), "--input", "X:FP32:12x0"], "positive"),
        (["other", "--torchscript", str(user_model), "--input", "X"], "NAME:DTYPE:SHAPE"),
        (["other", "--torchscript", str(user_model), "--input", "X:FP32:12", "--output", "A", "--output", "B"],
         "the model gives 1 output"),
        (["../evil", "--torchscript", str(user_model), "--input", "X:FP32:12"], "model name"),
        (["other", "--torchscript", str(user_model), "--input", "X:FP32:12", "--max-batch", "0"], "max batch"),
        (["other", "--input", "X:FP32:12"], "--torchscript FILE, --onnx FILE or --python DIR"),
        (["other", "--torchscript", str(user_model), "--onnx", str(user_model)], "--torchscript FILE, --onnx FILE or --python DIR"),
        (["other", "--torchscript", str(user_model)], "give the model's inputs"),
        (["other", "--onnx", str(user_model.parent / "broken.pt")], "not an ONNX file"),
        (["other", "--onnx", str(user_model), "--input", "X:FP32:12"], "leave out --input"),
    ]
    for args, needle in cases:
        p = run_cli("repo", "add", *args, "--repository", str(repo), timeout=120)
        assert p.returncode == 2 and needle in p.stderr, (args, p.stdout, p.stderr)
    p = run_cli("repo", "add", "other", "--torchscript", str(user_model), "--input", "X:FP32:12", timeout=60)
    assert p.returncode == 2 and "--repository" in p.stderr, p.stderr
    p = run_cli("repo", "rm", "nosuch", "--repository", str(repo), timeout=60)
    assert p.returncode == 2 and "unknown model 'nosuch'" in p.stderr and "scorer" in p.stderr, p.stderr
    assert _digest(repo) == before
    assert sorted(x.name for x in repo.iterdir()) == ["scorer"]          # no temporary folder left behind


def test_added_models_are_profiled_planned_and_served_through_the_router(user_model, onnx_model, tmp_path):
    repo = tmp_path / "repo"
    dep = tmp_path / "mine.yaml"
    dep.write_text(f"""\
name: mine
models:
  - {{name: scorer, rate: 20, slo_ms: 500}}
  - {{name: tagger, rate: 10, slo_ms: 500}}
devices: cpu
router: {{http_port: 0, grpc_port: 0}}
scheduler: {{shares: [50, 100], max_batch: 4}}
repository: repo
run_dir: {tmp_path / "run"}
""")
    # `repository: repo` is relative: to the directory the commands run in
    add = run_cli("repo", "add", "scorer", "--torchscript", str(user_model), "--input", "FEATURES:FP32:12",
                  "--output", "PROBS", "--max-batch", "8", "--slo-ms", "500", "-f", str(dep), cwd=tmp_path, timeout=120)
    assert add.returncode == 0, add.stdout + add.stderr
    assert "outputs PROBS FP32[4]" in add.stdout, add.stdout
    show = run_cli("repo", "show", "scorer", "--repository", str(repo), timeout=60)
    assert show.returncode == 0 and "input FEATURES: FP32 [12]" in show.stdout and "SLO: 500 ms" in show.stdout
    add = run_cli("repo", "add", "tagger", "--onnx", str(onnx_model), "--max-batch", "4", "-f", str(dep), cwd=tmp_path,
                  timeout=120)
    assert add.returncode == 0, add.stdout + add.stderr
    assert "inputs IMAGE FP32[3, 8, 8], SCALE FP32[1]; outputs SCORES FP32[5], MEAN FP32[1]" in add.stdout, add.stdout
    assert (repo / "tagger" / "1" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    listed = run_cli("repo", "list", "--repository", str(repo), timeout=60)
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:4]] for ln in listed.stdout.splitlines()
            if ln.startswith("│")}
    assert rows == {"scorer": ["torchscript", "1*"], "tagger": ["onnx", "1*"]}, listed.stdout
    up = run_cli("up", "-f", str(dep), "--detach", cwd=tmp_path, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        r = state["router"]
        # both profiled here (tagger with its two inputs) and planned from those latencies
        planned = {a["model"]: a for g in state["plan"]["gpulets"] for a in g["models"]}
        assert planned["tagger"]["latency_ms"] > 0 and planned["scorer"]["latency_ms"] > 0, planned
        x = np.random.default_rng(5).random((3, 12), dtype=np.float32)
        with torch.no_grad():
            ref = torch.jit.load(str(user_model))(torch.from_numpy(x)).numpy()
        http = httpclient.InferenceServerClient(f"127.0.0.1:{r['http_port']}")
        meta = http.get_model_metadata("scorer")
        assert [i["name"] for i in meta["inputs"]] == ["FEATURES"] and meta["outputs"][0]["name"] == "PROBS"
        hi = httpclient.InferInput("FEATURES", [3, 12], "FP32")
        hi.set_data_from_numpy(x)
        np.testing.assert_allclose(http.infer("scorer", [hi]).as_numpy("PROBS"), ref, rtol=1e-4, atol=1e-6)
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{r['grpc_port']}")
        gi = grpcclient.InferInput("FEATURES", [3, 12], "FP32")
        gi.set_data_from_numpy(x)
        np.testing.assert_allclose(grpc.infer("scorer", [gi]).as_numpy("PROBS"), ref, rtol=1e-4, atol=1e-6)

        import onnxruntime

        img = np.random.default_rng(6).random((2, 3, 8, 8), dtype=np.float32)
        scale = np.array([[0.5], [2.0]], dtype=np.float32)
        scores, mean = onnxruntime.InferenceSession(str(onnx_model)).run(None, {"IMAGE": img, "SCALE": scale})
        for mod, client in ((httpclient, http), (grpcclient, grpc)):
            inputs = []
            for name, x in (("IMAGE", img), ("SCALE", scale)):
                inputs.append(mod.InferInput(name, list(x.shape), "FP32"))
                inputs[-1].set_data_from_numpy(x)
            res = client.infer("tagger", inputs)
            np.testing.assert_allclose(res.as_numpy("SCORES"), scores, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(res.as_numpy("MEAN"), mean, rtol=1e-4, atol=1e-6)
    finally:
        down = run_cli("down", "-f", str(dep), cwd=tmp_path, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    rm = run_cli("repo", "rm", "scorer", "-f", str(dep), cwd=tmp_path, timeout=60)
    assert rm.returncode == 0 and not (repo / "scorer").exists(), rm.stdout + rm.stderr


AFFINE = '''\
import numpy as np
import triton_python_backend_utils as pb_utils
from helper import SCALE


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x * SCALE + 1).astype(np.float32))]))
        return out
'''


def test_a_python_model_is_checked_in_tritonserver_profiled_and_served(tmp_path):
    """`repo add --python DIR`: the user's TritonPythonModel (importing a module beside it) loads in a
    real tritonserver and answers one batch before it is written; `up` profiles it through tritonserver
    (it cannot run in-process), plans and serves it through the router. A model that fails its batch,
    or answers other tensors than declared, is refused and the repository left as it was."""
    src = tmp_path / "affine"
    src.mkdir()
    (src / "model.py").write_text(AFFINE)
    (src / "helper.py").write_text("SCALE = 2.0\n")
    repo = tmp_path / "repo"
    add = run_cli("repo", "add", "affine", "--python", str(src), "--input", "X:FP32:4", "--output", "Y:FP32:4",
                  "--max-batch", "8", "--slo-ms", "500", "--repository", str(repo), timeout=240)
    assert add.returncode == 0, add.stdout + add.stderr
    assert (repo / "affine" / "1" / "helper.py").is_file() and (repo / "affine" / "1" / "model.py").is_file()
    before = _digest(repo)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.py").write_text(AFFINE.replace("x * SCALE + 1", "x[:, :2]"))     # answers [2], not [4]
    (broken / "helper.py").write_text("SCALE = 2.0\n")
    p = run_cli("repo", "add", "bad", "--python", str(broken), "--input", "X:FP32:4", "--output", "Y:FP32:4",
                "--repository", str(repo), timeout=240)
    assert p.returncode == 2 and "output 'Y'" in p.stderr and "declared FP32[2, 4]" in p.stderr, p.stdout + p.stderr
    (broken / "model.py").write_text("class TritonPythonModel:\n    def execute(self, requests)\n")   # no colon
    p = run_cli("repo", "add", "bad", "--python", str(broken), "--input", "X:FP32:4", "--output", "Y:FP32:4",
                "--repository", str(repo), timeout=240)
    assert p.returncode == 2 and "did not load in tritonserver" in p.stderr and "SyntaxError" in p.stderr, \
        p.stdout + p.stderr                  # the server's log tail says why
    p = run_cli("repo", "add", "bad", "--python", str(tmp_path), "--repository", str(repo), timeout=60)
    assert p.returncode == 2 and "no model.py" in p.stderr, p.stderr
    assert _digest(repo) == before

    dep = tmp_path / "py.yaml"
    dep.write_text(f"""\
name: py
models: [{{name: affine, rate: 20, slo_ms: 500}}]
devices: cpu
router: {{http_port: 0, grpc_port: 0}}
scheduler: {{shares: [100], max_batch: 4}}
repository: {repo}
run_dir: {tmp_path / "run"}
""")
    up = run_cli("up", "-f", str(dep), "--detach", timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        (a,) = [a for g in state["plan"]["gpulets"] for a in g["models"]]
        assert a["model"] == "affine" and a["latency_ms"] > 0           # profiled through tritonserver
        x = np.random.default_rng(1).random((3, 4), dtype=np.float32)
        http = httpclient.InferenceServerClient(f"127.0.0.1:{state['router']['http_port']}")
        hi = httpclient.InferInput("X", [3, 4], "FP32")
        hi.set_data_from_numpy(x)
        np.testing.assert_allclose(http.infer("affine", [hi]).as_numpy("Y"), x * 2 + 1, rtol=1e-6)
    finally:
        down = run_cli("down", "-f", str(dep), timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
