"""Memory isolation: a model that leaks fails alone while its neighbour on the same device keeps its SLO.

    python benchmarks/isolation.py [--duration 30] [--out DIR] [--no-docs]

Two python models added with `controlplane repo add --python`, each on a gpu-let of its own on the
same device (GPU 0 at 50 % + 50 % under MPS when there is a GPU; else two CPU gpu-lets):

* **hog** (declares `--memory-mb 256`): every request keeps SIZE_MB more memory for good (a leak): on
  the GPU as a CUDA tensor, on the CPU as reserved host memory (np.empty, not touched, so the run
  without a limit costs no RAM). Sent one 512 MB request per second.
* **neighbour**: a few matrix products on the device, SLO 50 ms, sent a steady 50 req/s.

Each system runs the same schedule through the router: `limits` (the default, runtime.memory_limits:
true, each of hog's processes capped at 2 x 256 MB + the base) and `no-limits`. Per system: hog's
requests answered and refused (and the first refusal), what hog's server group holds at the end
(GPU: nvidia-smi's per-process memory; CPU: data segment), and the neighbour's SLO attainment and p99.
Prints a table and writes it to docs/benchmarks.md between ``<!-- isolation:begin -->`` and
``<!-- isolation:end -->``, with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import cli, report  # noqa: E402
from controlplane.runtime.base import free_ports  # noqa: E402

BEGIN, END = "<!-- isolation:begin -->", "<!-- isolation:end -->"
HOG_MB, LEAK_MB, NEIGHBOUR_RATE, NEIGHBOUR_SLO_MS = 256, 512, 50.0, 50.0

HOG = '''\
import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

CUDA = torch.cuda.is_available()


class TritonPythonModel:
    def initialize(self, args):
        self.kept = []          # the leak

    def execute(self, requests):
        out = []
        for r in requests:
            size = from_dlpack(pb_utils.get_input_tensor_by_name(r, "SIZE_MB").to_dlpack())
            mb = int(size.max())
            try:
                self.kept.append(torch.empty(mb << 20, dtype=torch.uint8, device="cuda") if CUDA
                                 else np.empty(mb << 20, dtype=np.uint8))
            except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"out of memory keeping {mb} MB more ({len(self.kept)} blocks kept): {str(e)[:120]}")))
                continue
            kept = sum(int(k.nbytes) >> 20 for k in self.kept)
            y = torch.full(tuple(size.shape), float(kept), dtype=torch.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("KEPT_MB", to_dlpack(y))]))
        return out
'''

NEIGHBOUR = '''\
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TritonPythonModel:
    def initialize(self, args):
        self.w = torch.randn(256, 256, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)) / 16

    def execute(self, requests):
        out = []
        for r in requests:
            x = from_dlpack(pb_utils.get_input_tensor_by_name(r, "X").to_dlpack()).to(DEVICE)
            for _ in range(8):
                x = torch.tanh(x @ self.w)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("Y", to_dlpack(x.cpu()))]))
        return out
'''


def on_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def group_memory_mb(pid: int, gpu: bool) -> float:
    """What a server and its stubs hold: GPU memory (nvidia-smi, per process) or private data (VmData)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    pids = {p.pid for p in procs}
    if gpu:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(sum(float(m) for p, m in (ln.split(",") for ln in out.splitlines() if ln.strip())
                         if int(p) in pids))
    total = 0.0
    for p in procs:
        for line in open(f"/proc/{p.pid}/status"):
            if line.startswith("VmData:"):
                total += int(line.split()[1]) / 1024
    return total


def run_system(name: str, limits: bool, work: Path, repo: Path, gpu: bool, duration: float) -> dict:
    import tritonclient.http as httpclient

    env = {**os.environ, "CONTROLPLANE_STATE": str(work / name / "state"), "COLUMNS": "200"}
    hport, gport = free_ports(2)
    device = "gpu0" if gpu else "cpu0"
    plan = {"deployment": "isolation", "device": "gpu" if gpu else "cpu", "algorithm": "manual",
            "gpus": 1 if gpu else 2,
            "gpulets": [{"id": f"{device}-a", "gpu": 0, "share": 50 if gpu else 100,
                         "models": [{"model": "hog", "batch": 1, "rate": 1.0}]},
                        {"id": f"{device}-b" if gpu else "cpu1-a", "gpu": 0 if gpu else 1, "share": 50 if gpu else 100,
                         "models": [{"model": "neighbour", "batch": 8, "rate": NEIGHBOUR_RATE}]}]}
    (work / name).mkdir(parents=True, exist_ok=True)
    plan_file = work / name / "plan.json"
    plan_file.write_text(json.dumps(plan))
    dep = work / name / "isolation.yaml"
    dep.write_text(f"""\
name: isolation
models:
  - {{name: hog, rate: 1, slo_ms: 5000}}
  - {{name: neighbour, rate: {NEIGHBOUR_RATE}, slo_ms: {NEIGHBOUR_SLO_MS}}}
devices: {"[0]" if gpu else "cpu"}
runtime: {{memory_limits: {str(limits).lower()}}}
router: {{http_port: {hport}, grpc_port: {gport}, workers: 1}}
repository: {repo}
""")
    up = cli("up", "-f", str(dep), "--plan", str(plan_file), "--detach", env=env)
    if up.returncode != 0:
        raise SystemExit(f"{name}: up failed:\n{up.stdout}\n{up.stderr}")
    state = json.loads((work / name / "state" / "runs" / "isolation" / "state.json").read_text())
    url = f"127.0.0.1:{hport}"
    stop = threading.Event()
    neighbour: list[tuple[float, bool]] = []           # (latency ms, ok)
    hog: list[tuple[bool, str]] = []

    def neighbour_loop() -> None:
        c = httpclient.InferenceServerClient(url, network_timeout=10)
        x = np.random.default_rng(0).random((1, 256), dtype=np.float32)
        inp = httpclient.InferInput("X", [1, 256], "FP32")
        inp.set_data_from_numpy(x)
        nxt = time.monotonic()
        while not stop.is_set():
            nxt += 1.0 / NEIGHBOUR_RATE
            t = time.monotonic()
            try:
                c.infer("neighbour", [inp])
                neighbour.append((1000 * (time.monotonic() - t), True))
            except Exception:  # noqa: BLE001 - every failure counts against the SLO
                neighbour.append((1000 * (time.monotonic() - t), False))
            time.sleep(max(0.0, nxt - time.monotonic()))

    th = threading.Thread(target=neighbour_loop, daemon=True)
    th.start()
    try:
        c = httpclient.InferenceServerClient(url, network_timeout=30)
        x = httpclient.InferInput("SIZE_MB", [1, 1], "INT64")
        x.set_data_from_numpy(np.array([[LEAK_MB]], dtype=np.int64))
        t_end = time.monotonic() + duration
        while time.monotonic() < t_end:
            try:
                kept = c.infer("hog", [x]).as_numpy("KEPT_MB")
                hog.append((True, f"kept {float(kept.ravel()[0]):.0f} MB"))
            except Exception as e:  # noqa: BLE001
                hog.append((False, str(e)[:200]))
            time.sleep(1.0)
        hog_gid = f"{device}-a"
        held = group_memory_mb(state["gpulets"][hog_gid]["pid"], gpu)
    finally:
        stop.set()
        th.join(15)
        cli("down", "-f", str(dep), env=env)
    lat = [ms for ms, ok in neighbour if ok]
    within = sum(1 for ms, ok in neighbour if ok and ms <= NEIGHBOUR_SLO_MS)
    return {"system": name, "hog_sent": len(hog), "hog_ok": sum(ok for ok, _ in hog),
            "hog_refused": sum(not ok for ok, _ in hog),
            "first_refusal": next((m for ok, m in hog if not ok), None),
            "hog_held_mb": round(held), "neighbour_sent": len(neighbour),
            "neighbour_attainment_pct": round(100.0 * within / max(1, len(neighbour)), 2),
            "neighbour_p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--systems", default="limits,no-limits")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    gpu = on_gpu()
    work = Path(tempfile.mkdtemp(prefix="gpulet-isolation-"))
    env = {**os.environ, "CONTROLPLANE_STATE": str(work / "state")}
    repo = work / "repo"
    for name, src, tensors in (("hog", HOG, ["--input", "SIZE_MB:INT64:1", "--output", "KEPT_MB:FP32:1",
                                             "--memory-mb", str(HOG_MB), "--max-batch", "2"]),
                               ("neighbour", NEIGHBOUR, ["--input", "X:FP32:256", "--output", "Y:FP32:256",
                                                         "--max-batch", "8"])):
        d = work / name
        d.mkdir()
        (d / "model.py").write_text(src)
        add = cli("repo", "add", name, "--python", str(d), *tensors, "--repository", str(repo), env=env)
        if add.returncode != 0:
            raise SystemExit(f"repo add {name} failed:\n{add.stdout}\n{add.stderr}")
    rows = [run_system(s, s == "limits", work, repo, gpu, args.duration) for s in args.systems.split(",")]
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": f"{platform.node()} ({os.cpu_count()} cores{', GPU' if gpu else ', no GPU'})",
           "command": "python benchmarks/isolation.py " + " ".join(sys.argv[1:]), "duration_s": args.duration,
           "rows": rows}
    report(render(doc), doc, args.out / "isolation.json" if args.out else None,
           None if args.no_docs else (BEGIN, END, "## Memory isolation: a leaking model beside a neighbour (issue 14)"))


def render(doc: dict) -> str:
    lines = [f"Run {doc['date']} on {doc['machine']}; `{doc['command']}`; {doc['duration_s']:g} s: hog (declares "
             f"{HOG_MB} MB) asked to keep {LEAK_MB} MB more every second, neighbour sent {NEIGHBOUR_RATE:g} req/s "
             f"(SLO {NEIGHBOUR_SLO_MS:g} ms), each on its own gpu-let of the same device.", "",
             "| system | hog requests | kept | refused | hog's servers hold at the end (MB) | neighbour requests "
             "| neighbour within SLO | neighbour p99 (ms) | first refusal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        lines.append(f"| {r['system']} | {r['hog_sent']} | {r['hog_ok']} | {r['hog_refused']} | {r['hog_held_mb']} | "
                     f"{r['neighbour_sent']} | {r['neighbour_attainment_pct']} % | {r['neighbour_p99_ms']} | "
                     f"{(r['first_refusal'] or '-').replace('|', '/')[:140]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
