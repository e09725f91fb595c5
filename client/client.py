"""The Python client of the cnp audit service. Needs grpcio and protobuf only (no torch).

    from cnp_client import AuditClient
    from cnp_core.spec import AuditSpec, DatasetRef, ModelRef

    with AuditClient("127.0.0.1:50051") as client:
        report = client.audit(spec)              # submit + wait; raises on failure
        print(report.to_json())

Long jobs: ``submit`` returns a :class:`Job` at once; ``watch`` yields :class:`Progress`;
``wait``, ``cancel``, ``get`` and ``list`` manage jobs; ``download_artifact`` streams a file.
Calls are retried on UNAVAILABLE only (bounded; exponential backoff, or the wait the
server's RetryInfo asks for; submissions carry a request id so a retried submit cannot
create a second job). Every other status raises a :class:`ServiceError` subclass carrying
the gRPC code, the server's message and its google.rpc details (``reason``,
``field_violations``, ``retry_delay``). ``cnp_client.aio.AsyncAuditClient`` is the same
client for asyncio.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_pb2
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp

from cnp.v1 import report_pb2, service_pb2
from cnp_core import convert
from cnp_core.results import AuditResult
from cnp_core.spec import AuditSpec

from . import calls
from .calls import DEFAULT_ADDRESS, DEFAULT_MESSAGE_BYTES, FINAL_STATES, default_token
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    code_name,
    decode_details,
    error_for,
    from_rpc_error,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_MESSAGE_BYTES",
    "Aborted",
    "AlreadyExists",
    "Artifact",
    "AuditClient",
    "AuditReportView",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Job",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Progress",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "code_name",
    "default_token",
    "error_for",
]

# --- results --------------------------------------------------------------------------


def _time(stamp: Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


def _job_error(
    job_id: str, code: str, message: str, details: tuple[AnyMessage, ...]
) -> ServiceError | None:
    if not code:
        return None
    return error_for(code, message, audit_id=job_id, **decode_details(details))


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
    # The google.rpc details of the job's error (ErrorInfo, BadRequest, ...).
    error_details: tuple[AnyMessage, ...] = field(default=(), compare=False, repr=False)

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    def error(self) -> ServiceError | None:
        """The typed error of a FAILED or CANCELLED job (None otherwise)."""
        return _job_error(self.audit_id, self.error_code, self.error_message, self.error_details)

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
            error_details=tuple(p.error.details) if has_error else (),
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
    mlflow_experiment_id: str = ""
    error_details: tuple[AnyMessage, ...] = field(default=(), compare=False, repr=False)

    @property
    def name(self) -> str:
        """The long-running operation name (``operations/<id>``)."""
        return convert.operation_name(self.id)

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"

    def error(self) -> ServiceError | None:
        """The typed error of a FAILED or CANCELLED job (None otherwise)."""
        return _job_error(self.id, self.error_code, self.error_message, self.error_details)

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
            mlflow_experiment_id=p.mlflow_experiment_id,
            error_details=progress.error_details,
        )


@dataclass(frozen=True)
class Artifact:
    name: str
    size: int
    sha256: str
    content_type: str

    @classmethod
    def from_proto(cls, info: report_pb2.ArtifactInfo) -> Artifact:
        return cls(info.name, info.size, info.sha256, info.content_type)


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
        return [Artifact.from_proto(a) for a in self.proto.artifacts]

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


class AuditClient(calls.Endpoint):
    """A connection to one cnp server.

    ``root_certificates`` (PEM bytes or a file path) switches to TLS; with
    ``client_certificate`` and ``client_key`` (PEM bytes or paths) the client proves its
    identity too, for a server that requires client certificates (mutual TLS).
    ``timeout`` bounds every unary call; ``retries`` is how often an UNAVAILABLE call is
    tried again.
    """

    channels = grpc  # the blocking channels

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AuditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------

    def _backoff(self, err: grpc.RpcError, failures: int) -> None:
        """Sleep before the next try, or raise the typed error when there is none."""
        error = from_rpc_error(err)
        delay = calls.retry_delay(error, failures, self.retries, self.backoff)
        if delay is None:
            raise error from None
        time.sleep(delay)

    def _retrying(self, attempt: Callable[[], Any]) -> Any:
        failures = 0
        while True:
            try:
                return attempt()
            except grpc.RpcError as err:
                self._backoff(err, failures)
                failures += 1

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        return self._retrying(
            lambda: method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        )

    # --- jobs -------------------------------------------------------------------------

    def submit(
        self,
        spec: AuditSpec,
        request_id: str | None = None,
        *,
        experiment: str = "",
        tags: Mapping[str, str] | None = None,
        register_model: str = "",
    ) -> Job:
        """Queue an audit; returns at once. A retry with the same request id is the same job.

        ``experiment`` names the MLflow experiment of the job's run (default: the
        server's), ``tags`` are added to the run (e.g. the commit and pipeline id of a CI
        run) and ``register_model`` registers the pruned model under that name.
        """
        request = calls.create_request(
            spec, request_id, experiment=experiment, tags=tags, register_model=register_model
        )
        return Job.from_operation(self._call(self._audit.CreateAudit, request))

    def get(self, job_id: str) -> Job:
        return Job.from_operation(
            self._call(self._operations.GetOperation, calls.get_request(job_id))
        )

    def list(
        self, page_size: int = 50, *, state: str | None = None, limit: int | None = None
    ) -> list[Job]:
        """Jobs, newest first (all pages, or the first ``limit``)."""
        jobs: list[Job] = []
        token = ""
        while True:
            request = calls.list_request(page_size, token, state)
            response = self._call(self._operations.ListOperations, request)
            jobs += [Job.from_operation(op) for op in response.operations]
            token = response.next_page_token
            if not token or (limit is not None and len(jobs) >= limit):
                return jobs[:limit] if limit is not None else jobs

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop (queued: at once; running: at its next check). Returns its state."""
        self._call(self._operations.CancelOperation, calls.cancel_request(job_id))
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        """Forget a finished job and its files (its MLflow run stays)."""
        self._call(self._operations.DeleteOperation, calls.delete_request(job_id))

    def watch(self, job_id: str) -> Iterator[Progress]:
        """Progress updates until the job is final (the last one carries the final state)."""
        request = calls.watch_request(job_id)
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
                self._backoff(err, failures)
                failures += 1

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is final; DeadlineExceeded after ``timeout`` seconds."""
        deadline = calls.wait_deadline(timeout)
        while True:
            seconds = calls.next_wait(deadline)
            if seconds is None:
                job = self.get(job_id)
                if job.done:
                    return job
                raise calls.still_running(job_id, job.state, timeout)
            request = calls.wait_request(job_id, seconds)
            job = Job.from_operation(
                self._call(self._operations.WaitOperation, request, timeout=seconds + 10.0)
            )
            if job.done:
                return job

    def report(self, job_id: str) -> AuditReportView:
        """The report of a SUCCEEDED job (FailedPrecondition before)."""
        return AuditReportView(self._call(self._audit.GetAuditReport, calls.report_request(job_id)))

    def audit(
        self,
        spec: AuditSpec,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        experiment: str = "",
        tags: Mapping[str, str] | None = None,
        register_model: str = "",
    ) -> AuditReportView:
        """Submit and wait; the report, or the job's typed error (e.g. InvalidArgument).
        ``experiment``, ``tags`` and ``register_model`` are as in :meth:`submit`."""
        job = self.submit(
            spec,
            request_id=request_id,
            experiment=experiment,
            tags=tags,
            register_model=register_model,
        )
        job = self.wait(job.id, timeout=timeout)
        if not job.succeeded:
            raise job.error() or Internal(f"audit {job.id} ended {job.state}", audit_id=job.id)
        return self.report(job.id)

    def metadata(self) -> service_pb2.ServerMetadata:
        """Version, limits, architectures, formats, methods and composites of the server."""
        return self._call(self._audit.GetServerMetadata, calls.metadata_request())

    # --- artifacts --------------------------------------------------------------------

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:  # `list` alone: the method above
        response = self._call(self._audit.ListArtifacts, calls.artifacts_request(job_id))
        return [Artifact.from_proto(a) for a in response.artifacts]

    def download_artifact(self, job_id: str, name: str, path: str | os.PathLike) -> Path:
        """Stream an artifact to ``path`` (resuming after UNAVAILABLE); checks size and sha256."""
        info = calls.find_artifact(job_id, self.artifacts(job_id), name)
        target = calls.ArtifactFile(job_id, info, path)
        failures = 0
        try:
            while True:  # one stream, resumed from the current offset after UNAVAILABLE
                request = calls.read_request(job_id, name, target.offset)
                try:
                    for chunk in self._audit.ReadArtifact(request, metadata=self._metadata):
                        target.write(chunk)
                    return target.finish()
                except grpc.RpcError as err:
                    self._backoff(err, failures)
                    failures += 1
        except BaseException:  # a typed error, an interrupt: no half file stays
            target.discard()
            raise

    def download_model(
        self, job_id: str, path: str | os.PathLike, *, format: str | None = None
    ) -> Path:
        """The pruned model: the compact one if the job wrote it, else the masked one.

        ``format`` picks a file type by suffix ("pt2", "onnx", "safetensors"); by default
        the suffix of ``path`` when a model in that format exists, else a
        ``torch.export`` program (runs with torch alone).
        """
        chosen = calls.choose_model(job_id, self.artifacts(job_id), path, format)
        return self.download_artifact(job_id, chosen.name, path)
