"""``controlplane repo add``: a user's TorchScript or ONNX file, or Triton python model, into a model repository.

The model is loaded and one batch of two rows is run before anything is written: what it outputs
(TorchScript: names given or ``OUTPUT``, ``OUTPUT1``, ...; ONNX: the graph's names; dtypes and shapes
as run) goes into the model's ``config.pbtxt`` beside the inputs (TorchScript: as the user named them;
ONNX: as the graph does). The model is written to a temporary folder
beside its destination and renamed into place, so a refused or failed add leaves the repository as
it was. Served by the same python-backend ``model.py`` as the zoo (``1/model.pt``; ``1/model.onnx``
through onnxruntime, :mod:`controlplane.onnx_model`). A Triton python model (``--python DIR``) is
served as it is: its tensors are declared (or read from its own config.pbtxt), and it is checked by
loading it in a real tritonserver and running one batch (:func:`add_python_model`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .repository import RepositoryError, TensorInfo
from .spec import MODEL_NAME

#: KServe v2 dtypes a TorchScript model may take or give here (what the python-backend model.py maps)
TORCH_DTYPES = {"FP32": "float32", "FP16": "float16", "INT64": "int64", "INT32": "int32"}
TENSOR_SPEC = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):([A-Z0-9]+):(\d+(?:x\d+)*)$")


def parse_tensor(spec: str, what: str = "input") -> TensorInfo:
    """``NAME:DTYPE:SHAPE`` (shape without the batch dimension, e.g. ``INPUT:FP32:3x224x224``)."""
    m = TENSOR_SPEC.match(spec)
    if not m:
        raise RepositoryError(f"{what} {spec!r}: expected NAME:DTYPE:SHAPE, e.g. INPUT:FP32:3x224x224")
    name, dtype, shape = m.groups()
    if dtype not in TORCH_DTYPES:
        raise RepositoryError(f"{what} {spec!r}: dtype {dtype} is not one of {', '.join(TORCH_DTYPES)}")
    dims = tuple(int(d) for d in shape.split("x"))
    if any(d <= 0 for d in dims):
        raise RepositoryError(f"{what} {spec!r}: every dimension must be positive")
    return TensorInfo(name, dtype, dims)


def example_inputs(inputs: list[TensorInfo], batch: int, seed: int = 0) -> list:
    """Random torch rows for the inputs (floats in [0, 1), integers 0 or 1), ``batch`` of each."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xs = []
    for t in inputs:
        dt = getattr(torch, TORCH_DTYPES[t.datatype])
        xs.append(torch.rand((batch, *t.shape), generator=g, dtype=dt) if dt.is_floating_point
                  else torch.randint(0, 2, (batch, *t.shape), generator=g, dtype=dt))
    return xs


@dataclass
class Added:
    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


#: what ``repo add`` takes: the option's name -> the file it becomes in the model's version folder
KINDS = {"torchscript": "model.pt", "onnx": "model.onnx"}


def _load(artifact: Path, kind: str):
    """The model, callable on torch tensors; RepositoryError when the file is not what it says."""
    import warnings

    try:
        if kind == "onnx":
            from .onnx_model import OnnxModel

            return OnnxModel(artifact)
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)    # TorchScript is deprecated upstream; Triton loads it
            return torch.jit.load(str(artifact), map_location="cpu").eval()
    except ImportError as e:
        raise RepositoryError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - torch and onnxruntime raise many kinds for a bad file
        what = "an ONNX file onnxruntime can load" if kind == "onnx" else "a TorchScript file torch can load"
        raise RepositoryError(f"{artifact}: not {what} ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def onnx_inputs(artifact: Path) -> list[TensorInfo]:
    """The inputs an ONNX graph names, batch first (its first dimension: dynamic, or fixed and then any)."""
    from .onnx_model import ONNX_DTYPES, graph_inputs

    try:
        found = graph_inputs(artifact)
    except ImportError as e:
        raise RepositoryError(str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise RepositoryError(f"{artifact}: not an ONNX file onnxruntime can load ({type(e).__name__})") from None
    out = []
    for name, typ, shape in found:
        if typ not in ONNX_DTYPES:
            raise RepositoryError(f"{artifact}: input {name} is a {typ}, not one of {', '.join(ONNX_DTYPES)}")
        rows = shape[1:]
        if not shape or not all(isinstance(d, int) and d > 0 for d in rows):
            raise RepositoryError(f"{artifact}: input {name} has shape {list(shape)}; after the batch dimension "
                                  f"every dimension must be fixed")
        out.append(TensorInfo(name, ONNX_DTYPES[typ], tuple(rows)))
    return out


def _run_one_batch(artifact: Path, kind: str, inputs: list[TensorInfo], batch: int = 2) -> list[TensorInfo]:
    """Load the model and run one batch; the outputs' (default) names, dtypes and row shapes."""
    import torch

    model = _load(artifact, kind)
    xs = example_inputs(inputs, batch)
    try:
        with torch.inference_mode():
            out = model(*xs)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()
        raise RepositoryError(f"{artifact}: running one batch of {batch} with inputs "
                              f"{', '.join(f'{t.name} {t.datatype}{list(t.shape)}' for t in inputs)} failed: "
                              f"{type(e).__name__}: {first[-1] if first else ''}") from None
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    names = ([o.name for o in model.session.get_outputs()] if kind == "onnx"
             else ["OUTPUT"] if len(outs) == 1 else [f"OUTPUT{i}" for i in range(len(outs))])
    found = []
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor):
            raise RepositoryError(f"{artifact}: output {i} is a {type(o).__name__}, not a tensor")
        if o.dim() < 1 or o.shape[0] != batch:
            raise RepositoryError(f"{artifact}: output {i} has shape {list(o.shape)}; its first dimension must "
                                  f"be the batch ({batch})")
        dtype = next((k for k, v in TORCH_DTYPES.items() if getattr(torch, v) == o.dtype), None)
        if dtype is None:
            raise RepositoryError(f"{artifact}: output {i} has dtype {o.dtype}, not one of {', '.join(TORCH_DTYPES)}")
        found.append(TensorInfo(names[i], dtype, tuple(o.shape[1:]) or (1,)))
    return found


def add_model(root: Path, name: str, artifact: Path, kind: str = "torchscript",
              inputs: list[TensorInfo] | None = None, output_names: list[str] | None = None, max_batch: int = 32,
              slo_ms: float | None = None, replace: bool = False, version: str | None = None,
              memory_mb: float | None = None) -> Added:
    """Write ``root/name`` (``config.pbtxt``, ``1/model.pt`` or ``1/model.onnx``) after one batch ran.

    ``kind``: 'torchscript' (``inputs`` required: TorchScript does not say them) or 'onnx' (inputs and
    output names from the graph, which the session needs as they are). Raises RepositoryError."""
    if kind not in KINDS:
        raise RepositoryError(f"model kind {kind!r}: one of {', '.join(KINDS)}")
    if not re.match(MODEL_NAME, name) or len(name) > 128:
        raise RepositoryError(f"model name {name!r}: letters, digits, '_', '-' and '.', starting with a letter or digit")
    if kind == "onnx" and (inputs or output_names):
        raise RepositoryError("an ONNX file names its inputs and outputs: leave out --input and --output")
    if kind == "torchscript" and not inputs:
        raise RepositoryError("give the model's inputs: --input NAME:DTYPE:SHAPE (shape without the batch)")
    _check_parameters(max_batch, slo_ms, memory_mb)
    if not artifact.is_file():
        raise RepositoryError(f"{artifact}: no such file")
    dest = root / name
    _check_destination(dest, name, replace, version)
    if kind == "onnx":
        inputs = onnx_inputs(artifact)
    if len({t.name for t in inputs}) != len(inputs):
        raise RepositoryError("two inputs have the same name")
    outputs = _run_one_batch(artifact, kind, inputs)
    if output_names:
        if len(output_names) != len(outputs):
            raise RepositoryError(f"{len(output_names)} output name(s) given, the model gives {len(outputs)} output(s)")
        if len(set(output_names)) != len(output_names) or set(output_names) & {t.name for t in inputs}:
            raise RepositoryError("output names must differ from each other and from the inputs")
        outputs = [TensorInfo(n, t.datatype, t.shape) for n, t in zip(output_names, outputs)]
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    for t, field in [(t, cfg.input) for t in inputs] + [(t, cfg.output) for t in outputs]:
        field.add(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.datatype}"), dims=list(t.shape))
    cfg.parameters["source"].string_value = f"{kind}:{artifact.name}"
    _set_parameters(cfg, slo_ms, memory_mb)
    built = Path(tempfile.mkdtemp(prefix="gpulet-add-")) / name
    try:
        (built / "1").mkdir(parents=True)
        shutil.copyfile(artifact, built / "1" / KINDS[kind])
        (built / "config.pbtxt").write_text(f"# added by `controlplane repo add` from {artifact.name}\n"
                                            + text_format.MessageToString(cfg))
        _install(built, root, name, replace, version)
    finally:
        shutil.rmtree(built.parent, ignore_errors=True)
    return Added(dest, inputs, outputs)


def _check_parameters(max_batch: int, slo_ms: float | None, memory_mb: float | None) -> None:
    if max_batch < 1:
        raise RepositoryError(f"max batch {max_batch}: must be at least 1")
    if slo_ms is not None and slo_ms <= 0:
        raise RepositoryError(f"SLO {slo_ms} ms: must be positive")
    if memory_mb is not None and memory_mb <= 0:
        raise RepositoryError(f"memory {memory_mb:g} MB: must be positive")


def _set_parameters(cfg, slo_ms: float | None, memory_mb: float | None) -> None:
    """The config parameters the control plane reads: the default SLO, and the memory one instance holds
    (the memory check and each gpu-let's memory limit use it where the profile does not say)."""
    if slo_ms is not None:
        cfg.parameters["slo_ms"].string_value = f"{slo_ms:g}"
    if memory_mb is not None:
        cfg.parameters["memory_mb"].string_value = f"{memory_mb:g}"


def _check_destination(dest: Path, name: str, replace: bool, version: str | None) -> None:
    """Refuse what would overwrite without --replace: the model (no --version) or that version of it."""
    if version is not None and (not version.isdigit() or int(version) < 1):
        raise RepositoryError(f"version {version!r}: a positive integer (Triton's version folders)")
    if version is None and dest.exists() and not replace:
        raise RepositoryError(f"{dest}: model {name!r} is already in the repository (repo rm it first, "
                              "--replace it, or add a new --version)")
    if version is not None and (dest / str(int(version))).exists() and not replace:
        raise RepositoryError(f"{dest}: model {name!r} already has version {int(version)} (--replace it)")


def _install(built: Path, root: Path, name: str, replace: bool, version: str | None) -> None:
    """Move a checked model (``built``: config.pbtxt and version folder 1) into ``root/name``: the whole
    model, or, with ``version``, as that version folder beside the model's others (its tensors must be the
    model's: Triton serves every version of a model with one config). Renamed into place, so a reader
    sees the repository before or after, never half of it."""
    dest = root / name
    root.mkdir(parents=True, exist_ok=True)
    if version is None or not (dest / "config.pbtxt").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            shutil.copytree(built, tmp, dirs_exist_ok=True)
            if version is not None:
                (tmp / "1").rename(tmp / str(int(version)))
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    from .repository import _parse_config, _tensors

    have, new = _parse_config(dest / "config.pbtxt"), _parse_config(built / "config.pbtxt")
    if (_tensors(have.input), _tensors(have.output)) != (_tensors(new.input), _tensors(new.output)):
        raise RepositoryError(f"version {int(version)} of {name!r} has other inputs or outputs than the model "
                              "(every version is served with one config): add it under a new name, or --replace")
    tmp = Path(tempfile.mkdtemp(prefix=f".v{int(version)}-", dir=dest))
    try:
        shutil.copytree(built / "1", tmp, dirs_exist_ok=True)
        final = dest / str(int(version))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def python_model_files(src: Path) -> Path:
    """The folder holding a Triton python model's ``model.py``: ``src`` itself, or its version folder
    ``src/1`` when ``src`` is a model directory in Triton's layout."""
    for d in (src, src / "1"):
        if (d / "model.py").is_file():
            return d
    raise RepositoryError(f"{src}: no model.py (a Triton python model: model.py with a TritonPythonModel class, "
                          "in this folder or in its version folder 1/)")


def python_model_tensors(src: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs a python model's own ``config.pbtxt`` declares (empty lists without one)."""
    from .repository import _tensors

    cfg_path = src / "config.pbtxt"
    if not cfg_path.is_file():
        return [], []
    try:
        cfg = text_format.Parse(cfg_path.read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{cfg_path}: {e}") from None
    return _tensors(cfg.input), _tensors(cfg.output)


def _run_in_tritonserver(model_dir: Path, name: str, inputs: list[TensorInfo], outputs: list[TensorInfo],
                         batch: int = 2) -> None:
    """Serve ``model_dir`` alone in a real tritonserver on the CPU and run one batch; RepositoryError with
    the server's words when it does not load, fails, or answers other outputs than declared."""
    import numpy as np
    import tritonclient.http as httpclient

    from .runtime.base import Launch, StartError
    from .runtime.process import ProcessRuntime
    from .spec import Assignment, GpuLet

    work = Path(tempfile.mkdtemp(prefix="gpulet-check-"))
    try:
        shutil.copytree(model_dir, work / "repo" / name)
        g = GpuLet(id="cpu0-a", gpu=0, share=100, models=[Assignment(model=name, batch=batch, rate=1)])
        rt = ProcessRuntime(startup_timeout_s=120, restart=False)
        try:
            eps = rt.start([Launch(gpulet=g, repository=work / "repo", log_path=work / "triton.log")])
        except StartError as e:
            raise RepositoryError(f"the model did not load in tritonserver: {e}") from None
        try:
            c = httpclient.InferenceServerClient(eps[g.id].http, network_timeout=60)
            ins = []
            for t, x in zip(inputs, example_inputs(inputs, batch)):
                i = httpclient.InferInput(t.name, [batch, *t.shape], t.datatype)
                i.set_data_from_numpy(x.numpy())
                ins.append(i)
            # Binary outputs, as the router asks for them. (In JSON, on the lent H200, a python model's
            # FP32 output once came back as "data": [] with its shape, which no client can decode.)
            outs = [httpclient.InferRequestedOutput(t.name, binary_data=True) for t in outputs]
            try:
                res = c.infer(name, ins, outputs=outs)
            except Exception as e:  # noqa: BLE001 - tritonclient's InferenceServerException, connection errors
                raise RepositoryError(f"running one batch of {batch} in tritonserver failed: {e}") from None
            for t in outputs:
                try:
                    y = res.as_numpy(t.name)
                except ValueError as e:     # bytes that do not fill the shape the answer gives
                    raise RepositoryError(f"output {t.name!r}: the model's answer does not decode: {e}") from None
                if y is None:
                    raise RepositoryError(f"the model answered no output {t.name!r}")
                want = (batch, *t.shape)
                if tuple(y.shape) != want or y.dtype != np.dtype(TORCH_DTYPES[t.datatype]):
                    raise RepositoryError(f"output {t.name!r}: the model answered {y.dtype}{list(y.shape)}, "
                                          f"declared {t.datatype}{list(want)}")
        finally:
            rt.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_python_model(root: Path, name: str, src: Path, inputs: list[TensorInfo] | None = None,
                     outputs: list[TensorInfo] | None = None, max_batch: int = 32, slo_ms: float | None = None,
                     replace: bool = False, version: str | None = None, memory_mb: float | None = None) -> Added:
    """A Triton python model (``model.py`` and whatever it imports beside it) into ``root/name``, after it
    loaded in a real tritonserver and answered one batch with the declared outputs. Its tensors come
    from ``inputs``/``outputs`` (NAME:DTYPE:SHAPE), else from its own ``config.pbtxt``."""
    if not re.match(MODEL_NAME, name) or len(name) > 128:
        raise RepositoryError(f"model name {name!r}: letters, digits, '_', '-' and '.', starting with a letter or digit")
    if not src.is_dir():
        raise RepositoryError(f"{src}: no such folder")
    files = python_model_files(src)
    own_in, own_out = python_model_tensors(src)
    inputs, outputs = inputs or own_in, outputs or own_out
    if not inputs or not outputs:
        raise RepositoryError("give the model's tensors: --input NAME:DTYPE:SHAPE and --output NAME:DTYPE:SHAPE "
                              "(or a config.pbtxt beside model.py that declares them)")
    names = [t.name for t in inputs + outputs]
    if len(set(names)) != len(names):
        raise RepositoryError("input and output names must all differ")
    odd = [t for t in inputs + outputs if t.datatype not in TORCH_DTYPES]
    if odd:
        raise RepositoryError(f"{odd[0].name}: dtype {odd[0].datatype} is not one of {', '.join(TORCH_DTYPES)}")
    _check_parameters(max_batch, slo_ms, memory_mb)
    dest = root / name
    _check_destination(dest, name, replace, version)
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    for t, field in [(t, cfg.input) for t in inputs] + [(t, cfg.output) for t in outputs]:
        field.add(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.datatype}"), dims=list(t.shape))
    cfg.parameters["source"].string_value = "python:model.py"
    _set_parameters(cfg, slo_ms, memory_mb)
    built = Path(tempfile.mkdtemp(prefix="gpulet-add-")) / name      # checked outside the repository
    try:
        shutil.copytree(files, built / "1", ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt", "1"))
        (built / "config.pbtxt").write_text(f"# added by `controlplane repo add --python` from {src}\n"
                                            + text_format.MessageToString(cfg))
        _run_in_tritonserver(built, name, inputs, outputs)
        _install(built, root, name, replace, version)
    finally:
        shutil.rmtree(built.parent, ignore_errors=True)
    return Added(dest, inputs, outputs)


def remove(root: Path, name: str, version: str | None = None) -> Path:
    """Delete ``root/name`` (a model the repository holds), or only its version folder ``version`` while
    others remain; raise RepositoryError naming what is there."""
    from .repository import SourceRepository

    repo = SourceRepository(root)
    info = repo[name]                      # unknown: the error lists the known models
    if version is None:
        shutil.rmtree(info.path)
        return info.path
    have = info.versions()
    if version not in have:
        raise RepositoryError(f"model {name!r} has no version {version!r} (it has {', '.join(have) or 'none'})")
    if have == [version]:
        raise RepositoryError(f"version {version} is the only one of {name!r}: `repo rm {name}` removes the model")
    shutil.rmtree(info.path / version)
    return info.path / version
