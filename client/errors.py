"""The client's exceptions: one class per gRPC status, with the server's google.rpc details.

The server sends a ``google.rpc.Status`` in the trailing metadata of a failed call
(``grpc-status-details-bin``) and in a failed job's ``AuditProgress.error``. Its details
say what a program needs to react without parsing the message: ``ErrorInfo`` a stable
``reason`` (domain "cnp.v1"), ``BadRequest`` the spec fields that were wrong
(``spec.prune.rate``), ``RetryInfo`` how long to wait before trying again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# The detail messages the client unpacks; anything else stays a google.protobuf.Any.
_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
    error_details_pb2.DebugInfo,
)


class ServiceError(Exception):
    """A call failed: ``code`` is the gRPC status name, ``message`` the server's message.

    ``audit_id`` names the job the error belongs to when there is one (a refused
    submission is stored as a FAILED job too). From the server's google.rpc details:
    ``reason`` and ``domain`` (ErrorInfo; stable, for programs), ``info`` (ErrorInfo's
    metadata), ``field_violations`` ((field path, description) pairs of a BadRequest,
    e.g. ``("spec.prune.rate", "must be in (0, 1)")``), ``retry_delay`` (seconds the
    server asks a client to wait before trying again, None when it says nothing) and
    ``details`` (every detail message, unpacked where the type is a google.rpc one).
    """

    code = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        audit_id: str = "",
        reason: str = "",
        domain: str = "",
        info: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_delay: float | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.audit_id = audit_id
        self.reason = reason
        self.domain = domain
        self.info = dict(info or {})
        self.field_violations = list(field_violations)
        self.retry_delay = retry_delay
        self.details = list(details)

    @property
    def status_code(self) -> grpc.StatusCode:
        return grpc.StatusCode.__members__.get(self.code, grpc.StatusCode.UNKNOWN)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class OutOfRange(ServiceError):
    code = "OUT_OF_RANGE"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    code = "CANCELLED"


class Aborted(ServiceError):
    code = "ABORTED"


class Internal(ServiceError):
    code = "INTERNAL"


_ERRORS: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        OutOfRange,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Aborted,
        Internal,
    )
}


def code_name(code: Any) -> str:
    """The gRPC status name of a code: a ``grpc.StatusCode``, its number (as in
    ``google.rpc.Status.code``) or its name; "UNKNOWN" for anything else."""
    if code is None:
        return "UNKNOWN"
    name = getattr(code, "name", None)  # grpc.StatusCode or another enum
    if isinstance(name, str):
        return name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return str(code).rsplit(".", 1)[-1].upper()


def error_for(code: str, message: str, *, audit_id: str = "", **details: Any) -> ServiceError:
    """The typed exception for a status code name (ServiceError for codes without a class).
    ``details`` are ServiceError's keyword arguments (reason, field_violations, ...)."""
    cls = _ERRORS.get(code, ServiceError)
    return cls(message, code=code, audit_id=audit_id, **details)


def _unpack(detail: any_pb2.Any) -> Message:
    for cls in _DETAIL_TYPES:
        if detail.Is(cls.DESCRIPTOR):
            message = cls()
            detail.Unpack(message)
            return message
    return detail


def decode_details(details: Iterable[any_pb2.Any]) -> dict[str, Any]:
    """ServiceError's keyword arguments from the details of a ``google.rpc.Status``."""
    decoded = [_unpack(d) for d in details]
    found: dict[str, Any] = {"details": decoded}
    for message in decoded:
        if isinstance(message, error_details_pb2.ErrorInfo):
            found.update(reason=message.reason, domain=message.domain, info=message.metadata)
        elif isinstance(message, error_details_pb2.BadRequest):
            found.setdefault("field_violations", []).extend(
                (v.field, v.description) for v in message.field_violations
            )
        elif isinstance(message, error_details_pb2.RetryInfo):
            found["retry_delay"] = message.retry_delay.ToTimedelta().total_seconds()
    return found


def from_status(status: status_pb2.Status, *, audit_id: str = "") -> ServiceError:
    """The typed error of a ``google.rpc.Status`` (a failed job's ``error``)."""
    code = code_name(status.code)
    return error_for(
        code, status.message or code, audit_id=audit_id, **decode_details(status.details)
    )


def from_rpc_error(err: grpc.RpcError) -> ServiceError:
    """The typed error of a failed call, blocking or asyncio (both are a ``grpc.Call``)."""
    code = err.code().name if err.code() is not None else "UNKNOWN"
    trailing = dict(err.trailing_metadata() or ())
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # details that contradict the call's own status are not trusted
        status = None
    details = decode_details(status.details) if status is not None else {}
    return error_for(
        code, err.details() or code, audit_id=trailing.get("cnp-audit-id", ""), **details
    )
