"""Applications: pipelines of models with one endpoint and one end-to-end SLO (the prototype's *traffic*
and *game*). Pure: the deployment, the repository's tensor declarations and latencies come in as arguments.

* :func:`app_tensors` checks an app against the repository (every step input fed, dtypes and shapes
  equal from producer to consumer) and says its inputs and outputs, each error naming the field.
* :func:`split_slo` divides the app's SLO over its steps in proportion to their latencies, so that the
  budgets along every path from an app input to an app output add up to at most the SLO, and exactly
  to it along the slowest (critical) path — as the prototype split *traffic*'s 202 ms.
* :func:`expand` is the deployment the planner sees: each step's model with the app's rate added to
  its own and its SLO no looser than its budget (models the file does not list are added).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .repository import SourceRepository, TensorInfo
from .spec import AppSpec, Deployment


def _step_of(ref: str) -> str | None:
    return ref.split(".", 1)[0] if "." in ref else None


def levels(app: AppSpec) -> list[list[str]]:
    """The steps' models in rounds that run at once (:meth:`AppSpec.rounds`; its validation refused cycles)."""
    return app.rounds()


def paths(app: AppSpec) -> list[list[str]]:
    """Every chain of steps from one fed by app inputs only to one whose output nobody else takes."""
    feeds: dict[str, set[str]] = {st.model: set() for st in app.steps}       # step -> steps it feeds
    for st in app.steps:
        for r in st.inputs.values():
            if _step_of(r) is not None:
                feeds[_step_of(r)].add(st.model)
    starts = [st.model for st in app.steps if all(_step_of(r) is None for r in st.inputs.values())]
    out: list[list[str]] = []

    def walk(chain: list[str]) -> None:
        nxt = sorted(feeds[chain[-1]])
        if not nxt:
            out.append(chain)
        for n in nxt:
            walk([*chain, n])

    for s in starts:
        walk([s])
    return out


def split_slo(app: AppSpec, latency_ms: Callable[[str], float | None]) -> tuple[dict[str, float], list[str]]:
    """Each step's budget (ms) and the critical path: budget = SLO x latency / (the slowest path through
    the step's total latency); steps without a latency weigh as the mean of the others (1 if none has)."""
    lat = {st.model: latency_ms(st.model) for st in app.steps}
    known = [v for v in lat.values() if v]
    fill = sum(known) / len(known) if known else 1.0
    w = {m: (v if v else fill) for m, v in lat.items()}
    chains = paths(app)
    total = {tuple(c): sum(w[m] for m in c) for c in chains}
    budgets = {}
    for st in app.steps:
        worst = max(t for c, t in total.items() if st.model in c)
        budgets[st.model] = app.slo_ms * w[st.model] / worst
    critical = list(max(total, key=total.get))
    return budgets, critical


def expand(dep: Deployment, budgets: Mapping[str, Mapping[str, float]],
           rows: Mapping[str, Mapping[str, int]] | None = None) -> Deployment:
    """The deployment the planner plans: ``budgets`` is app -> step model -> ms (:func:`split_slo`);
    ``rows``: app -> fan-out step -> rows per request (its model sees the app's rate times that)."""
    doc = dep.model_dump(mode="json", exclude_none=True)
    models = {m["name"]: m for m in doc["models"]}
    for app in dep.apps:
        for st in app.steps:
            budget = budgets[app.name][st.model]
            m = models.get(st.model)
            if m is None:
                m = models[st.model] = {"name": st.model, "rate": 0.0, "slo_ms": budget}
                doc["models"].append(m)
            m["rate"] = m["rate"] + app.rate * (rows or {}).get(app.name, {}).get(st.model, 1)
            m["slo_ms"] = min(m["slo_ms"], budget)
    return Deployment.model_validate(doc)


def app_tensors(app: AppSpec, repo: SourceRepository, where: str = "apps[0]") -> tuple[list[TensorInfo],
                                                                                           list[TensorInfo]]:
    """The app's inputs and outputs (name, dtype, shape without the batch): :func:`check_app`'s."""
    ins, outs, _ = check_app(app, repo, where)
    return ins, outs


def check_app(app: AppSpec, repo: SourceRepository, where: str = "apps[0]"
              ) -> tuple[list[TensorInfo], list[TensorInfo], dict[str, int]]:
    """The app's inputs and outputs (name, dtype, shape without the batch) and each fan-out step's rows
    per request, checked against the repository; ValueError naming the field when a step's model, input
    or output does not exist, a step input is left unfed, or a tensor's dtype or shape differs from what
    feeds it (a fan-out step's inputs: per row)."""
    names = repo.names()
    for i, st in enumerate(app.steps):
        if st.model not in names:
            raise ValueError(f"{where}.steps[{i}].model: no model {st.model!r} in the repository "
                             f"(it has: {', '.join(names)})")

    fanned = {st.model for st in app.steps if st.fan_out}

    def output(ref: str, field: str) -> TensorInfo:
        step, out = ref.split(".", 1)
        t = next((o for o in repo[step].outputs if o.name == out), None)
        if t is None:
            raise ValueError(f"{field}: {step!r} has no output {out!r} (it has: "
                             f"{', '.join(o.name for o in repo[step].outputs)})")
        if step in fanned:            # one row per input row: [K, *o]
            return TensorInfo(t.name, t.datatype, (rows[step], *t.shape))
        return t

    app_inputs: dict[str, TensorInfo] = {}
    rows: dict[str, int] = {}               # fan-out steps: K, the rows per request
    index = {st.model: i for i, st in enumerate(app.steps)}
    for st in (app.steps[index[m]] for level in levels(app) for m in level):   # producers before consumers
        i = index[st.model]
        info = repo[st.model]
        wanted = {t.name: t for t in info.inputs}
        for k, ref in st.inputs.items():
            field = f"{where}.steps[{i}].inputs.{k}"
            if k not in wanted:
                raise ValueError(f"{field}: {st.model!r} has no input {k!r} (it has: {', '.join(wanted)})")
            need = wanted[k]
            src = output(ref, field) if _step_of(ref) is not None else app_inputs.get(ref)
            if src is None:
                if st.fan_out:
                    raise ValueError(f"{field}: a fan-out step takes its inputs from other steps' outputs")
                app_inputs[ref] = TensorInfo(ref, need.datatype, need.shape)
                continue
            shape = tuple(src.shape)
            if st.fan_out:
                if len(shape) < 1 or shape[0] < 1:
                    raise ValueError(f"{field}: fan-out needs {ref!r} to have a fixed first dimension (rows)")
                if rows.setdefault(st.model, shape[0]) != shape[0]:
                    raise ValueError(f"{field}: {ref!r} has {shape[0]} rows, the step's other inputs "
                                     f"{rows[st.model]}")
                shape = shape[1:]
            if (src.datatype, shape) != (need.datatype, tuple(need.shape)):
                raise ValueError(f"{field}: {ref!r} is {src.datatype}{list(shape)}"
                                 f"{' per row' if st.fan_out else ''} but {st.model!r} takes "
                                 f"{need.datatype}{list(need.shape)}")
        missing = [n for n in wanted if n not in st.inputs]
        if missing:
            raise ValueError(f"{where}.steps[{i}].inputs: {st.model!r} needs {', '.join(missing)} too")
    outs = []
    for k, ref in app.outputs.items():
        t = output(ref, f"{where}.outputs.{k}")
        outs.append(TensorInfo(k, t.datatype, tuple(t.shape)))
    return list(app_inputs.values()), outs, rows


def check(dep: Deployment, repo: SourceRepository) -> dict[str, dict[str, int]]:
    """Every app of the deployment against the repository (ValueError naming the field); each app's
    fan-out steps' rows per request."""
    return {app.name: check_app(app, repo, f"apps[{i}]")[2] for i, app in enumerate(dep.apps)}


def planned(dep: Deployment, plan) -> Deployment:
    """The deployment as its plan serves it: :func:`expand` by the plan's split (``plan.apps``)."""
    if not dep.apps:
        return dep
    return expand(dep, {name: a.budgets_ms for name, a in plan.apps.items()},
                  {name: a.fan_out_rows for name, a in plan.apps.items()})
