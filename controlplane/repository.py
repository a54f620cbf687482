"""Model repositories: the source repository (the zoo) and the per-gpu-let ones.

The *source* repository (``model_repository/`` by default) is in Triton's
layout: ``<model>/config.pbtxt`` declares inputs, outputs and the default SLO;
the artifact ``model.pt`` (TorchScript) is either committed by the user in
``<model>/1/model.pt`` or, for zoo models, built with seeded weights into a
cache by :func:`build_artifacts` (``controlplane repo build``) — weights stay
out of git.

From a :class:`~controlplane.spec.Plan`, :func:`write_gpulet_repositories`
generates one repository per gpu-let: each model it serves on the python backend
(``model.py`` and the artifact, hard-linked where possible, so a container's
bind mount sees a real file), an ``instance_group`` on the gpu-let's GPU (or the
CPU), and Triton's dynamic batcher set from the plan — Triton batches, the
router only routes (:func:`gpulet_config` has the rule): batches as large as the
queue allows, and a short queue delay taken from the model's slack.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .paths import cache_dir

from .spec import Assignment, GpuLet, Plan

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_TEMPLATE = PACKAGE_DIR / "templates" / "model.py"
DEFAULT_SOURCE = PACKAGE_DIR.parent / "model_repository"

def kserve_datatype(data_type: int) -> str:
    """The KServe v2 name of a model config's data type: TYPE_FP32 -> FP32, TYPE_STRING -> BYTES."""
    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


class RepositoryError(ValueError):
    """A model repository that cannot be used; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str          # KServe v2 name: FP32, INT64, ...
    shape: tuple[int, ...]  # without the batch dimension


@dataclass
class ModelInfo:
    """What the control plane knows about one model of the source repository."""

    name: str
    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_batch_size: int
    slo_ms: float | None = None
    memory_mb: float | None = None
    config: mc.ModelConfig = field(repr=False, default_factory=mc.ModelConfig)
    source: str = ""  # the repository model whose artifact this one serves (itself unless aliased)

    def versions(self) -> list[str]:
        """The model's version folders in the repository (numbers, ascending); none for zoo models."""
        return sorted((d.name for d in self.path.iterdir() if d.is_dir() and d.name.isdigit()), key=int) \
            if self.path.is_dir() else []

    @property
    def version(self) -> str:
        """The version served: Triton's ``version_policy`` — ``specific``: the highest listed that exists,
        else (``latest``, the default) the highest present; "1" for zoo models (built into the cache)."""
        have = self.versions()
        if self.config.version_policy.WhichOneof("policy_choice") == "specific":
            wanted = [str(v) for v in self.config.version_policy.specific.versions if str(v) in have]
            if wanted:
                return max(wanted, key=int)
        return have[-1] if have else "1"

    def artifact(self) -> Path:
        """The served version's model file in the repository (``<v>/model.pt``, TorchScript; ``model.onnx``; or
        ``model.py``, a Triton python model of the user's), else the built one in the cache (zoo models)."""
        folder = self.path / self.version
        for local in (folder / "model.pt", folder / "model.onnx", folder / "model.py"):
            if local.exists():
                return local
        return cache_dir() / "zoo" / (self.source or self.name) / "model.pt"

    def is_python(self) -> bool:
        """A Triton python model of the user's (served as it is, not through the zoo's model.py)."""
        return self.artifact().name == "model.py"

    def is_built(self) -> bool:
        return self.artifact().exists()


def _parse_config(path: Path) -> mc.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}: {e}") from None


def _tensors(items) -> list[TensorInfo]:
    return [TensorInfo(t.name, kserve_datatype(t.data_type), tuple(int(d) for d in t.dims)) for t in items]


def _param(cfg: mc.ModelConfig, key: str) -> float | None:
    if key in cfg.parameters:
        try:
            return float(cfg.parameters[key].string_value)
        except ValueError:
            return None
    return None


class SourceRepository:
    """The source model repository (Triton layout), read once."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else DEFAULT_SOURCE
        if not self.root.is_dir():
            raise RepositoryError(f"{self.root}: model repository not found")
        self.models: dict[str, ModelInfo] = {}
        for cfg_path in sorted(self.root.glob("*/config.pbtxt")):
            if cfg_path.parent.name.startswith("."):
                continue            # `repo add` writing a model (a temporary folder, renamed into place)
            cfg = _parse_config(cfg_path)
            name = cfg.name or cfg_path.parent.name
            if name != cfg_path.parent.name:
                raise RepositoryError(f"{cfg_path}: name {name!r} differs from its directory {cfg_path.parent.name!r}")
            self.models[name] = ModelInfo(
                name=name, path=cfg_path.parent, inputs=_tensors(cfg.input), outputs=_tensors(cfg.output),
                max_batch_size=cfg.max_batch_size, slo_ms=_param(cfg, "slo_ms"),
                memory_mb=_param(cfg, "memory_mb"), config=cfg,
            )

    def names(self) -> list[str]:
        return list(self.models)

    def alias(self, name: str, base: str) -> "SourceRepository":
        """Serve a copy of model `base` under `name` (same artifact, its own config name)."""
        if name == base:
            return self
        info = self[base]
        cfg = mc.ModelConfig()
        cfg.CopyFrom(info.config)
        cfg.name = name
        self.models[name] = dataclasses.replace(info, name=name, config=cfg, source=info.source or base)
        return self

    def __getitem__(self, name: str) -> ModelInfo:
        try:
            return self.models[name]
        except KeyError:
            raise RepositoryError(f"unknown model {name!r}; known models: {', '.join(self.models)}") from None


# --------------------------------------------------------------------------- artifacts


def repository_for(deployment) -> SourceRepository:
    """The deployment's source repository, with its aliased models (`base:`) added."""
    repo = SourceRepository(deployment.repository)
    for m in deployment.models:
        if m.base:
            repo.alias(m.name, m.base)
    return repo


def build_artifacts(repo: SourceRepository, names: list[str] | None = None, force: bool = False,
                    progress=None) -> list[Path]:
    """Trace the zoo models with seeded weights into the cache; skip ones already built.

    Tracing is deterministic for a given torch version, so the file is rebuilt only when
    missing (or forced). Returns the artifact paths.
    """
    from . import zoo

    out = []
    for name in names or repo.names():
        info = repo[name]
        path = info.artifact()
        if path.exists() and not force:
            out.append(path)
            continue
        source = info.source or name
        if source not in zoo.BUILDERS:
            raise RepositoryError(f"{info.path}: no 1/model.pt and {source!r} is not a zoo model that can be built")
        if progress:
            progress(source)
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.jit.save(zoo.trace(source), str(tmp))
        tmp.replace(path)
        out.append(path)
    return out


# --------------------------------------------------------------------------- per-gpu-let repositories


MAX_QUEUE_DELAY_MS = 5.0  # the most a partial batch is held for more requests


def queue_delay_us(slo_ms: float | None, latency_ms: float) -> int:
    """``max_queue_delay_microseconds`` for a model with SLO s and predicted batch latency L (the
    plan's ``Assignment.latency_ms``; 0 = not predicted): how long a partial batch is held for more
    requests, a tenth of the slack left after waiting for one batch and running one,
    clamp(0.1 (s - 2L), 0, 5 ms); 0 without an SLO."""
    if not slo_ms or slo_ms <= 0:
        return 0
    delay_ms = min(max(0.1 * (float(slo_ms) - 2.0 * max(0.0, float(latency_ms))), 0.0), MAX_QUEUE_DELAY_MS)
    return round(delay_ms * 1000.0)


def gpulet_config(info: ModelInfo, assignment: Assignment, on_gpu: bool, slo_ms: float | None = None) -> mc.ModelConfig:
    """The model's config on one gpu-let: Triton's dynamic batcher set from the plan.

    * ``max_batch_size``: max(planned batch, the source model's own max_batch_size) — clients
      may send requests up to the model's limit; the router does not cut them.
    * ``dynamic_batching``: no ``preferred_batch_size``, so Triton runs whatever is queued, up to
      ``max_batch_size``, when the instance frees; ``max_queue_delay_microseconds`` =
      :func:`queue_delay_us` (slo_ms, ``assignment.latency_ms``), counted from the oldest queued
      request, so it only holds a partial batch when the queue is short. The planned batch is
      what the share must sustain at the planned rate, not a cap: measured on the H200
      (2026-11-29, docs/benchmarks.md "Serving"), preferring it capped batches under backlog and the
      gpu-run mix failed resnet50's SLO at x2.26 where two plain tritonservers split by hand
      with ``dynamic_batching { }`` held x3.
    * no queue policy. Measured with Triton 2.51 (sequential lenet requests on CPU): with any
      ``default_queue_policy`` — a timeout, ``allow_timeout_override`` or only
      ``max_queue_size`` — 0.4 to 3 % of requests sit ~500 ms in the queue (the batcher's idle
      wait after a missed wake-up; prefetching is off under a policy); without one, none in 1500.
      Requests that cannot meet their SLO are refused by the router instead (its in-flight
      limit, controlplane.router.core).
    * one instance on the gpu-let's GPU (device 0: the server sees only its own) or the CPU.

    Pure: everything comes in as arguments.
    """
    cfg = mc.ModelConfig()
    cfg.CopyFrom(info.config)
    cfg.backend = "python"
    cfg.ClearField("platform")
    cfg.max_batch_size = max(assignment.batch, info.max_batch_size)
    cfg.ClearField("dynamic_batching")
    cfg.ClearField("version_policy")        # the gpu-let's repository holds the served version only
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = queue_delay_us(slo_ms, assignment.latency_ms)
    cfg.ClearField("instance_group")
    group = cfg.instance_group.add()
    group.count = 1
    if on_gpu:
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        # The tritonserver sees only its own GPU (CUDA_VISIBLE_DEVICES), so it is device 0.
        group.gpus.append(0)
    else:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    return cfg


def plan_slos(repo: SourceRepository, plan: Plan, slo_ms: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each planned model's SLO: from slo_ms (the deployment's), else the plan's summary, else
    the source config's ``slo_ms`` parameter; models with none are left out."""
    out: dict[str, float] = {}
    for name in plan.model_names():
        given = (slo_ms or {}).get(name)
        summary = plan.models.get(name)
        slo = given or (summary.slo_ms if summary else None) or repo[name].slo_ms
        if slo:
            out[name] = float(slo)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_gpulet_repository(repo: SourceRepository, gpulet: GpuLet, dest: Path, on_gpu: bool,
                            slo_ms: Mapping[str, float] | None = None) -> Path:
    """Write one gpu-let's model repository under dest; return dest.

    slo_ms: the SLO of each model, as :func:`plan_slos` resolves them; a model missing from it
    gets no queue delay and no default timeout (what the profiler wants: batches run at once
    and nothing is timed out).
    """
    if dest.exists():
        shutil.rmtree(dest)
    for a in gpulet.models:
        info = repo[a.model]
        if not info.is_built():
            raise RepositoryError(f"model {a.model!r} is not built; run `controlplane repo build {a.model}`")
        mdir = dest / a.model
        vdir = mdir / info.version          # the served version, under its own number (requests may name it)
        vdir.mkdir(parents=True)
        cfg = gpulet_config(info, a, on_gpu, (slo_ms or {}).get(a.model))
        (mdir / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        if info.is_python():          # the user's own model.py and what it imports beside it
            shutil.copytree(info.path / info.version, vdir, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            continue
        shutil.copy2(MODEL_TEMPLATE, vdir / "model.py")
        _link_or_copy(info.artifact(), vdir / info.artifact().name)   # model.pt or model.onnx
        if info.artifact().suffix == ".onnx":     # what model.py runs it with, also where no controlplane is installed
            shutil.copy2(Path(__file__).parent / "onnx_model.py", vdir / "onnx_model.py")
    return dest


def write_gpulet_repositories(repo: SourceRepository, plan: Plan, root: Path, on_gpu: bool,
                              slo_ms: Mapping[str, float] | None = None) -> dict[str, Path]:
    """One repository per gpu-let of the plan, under root/<gpulet id>.

    slo_ms: the deployment's SLO per model ({m.name: m.slo_ms}); models it lacks take the
    plan's, else the source config's (:func:`plan_slos`).
    """
    slos = plan_slos(repo, plan, slo_ms)
    return {g.id: write_gpulet_repository(repo, g, root / g.id, on_gpu, slos) for g in plan.gpulets}


def with_repository_slos(dep, repo: SourceRepository | None = None, source: str = "<deployment>"):
    """The deployment with each model's missing ``slo_ms`` taken from its repository config's ``slo_ms``
    parameter (``repo add --slo-ms``, the zoo's configs); SpecError naming the field where neither has one."""
    from .spec import Deployment, SpecError

    missing = [i for i, m in enumerate(dep.models) if m.slo_ms is None]
    if not missing:
        return dep
    repo = repo or repository_for(dep)
    doc = dep.model_dump(mode="json", exclude_none=True)
    for i in missing:
        m = dep.models[i]
        slo = repo[m.source].slo_ms if m.source in repo.names() else None
        if not slo:
            raise SpecError(f"{source}: invalid\n  models[{i}].slo_ms: not given, and model {m.source!r} has no "
                            "slo_ms parameter in its config.pbtxt (`controlplane repo add ... --slo-ms MS`)")
        doc["models"][i]["slo_ms"] = slo
    return Deployment.model_validate(doc)
