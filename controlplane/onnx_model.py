"""An ONNX file run by onnxruntime, called like a TorchScript module: torch tensors in, torch tensors out.

Used by the python-backend ``model.py`` (a repository model whose artifact is ``model.onnx``), by
``repo add --onnx`` to read the graph's inputs and outputs and run one batch, and by the CPU
profiler. onnxruntime is an optional dependency (``pip install controlplane[onnx]``); a model
served with the CUDA execution provider where onnxruntime has it, else on the CPU.
"""

from __future__ import annotations

from pathlib import Path

#: onnxruntime's tensor types -> KServe v2 dtypes (what the python-backend model.py maps)
ONNX_DTYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(int64)": "INT64",
               "tensor(int32)": "INT32"}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("ONNX models need onnxruntime: pip install onnxruntime "
                          "(or onnxruntime-gpu on a GPU)") from None
    return onnxruntime


class OnnxModel:
    """``OnnxModel(path, device)(*tensors)``: the graph's outputs as torch tensors on the CPU (one, or a tuple)."""

    def __init__(self, path: str | Path, device=None, threads: int = 0) -> None:
        ort = _ort()
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
        on_gpu = device is not None and getattr(device, "type", str(device)) == "cuda"
        providers = (["CUDAExecutionProvider"] if on_gpu and "CUDAExecutionProvider" in ort.get_available_providers()
                     else []) + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *xs):
        import torch

        outs = self.session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(self.input_names, xs)})
        outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    # the parts of a torch module's interface the profiler and model.py call
    def eval(self) -> "OnnxModel":
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self

    def parameters(self) -> list:
        return []

    def buffers(self) -> list:
        return []


def graph_inputs(path: str | Path) -> list[tuple[str, str, tuple]]:
    """(name, onnxruntime type, shape as the graph says it: ints, or names / None for dynamic dims) per input."""
    s = OnnxModel(path).session
    return [(i.name, i.type, tuple(i.shape)) for i in s.get_inputs()]
