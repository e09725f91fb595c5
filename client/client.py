"""The Python client of the cnp audit service. Needs grpcio and protobuf only (no torch).

    from cnp_client import AuditClient
    from cnp_core.spec import AuditSpec, DatasetRef, ModelRef

    with AuditClient("127.0.0.1:50051") as client:
        report = client.audit(spec)              # submit + wait; raises on failure
        print(report.to_json())

Long jobs: ``submit`` returns a :class:`Job` at once; ``watch`` yields :class:`Progress`;
``wait``, ``cancel``, ``get`` and ``list`` manage jobs; ``download_artifact`` streams a file.
Calls are retried on UNAVAILABLE only (bounded, exponential backoff; submissions carry a
request id so a retried submit cannot create a second job). Every other status raises
a :class:`ServiceError` subclass carrying the gRPC code and the server's message.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from cnp.v1 import report_pb2, service_pb2, service_pb2_grpc
from cnp_core import convert
from cnp_core.paths import read_secret
from cnp_core.results import AuditResult
from cnp_core.spec import AuditSpec

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024
_FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


# --- errors ---------------------------------------------------------------------------


class ServiceError(Exception):
    """A call failed: ``code`` is the gRPC status name, ``message`` the server's message.

    ``audit_id`` names the job the error belongs to when there is one (a refused
    submission is stored as a FAILED job too).
    """

    code = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None, audit_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.audit_id = audit_id

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


def error_for(code: str, message: str, *, audit_id: str = "") -> ServiceError:
    """The typed exception for a status code name (ServiceError for codes without a class)."""
    cls = _ERRORS.get(code, ServiceError)
    return cls(message, code=code, audit_id=audit_id)


def _from_rpc(err: grpc.RpcError) -> ServiceError:
    code = err.code().name if err.code() is not None else "UNKNOWN"
    trailing = dict(err.trailing_metadata() or ())
    return error_for(code, err.details() or code, audit_id=trailing.get("cnp-audit-id", ""))


# --- results --------------------------------------------------------------------------


def _time(stamp: Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


@dataclass(frozen=True)
class Progress:
    """One update of a running job (what ``watch`` yields)."""

    audit_id: str
    state: str
    stage: str
    progress: float
    message: str
    attempt: int
    error_code: str = ""
    error_message: str = ""

    @property
    def done(self) -> bool:
        return self.state in _FINAL

    @classmethod
    def from_proto(cls, p: service_pb2.AuditProgress) -> Progress:
        has_error = p.HasField("error")
        return cls(
            audit_id=p.audit_id,
            state=service_pb2.State.Name(p.state),
            stage=p.stage,
            progress=p.progress,
            message=p.message,
            attempt=p.attempt,
            error_code=code_name(p.error.code) if has_error else "",
            error_message=p.error.message if has_error else "",
        )


@dataclass(frozen=True)
class Job:
    """A job as the server last reported it."""

    id: str
    state: str
    stage: str
    progress: float
    message: str
    attempt: int
    request_id: str
    error_code: str
    error_message: str
    cancel_requested: bool
    mlflow_run_id: str
    created: datetime | None
    started: datetime | None
    updated: datetime | None
    finished: datetime | None
    # The MLflow record: "", "pending", "done" or "failed" (tracking_error says why).
    tracking_state: str = ""
    tracking_error: str = ""

    @property
    def name(self) -> str:
        """The long-running operation name (``operations/<id>``)."""
        return convert.operation_name(self.id)

    @property
    def done(self) -> bool:
        return self.state in _FINAL

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"

    def error(self) -> ServiceError | None:
        """The typed error of a FAILED or CANCELLED job (None otherwise)."""
        if not self.error_code:
            return None
        return error_for(self.error_code, self.error_message, audit_id=self.id)

    @classmethod
    def from_operation(cls, operation: operations_pb2.Operation) -> Job:
        p = service_pb2.AuditProgress()
        operation.metadata.Unpack(p)
        progress = Progress.from_proto(p)
        return cls(
            id=p.audit_id,
            state=progress.state,
            stage=p.stage,
            progress=p.progress,
            message=p.message,
            attempt=p.attempt,
            request_id=p.request_id,
            error_code=progress.error_code,
            error_message=progress.error_message,
            cancel_requested=p.cancel_requested,
            mlflow_run_id=p.mlflow_run_id,
            created=_time(p.create_time, p.HasField("create_time")),
            started=_time(p.start_time, p.HasField("start_time")),
            updated=_time(p.update_time, p.HasField("update_time")),
            finished=_time(p.end_time, p.HasField("end_time")),
            tracking_state=p.tracking_state,
            tracking_error=p.tracking_error,
        )


@dataclass(frozen=True)
class Artifact:
    name: str
    size: int
    sha256: str
    content_type: str


class AuditReportView:
    """The typed report: the ``cnp.v1.AuditReport`` message with a few conveniences.

    ``report.proto.attributes[0].subspaces[2].ap_attribute.value`` reads the message;
    ``to_json()`` is the canonical JSON, ``to_result()`` the library's dataclasses.
    """

    def __init__(self, proto: report_pb2.AuditReport) -> None:
        self.proto = proto

    @property
    def audit_id(self) -> str:
        return self.proto.audit_id

    @property
    def attributes(self) -> Any:
        return self.proto.attributes

    @property
    def before(self) -> report_pb2.Evaluation | None:
        return self.proto.before if self.proto.HasField("before") else None

    @property
    def after(self) -> report_pb2.Evaluation | None:
        return self.proto.after if self.proto.HasField("after") else None

    @property
    def spec(self) -> AuditSpec:
        return convert.spec_from_proto(self.proto.spec)

    @property
    def artifacts(self) -> list[Artifact]:
        return [Artifact(a.name, a.size, a.sha256, a.content_type) for a in self.proto.artifacts]

    def flagged(self) -> dict[str, int]:
        """``"attribute=value@layer"`` -> flagged subspace index (-1 when none)."""
        return {
            f"{a.attribute}={a.value}@{a.layer}": a.flagged_subspace for a in self.proto.attributes
        }

    def to_json(self, indent: int | None = 2) -> str:
        return convert.report_to_json(self.proto, indent=indent)

    def to_dict(self) -> dict[str, Any]:
        return convert.report_to_dict(self.proto)

    def to_result(self) -> AuditResult:
        return convert.result_from_proto(self.proto)

    def __repr__(self) -> str:
        return (
            f"AuditReportView(audit_id={self.audit_id!r}, attributes={len(self.proto.attributes)})"
        )


# --- the client -----------------------------------------------------------------------


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


def default_token(
    token: str | None = None, token_file: str | os.PathLike | None = None
) -> str | None:
    """The bearer token: argument, file argument, $CNP_TOKEN, $CNP_TOKEN_FILE, then the
    embedded server's token file ($CNP_DATA_DIR/token or ./.cnp/token) if it exists."""
    if token:
        return token
    if token_file:
        return read_secret(token_file, "token file", PermissionError)
    if os.environ.get("CNP_TOKEN"):
        return os.environ["CNP_TOKEN"]
    if os.environ.get("CNP_TOKEN_FILE"):
        return read_secret(os.environ["CNP_TOKEN_FILE"], "token file", PermissionError)
    local = Path(os.environ.get("CNP_DATA_DIR", ".cnp")).expanduser() / "token"
    return read_secret(local, "token file", PermissionError) if local.is_file() else None


class AuditClient:
    """A connection to one cnp server.

    ``root_certificates`` (PEM bytes or a file path) switches to TLS; with
    ``client_certificate`` and ``client_key`` (PEM bytes or paths) the client proves its
    identity too, for a server that requires client certificates (mutual TLS).
    ``timeout`` bounds every unary call; ``retries`` is how often an UNAVAILABLE call is
    tried again.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        root_certificates: bytes | str | os.PathLike | None = None,
        client_certificate: bytes | str | os.PathLike | None = None,
        client_key: bytes | str | os.PathLike | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
    ) -> None:
        self.address, self.timeout, self.retries, self.backoff = address, timeout, retries, backoff
        token = default_token(token, token_file)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if (client_certificate is None) != (client_key is None):
            raise ValueError("client_certificate and client_key go together")
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates),
                private_key=_pem(client_key),
                certificate_chain=_pem(client_certificate),
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        elif client_certificate is not None:
            raise ValueError("a client certificate needs TLS: give root_certificates too")
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._audit = service_pb2_grpc.ConceptAuditStub(self._channel)
        self._operations = operations_pb2_grpc.OperationsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AuditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------

    def _retrying(self, attempt: Callable[[], Any]) -> Any:
        delay = self.backoff
        for tries in range(self.retries + 1):
            try:
                return attempt()
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE and tries < self.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 8.0)
                    continue
                raise _from_rpc(err) from None
        raise AssertionError("unreachable")

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        return self._retrying(
            lambda: method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        )

    # --- jobs -------------------------------------------------------------------------

    def submit(self, spec: AuditSpec, request_id: str | None = None) -> Job:
        """Queue an audit; returns at once. A retry with the same request id is the same job."""
        request = service_pb2.CreateAuditRequest(
            spec=convert.spec_to_proto(spec), request_id=request_id or uuid.uuid4().hex
        )
        return Job.from_operation(self._call(self._audit.CreateAudit, request))

    def get(self, job_id: str) -> Job:
        request = operations_pb2.GetOperationRequest(name=convert.operation_name(job_id))
        return Job.from_operation(self._call(self._operations.GetOperation, request))

    def list(
        self, page_size: int = 50, *, state: str | None = None, limit: int | None = None
    ) -> list[Job]:
        """Jobs, newest first (all pages, or the first ``limit``)."""
        jobs: list[Job] = []
        token = ""
        while True:
            request = operations_pb2.ListOperationsRequest(
                name="operations",
                page_size=page_size,
                page_token=token,
                filter=f"state={state}" if state else "",
            )
            response = self._call(self._operations.ListOperations, request)
            jobs += [Job.from_operation(op) for op in response.operations]
            token = response.next_page_token
            if not token or (limit is not None and len(jobs) >= limit):
                return jobs[:limit] if limit is not None else jobs

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop (queued: at once; running: at its next check). Returns its state."""
        request = operations_pb2.CancelOperationRequest(name=convert.operation_name(job_id))
        self._call(self._operations.CancelOperation, request)
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        """Forget a finished job and its files (its MLflow run stays)."""
        request = operations_pb2.DeleteOperationRequest(name=convert.operation_name(job_id))
        self._call(self._operations.DeleteOperation, request)

    def watch(self, job_id: str) -> Iterator[Progress]:
        """Progress updates until the job is final (the last one carries the final state)."""
        request = service_pb2.WatchAuditRequest(audit_id=job_id)
        failures = 0
        while True:
            try:
                for update in self._audit.WatchAudit(request, metadata=self._metadata):
                    failures = 0
                    progress = Progress.from_proto(update)
                    yield progress
                    if progress.done:
                        return
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                    raise _from_rpc(err) from None
                time.sleep(self.backoff * 2**failures)
                failures += 1

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is final; DeadlineExceeded after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 60.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                job = self.get(job_id)
                if job.done:
                    return job
                raise DeadlineExceeded(
                    f"audit {job_id} still {job.state} after {timeout:g} s", audit_id=job_id
                )
            wait = min(left, 60.0)
            duration = Duration()
            duration.FromNanoseconds(int(wait * 1e9))
            request = operations_pb2.WaitOperationRequest(
                name=convert.operation_name(job_id), timeout=duration
            )
            job = Job.from_operation(
                self._call(self._operations.WaitOperation, request, timeout=wait + 10.0)
            )
            if job.done:
                return job

    def report(self, job_id: str) -> AuditReportView:
        """The report of a SUCCEEDED job (FailedPrecondition before)."""
        request = service_pb2.GetAuditReportRequest(audit_id=job_id)
        return AuditReportView(self._call(self._audit.GetAuditReport, request))

    def audit(
        self, spec: AuditSpec, *, request_id: str | None = None, timeout: float | None = None
    ) -> AuditReportView:
        """Submit and wait; the report, or the job's typed error (e.g. InvalidArgument)."""
        job = self.wait(self.submit(spec, request_id=request_id).id, timeout=timeout)
        if not job.succeeded:
            raise job.error() or Internal(f"audit {job.id} ended {job.state}", audit_id=job.id)
        return self.report(job.id)

    def metadata(self) -> service_pb2.ServerMetadata:
        """Version, limits, architectures, formats, methods and composites of the server."""
        return self._call(self._audit.GetServerMetadata, service_pb2.GetServerMetadataRequest())

    # --- artifacts --------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[Artifact]:
        request = service_pb2.ListArtifactsRequest(audit_id=job_id)
        response = self._call(self._audit.ListArtifacts, request)
        return [Artifact(a.name, a.size, a.sha256, a.content_type) for a in response.artifacts]

    def download_artifact(self, job_id: str, name: str, path: str | os.PathLike) -> Path:
        """Stream an artifact to ``path`` (resuming after UNAVAILABLE); checks size and sha256."""
        info = {a.name: a for a in self.artifacts(job_id)}.get(name)
        if info is None:
            raise NotFound(f"audit {job_id} has no artifact {name!r}", audit_id=job_id)
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        failures = 0
        with partial.open("wb") as handle:
            while True:  # one stream, resumed from the current offset after UNAVAILABLE
                request = service_pb2.ReadArtifactRequest(
                    audit_id=job_id, name=name, offset=handle.tell()
                )
                try:
                    for chunk in self._audit.ReadArtifact(request, metadata=self._metadata):
                        if chunk.offset != handle.tell():
                            raise Internal(f"artifact stream out of order at {chunk.offset}")
                        handle.write(chunk.data)
                        digest.update(chunk.data)
                    break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                        handle.close()
                        partial.unlink(missing_ok=True)
                        raise _from_rpc(err) from None
                    time.sleep(self.backoff * 2**failures)
                    failures += 1
            size = handle.tell()
        if size != info.size or digest.hexdigest() != info.sha256:
            partial.unlink(missing_ok=True)
            raise Internal(f"artifact {name!r} arrived corrupted ({size} of {info.size} bytes)")
        partial.replace(target)
        return target

    def download_model(
        self, job_id: str, path: str | os.PathLike, *, format: str | None = None
    ) -> Path:
        """The pruned model: the compact one if the job wrote it, else the masked one.

        ``format`` picks a file type by suffix ("pt2", "onnx", "safetensors"); by default
        the suffix of ``path`` when a model in that format exists, else a
        ``torch.export`` program (runs with torch alone).
        """
        models = [a for a in self.artifacts(job_id) if a.name.startswith(_MODEL_PREFIXES)]
        suffix = Path(path).suffix
        if format is None and any(a.name.endswith(suffix) for a in models if suffix):
            format = suffix
        if format:
            models = [a for a in models if a.name.endswith("." + format.lstrip("."))]
        if not models:
            wanted = f" in format {format!r}" if format else ""
            raise NotFound(
                f"audit {job_id} has no pruned model{wanted} (was pruning requested?)",
                audit_id=job_id,
            )
        chosen = min(models, key=_model_rank)
        return self.download_artifact(job_id, chosen.name, path)


_MODEL_PREFIXES = ("model_compact", "model_masked")
_MODEL_SUFFIXES = (".pt2", ".safetensors", ".onnx")


def _model_rank(artifact: Artifact) -> tuple[int, int, str]:
    """Compact before masked; then pt2, safetensors, onnx, anything else; then by name."""
    kind = 0 if artifact.name.startswith("model_compact") else 1
    suffix = next(
        (i for i, s in enumerate(_MODEL_SUFFIXES) if artifact.name.endswith(s)),
        len(_MODEL_SUFFIXES),
    )
    return kind, suffix, artifact.name
