"""The service through gRPC against a real ``cnp-server`` process on loopback.

One server per module (scripted engine, see test_server_support) keeps this fast; every
test leaves no job running behind it.
"""

from __future__ import annotations

import hashlib
import json
import time

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_server_support import ServerProcess, make_spec, prune_spec, wait_for

from cnp.v1 import report_pb2, service_pb2, service_pb2_grpc
from cnp_client import (
    AuditClient,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ModelRef,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from cnp_core import convert


@pytest.fixture(scope="module")
def server(tmp_path_factory, refs):
    process = ServerProcess(
        tmp_path_factory.mktemp("data"),
        [refs],
        settings={"max_queued": 3, "stage_timeouts": {"default": 3600, "hang": 1.0}},
        args=["--no-tracking"],
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    with AuditClient(server.address, token=server.token, timeout=20) as c:
        yield c


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def _auth(server) -> tuple:
    return (("authorization", f"Bearer {server.token}"),)


def _running(client, job_id):
    return wait_for(lambda: client.get(job_id).state == "RUNNING", timeout=30)


# --- health, reflection, auth ---------------------------------------------------------


def test_health_and_reflection_answer_without_a_token(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "cnp.v1.ConceptAudit", "google.longrunning.Operations"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="cnp.v1.ConceptAudit"),
    ]
    listing, files = list(reflection.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listing.list_services_response.service}
    assert {
        "cnp.v1.ConceptAudit",
        "google.longrunning.Operations",
        "grpc.health.v1.Health",
    } <= names
    described = descriptor_pb2.FileDescriptorProto.FromString(
        files.file_descriptor_response.file_descriptor_proto[0]
    )
    assert described.name == "cnp/v1/service.proto"
    assert "CreateAudit" in [m.name for m in described.service[0].method]


def test_calls_without_or_with_a_wrong_token_are_unauthenticated(server, channel):
    stub = service_pb2_grpc.ConceptAuditStub(channel)
    request = service_pb2.GetServerMetadataRequest()
    for metadata, message in (((), "missing"), ((("authorization", "Bearer nope"),), "invalid")):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetServerMetadata(request, metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert message in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # streaming methods too
            list(stub.WatchAudit(service_pb2.WatchAuditRequest(audit_id="x"), metadata=metadata))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    operations = operations_pb2_grpc.OperationsStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        operations.ListOperations(operations_pb2.ListOperationsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with AuditClient(server.address, token="wrong") as wrong, pytest.raises(Unauthenticated):
        wrong.metadata()
    assert (
        stub.GetServerMetadata(request, metadata=_auth(server), timeout=5).api_version == "cnp.v1"
    )


def test_a_second_server_on_the_same_data_dir_is_refused(server, refs):
    twin = ServerProcess(server.data_dir, [refs], args=["--no-tracking"])
    with pytest.raises(RuntimeError, match="another cnp-server is using"):
        twin.start()
    assert twin.process.returncode == 2


def test_metadata_lists_limits_and_capabilities(client):
    meta = client.metadata()
    assert meta.version and meta.api_version == "cnp.v1" and meta.auth_required
    assert meta.limits.max_queued_jobs == 3 and meta.limits.workers == 1
    assert meta.limits.artifact_chunk_bytes == 1024 * 1024
    assert meta.limits.stage_timeouts["hang"] == 1.0
    assert list(meta.architectures) == ["scripted"]
    assert "cnp.v1.ConceptAudit" in meta.services


# --- the life of a job ----------------------------------------------------------------


def test_job_runs_streams_progress_and_serves_report_and_artifacts(client, server, refs, tmp_path):
    job = client.submit(make_spec(refs, "sleep:8", prune=prune_spec()))
    assert job.state == "QUEUED" and job.id.startswith("aud-")
    updates = list(client.watch(job.id))
    assert updates[-1].state == "SUCCEEDED" and updates[-1].progress == 1.0
    assert {u.stage for u in updates} >= {"work", "report"}
    pairs = zip(updates, updates[1:], strict=False)
    assert all(a.progress <= b.progress for a, b in pairs if a.stage == b.stage)
    done = client.get(job.id)
    assert done.succeeded and done.attempt == 1 and done.finished >= done.started >= done.created

    report = client.report(job.id)
    assert report.audit_id == job.id and report.flagged() == {"wm=1@layer": 1, "wm=0@layer": -1}
    assert report.after is not None and report.proto.pruning.filters_removed == 19
    assert report.spec == make_spec(refs, "sleep:8", prune=prune_spec())
    data = report.to_dict()
    assert data["attributes"][0]["subspaces"][1]["ap_attribute"]["value"] == pytest.approx(0.95)
    assert data["before"]["flops"] == 3_000_000_000

    names = {a.name: a for a in client.artifacts(job.id)}
    assert set(names) == {"audit_table", "heatmap:wm=1:layer", "model_compact", "report.json"}
    saved = client.download_artifact(job.id, "report.json", tmp_path / "report.json")
    assert json.loads(saved.read_text()) == data  # the stored file is the canonical report
    assert str(server.data_dir) not in saved.read_text()  # no server-side job paths
    model = client.download_model(job.id, tmp_path / "model.safetensors")
    assert model.stat().st_size == names["model_compact"].size > 2 * 1024 * 1024
    assert hashlib.sha256(model.read_bytes()).hexdigest() == names["model_compact"].sha256


def test_artifact_reads_are_chunked_with_offset_and_limit(client, server, refs, channel, tmp_path):
    job = client.submit(make_spec(refs, prune=prune_spec()))
    assert client.wait(job.id, timeout=60).succeeded
    whole = client.download_artifact(job.id, "model_compact", tmp_path / "m").read_bytes()
    stub = service_pb2_grpc.ConceptAuditStub(channel)
    request = service_pb2.ReadArtifactRequest(
        audit_id=job.id, name="model_compact", offset=1000, limit=2_500_000
    )
    chunks = list(stub.ReadArtifact(request, metadata=_auth(server)))
    assert len(chunks) == 3 and max(len(c.data) for c in chunks) == 1024 * 1024
    assert chunks[0].offset == 1000 and b"".join(c.data for c in chunks) == whole[1000:2_501_000]
    for name, offset, code in (
        ("nope", 0, grpc.StatusCode.NOT_FOUND),
        ("model_compact", len(whole) + 1, grpc.StatusCode.OUT_OF_RANGE),
        ("model_compact", -1, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        bad = service_pb2.ReadArtifactRequest(audit_id=job.id, name=name, offset=offset)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ReadArtifact(bad, metadata=_auth(server)))
        assert err.value.code() == code


def test_same_request_id_returns_the_same_operation(client, refs):
    spec = make_spec(refs, "sleep:2")
    first = client.submit(spec, request_id="req-idem-1")
    second = client.submit(spec, request_id="req-idem-1")
    assert first.id == second.id
    assert [j.id for j in client.list() if j.request_id == "req-idem-1"] == [first.id]
    with pytest.raises(InvalidArgument, match="already used"):
        client.submit(make_spec(refs, "sleep:3"), request_id="req-idem-1")
    assert client.wait(first.id, timeout=60).succeeded


def test_cancel_a_queued_and_a_running_job(client, refs):
    running = client.submit(make_spec(refs, "sleep:300"))
    queued = client.submit(make_spec(refs, "sleep:300"))
    _running(client, running.id)
    cancelled = client.cancel(queued.id)
    assert cancelled.state == "CANCELLED" and cancelled.attempt == 0  # never started
    started = time.monotonic()
    client.cancel(running.id)
    final = client.wait(running.id, timeout=30)
    assert final.state == "CANCELLED" and final.error_code == "CANCELLED"
    assert time.monotonic() - started < 5  # cooperative: the next step saw the flag
    assert client.cancel(running.id).state == "CANCELLED"  # cancelling again changes nothing


def test_a_job_that_ignores_cancellation_is_terminated_after_the_grace_period(client, refs):
    job = client.submit(make_spec(refs, "stubborn:300"))
    _running(client, job.id)
    started = time.monotonic()
    client.cancel(job.id)
    assert client.wait(job.id, timeout=30).state == "CANCELLED"
    assert 2.0 <= time.monotonic() - started < 15  # grace 2 s, then terminate


def test_a_full_queue_answers_resource_exhausted(client, refs):
    running = client.submit(make_spec(refs, "sleep:300"))
    _running(client, running.id)
    waiting = [client.submit(make_spec(refs, "sleep:300")) for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="queue is full"):
        client.submit(make_spec(refs, "sleep:300"))
    for job in [*waiting, running]:
        client.cancel(job.id)
    assert all(client.wait(j.id, timeout=30).state == "CANCELLED" for j in [*waiting, running])
    assert client.submit(make_spec(refs)).state == "QUEUED"  # room again


# --- bad input and failures -----------------------------------------------------------


def test_bad_spec_is_refused_stored_as_failed_and_the_next_job_succeeds(client, refs):
    bad = make_spec(refs, attributes=["nope"])
    with pytest.raises(InvalidArgument, match="no column nope") as err:
        client.submit(bad, request_id="req-bad-1")
    stored = client.get(err.value.audit_id)
    assert stored.state == "FAILED" and stored.error_code == "INVALID_ARGUMENT"
    assert "no column nope" in stored.error_message
    with pytest.raises(InvalidArgument) as again:  # a retry gets the same refusal
        client.submit(bad, request_id="req-bad-1")
    assert again.value.audit_id == stored.id
    with pytest.raises(InvalidArgument, match="num_classes"):
        client.submit(make_spec(refs, model=ModelRef(architecture="scripted", num_classes=1)))
    with pytest.raises(InvalidArgument, match="weights file not found"):
        spec = make_spec(refs)
        spec.model.weights = str(refs / "missing.safetensors")
        client.submit(spec)
    started = time.monotonic()
    with pytest.raises(Internal, match="correlation id") as exited:  # SystemExit: no hang
        client.submit(make_spec(refs, "exit-on-validate"))
    assert time.monotonic() - started < 5 and client.get(exited.value.audit_id).state == "FAILED"
    assert client.audit(make_spec(refs), timeout=60).audit_id


def test_paths_outside_the_allowed_roots_are_denied(client, refs, tmp_path):
    spec = make_spec(refs)
    spec.dataset.root = str(tmp_path)
    with pytest.raises(PermissionDenied, match="allowed root"):
        client.submit(spec)


def test_a_failing_job_keeps_its_code_and_message(client, refs):
    with pytest.raises(FailedPrecondition, match="scripted failure") as err:
        client.audit(make_spec(refs, "sleep:1;fail:FAILED_PRECONDITION"), timeout=60)
    job = client.get(err.value.audit_id)
    assert job.state == "FAILED" and job.error_code == "FAILED_PRECONDITION"
    with pytest.raises(FailedPrecondition, match="FAILED"):
        client.report(job.id)


def test_unexpected_errors_reach_the_client_as_internal_without_details(client, server, refs):
    with pytest.raises(Internal, match="correlation id") as err:
        client.audit(make_spec(refs, "crash"), timeout=60)
    assert "/srv/internal" not in err.value.message and "Traceback" not in err.value.message
    correlation = err.value.message.split("correlation id ")[1].rstrip(")")
    wait_for(lambda: correlation in server.log, timeout=10)
    assert "/srv/internal/path" in server.log  # the details stay in the server's log


def test_a_worker_that_dies_leaves_a_failed_job(client, refs):
    job = client.wait(client.submit(make_spec(refs, "sleep:2;exit")).id, timeout=60)
    assert job.state == "FAILED" and job.error_code == "INTERNAL"
    assert "exited with code 3" in job.error_message


def test_a_stage_over_its_time_limit_fails_with_deadline_exceeded(client, refs):
    job = client.wait(client.submit(make_spec(refs, "stage:hang:300")).id, timeout=60)
    assert job.state == "FAILED" and job.error_code == "DEADLINE_EXCEEDED"
    assert "'hang'" in job.error_message and "1 s" in job.error_message


# --- the Operations service -----------------------------------------------------------


def test_operations_list_wait_and_delete(client, server, channel, refs):
    operations = operations_pb2_grpc.OperationsStub(channel)
    meta = _auth(server)
    jobs = [client.submit(make_spec(refs)) for _ in range(3)]
    for job in jobs:
        client.wait(job.id, timeout=60)
    seen, token = [], ""
    while True:
        page = operations.ListOperations(
            operations_pb2.ListOperationsRequest(page_size=2, page_token=token), metadata=meta
        )
        assert len(page.operations) <= 2
        assert not any(op.HasField("response") for op in page.operations)
        seen += [convert.audit_id_of(op.name) for op in page.operations]
        token = page.next_page_token
        if not token:
            break
    assert seen[:3] == [j.id for j in reversed(jobs)] and len(seen) == len(set(seen))
    assert {j.id for j in client.list(state="SUCCEEDED")} >= {j.id for j in jobs}

    slow = client.submit(make_spec(refs, "sleep:300"))
    request = operations_pb2.WaitOperationRequest(name=f"operations/{slow.id}")
    request.timeout.FromMilliseconds(300)
    assert not operations.WaitOperation(request, metadata=meta, timeout=10).done
    with pytest.raises(grpc.RpcError) as err:
        operations.DeleteOperation(
            operations_pb2.DeleteOperationRequest(name=f"operations/{slow.id}"), metadata=meta
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.cancel(slow.id)
    client.wait(slow.id, timeout=30)

    done = operations.GetOperation(
        operations_pb2.GetOperationRequest(name=f"operations/{jobs[0].id}"), metadata=meta
    )
    assert done.done and done.response.Is(report_pb2.AuditReport.DESCRIPTOR)
    client.delete(jobs[0].id)
    assert not (server.data_dir / "jobs" / jobs[0].id).exists()
    with pytest.raises(NotFound):
        client.get(jobs[0].id)
