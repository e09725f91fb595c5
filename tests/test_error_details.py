"""google.rpc error details: what a client in any language learns from a failed call.

Unit tests of the mapping (cnp_server.errors), then a real ``cnp-server`` on loopback
(scripted engine, test_server_support) called through the raw generated stubs, the way a
non-Python client would, with the details decoded by grpcio-status.
"""

from __future__ import annotations

import pickle
import re
import signal

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from test_server_support import ServerProcess, make_spec, wait_for

import cnp_core.errors as core_errors
import cnp_server.errors as server_errors
from cnp.v1 import service_pb2, service_pb2_grpc
from cnp_core import convert
from cnp_core.errors import CnpError, DatasetError, InvalidSpec
from cnp_core.spec import PruneSpec
from cnp_server.errors import (
    DOMAIN,
    BadRequest,
    Failure,
    PathOutsideRoots,
    QueueFull,
    ShuttingDown,
    StoredError,
    describe,
    stored_failure,
)

DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
)


def unpack(status: status_pb2.Status) -> dict[str, object]:
    """The details of a google.rpc.Status by type name; each type at most once."""
    found: dict[str, object] = {}
    for detail in status.details:
        kind = next(t for t in DETAIL_TYPES if detail.Is(t.DESCRIPTOR))
        message = kind()
        detail.Unpack(message)
        assert kind.__name__ not in found
        found[kind.__name__] = message
    return found


def retry_seconds(details: dict) -> float | None:
    retry = details.get("RetryInfo")
    return None if retry is None else retry.retry_delay.ToTimedelta().total_seconds()


def violations(details: dict) -> list[str]:
    bad = details.get("BadRequest")
    return [] if bad is None else [v.field for v in bad.field_violations]


# --- the mapping ------------------------------------------------------------------------


def _error_classes() -> list[type]:
    """The CnpError classes defined in cnp_core.errors and cnp_server.errors."""
    return [
        value
        for module in (core_errors, server_errors)
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, CnpError)
        and value.__module__ == module.__name__
    ]


def test_every_error_class_has_its_own_stable_reason():
    bases = {CnpError, server_errors.ServiceError, StoredError}
    reasons = {cls: cls.__dict__.get("reason") for cls in _error_classes() if cls not in bases}
    assert all(reasons.values()), [cls.__name__ for cls, r in reasons.items() if not r]
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", r) for r in reasons.values())
    assert len(set(reasons.values())) == len(reasons), "two classes share a reason"
    assert reasons[InvalidSpec] == "INVALID_SPEC" and reasons[QueueFull] == "QUEUE_FULL"


def test_a_spec_error_names_its_field_under_spec():
    failure = describe(
        InvalidSpec("prune.rate must lie strictly between 0 and 1", field="prune.rate")
    )
    status = failure.status()
    assert (status.code, status.message) == (3, "prune.rate must lie strictly between 0 and 1")
    details = unpack(status)
    info = details["ErrorInfo"]
    assert (info.reason, info.domain) == ("INVALID_SPEC", DOMAIN)
    assert details["BadRequest"].field_violations[0].field == "spec.prune.rate"
    assert details["BadRequest"].field_violations[0].description == status.message
    assert "RetryInfo" not in details  # the same spec fails again: fix it first


def test_a_request_field_is_named_as_it_is_and_no_field_means_no_bad_request():
    assert violations(unpack(describe(BadRequest("bad", request_field="page_size")).status())) == [
        "page_size"
    ]
    assert "BadRequest" not in unpack(describe(DatasetError("labels.csv lacks wm")).status())


def test_retryable_errors_say_when_and_a_shutdown_waits_longer():
    full = describe(QueueFull("the queue is full"))
    down = describe(ShuttingDown("the server is shutting down"))
    assert (full.code, full.reason, full.metadata) == (
        "RESOURCE_EXHAUSTED",
        "QUEUE_FULL",
        {"setting": "max_queued"},
    )
    assert down.code == "UNAVAILABLE"
    assert 0 < retry_seconds(unpack(full.status())) < retry_seconds(unpack(down.status()))


def test_an_error_class_of_another_module_gets_its_code_as_reason():
    class Elsewhere(CnpError):  # like registry's TrackingUnavailable before it names one
        status = "UNAVAILABLE"

    failure = describe(Elsewhere("the tracking server is away"))
    assert (failure.reason, failure.code) == ("UNAVAILABLE", "UNAVAILABLE")
    assert failure.retry_after == 15.0  # UNAVAILABLE is retryable by nature


def test_exhausted_jobs_are_not_retryable_and_bugs_reveal_only_a_correlation_id():
    memory = describe(MemoryError())
    assert (memory.code, memory.reason, memory.retry_after) == (
        "RESOURCE_EXHAUSTED",
        "OUT_OF_MEMORY",
        None,
    )
    bug = describe(KeyError("/srv/secret/path"))
    assert bug.code == "INTERNAL" and "/srv" not in bug.message
    assert bug.metadata["correlation_id"] in bug.message
    assert "/srv" not in bug.status().SerializeToString().decode("latin-1")


def test_stored_details_give_back_the_same_failure():
    failure = describe(
        PathOutsideRoots("dataset.root '/x' is not under an allowed root", field="dataset.root")
    )
    assert failure.field_path == "spec.dataset.root"
    again = stored_failure(*failure.record())
    assert again == failure and again.status() == failure.status()
    legacy = stored_failure("CANCELLED", "cancelled by the client")
    assert (legacy.reason, legacy.field_path, legacy.retry_after) == ("CANCELLED", "", None)


def test_a_stored_error_adds_its_audit_id_and_errors_survive_pickling():
    stored = StoredError(Failure("INVALID_ARGUMENT", "bad", "INVALID_SPEC"), audit_id="aud-1")
    assert describe(stored).metadata == {"audit_id": "aud-1"}
    error = QueueFull("full", metadata={"waiting": "3"})
    copy = pickle.loads(pickle.dumps(error))
    assert copy.metadata == {"setting": "max_queued", "waiting": "3"} and str(copy) == "full"


# --- against a real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, refs):
    process = ServerProcess(
        tmp_path_factory.mktemp("data"),
        [refs],
        settings={"max_queued": 1, "workers": 1, "max_streams_per_client": 1},
        args=["--no-tracking"],
    ).start()
    yield process
    process.stop()


class Stubs:
    """The generated stubs with the server's token, as a client in another language has."""

    def __init__(self, server: ServerProcess) -> None:
        self.channel = grpc.insecure_channel(server.address)
        self.audit = service_pb2_grpc.ConceptAuditStub(self.channel)
        self.operations = operations_pb2_grpc.OperationsStub(self.channel)
        self.metadata = (("authorization", f"Bearer {server.token}"),)

    def create(self, spec, request_id: str = "") -> str:
        """CreateAudit; the new audit's id."""
        operation = self.audit.CreateAudit(
            create_request(spec, request_id), metadata=self.metadata, timeout=20
        )
        return convert.audit_id_of(operation.name)

    def failure(self, call, request) -> tuple[grpc.RpcError, status_pb2.Status, dict]:
        """Call a stub method that must fail: the error, its google.rpc.Status, details."""
        with pytest.raises(grpc.RpcError) as raised:
            result = call(request, metadata=self.metadata, timeout=20)
            if isinstance(result, grpc.Call):  # a stream fails on its first read
                next(result)
        error = raised.value
        status = rpc_status.from_call(error)  # also checks code and message match the call's
        assert status is not None, f"no details on {error.code()} {error.details()}"
        return error, status, unpack(status)

    def operation(self, audit_id: str) -> operations_pb2.Operation:
        return self.operations.GetOperation(
            operations_pb2.GetOperationRequest(name=convert.operation_name(audit_id)),
            metadata=self.metadata,
            timeout=20,
        )

    def state(self, audit_id: str) -> int:
        progress = service_pb2.AuditProgress()
        self.operation(audit_id).metadata.Unpack(progress)
        return progress.state

    def finished(self, audit_id: str) -> operations_pb2.Operation:
        return wait_for(lambda: (op := self.operation(audit_id)).done and op, timeout=60)


def create_request(spec, request_id: str = "") -> service_pb2.CreateAuditRequest:
    return service_pb2.CreateAuditRequest(spec=convert.spec_to_proto(spec), request_id=request_id)


@pytest.fixture(scope="module")
def stubs(server):
    stubs = Stubs(server)
    yield stubs
    stubs.channel.close()


def test_an_invalid_spec_names_the_field_and_a_retry_gets_the_same_details(stubs, refs):
    request = create_request(make_spec(refs, prune=PruneSpec(method="cnp", rate=1.5)), "req-rate")
    error, status, details = stubs.failure(stubs.audit.CreateAudit, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prune.rate" in status.message
    info = details["ErrorInfo"]
    assert (info.reason, info.domain) == ("INVALID_SPEC", "cnp.v1")
    assert violations(details) == ["spec.prune.rate"]
    assert "RetryInfo" not in details
    trailer = dict(error.trailing_metadata())
    assert info.metadata["audit_id"] == trailer["cnp-audit-id"]  # the refused job's record
    assert info.metadata["request_id"] == "req-rate"
    _, again, _ = stubs.failure(stubs.audit.CreateAudit, request)
    assert again == status  # the stored refusal, details and all


def test_a_path_outside_the_roots_and_an_unlisted_factory_name_their_fields(stubs, refs, tmp_path):
    outside = make_spec(refs)
    outside.dataset.root = str(tmp_path)
    error, _, details = stubs.failure(stubs.audit.CreateAudit, create_request(outside))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details["ErrorInfo"].reason == "PATH_OUTSIDE_ROOTS"
    assert details["ErrorInfo"].metadata["setting"] == "allow_roots"
    assert violations(details) == ["spec.dataset.root"]
    factory = make_spec(refs)
    factory.model.architecture, factory.model.factory = "", "os:system"
    error, _, details = stubs.failure(stubs.audit.CreateAudit, create_request(factory))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details["ErrorInfo"].reason == "FACTORY_NOT_ALLOWED"
    assert violations(details) == ["spec.model.factory"]


def test_an_unknown_audit_is_not_found_with_its_id(stubs):
    for call, request in (
        (stubs.audit.GetAuditReport, service_pb2.GetAuditReportRequest(audit_id="aud-none")),
        (stubs.audit.WatchAudit, service_pb2.WatchAuditRequest(audit_id="aud-none")),
        (
            stubs.operations.GetOperation,
            operations_pb2.GetOperationRequest(name="operations/aud-none"),
        ),
    ):
        error, _, details = stubs.failure(call, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert details["ErrorInfo"].reason == "NOT_FOUND"
        assert dict(details["ErrorInfo"].metadata) == {"audit_id": "aud-none"}
        assert violations(details) == [] and "RetryInfo" not in details


def test_a_bad_request_field_and_a_missing_token_say_what_is_wrong(stubs, server):
    request = operations_pb2.ListOperationsRequest(page_size=5000)
    error, _, details = stubs.failure(stubs.operations.ListOperations, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details["ErrorInfo"].reason == "INVALID_REQUEST"
    assert violations(details) == ["page_size"]
    metadata = service_pb2.GetServerMetadataRequest()
    for token, reason in (("", "MISSING_TOKEN"), ("not-the-token", "INVALID_TOKEN")):
        stubs.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            error, _, details = stubs.failure(stubs.audit.GetServerMetadata, metadata)
        finally:
            stubs.metadata = (("authorization", f"Bearer {server.token}"),)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details["ErrorInfo"].reason == reason


def test_a_full_queue_and_too_many_streams_say_when_to_retry(stubs, refs, tmp_path):
    gate = tmp_path / "gate"
    running = stubs.create(make_spec(refs, f"hold:work:{gate}"))
    watch = stubs.audit.WatchAudit(
        service_pb2.WatchAuditRequest(audit_id=running), metadata=stubs.metadata, timeout=60
    )
    jobs = [running]
    try:
        wait_for(lambda: next(watch).state == service_pb2.RUNNING, timeout=30)
        jobs.append(stubs.create(make_spec(refs)))  # max_queued = 1: the queue is full now

        error, _, details = stubs.failure(stubs.audit.CreateAudit, create_request(make_spec(refs)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details["ErrorInfo"].reason == "QUEUE_FULL"
        assert details["ErrorInfo"].metadata["setting"] == "max_queued"
        assert retry_seconds(details) == 5.0

        # max_streams_per_client = 1, and `watch` holds it.
        request = service_pb2.WatchAuditRequest(audit_id=running)
        error, _, details = stubs.failure(stubs.audit.WatchAudit, request)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details["ErrorInfo"].reason == "TOO_MANY_STREAMS"
        assert details["ErrorInfo"].metadata["setting"] == "max_streams_per_client"
        assert details["ErrorInfo"].metadata["audit_id"] == running
        assert 0 < retry_seconds(details) <= 5.0
    finally:  # the next tests find an idle server, whatever failed here
        watch.cancel()
        gate.touch()
        finished = [stubs.finished(job) for job in jobs]
    assert all(operation.HasField("response") for operation in finished)


def test_a_failed_job_carries_the_details_in_its_operation_and_progress(stubs, refs):
    audit_id = stubs.create(make_spec(refs, "diskfull"))
    operation = stubs.finished(audit_id)
    details = unpack(operation.error)
    assert operation.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert details["ErrorInfo"].reason == "DISK_FULL"
    assert "RetryInfo" not in details  # the same job would fill the disk again
    progress = service_pb2.AuditProgress()
    operation.metadata.Unpack(progress)
    assert progress.error == operation.error
    request = service_pb2.GetAuditReportRequest(audit_id=audit_id)
    error, _, details = stubs.failure(stubs.audit.GetAuditReport, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details["ErrorInfo"].reason == "WRONG_STATE"


@pytest.mark.slow
def test_a_server_shutting_down_asks_to_retry_later(refs, tmp_path):
    gate = tmp_path / "gate"
    server = ServerProcess(tmp_path / "data", [refs], args=["--no-tracking"]).start()
    stubs = Stubs(server)
    try:
        running = stubs.create(make_spec(refs, f"hold:work:{gate}"))
        wait_for(lambda: stubs.state(running) == service_pb2.RUNNING, timeout=30)
        server.process.send_signal(signal.SIGTERM)  # it drains running jobs, refusing new ones
        wait_for(lambda: "shutting down" in server.log, timeout=10)
        error, _, details = stubs.failure(stubs.audit.CreateAudit, create_request(make_spec(refs)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert details["ErrorInfo"].reason == "SHUTTING_DOWN"
        assert retry_seconds(details) == 15.0
    finally:
        stubs.channel.close()
        gate.touch()
        server.stop()
