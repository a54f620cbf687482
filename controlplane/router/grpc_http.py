"""gRPC infer requests forwarded to a gpu-let over HTTP: the same request, a cheaper hop.

The router's gRPC front end costs about three times its HTTP one per request
(``benchmarks/router_cpu.py``: grpc.aio's server *and* client calls; the HTTP
client is a bare asyncio protocol). So a ``ModelInferRequest`` whose tensors
come as ``raw_input_contents`` (what tritonclient sends) is re-framed as Triton's
HTTP binary request — a small JSON header, then the same tensor bytes — and the
HTTP answer re-framed as a ``ModelInferResponse``. Tensor bytes are never
decoded. Requests with typed ``contents`` go to the gpu-let over gRPC as they came.
"""

from __future__ import annotations

import json

import grpc
from tritonclient.grpc import service_pb2 as pb

from .clients import HttpAnswer
from .errors import RouterError

_HTTP_TO_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                 503: grpc.StatusCode.UNAVAILABLE, 500: grpc.StatusCode.INTERNAL,
                 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def _value(p: pb.InferParameter):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _params(m) -> dict:
    return {k: _value(v) for k, v in m.items()}


def _set_params(target, params: dict) -> None:
    for k, v in params.items():
        p = target[k]
        if isinstance(v, bool):
            p.bool_param = v
        elif isinstance(v, int):
            p.int64_param = v
        elif isinstance(v, float):
            p.double_param = v
        else:
            p.string_param = str(v)


def to_http(request: bytes) -> tuple[pb.ModelInferRequest, list[tuple[bytes, bytes]], bytes] | None:
    """The parsed request, and the HTTP headers and body of the same request; None when its tensors are
    not all in ``raw_input_contents`` (then it goes over gRPC as it came)."""
    try:
        req = pb.ModelInferRequest.FromString(request)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise RouterError(400, f"malformed ModelInferRequest: {e}") from None
    raw = req.raw_input_contents
    if not req.inputs or len(raw) != len(req.inputs):
        return None
    inputs = []
    for t, data in zip(req.inputs, raw):
        inputs.append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                       "parameters": {**_params(t.parameters), "binary_data_size": len(data)}})
    head: dict = {"inputs": inputs}
    params = _params(req.parameters)
    if req.outputs:
        head["outputs"] = [{"name": o.name, "parameters": {**_params(o.parameters), "binary_data": True}}
                           for o in req.outputs]
    else:
        params["binary_data_output"] = True
    if params:
        head["parameters"] = params
    if req.id:
        head["id"] = req.id
    h = json.dumps(head, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/octet-stream"), (b"inference-header-content-length", str(len(h)).encode())]
    return req, headers, b"".join([h, *raw])


def to_grpc(ans: HttpAnswer) -> bytes:
    """Triton's HTTP answer as a serialized ModelInferResponse; its errors as :class:`RouterError`."""
    if ans.status != 200:
        code = _HTTP_TO_GRPC.get(ans.status, grpc.StatusCode.INTERNAL)
        raise RouterError(ans.status if ans.status in _HTTP_TO_GRPC else 502, ans.error_message(), code)
    head, outputs = ans.outputs()
    resp = pb.ModelInferResponse(model_name=head.get("model_name", ""), model_version=head.get("model_version", ""),
                                 id=head.get("id", ""))
    _set_params(resp.parameters, head.get("parameters") or {})
    for o, data in outputs:
        t = resp.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        params = dict(o.get("parameters") or {})
        params.pop("binary_data_size", None)
        _set_params(t.parameters, params)
        if data is None:
            raise RouterError(502, f"the gpu-let answered output {o['name']!r} without binary data")
        resp.raw_output_contents.append(data)
    return resp.SerializeToString()
