"""Where a batch's time goes inside ``model.py``, in-process on one GPU (no Triton): is a model
launch-bound or GPU-bound, and what do its CUDA graphs save?

    python benchmarks/model_steps.py [--models resnet50,bert,vgg16] [--batches 1,8,16,32]

Per model and batch: the eager forward (inputs from a pinned host buffer, synchronised), how long
the host takes to launch it (returns before the GPU is done only if the GPU is the slower one),
the same batch replayed as ``model.py``'s CUDA graph, the largest difference between the two
outputs, and the host-side steps of ``execute``: gathering the requests into the pinned buffer,
the copy up, the copy down. Prints a table; one host thread, as in a GPU instance.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_model_py():
    """controlplane/templates/model.py as a module, with an empty stand-in for Triton's utils."""
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("gpulet_model", ROOT / "controlplane" / "templates" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(f, n: int = 15) -> tuple[float, float]:
    """(ms per call with the GPU done, ms per call for the host to return)."""
    import torch

    f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3, host


def main() -> None:
    import torch
    from google.protobuf import json_format

    from controlplane.repository import SourceRepository, build_artifacts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet50,bert,vgg16,densenet161")
    ap.add_argument("--batches", default="1,8,16,32")
    args = ap.parse_args()
    tm = load_model_py()
    for off in ("_jit_set_profiling_executor", "_jit_set_profiling_mode"):   # as model.py
        getattr(torch._C, off)(False)
    torch.set_num_threads(1)
    dev = torch.device("cuda", 0)
    repo = SourceRepository()
    names = args.models.split(",")
    build_artifacts(repo, names)
    print(f"{torch.cuda.get_device_name(dev)}; ms per batch")
    print("| model | batch | eager | host launch | graph | max diff | gather | copy up | copy down |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        cfg = json_format.MessageToDict(repo[name].config, preserving_proto_field_name=True)
        shapes = [(tuple(int(d) for d in i["dims"]), tm.DTYPES.get(i["data_type"], torch.float32))
                  for i in cfg["input"]]
        model = torch.jit.load(str(repo[name].artifact()), map_location=dev).eval()
        max_batch = int(cfg.get("max_batch_size", 0))
        t0 = time.perf_counter()
        try:
            graphs = tm.CudaGraphs(model, shapes, max_batch, dev)
            print(f"<!-- {name}: graphs for batches 1..{max_batch} captured in {time.perf_counter() - t0:.1f} s -->")
        except Exception as e:  # noqa: BLE001 - report and measure eager only
            graphs = None
            print(f"<!-- {name}: capture failed: {type(e).__name__}: {e} -->")
            torch.cuda.synchronize()
        for b in (int(x) for x in args.batches.split(",")):
            if b > max_batch:
                continue
            gen = torch.Generator().manual_seed(b)
            xs = [(torch.rand((b, *sh), generator=gen) * (100 if dt != torch.float32 else 1)).to(dt).pin_memory()
                  for sh, dt in shapes]
            rows = [[x[i:i + 1].clone() for i in range(b)] for x in xs]     # one request per row
            with torch.inference_mode():
                eager, launch = timed(lambda: model(*[x.to(dev, non_blocking=True) for x in xs]))
                ref = model(*[x.to(dev) for x in xs])
                ref = (ref if isinstance(ref, (tuple, list)) else (ref,))[0]
                graph, diff = float("nan"), float("nan")
                if graphs is not None:
                    graph, _ = timed(lambda: graphs(xs))
                    diff = (graphs(xs)[0] - ref).abs().max().item()
            gather, _ = timed(lambda: [torch.cat(r, out=x) for r, x in zip(rows, xs)])
            up, _ = timed(lambda: [x.to(dev, non_blocking=True) for x in xs])
            down, _ = timed(lambda: ref.cpu())
            print(f"| {name} | {b} | {eager:.2f} | {launch:.2f} | {graph:.2f} | {diff:.1e} | {gather:.2f} | "
                  f"{up:.2f} | {down:.2f} |", flush=True)


if __name__ == "__main__":
    main()
