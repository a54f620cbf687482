"""One profiling process at one share: ``python -m profiler.worker JOB.json``.

An MPS share is fixed for a process's life, so the profiler starts one worker
per share. The worker pins itself (CPU: ``sched_setaffinity`` to the share's
cores and as many torch threads; GPU: the parent set
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` before it started), checks that the share
really is enforced (GPU shares < 100 need it to be an MPS client), then

* ``mode: table`` — loads each model and times every batch: warm-up, then up to
  ``runs`` timed runs (at least ``min_runs``; stops early after ``point_budget_s``),
  each device-synchronised (CUDA events around input copy + forward; on CPU the
  host clock). One JSON line per measured point on stdout (prefix ``@@``).
* ``mode: serve`` — loads models and answers commands on stdin (``warm``, ``run``
  from a wall-clock start time for a duration, ``quit``): what the interference
  measurement drives two of at once.
"""

from __future__ import annotations

import json
import os
import sys
import time

PREFIX = "@@ "


def emit(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Bench:
    def __init__(self, job: dict) -> None:
        import torch

        self.torch = torch
        self.job = job
        self.share = int(job.get("share", 100))
        self.on_gpu = job.get("device", "cpu") != "cpu"
        if self.on_gpu:
            self.dev = torch.device("cuda", 0)
            torch.cuda.init()
            torch.empty(1, device=self.dev).add_(1)
            torch.cuda.synchronize()
            from controlplane.runtime.mps import require_client

            if self.share < 100 or job.get("require_mps"):
                require_client(self.share if self.share < 100 else 99, os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))
        else:
            self.dev = torch.device("cpu")
            cores = job.get("cores")
            if cores:
                os.sched_setaffinity(0, cores)
            torch.set_num_threads(max(1, len(cores) if cores else int(job.get("threads") or os.cpu_count() or 1)))
        self.models: dict[tuple[str, str], object] = {}
        self.inputs: dict[tuple[str, str, int], object] = {}

    # ------------------------------------------------------------------ models

    def load(self, name: str, precision: str):
        key = (name, precision)
        if key in self.models:
            return self.models[key]
        torch = self.torch
        if self._from_repository(name):
            path = self._info(name).artifact()
            if path.suffix == ".onnx":
                from controlplane.onnx_model import OnnxModel

                m = OnnxModel(path, self.dev, torch.get_num_threads())
            else:
                m = torch.jit.load(str(path), map_location="cpu").eval()
        else:
            from controlplane import zoo

            m = zoo.build(name)
        m = m.to(self.dev)
        if precision == "fp16":
            if not self.on_gpu:
                raise ValueError("fp16 is profiled on GPUs only")
            ref = self._forward(m, name, "fp32", 2)
            m = m.half()
            out = self._forward(m, name, "fp16", 2).float()
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            tiny = float(ref.abs().max()) < 1e-4  # seeded weights: output below fp16's resolution
            if not bool(torch.isfinite(out).all()) or (err > 0.05 and not tiny):
                raise ValueError(f"fp16 does not hold for {name}: relative error {err:.3g} against fp32 "
                                 f"(finite: {bool(torch.isfinite(out).all())})")
        self.models[key] = m
        return m

    def _input(self, name: str, precision: str, batch: int):
        key = (name, precision, batch)
        x = self.inputs.get(key)
        if x is None:
            from controlplane import zoo

            xs = self._repository_inputs(name, batch) if self._from_repository(name) else zoo.example_inputs(name, batch)
            xs = tuple(x.half() if precision == "fp16" and x.is_floating_point() else x for x in xs)
            if self.on_gpu:
                xs = tuple(x.pin_memory() for x in xs)
            self.inputs[key] = x = xs
        return x

    def _from_repository(self, name: str) -> bool:
        """A model served from the repository's own model.pt: asked for, or not one the zoo can build."""
        from controlplane import zoo

        return self.job.get("source", "zoo") == "torchscript" or name not in zoo.names()

    def _info(self, name: str):
        """The model's entry in the job's repository (read once per worker)."""
        repo = self.__dict__.get("_repo")
        if repo is None:
            from controlplane.repository import SourceRepository

            repo = self._repo = SourceRepository(self.job.get("repository"))
        return repo[name]

    def _repository_inputs(self, name: str, batch: int) -> tuple:
        """Random rows shaped by the model's config, one tensor per input in the config's order (the
        order the model takes them: `repo add` writes the config from the artifact's own inputs)."""
        from controlplane.model_add import TORCH_DTYPES, example_inputs

        info = self._info(name)
        odd = [t for t in info.inputs if t.datatype not in TORCH_DTYPES]
        if odd:
            raise ValueError(f"{name}: input {odd[0].name} has datatype {odd[0].datatype}, "
                             f"not one of {', '.join(TORCH_DTYPES)}")
        return tuple(example_inputs(info.inputs, batch))

    def _run(self, m, xs):
        """One call of the model on its inputs (a tuple of tensors, moved to the device)."""
        return m(*(x.to(self.dev, non_blocking=True) for x in xs))

    def _forward(self, m, name: str, precision: str, batch: int):
        with self.torch.inference_mode():
            out = self._run(m, self._input(name, precision, batch))
        return out[0] if isinstance(out, (tuple, list)) else out

    @staticmethod
    def weights_mb(m) -> float:
        return sum(p.numel() * p.element_size() for p in list(m.parameters()) + list(m.buffers())) / 2**20

    def memory_mb(self, m, before: int = 0) -> float:
        """GPU: the model's weights plus the peak of what one batch allocated on top (other models
        this worker holds are not counted); CPU: the weights."""
        if self.on_gpu:
            return self.weights_mb(m) + max(0, self.torch.cuda.max_memory_allocated(self.dev) - before) / 2**20
        return self.weights_mb(m)

    # ------------------------------------------------------------------ timing

    def once_ms(self, m, x) -> float:
        torch = self.torch
        with torch.inference_mode():
            if self.on_gpu:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                self._run(m, x)
                e1.record()
                e1.synchronize()
                return e0.elapsed_time(e1)
            t0 = time.perf_counter()
            self._run(m, x)
            return (time.perf_counter() - t0) * 1000.0

    def warm(self, m, x, n: int, seconds: float) -> None:
        t0 = time.perf_counter()
        i = 0
        while i < n or time.perf_counter() - t0 < seconds:
            self.once_ms(m, x)
            i += 1
            if i >= 50 * max(n, 1):
                break
        if self.on_gpu:
            self.torch.cuda.synchronize()

    def point(self, name: str, precision: str, batch: int) -> dict:
        import numpy as np

        job = self.job
        m = self.load(name, precision)
        x = self._input(name, precision, batch)
        before = 0
        if self.on_gpu:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats(self.dev)
            before = self.torch.cuda.memory_allocated(self.dev)
        self.warm(m, x, int(job.get("warmup", 5)), float(job.get("warmup_s", 0.1)))
        runs, min_runs, budget = int(job.get("runs", 100)), int(job.get("min_runs", 20)), float(job.get("point_budget_s", 1.0))
        times: list[float] = []
        t0 = time.perf_counter()
        while len(times) < runs:
            times.append(self.once_ms(m, x))
            if len(times) >= min_runs and time.perf_counter() - t0 > budget:
                break
        a = np.asarray(times)
        return {"model": name, "precision": precision, "batch": batch, "share": self.share,
                "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                "mean_ms": float(a.mean()), "runs": len(times), "memory_mb": round(self.memory_mb(m, before), 1),
                "wall_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ modes

    def table(self) -> None:
        """Time every (precision, model, batch) not in ``skip``.

        With ``gate``, the worker first loads (``preload``: all models, else the first) and
        warms up, says ``ready`` and waits for ``go`` on stdin: the profiler starts every
        share's worker at once so their start-up overlaps, and lets them time one after the
        other (a waiting worker is idle, so it does not disturb the one timing).
        """
        import gc

        skip = {tuple(k) for k in self.job.get("skip", [])}
        plan = [(p, n, [b for b in self.job["batches"] if (n, p, int(b)) not in skip])
                for p in self.job.get("precisions", ["fp32"]) for n in self.job["models"]]
        plan = [(p, n, bs) for p, n, bs in plan if bs]
        failed: dict[tuple[str, str], str] = {}
        if self.job.get("gate"):
            pre = plan if self.job.get("preload_all") else plan[:1]
            for p, n, bs in pre:
                try:
                    m = self.load(n, p)
                    for b in bs:
                        self.warm(m, self._input(n, p, int(b)), 2, 0.0)
                except Exception as e:  # noqa: BLE001
                    failed[(n, p)] = f"{type(e).__name__}: {e}"
            emit({"ready": True})
            line = sys.stdin.readline()
            if not line.strip().startswith("go"):
                return
        gc.collect()
        gc.disable()
        for precision, name, todo in plan:
            t0 = time.perf_counter()
            try:
                if (name, precision) in failed:
                    raise RuntimeError(failed[(name, precision)])
                self.load(name, precision)
            except Exception as e:  # noqa: BLE001 - report and go on with the next model
                emit({"skipped": {"model": name, "precision": precision, "share": self.share,
                                  "reason": str(e) if (name, precision) in failed else f"{type(e).__name__}: {e}"}})
                continue
            emit({"loaded": {"model": name, "precision": precision, "load_s": time.perf_counter() - t0}})
            for b in todo:
                emit({"row": self.point(name, precision, int(b))})
            del self.models[(name, precision)]
            for k in [k for k in self.inputs if k[:2] == (name, precision)]:
                del self.inputs[k]
            gc.collect()
            if self.on_gpu:
                self.torch.cuda.empty_cache()
        gc.enable()

    def graph_step(self, name: str, precision: str, batch: int):
        """A CUDA graph of one forward on a device-resident input: replays run the GPU work alone,
        without the host's launch overhead (whose jitter would drown the interference signal).
        Falls back to eager where capture fails."""
        key = ("graph", name, precision, batch)
        g = self.inputs.get(key)
        if g is not None:
            return g
        torch = self.torch
        m = self.load(name, precision)
        x = tuple(t.to(self.dev) for t in self._input(name, precision, batch))
        try:
            with torch.inference_mode():
                st = torch.cuda.Stream()
                st.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(st):
                    for _ in range(3):
                        m(*x)
                torch.cuda.current_stream().wait_stream(st)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = m(*x)
            step = (graph, x, out)
        except Exception as e:  # noqa: BLE001
            emit({"warning": f"no CUDA graph for {name} b{batch}: {type(e).__name__}: {e}; timing eagerly"})
            step = None
        self.inputs[key] = step
        return step

    def step_ms(self, name: str, precision: str, batch: int, graphs: bool) -> float:
        if graphs and self.on_gpu:
            step = self.graph_step(name, precision, batch)
            if step is not None:
                torch = self.torch
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                step[0].replay()
                e1.record()
                e1.synchronize()
                return e0.elapsed_time(e1)
        return self.once_ms(self.load(name, precision), self._input(name, precision, batch))

    def serve(self) -> None:
        import numpy as np

        for name, precision in self.job.get("preload", []):
            self.load(name, precision)
        emit({"ready": True, "pid": os.getpid(), "share": self.share})
        import gc

        gc.collect()
        gc.disable()
        for line in sys.stdin:
            cmd = json.loads(line)
            c = cmd.get("cmd")
            if c == "quit":
                break
            name, precision, batch = cmd.get("model"), cmd.get("precision", "fp32"), int(cmd.get("batch", 1))
            graphs = bool(self.job.get("graphs"))
            if c == "warm":
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < float(cmd.get("seconds", 0.1)):
                    self.step_ms(name, precision, batch, graphs)
                emit({"ok": "warm"})
            elif c == "run":
                while time.time() < cmd["start_at"]:
                    time.sleep(0.0005)
                t_end = time.perf_counter() + float(cmd["duration"])
                times = []
                while time.perf_counter() < t_end or len(times) < 3:
                    times.append(self.step_ms(name, precision, batch, graphs))
                a = np.asarray(times)
                emit({"mean_ms": float(a.mean()), "p50_ms": float(np.median(a)), "n": len(times)})
            else:
                emit({"error": f"unknown command {c!r}"})


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        job = json.load(f)
    try:
        bench = Bench(job)
    except Exception as e:  # noqa: BLE001
        emit({"fatal": f"{type(e).__name__}: {e}"})
        return 3
    emit({"started": {"pid": os.getpid(), "share": bench.share, "device": job.get("device")}})
    if job.get("mode", "table") == "serve":
        bench.serve()
    else:
        bench.table()
    emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
