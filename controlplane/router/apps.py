"""Applications served by the router: one KServe model whose request runs several models' steps.

A request to an app (HTTP, or gRPC re-framed as HTTP by :mod:`.grpc_http`) is parsed once; each round
of steps whose inputs are ready is sent at once, each step a binary KServe request to its model's
gpu-lets through the router's own routing (admission, retries, metrics per model); tensors pass from
one step to the next as the bytes the gpu-let answered, never decoded. The answer has the app's
outputs, binary or JSON as the client asked. A step that fails fails the app request, with the step
named; the app's own requests, successes and SLO attainment are counted beside the models'.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np

from ..repository import TensorInfo
from .clients import HttpAnswer
from .errors import RouterError

Tensor = tuple[str, list[int], bytes]          # datatype, shape (batch first), row-major bytes


@dataclass
class AppRoute:
    """What the router knows of one app: its tensors, its steps in rounds, its SLO."""

    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    sources: dict[str, str]                     # app output -> STEP.OUTPUT
    steps: dict[str, dict[str, str]]            # step model -> {its input: app input or STEP.OUTPUT}
    levels: list[list[str]]
    slo_ms: float
    max_batch_size: int = 0
    version: str = "1"
    fan_out: dict[str, int] | None = None       # fan-out step -> rows per request (K)

    def model_config(self) -> dict:
        """Its configuration in Triton's JSON form: tensors, the largest batch its steps all take, and
        its SLO as the ``slo_ms`` parameter (what `controlplane loadgen` reads)."""
        def tensor(x: TensorInfo) -> dict:
            return {"name": x.name, "data_type": f"TYPE_{'STRING' if x.datatype == 'BYTES' else x.datatype}",
                    "dims": [str(d) for d in x.shape]}

        return {"name": self.name, "platform": "gpulet_app", "max_batch_size": self.max_batch_size,
                "input": [tensor(x) for x in self.inputs], "output": [tensor(x) for x in self.outputs],
                "parameters": {"slo_ms": {"string_value": f"{self.slo_ms:g}"}}}

    def metadata(self) -> dict:
        t = [{"name": x.name, "datatype": x.datatype, "shape": [-1, *x.shape]} for x in self.inputs]
        o = [{"name": x.name, "datatype": x.datatype, "shape": [-1, *x.shape]} for x in self.outputs]
        return {"name": self.name, "versions": [self.version], "platform": "gpulet_app", "inputs": t, "outputs": o}


def _np_dtype(datatype: str):
    from tritonclient.utils import triton_to_np_dtype

    dt = triton_to_np_dtype(datatype)
    if dt is None or datatype == "BYTES":
        raise RouterError(400, f"datatype {datatype} is not supported by apps")
    return np.dtype(dt)


def parse_request(body: bytes, header_len: bytes | None) -> tuple[dict, dict[str, Tensor]]:
    """A KServe v2 HTTP infer request (JSON, or JSON header + binary tensors): its header and tensors."""
    try:
        hlen = int(header_len) if header_len is not None else len(body)
        head = json.loads(body[:hlen])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RouterError(400, "the request is not a KServe v2 infer request (JSON header)") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise RouterError(400, "the request has no 'inputs' list")
    off = hlen
    out: dict[str, Tensor] = {}
    for t in head["inputs"]:
        try:
            name, dt, shape = str(t["name"]), str(t["datatype"]), [int(d) for d in t["shape"]]
        except (KeyError, TypeError, ValueError):
            raise RouterError(400, "each input needs a name, a datatype and a shape") from None
        npdt = _np_dtype(dt)
        n = int(np.prod(shape)) if shape else 1
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = body[off:off + int(size)]
            off += int(size)
        else:
            try:
                raw = np.asarray(t["data"], dtype=npdt).tobytes()
            except (KeyError, TypeError, ValueError):
                raise RouterError(400, f"input {name!r}: no binary data and no 'data' of {dt}") from None
        if len(raw) != n * npdt.itemsize:
            raise RouterError(400, f"input {name!r}: {len(raw)} bytes for shape {shape} of {dt}")
        out[name] = (dt, shape, raw)
    return head, out


def _wants_binary(head: dict) -> bool:
    if (head.get("parameters") or {}).get("binary_data_output"):
        return True
    return any((o.get("parameters") or {}).get("binary_data") for o in head.get("outputs") or [])


async def _step(router, app: AppRoute, model: str, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """One step: its inputs from ``values``, sent as a binary request; its outputs as the bytes answered.
    A fan-out step's inputs [B, K, *s] go as B*K rows of [*s] (the same bytes), in requests of at most
    the model's max batch, sent at once; its outputs come back as [B, K, *o]."""
    rows = (app.fan_out or {}).get(model)
    if rows is None:
        return await _call(router, app, model, {n: values[r] for n, r in app.steps[model].items()})
    flat = {}
    for name, ref in app.steps[model].items():
        dt, shape, raw = values[ref]
        flat[name] = (dt, [shape[0] * shape[1], *shape[2:]], raw)
    n = next(iter(flat.values()))[1][0]
    cap = max(1, router.table.models[model].max_batch_size or n)
    chunks = []
    for lo in range(0, n, cap):
        hi = min(n, lo + cap)
        part = {}
        for name, (dt, shape, raw) in flat.items():
            row = len(raw) // n
            part[name] = (dt, [hi - lo, *shape[1:]], raw[lo * row:hi * row])
        chunks.append(part)
    answers = await asyncio.gather(*(_call(router, app, model, c) for c in chunks))
    out = {}
    b = n // rows
    for key in answers[0]:
        dt, shape, _ = answers[0][key]
        out[key] = (dt, [b, rows, *shape[1:]], b"".join(a[key][2] for a in answers))
    return out


async def _call(router, app: AppRoute, model: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """One binary request to a model's gpu-lets; its outputs as the bytes answered."""
    ins, parts = [], []
    for name, (dt, shape, raw) in inputs.items():
        ins.append({"name": name, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": len(raw)}})
        parts.append(raw)
    head = json.dumps({"inputs": ins, "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/octet-stream"),
               (b"inference-header-content-length", str(len(head)).encode())]
    ans: HttpAnswer = await router.infer_http(model, "", headers, b"".join([head, *parts]))
    if ans.status != 200:
        status = ans.status if ans.status in (400, 503, 504) else 502
        raise RouterError(status, f"app {app.name!r}: step {model!r} failed: {ans.error_message()}")
    out = {}
    for o, data in ans.outputs()[1]:
        if data is None:
            raise RouterError(502, f"app {app.name!r}: step {model!r} answered {o['name']!r} without binary data")
        out[f"{model}.{o['name']}"] = (o["datatype"], list(o["shape"]), data)
    return out


async def run_app(router, app: AppRoute, head_len: bytes | None, body: bytes) -> HttpAnswer:
    """One app request (KServe v2 HTTP body): every step, then the app's answer."""
    mm = router._mm[app.name]
    mm.requests.inc()
    t0 = time.monotonic()
    try:
        ans = await _run(router, app, head_len, body)
    except RouterError:
        mm.done(t0, False)
        raise
    mm.done(t0, True)
    return ans


async def _run(router, app: AppRoute, head_len: bytes | None, body: bytes) -> HttpAnswer:
    head, given = parse_request(body, head_len)
    want = {t.name: t for t in app.inputs}
    if set(given) != set(want):
        raise RouterError(400, f"app {app.name!r} takes inputs {', '.join(want)}; the request has "
                               f"{', '.join(given) or 'none'}")
    batch = None
    for name, (dt, shape, _) in given.items():
        t = want[name]
        if dt != t.datatype or len(shape) != len(t.shape) + 1 or any(
                d != s for d, s in zip(shape[1:], t.shape) if s != -1):
            raise RouterError(400, f"input {name!r}: {dt}{shape}, app {app.name!r} takes {t.datatype}[-1, "
                                   f"{', '.join(map(str, t.shape))}]")
        if batch is not None and shape[0] != batch:
            raise RouterError(400, f"inputs of app {app.name!r} differ in batch size ({batch} and {shape[0]})")
        batch = shape[0]
    values: dict[str, Tensor] = dict(given)
    for level in app.levels:
        for outs in await asyncio.gather(*(_step(router, app, m, values) for m in level)):
            values.update(outs)
    asked = [str(o.get("name")) for o in head.get("outputs") or []] or [t.name for t in app.outputs]
    unknown = [n for n in asked if n not in app.sources]
    if unknown:
        raise RouterError(400, f"app {app.name!r} has no output {', '.join(map(repr, unknown))} (it has "
                               f"{', '.join(app.sources)})")
    outs, parts = [], []
    binary = _wants_binary(head)
    for name in asked:
        dt, shape, raw = values[app.sources[name]]
        if binary:
            outs.append({"name": name, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": len(raw)}})
            parts.append(raw)
        else:
            outs.append({"name": name, "datatype": dt, "shape": shape,
                         "data": np.frombuffer(raw, dtype=_np_dtype(dt)).tolist()})
    doc: dict = {"model_name": app.name, "model_version": app.version, "outputs": outs}
    if "id" in head:
        doc["id"] = head["id"]
    h = json.dumps(doc, separators=(",", ":")).encode()
    if not binary:
        return HttpAnswer(200, [(b"content-type", b"application/json")], h)
    return HttpAnswer(200, [(b"content-type", b"application/octet-stream"),
                            (b"inference-header-content-length", str(len(h)).encode())], b"".join([h, *parts]))
