"""The one place that maps exceptions to gRPC status codes.

A :class:`cnp_core.errors.CnpError` carries the name of its code in ``.status`` and a
message that is safe to show. Anything else is a bug: the caller sees INTERNAL with a
correlation id only, and the details (traceback, server paths) go to the server log.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from cnp_core.errors import CnpError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class BadRequest(CnpError):
    """A request field (not the spec) is malformed: a page token, a filter, an offset."""

    status = "INVALID_ARGUMENT"


class NotFound(CnpError):
    status = "NOT_FOUND"


class WrongState(CnpError):
    """The job is not in a state that allows the request (e.g. a report before success)."""

    status = "FAILED_PRECONDITION"


class QueueFull(CnpError):
    status = "RESOURCE_EXHAUSTED"


class PermissionDenied(CnpError):
    status = "PERMISSION_DENIED"


class ShuttingDown(CnpError):
    status = "UNAVAILABLE"


class OutOfRange(CnpError):
    status = "OUT_OF_RANGE"


class StageTimeout(CnpError):
    status = "DEADLINE_EXCEEDED"


class Aborted(CnpError):
    """The job was interrupted too often (server restarts) and was given up."""

    status = "ABORTED"


def classify(exc: BaseException) -> tuple[str, str]:
    """(status code name, message safe to show) for any exception.

    Unknown exceptions are logged here with a fresh correlation id, which is all the
    caller learns about them.
    """
    if isinstance(exc, CnpError):
        name = exc.status if exc.status in grpc.StatusCode.__members__ else "INVALID_ARGUMENT"
        return name, str(exc) or type(exc).__name__
    correlation = uuid.uuid4().hex[:12]
    log.error("internal error (correlation id %s)", correlation, exc_info=exc)
    return "INTERNAL", f"internal error (correlation id {correlation})"


def code_of(name: str) -> grpc.StatusCode:
    """grpc.StatusCode for a code name; unknown names read as UNKNOWN."""
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)


def code_number(name: str) -> int:
    """The numeric gRPC code (as in google.rpc.Status.code) for a code name."""
    return code_of(name).value[0]


def rpc_errors(method: F) -> F:
    """Decorate a servicer method so every exception ends as a proper status.

    ``context.abort`` raises, so it is called outside the ``try`` that caught the error.
    Works for unary methods and for server-streaming (generator) methods.
    """
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
                return
            except Exception as exc:
                code, message = classify(exc)
            context.abort(code_of(code), message)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code, message = classify(exc)
        context.abort(code_of(code), message)

    return unary  # type: ignore[return-value]
