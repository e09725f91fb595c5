"""The job part of the translation: the store's :class:`~cnp_server.jobs.JobRecord` ->
``cnp.v1.AuditProgress`` and ``google.longrunning.Operation``.

Spec and report conversion is the contract's, in :mod:`cnp_core.convert`.
"""

from __future__ import annotations

from google.longrunning import operations_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from cnp.v1 import report_pb2, service_pb2
from cnp_core.convert import operation_name

from .errors import stored_failure
from .jobs import SUCCEEDED, JobRecord


def _timestamp(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def progress_of(job: JobRecord) -> service_pb2.AuditProgress:
    progress = service_pb2.AuditProgress(
        audit_id=job.id,
        state=service_pb2.State.Value(job.state),
        stage=job.stage,
        progress=job.progress,
        message=job.message,
        attempt=job.attempts,
        cancel_requested=job.cancel_requested,
        request_id=job.request_id or "",
        mlflow_run_id=job.mlflow_run_id,
        mlflow_experiment_id=job.mlflow_experiment_id,
        tracking_state=job.tracking_state,
        tracking_error=job.tracking_error,
    )
    for name, seconds in (
        ("create_time", job.created_at),
        ("start_time", job.started_at),
        ("update_time", job.updated_at),
        ("end_time", job.finished_at),
    ):
        stamp = _timestamp(seconds)
        if stamp is not None:
            getattr(progress, name).CopyFrom(stamp)
    if job.error_code:
        failure = stored_failure(job.error_code, job.error_message, job.error_details)
        progress.error.CopyFrom(failure.status())
    return progress


def operation_of(job: JobRecord, *, with_response: bool = True) -> operations_pb2.Operation:
    """The long-running operation of a job: metadata = progress, response = report."""
    progress = progress_of(job)
    operation = operations_pb2.Operation(name=operation_name(job.id), done=job.done)
    operation.metadata.Pack(progress)
    if job.state == SUCCEEDED and with_response and job.report:
        operation.response.Pack(report_pb2.AuditReport.FromString(job.report))
    elif job.done and job.state != SUCCEEDED:
        operation.error.CopyFrom(progress.error)
    return operation
