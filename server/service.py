"""The gRPC servicers: ``cnp.v1.ConceptAudit`` and ``google.longrunning.Operations``.

Both read and write the job store only: no job state lives in a stream or in memory, so
any replica answers for any job and a restart loses nothing.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from cnp.v1 import report_pb2, service_pb2, service_pb2_grpc
from cnp_core.convert import audit_id_of, spec_from_proto, spec_to_json

from . import __version__, convert
from .config import STREAM_RESERVE, ServerConfig
from .engine import check_references, files_only
from .errors import (
    BadRequest,
    NotFound,
    OutOfRange,
    ShuttingDown,
    StoredError,
    TooManyStreams,
    WrongState,
    describe,
    rpc_errors,
    stored_failure,
)
from .executor import Executor, workdir_of
from .jobs import FAILED, STAGE_VALIDATE, SUCCEEDED, JobRecord
from .store import JobStore
from .tracking import tracking_options

log = logging.getLogger(__name__)

API_VERSION = "cnp.v1"
WATCH_POLL_SECONDS = 0.25
MAX_WAIT_SECONDS = 300.0
MAX_PAGE_SIZE = 1000


def client_of(peer: str) -> str:
    """The client's address from ``context.peer()`` ("ipv4:10.0.0.7:51234" -> "10.0.0.7"):
    its port changes with every connection, its address does not."""
    kind, _, rest = peer.partition(":")
    return rest.rsplit(":", 1)[0].strip("[]") if kind in {"ipv4", "ipv6"} else peer


class StreamLimits:
    """Counts the long calls (WatchAudit, WaitOperation, ReadArtifact), each holding an RPC
    thread while it lasts: no client may take more than ``per_client`` of them, all
    together no more than ``total``, so short calls always find a thread."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client, self.total = per_client, total
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, context: grpc.ServicerContext) -> Iterator[None]:
        client = client_of(context.peer())
        with self._lock:
            if self._open[client] >= self.per_client:
                raise TooManyStreams(
                    f"too many streams from {client}: {self._open[client]} open (WatchAudit, "
                    f"WaitOperation, ReadArtifact), the limit is max_streams_per_client = "
                    f"{self.per_client}; close one, or raise max_streams_per_client on the "
                    "server (--set max_streams_per_client=N)",
                    metadata={"setting": "max_streams_per_client"},
                )
            if self._open.total() >= self.total:
                raise TooManyStreams(
                    f"too many streams on this server: {self.total} open, the limit is "
                    f"rpc_threads - {STREAM_RESERVE} (threads kept for other calls); retry "
                    "later, poll GetOperation instead, or raise rpc_threads on the server "
                    "(--set rpc_threads=N)",
                    metadata={"setting": "rpc_threads"},
                )
            self._open[client] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[client] -= 1
                if not self._open[client]:
                    del self._open[client]


class AuditService:
    """What both servicers share: config, store, executor, engine and the shutdown flag."""

    def __init__(
        self, config: ServerConfig, store: JobStore, executor: Executor, engine: ModuleType
    ) -> None:
        self.config, self.store, self.executor, self.engine = config, store, executor, engine
        self.stopping = threading.Event()
        self.streams = StreamLimits(config.max_streams_per_client, config.max_streams)
        self._create_lock = threading.Lock()
        self._capabilities: dict | None = None

    def job(self, audit_id: str) -> JobRecord:
        if not audit_id:
            raise BadRequest("audit_id is required")
        return self.store.get(audit_id_of(audit_id))

    def wait_for(self, audit_id: str, seconds: float, context: grpc.ServicerContext) -> JobRecord:
        deadline = time.monotonic() + seconds
        job = self.job(audit_id)
        while not job.done and context.is_active() and not self.stopping.is_set():
            if time.monotonic() >= deadline:
                break
            time.sleep(WATCH_POLL_SECONDS)
            job = self.job(audit_id)
        return job

    def capabilities(self) -> dict:
        if self._capabilities is None:
            self._capabilities = self.engine.capabilities()
        return self._capabilities


def _raise_if_refused(job: JobRecord, context: grpc.ServicerContext) -> None:
    """A refused CreateAudit (and every retry of it) fails with the stored status; the
    trailing metadata ``cnp-audit-id`` names the FAILED job that records the refusal."""
    if job.state == FAILED and job.stage == STAGE_VALIDATE:
        context.set_trailing_metadata((("cnp-audit-id", job.id),))
        failure = stored_failure(job.error_code, job.error_message, job.error_details)
        raise StoredError(failure, audit_id=job.id)


class ConceptAuditServicer(service_pb2_grpc.ConceptAuditServicer):
    def __init__(self, service: AuditService) -> None:
        self.s = service

    @rpc_errors
    def CreateAudit(self, request, context):
        s = self.s
        if s.stopping.is_set():
            raise ShuttingDown("the server is shutting down; retry on another replica or later")
        spec = spec_from_proto(request.spec)
        spec_json = spec_to_json(spec)
        tracking_json = tracking_options(request.tracking, s.config, spec.prune is not None)
        request_id = request.request_id or None
        if request_id:
            existing = s.store.find_by_request_id(request_id)
            if existing is not None:
                if (existing.spec_json, existing.tracking_json) != (spec_json, tracking_json):
                    raise BadRequest(
                        f"request_id {request_id!r} was already used for another spec",
                        request_field="request_id",
                    )
                _raise_if_refused(existing, context)
                return convert.operation_of(existing)
        try:
            spec.validate()
            check_references(spec, s.config)
            s.engine.validate(files_only(spec), [Path(r) for r in s.config.allow_roots])
        except (Exception, SystemExit) as exc:  # an engine's exit must not end this thread
            failure = describe(exc)
            job = s.store.create(
                spec_json,
                request_id=request_id,
                error=failure.record(),
                stage=STAGE_VALIDATE,
                tracking_json=tracking_json,
            )
            log.info("audit %s refused: %s %s", job.id, failure.code, failure.message)
            _raise_if_refused(job, context)
            return convert.operation_of(job)  # a concurrent twin was accepted meanwhile
        with s._create_lock:
            job = s.store.create(
                spec_json,
                request_id=request_id,
                max_queued=s.config.max_queued,
                tracking_json=tracking_json,
            )
        log.info("audit %s queued (request id %s)", job.id, request_id)
        s.executor.wake()
        return convert.operation_of(job)

    @rpc_errors
    def WatchAudit(self, request, context):
        with self.s.streams.hold(context):
            last = None
            while context.is_active():
                job = self.s.job(request.audit_id)
                progress = convert.progress_of(job)
                if progress != last:
                    yield progress
                    last = progress
                if job.done or self.s.stopping.is_set():
                    return
                time.sleep(WATCH_POLL_SECONDS)

    @rpc_errors
    def GetAuditReport(self, request, context):
        job = self.s.job(request.audit_id)
        if job.state != SUCCEEDED:
            detail = f": {job.error_code} {job.error_message}" if job.error_code else ""
            raise WrongState(f"audit {job.id} is {job.state}{detail}; it has no report")
        return report_pb2.AuditReport.FromString(job.report)

    def _artifacts(self, job: JobRecord) -> dict[str, dict]:
        return job.artifacts if job.state == SUCCEEDED else {}

    @rpc_errors
    def ListArtifacts(self, request, context):
        job = self.s.job(request.audit_id)
        return service_pb2.ListArtifactsResponse(
            artifacts=[
                report_pb2.ArtifactInfo(
                    name=name,
                    size=info["size"],
                    sha256=info["sha256"],
                    content_type=info["content_type"],
                )
                for name, info in sorted(self._artifacts(job).items())
            ]
        )

    @rpc_errors
    def ReadArtifact(self, request, context):
        with self.s.streams.hold(context):
            yield from self._read_artifact(request, context)

    def _read_artifact(self, request, context):
        job = self.s.job(request.audit_id)
        artifacts = self._artifacts(job)
        if request.name not in artifacts:
            names = ", ".join(sorted(artifacts)) or "none"
            raise NotFound(f"audit {job.id} has no artifact {request.name!r} (artifacts: {names})")
        if request.offset < 0 or request.limit < 0:
            raise BadRequest(
                "offset and limit must be >= 0",
                request_field="offset" if request.offset < 0 else "limit",
            )
        workdir = workdir_of(self.s.config, job.id).resolve()
        path = (workdir / artifacts[request.name]["path"]).resolve()
        if not path.is_relative_to(workdir) or not path.is_file():
            raise NotFound(f"artifact {request.name!r} of audit {job.id} is no longer available")
        size = path.stat().st_size
        if request.offset > size:
            raise OutOfRange(
                f"offset {request.offset} lies beyond the artifact's {size} bytes",
                request_field="offset",
            )
        end = size if request.limit == 0 else min(size, request.offset + request.limit)
        chunk = self.s.config.artifact_chunk_bytes
        with path.open("rb") as handle:
            handle.seek(request.offset)
            offset = request.offset
            while offset < end and context.is_active():
                data = handle.read(min(chunk, end - offset))
                if not data:
                    break
                yield service_pb2.ReadArtifactResponse(offset=offset, data=data)
                offset += len(data)

    @rpc_errors
    def GetServerMetadata(self, request, context):
        c = self.s.config
        caps = self.s.capabilities()
        return service_pb2.ServerMetadata(
            version=__version__,
            api_version=API_VERSION,
            limits=service_pb2.ServerLimits(
                max_message_bytes=c.max_message_bytes,
                artifact_chunk_bytes=c.artifact_chunk_bytes,
                max_queued_jobs=c.max_queued,
                workers=self.s.executor.slots,
                max_attempts=c.max_attempts,
                stage_timeouts=c.stage_timeouts,
            ),
            architectures=caps.get("architectures", []),
            weight_formats=caps.get("weight_formats", []),
            concept_methods=caps.get("concept_methods", []),
            scores=caps.get("scores", []),
            composites=caps.get("composites", []),
            prune_methods=caps.get("prune_methods", []),
            prune_schedules=caps.get("prune_schedules", []),
            auth_required=c.auth,
            tls=c.tls,
            services=SERVICE_NAMES,
        )


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """The standard long-running operations API over the same jobs."""

    def __init__(self, service: AuditService) -> None:
        self.s = service

    @rpc_errors
    def GetOperation(self, request, context):
        return convert.operation_of(self.s.job(request.name))

    @rpc_errors
    def ListOperations(self, request, context):
        page_size = request.page_size or 50
        if not 0 < page_size <= MAX_PAGE_SIZE:
            raise BadRequest(
                f"page_size must lie in [1, {MAX_PAGE_SIZE}]", request_field="page_size"
            )
        state = None
        if request.filter:
            key, sep, value = request.filter.partition("=")
            if not sep or key.strip() != "state":
                raise BadRequest("filter supports only 'state=<STATE>'", request_field="filter")
            state = value.strip().strip('"').upper()
        jobs, token = self.s.store.list(
            page_size=page_size, page_token=request.page_token, state=state
        )
        # Listings leave the reports out (GetOperation has them): pages stay small.
        return operations_pb2.ListOperationsResponse(
            operations=[convert.operation_of(j, with_response=False) for j in jobs],
            next_page_token=token,
        )

    @rpc_errors
    def CancelOperation(self, request, context):
        job = self.s.job(request.name)
        job = self.s.store.request_cancel(job.id)
        log.info("audit %s: cancellation requested (%s)", job.id, job.state)
        self.s.executor.wake()
        return empty_pb2.Empty()

    @rpc_errors
    def DeleteOperation(self, request, context):
        job = self.s.store.delete(audit_id_of(request.name))
        shutil.rmtree(workdir_of(self.s.config, job.id), ignore_errors=True)
        log.info("audit %s deleted", job.id)
        return empty_pb2.Empty()

    @rpc_errors
    def WaitOperation(self, request, context):
        seconds = MAX_WAIT_SECONDS
        if request.HasField("timeout"):
            seconds = min(seconds, request.timeout.ToTimedelta().total_seconds())
        remaining = context.time_remaining()
        if remaining is not None:
            seconds = min(seconds, max(0.0, remaining - 0.5))
        with self.s.streams.hold(context):
            return convert.operation_of(self.s.wait_for(request.name, seconds, context))


SERVICE_NAMES = [
    service_pb2.DESCRIPTOR.services_by_name["ConceptAudit"].full_name,
    operations_pb2.DESCRIPTOR.services_by_name["Operations"].full_name,
    "grpc.health.v1.Health",
]
