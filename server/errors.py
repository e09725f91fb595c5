"""The one place that maps exceptions to gRPC status codes.

A :class:`cnp_core.errors.CnpError` carries the name of its code in ``.status`` and a
message that is safe to show. Anything else is a bug: the caller sees INTERNAL with a
correlation id only, and the details (traceback, server paths) go to the server log.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import re
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
    exhausted = _exhausted(exc)
    if exhausted:
        log.warning("job resources exhausted: %s", exc)
        return "RESOURCE_EXHAUSTED", exhausted
    correlation = uuid.uuid4().hex[:12]
    log.error("internal error (correlation id %s)", correlation, exc_info=exc)
    return "INTERNAL", f"internal error (correlation id {correlation})"


def _exhausted(exc: BaseException) -> str:
    """The message for a job that ran out of memory or disk, '' for anything else."""
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and _OUT_OF_MEMORY.search(str(exc))
    ):
        return (
            "the job ran out of memory (the worker's limit, worker_memory_bytes, or the "
            "machine's): audit fewer or smaller images (fit_images, batch_size) or raise it"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the server's disk for the job's files: free some and retry"
    return ""


# torch's allocators say so in RuntimeErrors (OutOfMemoryError for CUDA is one).
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)


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
