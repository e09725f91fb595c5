"""The one place that maps exceptions to gRPC statuses and their google.rpc error details.

A :class:`cnp_core.errors.CnpError` carries the name of its code in ``.status``, a stable
``.reason``, optionally the spec ``.field`` at fault, and a message that is safe to show.
Anything else is a bug: the caller sees INTERNAL with a correlation id only, and the
details (traceback, server paths) go to the server log.

Every error leaves the service as a ``google.rpc.Status`` (in the trailer
``grpc-status-details-bin``, which grpcio-status and every language's gRPC library
decode) whose details are

- ``ErrorInfo``: ``reason`` (e.g. ``INVALID_SPEC``, ``QUEUE_FULL``), domain ``cnp.v1``,
  metadata such as the ``audit_id`` or the server ``setting`` that set the limit;
- ``BadRequest``: when one request field is at fault, its path (``spec.prune.rate``,
  ``spec.layers[0]``, ``page_size``);
- ``RetryInfo``: when retrying the same request later can succeed (a full queue, a server
  shutting down); its absence means: change the request first.

A failed job's ``AuditProgress.error`` carries the same status: the store keeps
:meth:`Failure.details_json` beside the code and message, :func:`stored_failure` reads it
back.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import inspect
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from cnp_core.convert import audit_id_of
from cnp_core.errors import CnpError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

DOMAIN = "cnp.v1"  # ErrorInfo.domain: the API whose reasons these are
DETAILS_KEY = "grpc-status-details-bin"  # the trailer that carries the google.rpc.Status
_METADATA_CHARS = 256  # request values echoed in ErrorInfo.metadata are cut to this

# Codes whose errors are retryable by nature, for errors that name no delay themselves.
_DEFAULT_RETRY_SECONDS = {"RESOURCE_EXHAUSTED": 5.0, "UNAVAILABLE": 15.0}


class ServiceError(CnpError):
    """Base of the service's own errors (the engine's are in :mod:`cnp_core.errors`).

    ``request_field``: the request field at fault when it is not in the spec (``page_size``,
    ``filter``, ``offset``); a spec field goes in ``field`` (``model.factory``), as for the
    engine's errors. ``metadata`` adds to ErrorInfo's (the class's own come first).
    ``retry_after``: seconds after which the same request may succeed; None: not
    retryable as it is (RESOURCE_EXHAUSTED and UNAVAILABLE then default to a few seconds).
    """

    reason = ""
    retry_after: float | None = None
    metadata: Mapping[str, str] = MappingProxyType({})

    def __init__(
        self,
        *args: object,
        field: str = "",
        request_field: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(*args, field=field)
        self.request_field = request_field
        self.metadata = {**type(self).metadata, **(metadata or {})}


class BadRequest(ServiceError):
    """A request field (not the spec) is malformed: a page token, a filter, an offset."""

    status = "INVALID_ARGUMENT"
    reason = "INVALID_REQUEST"


class NotFound(ServiceError):
    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class WrongState(ServiceError):
    """The job is not in a state that allows the request (e.g. a report before success)."""

    status = "FAILED_PRECONDITION"
    reason = "WRONG_STATE"


class QueueFull(ServiceError):
    status = "RESOURCE_EXHAUSTED"
    reason = "QUEUE_FULL"
    retry_after = 5.0  # a queued job starts within seconds on a busy server
    metadata = MappingProxyType({"setting": "max_queued"})


class TooManyStreams(ServiceError):
    """Too many long calls (WatchAudit, WaitOperation, ReadArtifact) are open; the raise
    site names the setting that limits them (``max_streams_per_client``, ``rpc_threads``)."""

    status = "RESOURCE_EXHAUSTED"
    reason = "TOO_MANY_STREAMS"
    retry_after = 2.0  # streams end as watched jobs finish or clients go away


class PermissionDenied(ServiceError):
    status = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class FactoryNotAllowed(PermissionDenied):
    """The spec names a model factory the operator did not list."""

    reason = "FACTORY_NOT_ALLOWED"
    metadata = MappingProxyType({"setting": "allow_factories"})


class PathOutsideRoots(PermissionDenied):
    """A weights or dataset path lies outside the roots the operator allows."""

    reason = "PATH_OUTSIDE_ROOTS"
    metadata = MappingProxyType({"setting": "allow_roots"})


class ShuttingDown(ServiceError):
    status = "UNAVAILABLE"
    reason = "SHUTTING_DOWN"
    retry_after = 15.0  # another replica, or this one restarted; longer than a full queue


class OutOfRange(ServiceError):
    status = "OUT_OF_RANGE"
    reason = "OUT_OF_RANGE"


class StageTimeout(ServiceError):
    status = "DEADLINE_EXCEEDED"
    reason = "STAGE_TIMEOUT"
    metadata = MappingProxyType({"setting": "stage_timeouts"})


class Aborted(ServiceError):
    """The job was interrupted too often (server restarts) and was given up."""

    status = "ABORTED"
    reason = "TOO_MANY_ATTEMPTS"
    metadata = MappingProxyType({"setting": "max_attempts"})


@dataclasses.dataclass(frozen=True)
class Failure:
    """An error as the API reports it: code, message, and what its details say."""

    code: str  # a grpc.StatusCode name
    message: str
    reason: str  # ErrorInfo.reason
    field_path: str = ""  # BadRequest: the request field at fault, e.g. spec.prune.rate
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    retry_after: float | None = None  # RetryInfo.retry_delay in seconds

    def status(self) -> status_pb2.Status:
        """The google.rpc.Status: ErrorInfo, then BadRequest and RetryInfo when they apply."""
        details: list[Any] = [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata)
            )
        ]
        if self.field_path:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=self.field_path, description=self.message
                        )
                    ]
                )
            )
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        status = status_pb2.Status(code=code_number(self.code), message=self.message)
        for detail in details:
            status.details.add().Pack(detail)
        return status

    def with_metadata(self, extra: Mapping[str, str]) -> Failure:
        """This failure with ``extra`` added to ErrorInfo.metadata (its own values win)."""
        return dataclasses.replace(self, metadata={**extra, **self.metadata})

    def record(self) -> tuple[str, str, str]:
        """(code, message, details_json) as the job store keeps a job's error."""
        return self.code, self.message, self.details_json()

    def details_json(self) -> str:
        """What the job store keeps beside code and message to rebuild the details."""
        return json.dumps(
            {
                "reason": self.reason,
                "field_path": self.field_path,
                "metadata": dict(self.metadata),
                "retry_after": self.retry_after,
            },
            sort_keys=True,
        )


def stored_failure(code: str, message: str, details_json: str = "") -> Failure:
    """A failure the job store recorded (code, message, :meth:`Failure.details_json`).

    Records without details (written before details existed, or by a cancellation) get an
    ErrorInfo whose reason is the code's name.
    """
    details = json.loads(details_json) if details_json else {}
    return Failure(
        code=code,
        message=message,
        reason=details.get("reason") or code,
        field_path=details.get("field_path", ""),
        metadata=details.get("metadata", {}),
        retry_after=details.get("retry_after"),
    )


class StoredError(CnpError):
    """Raise a stored failure again (a refused CreateAudit and every retry of it)."""

    def __init__(self, failure: Failure, *, audit_id: str = "") -> None:
        super().__init__(failure.message)
        self.status = failure.code
        self.failure = failure.with_metadata({"audit_id": audit_id}) if audit_id else failure


def describe(exc: BaseException) -> Failure:
    """The failure the API reports for any exception.

    Unknown exceptions are logged here with a fresh correlation id, which is all the
    caller learns about them.
    """
    if isinstance(exc, StoredError):
        return exc.failure
    if isinstance(exc, CnpError):
        return _describe_known(exc)
    exhausted = _exhausted(exc)
    if exhausted is not None:
        log.warning("job resources exhausted: %s", exc)
        return exhausted
    correlation = uuid.uuid4().hex[:12]
    log.error("internal error (correlation id %s)", correlation, exc_info=exc)
    return Failure(
        code="INTERNAL",
        message=f"internal error (correlation id {correlation})",
        reason="INTERNAL",
        metadata={"correlation_id": correlation},
    )


def _describe_known(exc: CnpError) -> Failure:
    code = exc.status if exc.status in grpc.StatusCode.__members__ else "INVALID_ARGUMENT"
    spec_field = getattr(exc, "field", "")
    request_field = getattr(exc, "request_field", "")
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is None and getattr(exc, "retryable", True):
        retry_after = _DEFAULT_RETRY_SECONDS.get(code)
    return Failure(
        code=code,
        message=str(exc) or type(exc).__name__,
        reason=getattr(exc, "reason", "") or code,
        # The engine names spec fields (prune.rate); the request holds the spec in `spec`.
        field_path=f"spec.{spec_field}" if spec_field else request_field,
        metadata=dict(getattr(exc, "metadata", {})),
        retry_after=retry_after,
    )


def classify(exc: BaseException) -> tuple[str, str]:
    """(status code name, message safe to show) for any exception; see :func:`describe`."""
    failure = describe(exc)
    return failure.code, failure.message


def _exhausted(exc: BaseException) -> Failure | None:
    """The failure of a job that ran out of memory or disk, None for anything else.

    No RetryInfo: the same job would run out again; the message says what to change.
    """
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and _OUT_OF_MEMORY.search(str(exc))
    ):
        return Failure(
            code="RESOURCE_EXHAUSTED",
            message=(
                "the job ran out of memory (the worker's limit, worker_memory_bytes, or the "
                "machine's): audit fewer or smaller images (fit_images, batch_size) or raise it"
            ),
            reason="OUT_OF_MEMORY",
            metadata={"setting": "worker_memory_bytes"},
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Failure(
            code="RESOURCE_EXHAUSTED",
            message="no space left on the server's disk for the job's files: free some and retry",
            reason="DISK_FULL",
        )
    return None


# torch's allocators say so in RuntimeErrors (OutOfMemoryError for CUDA is one).
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)


def code_of(name: str) -> grpc.StatusCode:
    """grpc.StatusCode for a code name; unknown names read as UNKNOWN."""
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)


def code_number(name: str) -> int:
    """The numeric gRPC code (as in google.rpc.Status.code) for a code name."""
    return code_of(name).value[0]


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status
):
    """The status ``abort_with_status`` takes (grpc.Status is an interface only)."""


def abort(context: grpc.ServicerContext, failure: Failure) -> None:
    """End the call with ``failure``: its code and message, and its details in the trailer.

    Trailing metadata set before (e.g. ``cnp-audit-id``) is kept: ``abort_with_status``
    alone would replace it.
    """
    status = rpc_status.to_status(failure.status())
    kept = tuple(
        (key, value) for key, value in (context.trailing_metadata() or ()) if key != DETAILS_KEY
    )
    context.abort_with_status(
        _Status(status.code, status.details, kept + tuple(status.trailing_metadata))
    )  # raises: the call ends here


def _about(request: Any) -> dict[str, str]:
    """ErrorInfo metadata naming what the request is about: its audit and request id."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return {}
    fields = descriptor.fields_by_name
    found = {
        "audit_id": request.audit_id if "audit_id" in fields else "",
        "request_id": request.request_id if "request_id" in fields else "",
    }
    if descriptor.full_name.startswith("google.longrunning.") and "name" in fields:
        found["audit_id"] = audit_id_of(request.name)  # operations/<audit id>
    return {key: value[:_METADATA_CHARS] for key, value in found.items() if value}


def rpc_errors(method: F) -> F:
    """Decorate a servicer method so every exception ends as a status with details.

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
                failure = describe(exc)
            abort(context, failure.with_metadata(_about(request)))

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            failure = describe(exc)
        abort(context, failure.with_metadata(_about(request)))

    return unary  # type: ignore[return-value]
