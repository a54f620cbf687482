"""Triton python-backend model that serves one TorchScript file (`model.pt` beside it).

Generated into every gpu-let's model repository by the control plane. Tensors
cross the Triton boundary through DLPack, not numpy: numpy-backed outputs fail
on some numpy versions ("output tensor shape does not match size of output").

One batch crosses the PCIe bus as one copy each way: the requests' inputs are
gathered into a pinned buffer and sent to the GPU together, and the outputs come
back to the host together before they are cut into responses. Measured on the
H200 (2026-11-29, benchmarks/serving.py): copying each request's 600 KB image up
on its own, and handing Triton one GPU output per response, cost a resnet50
batch of 24 about 20 ms besides its run — the model, not the GPU, capped what
any deployment served.

On a GPU the model runs as CUDA graphs, one per batch size, captured at start-up
(:class:`CudaGraphs`): measured in-process on the H200 with one host thread,
resnet50's forward took ~4 ms for every batch up to 16 and bert's ~2.7 ms — the
host launching kernels one at a time, not the GPU computing. A model whose
capture fails (host-side work inside its forward) runs eagerly.

Environment (set by the runtime for each gpu-let):
  CONTROLPLANE_THREADS  intra-op threads on the CPU (the gpu-let's cores).
"""

import json
import os
import time

_T_IMPORT = time.monotonic()
import torch  # noqa: E402 - timed: a gpu-let's start waits for it in every stub
_IMPORT_TORCH_S = time.monotonic() - _T_IMPORT
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack


DTYPES = {"TYPE_FP32": torch.float32, "TYPE_FP16": torch.float16, "TYPE_INT64": torch.int64,
          "TYPE_INT32": torch.int32}


class CudaGraphs:
    """The model as one CUDA graph per batch size 1..max_batch, sharing one memory pool.

    Safe to share: the graphs never run at once (one ``execute`` at a time per instance) and each
    graph's outputs stay referenced, so no later capture reuses their memory. A replay's outputs
    are overwritten by the next replay of the same size: copy them out first.
    """

    def __init__(self, model, inputs, max_batch, device, warmups_after_first: int = 0, lean: bool = True):
        """inputs: (per-row shape, dtype) of each input, in the model's argument order.

        What start-up costs is what a re-plan waits for (benchmarks/startup.py, H200, 20 % share):
        ``warmups_after_first``: eager runs before capturing each size after the largest, which always
        gets two (cuDNN/cuBLAS handles, workspaces and kernel choice happen there); two before every
        size made bert's 32 graphs take 1.13 s and vgg16's 2.18 s, none 0.54 and 1.17 s, with replays
        equal to the eager forward either way. ``lean``: capture with ``capture_begin``/``capture_end``
        on our own stream, not ``torch.cuda.graph``, which synchronises, empties the allocator's cache
        (so the next size allocates anew) and may run the garbage collector before every capture."""
        self.graphs = {}
        pool = None
        side = torch.cuda.Stream(device)
        for b in range(max_batch, 0, -1):      # largest first: the pool grows once
            static = [torch.zeros((b, *shape), dtype=dt, device=device) for shape, dt in inputs]
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2 if b == max_batch else warmups_after_first):   # warm-up before capture
                    model(*static)
            graph = torch.cuda.CUDAGraph()
            if lean:
                with torch.cuda.stream(side), torch.inference_mode():
                    graph.capture_begin(*(() if pool is None else (pool,)))
                    try:
                        out = model(*static)
                    finally:
                        graph.capture_end()
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                torch.cuda.current_stream(device).wait_stream(side)
                with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                    out = model(*static)
            pool = graph.pool()
            self.graphs[b] = (graph, static, tuple(out) if isinstance(out, (tuple, list)) else (out,))
        torch.cuda.synchronize(device)

    def __call__(self, batch):
        """batch: one tensor per input (host or device), all with the same number of rows."""
        graph, static, out = self.graphs[batch[0].shape[0]]
        for dst, src in zip(static, batch):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return out


def _onnx_model_class(folder: str):
    """controlplane.onnx_model.OnnxModel: from ``onnx_model.py`` beside this file (where the gpu-let's
    repository carries it: containers have no controlplane package), else from the package."""
    path = os.path.join(folder, "onnx_model.py")
    if os.path.exists(path):
        import importlib.util

        spec = importlib.util.spec_from_file_location("gpulet_onnx_model", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.OnnxModel
    from controlplane.onnx_model import OnnxModel

    return OnnxModel


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): the stub's own start-up,
    before Triton calls ``initialize``."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class TritonPythonModel:
    def initialize(self, args):
        t0 = time.monotonic()
        stub_s = process_age_s()
        config = json.loads(args["model_config"])
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
            # The host side only copies; torch's default (a thread per core, spinning between ops)
            # made three stubs take 14 of 16 cores and a resnet50 batch 450 ms on the H200.
            torch.set_num_threads(1)
        else:
            self.device = torch.device("cpu")
            threads = int(os.environ.get("CONTROLPLANE_THREADS", "0") or 0)
            if threads > 0:
                torch.set_num_threads(threads)
        # The profiling executor re-specialises the graph for every new input shape, so the
        # first batches of each size take seconds; the router's batches vary in size.
        for off in ("_jit_set_profiling_executor", "_jit_set_profiling_mode"):
            if hasattr(torch._C, off):
                getattr(torch._C, off)(False)
        folder = os.path.join(args["model_repository"], args["model_version"])
        onnx = os.path.exists(os.path.join(folder, "model.onnx"))
        if onnx:     # a user's ONNX file (`repo add --onnx`), run by onnxruntime; no CUDA graphs of it
            self.model = _onnx_model_class(folder)(os.path.join(folder, "model.onnx"), self.device,
                                                   torch.get_num_threads())
        else:
            self.model = torch.jit.load(os.path.join(folder, "model.pt"), map_location=self.device).eval()
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self._pinned = {}   # input name -> reusable page-locked host buffer (GPU instances)
        shapes = [(tuple(int(d) for d in i["dims"]), DTYPES.get(i["data_type"], torch.float32))
                  for i in config["input"]]
        max_batch = int(config.get("max_batch_size", 0))
        t_loaded = time.monotonic()
        self.graphs = None
        if not onnx and self.device.type == "cuda" and max_batch > 0 and all(d > 0 for sh, _ in shapes for d in sh):
            try:
                self.graphs = CudaGraphs(self.model, shapes, max_batch, self.device)
            except Exception as e:  # noqa: BLE001 - a forward that cannot be captured runs eagerly
                pb_utils.Logger.log_warn(f"{config.get('name')}: no CUDA graphs ({type(e).__name__}: {e}); eager")
                torch.cuda.synchronize(self.device)
        if self.graphs is None:
            self._warm_up(shapes, max(1, max_batch))
        # A re-plan waits for its new gpu-lets to be ready: where that time goes, in every server's log
        # (stub: its process up to here, of which importing torch; load: the weights onto the device;
        # prepare: CUDA graphs of every batch size, or a warm-up run). benchmarks/startup.py reads it.
        t_ready = time.monotonic()
        stub = "" if stub_s is None else f"stub {stub_s:.2f} s: import torch {_IMPORT_TORCH_S:.2f} s; "
        pb_utils.Logger.log_info(
            f"{config.get('name')}: initialized in {(stub_s or 0.0) + t_ready - t0:.2f} s "
            f"({stub}load {t_loaded - t0:.2f} s, "
            f"prepare {t_ready - t_loaded:.2f} s: "
            f"{f'CUDA graphs for batches 1-{max_batch}' if self.graphs else 'warm-up'}) on {self.device}")

    def _warm_up(self, shapes, largest):
        """Run the smallest and the largest batch once, so the first real requests are not the slow ones
        (CUDA context, cuDNN/cuBLAS handles, allocator growth)."""
        for b in sorted({1, largest}):
            xs = [torch.zeros((b, *sh), dtype=dt, device=self.device) for sh, dt in shapes]
            with torch.inference_mode():
                self.model(*xs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _batch(self, name, parts):
        """The requests' tensors (parts) of one input as one batch: on a GPU instance, in a page-locked
        host buffer (one copy up per batch); otherwise on the model's device."""
        if self.device.type == "cpu" or any(p.device.type != "cpu" for p in parts):
            parts = [p.to(self.device) for p in parts]
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        n = torch.Size(shape).numel()
        buf = self._pinned.get(name)
        if buf is None or buf.dtype != parts[0].dtype or buf.numel() < n:
            buf = self._pinned[name] = torch.empty(max(n, 1), dtype=parts[0].dtype, pin_memory=True)
        host = buf[:n].view(shape)
        torch.cat(parts, out=host)
        # Safe to reuse next batch: execute() waits for this batch's outputs, which come after this copy.
        return host

    def execute(self, requests):
        # Triton may hand over several requests at once: run them as one batch.
        parts = {n: [from_dlpack(pb_utils.get_input_tensor_by_name(r, n).to_dlpack()) for r in requests]
                 for n in self.inputs}
        sizes = [p.shape[0] for p in parts[self.inputs[0]]]
        batch = [self._batch(n, parts[n]) for n in self.inputs]
        if self.graphs is not None and batch[0].shape[0] in self.graphs.graphs:
            out = self.graphs(batch)
        else:
            with torch.inference_mode():
                out = self.model(*[x.to(self.device, non_blocking=True) for x in batch])
            if not isinstance(out, (tuple, list)):
                out = (out,)
        out = [o.cpu() for o in out]     # one copy per output (it waits for the GPU)
        responses = []
        start = 0
        for n in sizes:
            tensors = [
                pb_utils.Tensor.from_dlpack(name, to_dlpack(o[start:start + n].contiguous()))
                for name, o in zip(self.outputs, out)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
