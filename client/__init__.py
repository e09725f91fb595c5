"""cnp_client: the Python client of the cnp audit service (grpcio + protobuf, no torch).

``AuditClient`` blocks; ``AsyncAuditClient`` (``cnp_client.aio``) is the same for asyncio.
"""

from cnp_core.spec import AuditSpec, DatasetRef, ModelRef, PruneSpec

from .aio import AsyncAuditClient
from .client import (
    Aborted,
    AlreadyExists,
    Artifact,
    AuditClient,
    AuditReportView,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Job,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Progress,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    error_for,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Artifact",
    "AsyncAuditClient",
    "AuditClient",
    "AuditReportView",
    "AuditSpec",
    "Cancelled",
    "DatasetRef",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Job",
    "ModelRef",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Progress",
    "PruneSpec",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "error_for",
]
