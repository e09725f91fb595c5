"""The asyncio client, and the google.rpc error details both clients decode.

Two kinds of server, both real gRPC servers on loopback:

- a scripted ``ConceptAudit`` servicer started in this process, whose answers the test
  chooses (rich statuses with ErrorInfo, BadRequest and RetryInfo, a status whose
  details contradict it, streams that fail once) and which records what arrived;
- ``cnp-server`` itself (scripted engine, see test_server_support) for the end-to-end
  runs: submit, watch, report, artifacts, cancel, and its errors with their details.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from concurrent import futures

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from test_server_support import (
    MODEL_BYTES,
    ServerProcess,
    make_spec,
    prune_spec,
)

from cnp.v1 import service_pb2, service_pb2_grpc
from cnp_client import (
    AsyncAuditClient,
    AuditClient,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Job,
    NotFound,
    PruneSpec,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

# --- a scripted server ----------------------------------------------------------------


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status
):
    """What ``abort_with_status`` takes (grpc.Status is an interface only)."""


def _rich(
    code: grpc.StatusCode,
    message: str,
    *details: object,
    trailing: tuple[tuple[str, str], ...] = (),
    status_code: int | None = None,
) -> _Status:
    """A status with google.rpc details, as cnp-server sends them. ``status_code`` makes
    the detailed Status disagree with the call's own code."""
    status = status_pb2.Status(
        code=code.value[0] if status_code is None else status_code, message=message
    )
    for detail in details:
        status.details.add().Pack(detail)
    plain = rpc_status.to_status(status)
    return _Status(code, message, trailing + tuple(plain.trailing_metadata))


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _operation(audit_id: str, state: int, **fields: object) -> operations_pb2.Operation:
    progress = service_pb2.AuditProgress(audit_id=audit_id, state=state, **fields)
    packed = any_pb2.Any()
    packed.Pack(progress)
    return operations_pb2.Operation(
        name=f"operations/{audit_id}", metadata=packed, done=state >= service_pb2.SUCCEEDED
    )


class Scripted(service_pb2_grpc.ConceptAuditServicer):
    """Answers by the spec's first layer name; records every request and its metadata."""

    def __init__(self) -> None:
        self.arrived: list[tuple[str, float, object, dict]] = []
        self.unavailable = 0  # how many calls of GetServerMetadata / WatchAudit fail first

    def _note(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        self.arrived.append(
            (method, time.monotonic(), request, dict(context.invocation_metadata()))
        )

    def CreateAudit(self, request, context):
        self._note("CreateAudit", request, context)
        script = request.spec.layers[0] if request.spec.layers else ""
        if script == "refuse":
            context.abort_with_status(
                _rich(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "prune.rate must lie in (0, 1), got 1.5",
                    error_details_pb2.ErrorInfo(
                        reason="INVALID_SPEC", domain="cnp.v1", metadata={"audit_id": "aud-9"}
                    ),
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field="spec.prune.rate", description="must lie in (0, 1)"
                            )
                        ]
                    ),
                    trailing=(("cnp-audit-id", "aud-9"),),
                )
            )
        if script == "full":
            context.abort_with_status(
                _rich(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the queue is full",
                    error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="cnp.v1"),
                    _retry_info(5.0),
                )
            )
        if script == "contradicting":  # a Status whose code is not the call's
            context.abort_with_status(
                _rich(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "bad",
                    error_details_pb2.ErrorInfo(reason="SOMETHING_ELSE"),
                    status_code=grpc.StatusCode.NOT_FOUND.value[0],
                )
            )
        if script == "later":  # asks for a longer wait than any client should sit through
            context.abort_with_status(
                _rich(grpc.StatusCode.UNAVAILABLE, "maintenance", _retry_info(3600))
            )
        return _operation("aud-1", service_pb2.QUEUED, request_id=request.request_id)

    def GetServerMetadata(self, request, context):
        self._note("GetServerMetadata", request, context)
        if self.unavailable > 0:
            self.unavailable -= 1
            context.abort_with_status(
                _rich(grpc.StatusCode.UNAVAILABLE, "shutting down", _retry_info(0.3))
            )
        return service_pb2.ServerMetadata(version="scripted")

    def WatchAudit(self, request, context):
        self._note("WatchAudit", request, context)
        if self.unavailable > 0:
            self.unavailable -= 1
            context.abort_with_status(
                _rich(grpc.StatusCode.UNAVAILABLE, "restarting", _retry_info(0.3))
            )
        yield service_pb2.AuditProgress(audit_id=request.audit_id, state=service_pb2.RUNNING)
        yield service_pb2.AuditProgress(
            audit_id=request.audit_id,
            state=service_pb2.FAILED,
            error=status_pb2.Status(
                code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                message="no subspace flagged",
                details=[_packed(error_details_pb2.ErrorInfo(reason="NO_FLAGGED_SUBSPACE"))],
            ),
        )


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


@pytest.fixture
def scripted():
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_ConceptAuditServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(None)


def _blocking(address: str, **options):
    """Run ``body(client)`` with the blocking client."""

    def run(body):
        with AuditClient(address, token="t", **options) as client:
            return body(client)

    return run


def _asyncio(address: str, **options):
    """Run ``body(client)`` with the asyncio client inside a fresh event loop."""

    def run(body):
        async def main():
            async with AsyncAuditClient(address, token="t", **options) as client:
                result = body(client)
                return await result if asyncio.iscoroutine(result) else result

        return asyncio.run(main())

    return run


CLIENTS = {"blocking": _blocking, "asyncio": _asyncio}


async def _list(iterator) -> list:
    return [item async for item in iterator]


def _collect(updates) -> list:
    """All updates of a watch, from a generator or an async generator."""
    return _list(updates) if hasattr(updates, "__aiter__") else list(updates)


# --- error details --------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
def test_error_details_reach_the_typed_error(scripted, tmp_path, kind):
    run = CLIENTS[kind](scripted.address, retries=3, backoff=5.0)
    with pytest.raises(InvalidArgument) as refused:
        run(lambda c: c.submit(make_spec(tmp_path, "refuse")))
    err = refused.value
    assert err.message == "prune.rate must lie in (0, 1), got 1.5" and err.audit_id == "aud-9"
    assert (err.reason, err.domain, err.info) == ("INVALID_SPEC", "cnp.v1", {"audit_id": "aud-9"})
    assert err.field_violations == [("spec.prune.rate", "must lie in (0, 1)")]
    assert err.retry_delay is None
    assert [type(d).__name__ for d in err.details] == ["ErrorInfo", "BadRequest"]

    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as full:
        run(lambda c: c.submit(make_spec(tmp_path, "full")))
    assert full.value.retry_delay == pytest.approx(5.0) and full.value.reason == "QUEUE_FULL"
    # Only UNAVAILABLE is retried: the caller decides what a full queue means to it.
    assert time.monotonic() - started < 2.0
    assert [m for m, *_ in scripted.arrived].count("CreateAudit") == 2

    with pytest.raises(InvalidArgument) as contradicting:
        run(lambda c: c.submit(make_spec(tmp_path, "contradicting")))
    assert contradicting.value.message == "bad"  # the call's own status wins
    assert contradicting.value.reason == "" and contradicting.value.details == []


@pytest.mark.parametrize("kind", CLIENTS)
def test_retries_wait_as_long_as_retry_info_asks(scripted, kind):
    scripted.unavailable = 2
    # backoff=5: without RetryInfo the two waits would take 5 + 10 s.
    run = CLIENTS[kind](scripted.address, retries=3, backoff=5.0)
    started = time.monotonic()
    assert run(lambda c: c.metadata()).version == "scripted"
    assert time.monotonic() - started < 3.0
    times = [t for method, t, *_ in scripted.arrived if method == "GetServerMetadata"]
    assert len(times) == 3
    assert all(later - earlier >= 0.28 for earlier, later in zip(times, times[1:], strict=False))


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_longer_retry_delay_than_a_client_waits_is_raised_at_once(scripted, tmp_path, kind):
    run = CLIENTS[kind](scripted.address, retries=3, backoff=0.1)
    started = time.monotonic()
    with pytest.raises(Unavailable) as later:
        run(lambda c: c.submit(make_spec(tmp_path, "later")))
    assert later.value.retry_delay == pytest.approx(3600.0)
    assert time.monotonic() - started < 2.0 and len(scripted.arrived) == 1


@pytest.mark.parametrize("kind", CLIENTS)
def test_watch_resumes_after_unavailable_and_ends_with_the_jobs_error(scripted, kind):
    scripted.unavailable = 1
    run = CLIENTS[kind](scripted.address, retries=2, backoff=5.0)
    started = time.monotonic()
    updates = run(lambda c: _collect(c.watch("aud-3")))
    assert time.monotonic() - started < 3.0  # waited RetryInfo's 0.3 s, not the 5 s backoff
    assert [u.state for u in updates] == ["RUNNING", "FAILED"]
    error = updates[-1].error()
    assert isinstance(error, FailedPrecondition) and error.audit_id == "aud-3"
    assert error.reason == "NO_FLAGGED_SUBSPACE" and error.message == "no subspace flagged"


def test_a_failed_jobs_error_keeps_its_details():
    status = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        message="labels.csv has no column wm",
        details=[_packed(error_details_pb2.ErrorInfo(reason="INVALID_DATASET", domain="cnp.v1"))],
    )
    job = Job.from_operation(_operation("aud-4", service_pb2.FAILED, error=status))
    error = job.error()
    assert isinstance(error, InvalidArgument) and error.reason == "INVALID_DATASET"
    assert job == Job.from_operation(_operation("aud-4", service_pb2.FAILED, error=status))


# --- what a submission carries --------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
def test_submit_sends_tracking_options_and_the_token(scripted, tmp_path, kind):
    run = CLIENTS[kind](scripted.address)
    job = run(
        lambda c: c.submit(
            make_spec(tmp_path),
            "req-7",
            experiment="shapes-ci",
            tags={"git.commit": "0a1b2c", "ci.pipeline": "981"},
            register_model="shapes-pruned",
        )
    )
    assert job.id == "aud-1" and job.state == "QUEUED" and job.request_id == "req-7"
    _, _, request, metadata = scripted.arrived[-1]
    assert request.tracking.experiment == "shapes-ci"
    assert dict(request.tracking.tags) == {"git.commit": "0a1b2c", "ci.pipeline": "981"}
    assert request.tracking.register_model == "shapes-pruned"
    assert request.spec.layers == ["layer"] and metadata["authorization"] == "Bearer t"
    run(lambda c: c.submit(make_spec(tmp_path)))
    plain = scripted.arrived[-1][2]
    assert not plain.HasField("tracking") or plain.tracking == service_pb2.TrackingOptions()
    assert len(plain.request_id) == 32  # a fresh id, so a retried submit is one job


def test_the_asyncio_client_speaks_mutual_tls(tmp_path):
    from test_server_support import self_signed_certificate

    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    cert, key = self_signed_certificate(tmp_path / "server")
    client_cert, client_key = self_signed_certificate(tmp_path / "client")
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_cert.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_ConceptAuditServicer_to_server(Scripted(), server)
    address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
    server.start()
    try:
        tls = {"root_certificates": cert, "retries": 0, "timeout": 5}
        meta = _asyncio(address, client_certificate=client_cert, client_key=client_key, **tls)
        assert meta(lambda c: c.metadata()).version == "scripted"
        with pytest.raises(Unavailable):  # no client certificate: no handshake
            _asyncio(address, **tls)(lambda c: c.metadata())
        with pytest.raises(ValueError, match="go together"):
            AsyncAuditClient(address, root_certificates=cert, client_certificate=client_cert)
    finally:
        server.stop(None)


# --- against cnp-server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, refs):
    process = ServerProcess(tmp_path_factory.mktemp("data"), [refs], args=["--no-tracking"])
    yield process.start()
    process.stop()


@pytest.mark.slow
def test_an_audit_end_to_end_with_the_asyncio_client(server, refs, tmp_path):
    async def main():
        async with AsyncAuditClient(server.address, token=server.token) as client:
            assert (await client.metadata()).architectures == ["scripted"]
            job = await client.submit(make_spec(refs, "sleep:3", prune=prune_spec()))
            assert job.state in {"QUEUED", "RUNNING"}
            updates = [u async for u in client.watch(job.id)]
            assert updates[-1].state == "SUCCEEDED" and updates[-1].audit_id == job.id
            assert {"work", "report"} <= {u.stage for u in updates}
            report = await client.report(job.id)
            assert report.audit_id == job.id and len(report.attributes) == 2
            assert report.flagged() == {"wm=1@layer": 1, "wm=0@layer": -1}
            names = {a.name: a for a in await client.artifacts(job.id)}
            table = await client.download_artifact(job.id, "audit_table", tmp_path / "t.csv")
            assert hashlib.sha256(table.read_bytes()).hexdigest() == names["audit_table"].sha256
            model = await client.download_model(job.id, tmp_path / "model.safetensors")
            assert model.stat().st_size > MODEL_BYTES  # more than one 1 MiB chunk
            assert not list(tmp_path.glob("*.part"))
            with pytest.raises(NotFound, match="no artifact"):
                await client.download_artifact(job.id, "nothing", tmp_path / "x")
            assert [j.id for j in await client.list(limit=1)] == [job.id]
            assert (await client.get(job.id)).succeeded
            assert (await client.wait(job.id, timeout=5)).succeeded
            await client.delete(job.id)
            with pytest.raises(NotFound):
                await client.get(job.id)

    asyncio.run(main())


@pytest.mark.slow
def test_cancel_and_errors_with_the_asyncio_client(server, refs):
    async def main():
        async with AsyncAuditClient(server.address, token=server.token, timeout=20) as client:
            job = await client.submit(make_spec(refs, "sleep:300"))
            async for update in client.watch(job.id):
                if update.state == "RUNNING":
                    break  # leaving early ends the stream
            with pytest.raises(DeadlineExceeded, match="still RUNNING"):
                await client.wait(job.id, timeout=0.3)
            assert (await client.cancel(job.id)).cancel_requested
            final = await client.wait(job.id, timeout=30)
            assert final.state == "CANCELLED" and isinstance(final.error(), Cancelled)
            with pytest.raises(FailedPrecondition) as early:
                await client.report(job.id)
            assert early.value.reason == "WRONG_STATE"

            bad = make_spec(refs, prune=PruneSpec(method="cnp", rate=1.5))
            with pytest.raises(InvalidArgument) as refused:
                await client.submit(bad)
            err = refused.value
            assert err.reason == "INVALID_SPEC" and err.domain == "cnp.v1"
            assert [field for field, _ in err.field_violations] == ["spec.prune.rate"]
            assert err.audit_id and err.info.get("audit_id") == err.audit_id
            assert (await client.get(err.audit_id)).state == "FAILED"

            with pytest.raises(FailedPrecondition, match="scripted failure") as failed:
                await client.audit(make_spec(refs, "fail:FAILED_PRECONDITION"), timeout=60)
            assert failed.value.reason == "FAILED_PRECONDITION" and failed.value.audit_id
            with pytest.raises(NotFound) as missing:
                await client.get("no-such-audit")
            assert missing.value.reason == "NOT_FOUND"

        async with AsyncAuditClient(server.address, token="wrong", retries=0) as stranger:
            with pytest.raises(Unauthenticated):
                await stranger.list()

    asyncio.run(main())
