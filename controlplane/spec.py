"""File formats of the control plane, as pydantic models.

One source of truth for every file a user writes or reads:

* :class:`Deployment` — the deployment file (YAML) a user writes: which models,
  at what request rate and SLO, on which devices, with which runtime.
* :class:`Plan` — what the scheduler decides: gpu-lets (a GPU index and an MPS
  share in %) and, on each, the models it serves with their batch size, assigned
  rate and the duty cycle they share.

Validation errors are turned into :class:`SpecError`, whose message names the
file, the field (as a dotted path such as ``models[1].rate``) and the problem,
so a CLI can print it as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class SpecError(ValueError):
    """A deployment or plan file that cannot be used; the message says why."""


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a deployment file must not pass silently."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- deployment


#: a model name: it becomes a folder of generated repositories and a URL path segment, so letters,
#: digits, '_' and '-', with single dots between them (no '/', no '..', no leading dot)
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"


class ModelSpec(_Strict):
    """One model to serve: its name in the model zoo, its load and its SLO."""

    name: str = Field(pattern=MODEL_NAME, max_length=128,
                      description="model name in the model repository (see `controlplane repo list`)")
    rate: float = Field(ge=0, description="request rate to plan for, in requests per second")
    slo_ms: float | None = Field(default=None, gt=0, description="latency SLO in milliseconds, queueing included; "
                                 "default: the `slo_ms` parameter of the model's config.pbtxt in the repository")
    max_batch: int | None = Field(
        default=None, ge=1, le=1024, description="largest batch the scheduler may use for this model"
    )
    base: str | None = Field(
        default=None, pattern=MODEL_NAME, max_length=128, description="repository model this one is a copy of (default: its own name), "
        "e.g. six lenet readers lenet1..lenet6 with base lenet"
    )

    @property
    def source(self) -> str:
        """The repository model behind this name."""
        return self.base or self.name


#: where a step's input comes from: an app input (``IMAGE``) or an earlier step's output (``lenet.OUTPUT``)
TENSOR_REF = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class AppStep(_Strict):
    """One model of an application, and where each of its inputs comes from."""

    model: str = Field(pattern=MODEL_NAME, max_length=128, description="a model of the repository")
    inputs: dict[str, Annotated[str, Field(pattern=TENSOR_REF)]] = Field(
        min_length=1, description="the model's input name -> an app input name, or STEP_MODEL.OUTPUT of another step")
    fan_out: bool = Field(default=False, description="run the model once per row of its inputs' first dimension "
                          "after the batch: tensors of shape [K, *s] feed a model taking [*s], K rows per request "
                          "(e.g. one crop per detection); its outputs come back as [K, *o]")


class AppSpec(_Strict):
    """An application: models run as one pipeline (steps whose inputs are ready run at once), one
    endpoint and one end-to-end SLO, which the planner splits over the steps."""

    name: str = Field(pattern=MODEL_NAME, max_length=128, description="served as a KServe model of this name")
    rate: float = Field(ge=0, description="requests/s to plan for; every step's model gets this much more")
    slo_ms: float = Field(gt=0, description="end-to-end latency SLO in milliseconds")
    steps: list[AppStep] = Field(min_length=1)
    outputs: dict[str, Annotated[str, Field(pattern=TENSOR_REF)]] = Field(
        min_length=1, description="the app's output name -> STEP_MODEL.OUTPUT")

    @model_validator(mode="after")
    def _graph(self) -> "AppSpec":
        """Each model once; references to steps that exist; no cycle (checked here, without the repository)."""
        models = [s.model for s in self.steps]
        for i, st in enumerate(self.steps):
            if st.model in models[:i]:
                raise ValueError(f"steps[{i}].model: {st.model!r} is a step already (use `base:` copies to run a "
                                 "model twice)")
        for i, st in enumerate(self.steps):
            for k, ref in st.inputs.items():
                step = ref.split(".", 1)[0] if "." in ref else None
                if step is not None and step not in models:
                    raise ValueError(f"steps[{i}].inputs.{k}: {ref!r} names no step (steps: {', '.join(models)})")
                if step == st.model:
                    raise ValueError(f"steps[{i}].inputs.{k}: a step cannot take its own output")
        for k, ref in self.outputs.items():
            if "." not in ref or ref.split(".", 1)[0] not in models:
                raise ValueError(f"outputs.{k}: {ref!r} is not STEP_MODEL.OUTPUT of a step "
                                 f"(steps: {', '.join(models)})")
        self.rounds()                   # raises on a cycle
        return self

    def rounds(self) -> list[list[str]]:
        """The steps' models in rounds: each round's steps need only app inputs and earlier rounds'
        outputs (so they run at once); ValueError when some steps wait on each other."""
        done: set[str] = set()
        out = []
        todo = list(self.steps)
        while todo:
            ready = [st for st in todo if all(("." not in r) or r.split(".", 1)[0] in done for r in st.inputs.values())]
            if not ready:
                raise ValueError(f"steps: {', '.join(st.model for st in todo)} wait on each other (a cycle)")
            out.append([st.model for st in ready])
            done.update(st.model for st in ready)
            todo = [st for st in todo if st not in ready]
        return out


#: where the Ray runtime finds its cluster: auto, ray://HOST:PORT (Ray Client) or HOST:PORT (the head's GCS)
RAY_ADDRESS = r"^(auto|ray://[A-Za-z0-9_.\[\]:-]+:[0-9]{1,5}|[A-Za-z0-9_.\[\]:-]+:[0-9]{1,5})$"


class RuntimeSpec(_Strict):
    """How gpu-lets are run: local tritonserver processes, Docker containers, or Ray actors on a cluster."""

    kind: Literal["process", "docker", "ray"] = "process"
    tritonserver: str | None = Field(
        default=None, description="tritonserver binary; default: the nvidia-pytriton wheel's, then PATH "
        "(ray: looked for on each node)"
    )
    image: str = Field(default="gpulet-triton-cpu:latest", description="Triton image (docker runtime)")
    startup_timeout_s: float = Field(default=180.0, gt=0)
    restart: bool = Field(default=True, description="restart a tritonserver that dies")
    memory_limits: bool = Field(
        default=True, description="limit the memory each process of a gpu-let may hold to twice its largest "
        "model's memory (the larger of the profile's and its config.pbtxt's `memory_mb`) plus a base (1 GB on a GPU, "
        "2 GB + 16 MB per core on the CPU), so a model that leaks or overflows fails alone: on a GPU as the MPS client's pinned "
        "device memory limit, on the CPU as the process's data limit (process and ray runtimes)")
    mps_pipe_dir: str | None = Field(default=None, description="CUDA_MPS_PIPE_DIRECTORY; default under the run dir")
    address: str | None = Field(
        default=None, max_length=300,
        description="ray runtime: the cluster to run on: 'auto' (RAY_ADDRESS, else the cluster `ray start` "
        "started on this machine; the default), ray://HEAD:10001 (Ray Client), or HEAD:PORT (the head's GCS "
        "address that `ray start --head` prints). Each gpu-let is one Ray actor on a node of the cluster that "
        "owns its tritonserver; the plan's GPU i is the cluster's i-th GPU (nodes in order of address, each "
        "node's GPUs in index order); on a cluster without GPUs each node is one virtual CPU device")
    ship_repositories: bool = Field(
        default=False, description="ray runtime: send each gpu-let's generated model repository to its node with "
        "the actor (through Ray's object store) instead of passing its path, which every node must then see "
        "(a shared run directory)")

    @field_validator("address")
    @classmethod
    def _ray_address(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.match(RAY_ADDRESS, v):
            raise ValueError(f"{v!r} is not a Ray cluster address: auto, ray://HOST:PORT or HOST:PORT")
        return v

    @model_validator(mode="after")
    def _ray_only(self) -> "RuntimeSpec":
        if self.kind != "ray":     # values, not fields set: a dumped deployment (defaults written out) validates
            for name, unset in (("address", None), ("ship_repositories", False)):
                if getattr(self, name) != unset:
                    raise ValueError(f"{name} is an option of the ray runtime (kind: ray), not of kind {self.kind!r}")
        return self

    @property
    def ray_address(self) -> str:
        return self.address or "auto"


class RouterSpec(_Strict):
    """Where the router listens (KServe v2 over HTTP and gRPC)."""

    host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0, description="a request body that stalls this long between "
                                  "reads is answered 408 and its connection closed (slow or stalled clients)")
    workers: int = Field(default=0, ge=0, description="router processes sharing the ports (SO_REUSEPORT); "
                                                      "0: one per 2 CPU cores, 1 to 8")
    repository_api: bool = Field(
        default=False, description="serve the repository API's load and unload (HTTP /v2/repository/models/{m}/load "
        "and /unload, gRPC RepositoryModelLoad/Unload): they change what runs (the controller re-plans and starts or "
        "stops gpu-lets), so they are off unless set; /v2/repository/index is always served")


class SchedulerSpec(_Strict):
    """Options of the planner (see controlplane.scheduler)."""

    algorithm: str = "gpulet"
    shares: list[int] = Field(default_factory=lambda: [20, 40, 50, 60, 80, 100])
    max_batch: int = Field(default=32, ge=1)
    latency_margin: float = Field(
        default=1.1, ge=1.0,
        description="profiled batch latencies are planned at this multiple: a deployment's batches run slower than the "
                    "profile measured alone (on the H200, five 20 % gpu-lets under load: 1.2-1.45x, docs/benchmarks.md "
                    "'Serving' run 16; its mixes plan with 1.25)")
    burst_pct: float = Field(
        default=0.99, ge=0, lt=1,
        description="plan each model for this quantile of its Poisson arrivals within half its SLO (less "
                    "overhead_ms), per second: what its batches must absorb for a request to wait at most one batch. "
                    "Tight SLOs get the most room: measured on the H200 (docs/benchmarks.md 'Serving', run 9), bert "
                    "(22 ms) held its SLO at ~55 % of the throughput planned at the mean rate, resnet50 (108 ms) at "
                    "over 80 %. 0: plan for the mean rate (the paper)")
    overhead_ms: float = Field(
        default=2.0, ge=0,
        description="time a request spends outside its batch (client to router to tritonserver and back, HTTP "
                    "parsing, waiting in the router's event loop); planned: duty cycle + batch latency + "
                    "overhead_ms <= SLO. The profile times batches inside Triton only")
    interference: bool = True
    colocation: Literal["auto", "turns", "concurrent"] = Field(
        default="auto",
        description="how a gpu-let's models share it. turns: they take turns in a duty cycle, each batch at "
                    "the whole share (the paper's prototype: one process per gpu-let). concurrent: they run "
                    "at once, each at the share: what a gpu-let's tritonserver does on a GPU, where each "
                    "python-backend model instance is a process of its own and CUDA_MPS_ACTIVE_THREAD_PERCENTAGE "
                    "caps each process, not the server (docs/benchmarks.md 'Serving', runs 12 and 13). auto: "
                    "concurrent on a GPU, turns on a CPU (a gpu-let's processes share its cores) and with the "
                    "planners that only plan turns (ideal, ideal-prototype, best). concurrent is planned by "
                    "gpulet, gpulet-paper, temporal, greedy")
    gpulets_per_gpu: int = Field(
        default=2, ge=1, le=16,
        description="most gpu-lets on one GPU (the paper's prototype: 2; the exact optimum with interference "
                    "supports no more). On the H200 a python-backend model's tritonserver is capped by its "
                    "host pipeline (~1,000 resnet50 images/s at any share, docs/benchmarks.md 'Serving'): "
                    "a busy model needs several small gpu-lets, so raise it there")
    gpus: int | None = Field(default=None, ge=1, description="most GPUs the plan may use; default: all devices")
    epoch_s: float | None = Field(
        default=None, gt=0,
        description="re-plan from the measured load (checked every second) and recalibrate the profile every "
                    "epoch_s seconds (the paper: 20); default: serve the file's rates until `controlplane apply`")
    window_s: float = Field(default=30.0, gt=0,
                            description="re-planning uses each model's peak rate over this window; share is given "
                                        "back only when the whole window is well under the plan")

    @field_validator("shares")
    @classmethod
    def _shares_in_range(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 0 < s <= 100]
        if bad:
            raise ValueError(f"shares must be in (0, 100], got {bad}")
        if not v:
            raise ValueError("at least one share is needed")
        return sorted(set(v))


class FleetSpec(_Strict):
    """GPUs to plan for that are not this machine's: `plan`, `compose` and `render k8s` work from it on any
    machine (the profile of that GPU model must exist); `up` refuses it (it runs on the GPUs it has)."""

    gpus: int = Field(ge=1, le=4096, description="how many GPUs")
    model: str = Field(min_length=1, max_length=128, description="GPU model as its profiles name it, e.g. 'H200'")


Devices = Literal["auto", "cpu"] | list[Annotated[int, Field(ge=0)]] | FleetSpec


class Deployment(_Strict):
    """A deployment file: what to serve and where."""

    name: str = Field(default="default", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    models: list[ModelSpec] = Field(default_factory=list, description="models served on their own (at least one "
                                                                        "model or app)")
    devices: Devices = Field(
        default="auto", description="'auto' (GPUs if any, else CPU), 'cpu', a list of GPU indices, or a fleet to "
        "plan for elsewhere: {gpus: N, model: H200}"
    )
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    repository: str | None = Field(default=None, description="source model repository; default: the zoo")
    profiles: str | None = Field(default=None, description="profile directory; default: ./profiles")
    run_dir: str | None = Field(default=None, description="where logs, state and repos go; default <state>/runs/<name> "
                                                               "(~/.local/state/controlplane, or $CONTROLPLANE_STATE)")
    apps: list[AppSpec] = Field(default_factory=list, description="applications: pipelines of models with one "
                                                                   "endpoint and one SLO each")

    @field_validator("runtime", mode="before")
    @classmethod
    def _runtime_shorthand(cls, v: Any) -> Any:
        # `runtime: docker` is shorthand for `runtime: {kind: docker}`.
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _unique_models(self) -> "Deployment":
        if not self.models and not self.apps:
            raise ValueError("models: a deployment serves at least one model or app")
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(f"models[{i}].name: model {m.name!r} is listed twice")
            seen.add(m.name)
        for i, a in enumerate(self.apps):
            if a.name in seen:
                raise ValueError(f"apps[{i}].name: {a.name!r} is a model's name or another app's")
            seen.add(a.name)
        return self

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


# --------------------------------------------------------------------------- plan


class Assignment(_Strict):
    """One model on one gpu-let."""

    model: str
    batch: int = Field(ge=1)
    rate: float = Field(ge=0, description="requests/s this gpu-let is planned to take for the model")
    latency_ms: float = Field(default=0.0, ge=0, description="predicted latency of one batch (interference included)")
    throughput: float = Field(default=0.0, ge=0, description="predicted requests/s this gpu-let can serve")
    duty_cycle_ms: float = Field(default=0.0, ge=0, description="when a gpu-let's models run at once, this "
                                 "model's own cycle: its instance runs one batch of it per cycle (0: the gpu-let's)")


def gpulet_id(device: str, index: int, j: int) -> str:
    """The j-th gpu-let (largest share first) of device number `index`: gpu0-a, gpu0-b, ...; on a CPU
    (device names starting "cpu"), cpu0-a, ..."""
    kind = "cpu" if device.lower().startswith("cpu") else "gpu"
    return f"{kind}{index}-{chr(ord('a') + j) if j < 26 else f'x{j}'}"


class GpuLet(_Strict):
    """A share of one GPU run by one tritonserver, serving one or more models in turn."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="stable name, e.g. gpu0-a (cpu0-a on a CPU)")
    gpu: int = Field(ge=0, description="index of the GPU (or of the virtual CPU device)")
    share: int = Field(gt=0, le=100, description="MPS active-thread percentage (CPU: % of the cores)")
    duty_cycle_ms: float = Field(default=0.0, ge=0, description="time slot shared by the models of this gpu-let "
                                 "(running at once: the longest of their own cycles)")
    models: list[Assignment] = Field(min_length=1)

    def assignment(self, model: str) -> Assignment | None:
        return next((a for a in self.models if a.model == model), None)


class ModelSummary(_Strict):
    """What the plan promises one model."""

    rate: float
    slo_ms: float
    throughput: float = Field(description="predicted requests/s over all its gpu-lets")
    worst_latency_ms: float = Field(description="predicted worst-case latency, queueing in the duty cycle included")


class AppSummary(_Strict):
    """How the plan splits one application's SLO over its steps."""

    rate: float
    slo_ms: float
    budgets_ms: dict[str, float] = Field(description="each step's model -> its share of the SLO")
    critical_path: list[str] = Field(description="the steps whose budgets add up to the SLO")
    fan_out_rows: dict[str, int] = Field(default_factory=dict, description="fan-out step -> rows per request")


class Plan(_Strict):
    """The scheduler's answer: gpu-lets, and who runs where."""

    deployment: str = "default"
    device: str = Field(default="cpu", description="device type the profiles came from, e.g. 'cpu' or 'NVIDIA H100 80GB HBM3'")
    algorithm: str = "trivial"
    colocation: Literal["turns", "concurrent"] = Field(
        default="turns", description="how the plan has a gpu-let's models share it (scheduler.colocation, resolved)")
    gpus: int = Field(ge=0, description="number of GPUs the plan uses")
    gpulets: list[GpuLet]
    models: dict[str, ModelSummary] = Field(default_factory=dict)
    apps: dict[str, AppSummary] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        ids = [g.id for g in self.gpulets]
        if len(ids) != len(set(ids)):
            raise ValueError(f"gpu-let ids must be unique, got {ids}")
        used: dict[int, int] = {}
        for g in self.gpulets:
            used[g.gpu] = used.get(g.gpu, 0) + g.share
        over = {gpu: s for gpu, s in used.items() if s > 100}
        if over:
            raise ValueError(f"shares of one GPU sum to more than 100 %: {over}")
        return self

    def used_share(self, gpu: int) -> int:
        return sum(g.share for g in self.gpulets if g.gpu == gpu)

    def gpulets_for(self, model: str) -> list[GpuLet]:
        return [g for g in self.gpulets if g.assignment(model) is not None]

    def model_names(self) -> list[str]:
        names: list[str] = []
        for g in self.gpulets:
            for a in g.models:
                if a.model not in names:
                    names.append(a.model)
        return names


# --------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    """('models', 1, 'rate') -> 'models[1].rate'"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid"]
    for e in err.errors():
        loc = _loc(tuple(p for p in e["loc"] if not str(p).startswith(("function-", "literal[", "list[int"))))
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "field required"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_deployment(data: Any, source: str = "<deployment>", known_models: list[str] | None = None) -> Deployment:
    """Validate a deployment given as parsed YAML; raise SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        dep = Deployment.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(source, e)) from None
    if known_models is not None:
        for i, m in enumerate(dep.models):
            if m.source not in known_models:
                field = "base" if m.base else "name"
                raise SpecError(
                    f"{source}: invalid\n  models[{i}].{field}: unknown model {m.source!r}; "
                    f"known models: {', '.join(sorted(known_models))}"
                )
    return dep


def load_deployment(path: str | Path, known_models: list[str] | None = None) -> Deployment:
    """Read a deployment YAML file. Errors name the file, the field and the problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{path}: broken YAML{where}: {problem}") from None
    return parse_deployment(data, str(path), known_models)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        return Plan.model_validate_json(path.read_text())
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    except ValidationError as e:
        raise SpecError(format_validation_error(str(path), e)) from None


# --------------------------------------------------------------------------- run state (state.json)


class RouterState(_Strict):
    host: str
    http_port: int
    grpc_port: int


class GpuletState(_Strict):
    """One gpu-let's server as the runtime last reported it."""

    http: str | None = None       # host:port, once started
    grpc: str | None = None
    pid: int | None = None        # process runtime: the server's process group leader
    started: float | None = None  # its start time (psutil), so a reused pid is not taken for it
    container: str | None = None  # docker runtime
    node: str | None = None       # ray runtime: the node's address and id ("10.0.0.5 1a2b3c4d")
    node_gpu: int | None = None   # ray runtime: the GPU's index on that node (None on a CPU)
    restarts: int = 0
    memory_limit_mb: int | None = None   # the most memory each of its processes may hold (runtime.memory_limits)
    log: str | None = None


class RunState(_Strict):
    """A running deployment, written by its controller (``up``) to ``<run dir>/state.json`` and read by
    ``status``, ``logs``, ``loadgen`` and ``down``: what runs where, and the plan it runs."""

    deployment: str
    state: Literal["starting", "ready", "stopping"]
    pid: int                      # the controller's
    started: float | None = None  # the controller's start time (psutil)
    runtime: str
    device: str | None = None
    updated: float = 0.0          # time.time() of the last write
    router: RouterState
    gpulets: dict[str, GpuletState] = Field(default_factory=dict)
    plan: Plan
    replans: int = 0              # plans applied since start (measured load or `apply`)
    last_replan: str | None = None  # when and why the last one was made
    changing: str | None = None   # the change in flight (its reason and since when); None: actual is the plan
    calibration: dict[str, float] = Field(default_factory=dict)  # model -> measured / profile time, planned with
