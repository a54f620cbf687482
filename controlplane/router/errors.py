"""The errors the router answers clients with, and how it reads a gpu-let's errors."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    """An error to return to the client: HTTP status, gRPC code and a message."""

    _GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED,
             404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
             413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
             503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
             502: grpc.StatusCode.INTERNAL, 500: grpc.StatusCode.INTERNAL,
             408: grpc.StatusCode.DEADLINE_EXCEEDED}     # last: DEADLINE_EXCEEDED maps back to 504
    _HTTP = {v: k for k, v in reversed(_GRPC.items())}

    def __init__(self, status: int, message: str, grpc_code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.grpc_code = grpc_code or self._GRPC.get(status, grpc.StatusCode.INTERNAL)

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str) -> "RouterError":
        return cls(cls._HTTP.get(code, 502), message, code)


class Dropped(RouterError):
    """Refused because it cannot meet its deadline: its gpu-lets hold as many requests as they can
    finish within the SLO (or a gpu-let's queue policy rejected it)."""


def is_deadline_reject(message: str) -> bool:
    """Whether a gpu-let's error is a queue policy rejecting a request that waited past its timeout
    (a user's own Triton config may carry one)."""
    return "timeout" in message.lower() and "expired" in message.lower()


def is_parse_error(message: str) -> bool:
    """Whether a gpu-let's error is Triton failing to parse the request: a client error, though Triton 2.51
    answers some of them HTTP 500 / gRPC INTERNAL ("failed to parse the request JSON buffer", "Unable to
    parse 'inputs'", "Unable to parse request", and its JSON reader's "attempt to access ..." / "attempt to get
    members for non-object"). The router answers them 400 / INVALID_ARGUMENT."""
    m = message.lower()
    return "parse" in m or "attempt to " in m


class GpuletUnhealthy(ConnectionError):
    """A gpu-let answered that it cannot run the model (its python-backend stub is gone): the request
    is sent to another gpu-let of the model, and this one is skipped for it (its readiness still says yes)."""


def is_stub_dead(message: str) -> bool:
    """Whether a gpu-let's error says the model's python-backend stub died ("Stub process ... is not
    healthy"): Triton keeps answering ready, so only the controller's restart brings it back."""
    m = message.lower()
    return "stub process" in m and "not healthy" in m
