"""Liveness under load, against real ``cnp-server`` processes on loopback.

Open streams (CI jobs waiting on WatchAudit) must never starve the health port a liveness
probe uses, nor the unary calls; one client cannot take every stream; and the server
serves plaintext beyond loopback only when the operator says so.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server_support import ServerProcess, make_spec, wait_for

from cnp.v1 import service_pb2, service_pb2_grpc
from cnp_client import AuditClient
from cnp_core import convert
from cnp_server.config import ConfigError, ServerConfig, load_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _server(tmp_path_factory, refs, **settings) -> ServerProcess:
    data = tmp_path_factory.mktemp("data")
    return ServerProcess(data, [refs], settings={"workers": 1, **settings}, args=["--no-tracking"])


def _waiting_job(client: AuditClient, refs: Path) -> tuple[str, str]:
    """(running, queued) job ids: streams watch the queued one, as waiting CI jobs do."""
    running = client.submit(make_spec(refs, "sleep:900")).id
    wait_for(lambda: client.get(running).state == "RUNNING", timeout=30)
    return running, client.submit(make_spec(refs, "sleep:900")).id


def _health(address: str, service: str = "") -> tuple[int, float]:
    """(status, seconds) of one probe on a fresh connection, as the kubelet makes it."""
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status
    return status, time.monotonic() - started


class Streams:
    """WatchAudit streams held open from a few channels (all from 127.0.0.1: one client)."""

    def __init__(self, server: ServerProcess, audit_id: str, channels: int = 4) -> None:
        self.metadata = (("authorization", f"Bearer {server.token}"),)
        self.request = service_pb2.WatchAuditRequest(audit_id=audit_id)
        self.channels = [grpc.insecure_channel(server.address) for _ in range(channels)]
        self.stubs = [service_pb2_grpc.ConceptAuditStub(c) for c in self.channels]
        self.calls: list = []

    def open(self) -> None:
        """One more stream, served once its first update arrives (RpcError if refused)."""
        call = self.stubs[len(self.calls) % len(self.stubs)].WatchAudit(
            self.request, metadata=self.metadata
        )
        try:
            next(call)
        except grpc.RpcError:
            call.cancel()
            raise
        self.calls.append(call)

    def close(self, n: int | None = None) -> None:
        for call in self.calls[-n if n else 0 :]:
            call.cancel()
        del self.calls[-n if n else 0 :]

    def refused(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            self.open()
        assert err.value.code() == EXHAUSTED
        return err.value

    def shut(self) -> None:
        self.close()
        for channel in self.channels:
            channel.close()


def _accepts(streams: Streams) -> bool:
    try:
        streams.open()
    except grpc.RpcError:
        return False  # a cancelled stream frees its slot within one watch poll
    return True


# --- 200 streams: the health port answers, one client meets its limit -----------------

STREAMS = 200


@pytest.fixture(scope="module")
def busy(tmp_path_factory, refs):
    """A server with 200 WatchAudit streams open, all the limit allows one client."""
    server = _server(
        tmp_path_factory, refs, rpc_threads=STREAMS + 16, max_streams_per_client=STREAMS
    ).start()
    client = AuditClient(server.address, token=server.token)
    jobs = _waiting_job(client, refs)
    streams = Streams(server, jobs[1])
    for _ in range(STREAMS):
        streams.open()
    yield server, streams, jobs
    streams.shut()
    for job in jobs:
        client.cancel(job)
    client.close()
    server.stop()


@pytest.mark.slow
def test_health_port_answers_within_a_second_with_200_streams_open(busy):
    server, streams, _ = busy
    assert len(streams.calls) == STREAMS
    latencies = []
    for _ in range(10):
        status, seconds = _health(server.health_address)
        assert status == SERVING
        latencies.append(seconds)
    assert _health(server.health_address, "cnp.v1.ConceptAudit")[0] == SERVING
    print(f"health with {STREAMS} streams open: max {max(latencies) * 1000:.1f} ms")
    assert max(latencies) < 1.0


@pytest.mark.slow
def test_one_client_gets_no_more_streams_than_its_limit(busy):
    server, streams, jobs = busy
    error = streams.refused()
    assert "too many streams from 127.0.0.1" in error.details()
    assert f"max_streams_per_client = {STREAMS}" in error.details()
    # WaitOperation holds a thread as long: it counts too.
    with grpc.insecure_channel(server.address) as channel:
        request = operations_pb2.WaitOperationRequest(name=convert.operation_name(jobs[1]))
        with pytest.raises(grpc.RpcError) as err:
            operations_pb2_grpc.OperationsStub(channel).WaitOperation(
                request, metadata=streams.metadata, timeout=10
            )
        assert err.value.code() == EXHAUSTED and "max_streams_per_client" in err.value.details()
    streams.close(10)
    while len(streams.calls) < STREAMS:  # each cancelled stream frees its slot in time
        wait_for(lambda: _accepts(streams), timeout=10)
    streams.refused()  # full again


# --- the global cap: unary calls still get through -------------------------------------


@pytest.mark.slow
def test_unary_calls_get_through_while_the_stream_cap_is_reached(tmp_path_factory, refs):
    # 12 RPC threads: 4 for streams, 8 kept for everything else.
    server = _server(tmp_path_factory, refs, rpc_threads=12).start()
    client = AuditClient(server.address, token=server.token, retries=0, timeout=5)
    jobs = _waiting_job(client, refs)
    streams = Streams(server, jobs[1])
    try:
        for _ in range(4):
            streams.open()
        error = streams.refused()
        assert "too many streams on this server" in error.details()
        assert "rpc_threads - 8" in error.details()
        # Every thread a stream may take is taken, and yet:
        extra = client.submit(make_spec(refs))
        assert client.get(extra.id).state == "QUEUED"
        assert client.metadata().api_version == "cnp.v1"
        assert _health(server.address)[0] == SERVING  # the main port's health too
        streams.close(1)
        wait_for(lambda: _accepts(streams), timeout=10)
        for job in [*jobs, extra.id]:
            client.cancel(job)
    finally:
        streams.shut()
        client.close()
        server.stop()


# --- keepalive: a vanished client's stream is freed ------------------------------------

_WATCHER = """
import sys, grpc
from cnp.v1 import service_pb2, service_pb2_grpc
address, token, audit_id = sys.argv[1:]
stub = service_pb2_grpc.ConceptAuditStub(grpc.insecure_channel(address))
call = stub.WatchAudit(
    service_pb2.WatchAuditRequest(audit_id=audit_id),
    metadata=(("authorization", "Bearer " + token),),
)
next(call)
print("open", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_keepalive_frees_the_stream_of_a_client_that_stopped_answering(tmp_path_factory, refs):
    settings = {"max_streams_per_client": 1, "keepalive_seconds": 1, "keepalive_timeout_seconds": 1}
    server = _server(tmp_path_factory, refs, **settings).start()
    client = AuditClient(server.address, token=server.token)
    jobs = _waiting_job(client, refs)
    streams = Streams(server, jobs[1], channels=1)
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, server.address, server.token, jobs[1]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout.readline() == "open\n"
        watcher.send_signal(signal.SIGSTOP)  # its socket stays open, its pings go unanswered
        streams.refused()
        started = time.monotonic()
        wait_for(lambda: _accepts(streams), timeout=20)
        print(f"stopped client's stream freed after {time.monotonic() - started:.1f} s")
        for job in jobs:
            client.cancel(job)
    finally:
        watcher.kill()
        watcher.wait()
        streams.shut()
        client.close()
        server.stop()


# --- drain shows on both ports ----------------------------------------------------------


@pytest.mark.slow
def test_drain_turns_the_health_port_not_serving_too(tmp_path_factory, refs):
    server = _server(tmp_path_factory, refs, drain_seconds=20).start()
    with AuditClient(server.address, token=server.token) as client:
        job = client.submit(make_spec(refs, "sleep:30"))
        wait_for(lambda: client.get(job.id).state == "RUNNING", timeout=30)
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: _health(server.health_address)[0] == NOT_SERVING, timeout=10)
    assert _health(server.address)[0] == NOT_SERVING
    assert server.process.wait(60) == 0


# --- plaintext only on loopback -----------------------------------------------------------


def test_plaintext_beyond_loopback_needs_allow_insecure(tmp_path):
    for listen in ("0.0.0.0:0", "[::]:50051", "10.1.2.3:50051", "cnp.example.com:50051"):
        with pytest.raises(ConfigError, match="tls_cert and tls_key.*allow_insecure = true"):
            ServerConfig(listen=listen).validate()
        assert ServerConfig(listen=listen, allow_insecure=True).validate()
    for listen in ("127.0.0.1:0", "127.8.0.1:50051", "[::1]:0", "localhost:50051"):
        ServerConfig(listen=listen).validate()
    pem = tmp_path / "server.pem"
    pem.write_text("checked for existence only here")
    ServerConfig(listen="0.0.0.0:0", tls_cert=str(pem), tls_key=str(pem)).validate()
    assert load_config(["--listen", "0.0.0.0:0", "--allow-insecure"], environ={}).allow_insecure
    env = {"CNP_LISTEN": "0.0.0.0:0", "CNP_ALLOW_INSECURE": "true"}
    assert load_config([], environ=env).allow_insecure
    with pytest.raises(ConfigError, match="--allow-insecure"):
        load_config(["--listen", "0.0.0.0:0"], environ={})


def test_the_server_refuses_to_start_plaintext_on_all_interfaces(tmp_path):
    command = [str(Path(sys.executable).parent / "cnp-server"), "--listen", "0.0.0.0:0"]
    result = subprocess.run(
        [*command, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr and "--allow-insecure" in result.stderr
    assert not (tmp_path / "server.json").exists()


def test_stream_limits_and_keepalive_are_validated():
    for values in ({"rpc_threads": 8}, {"max_streams_per_client": 0}, {"keepalive_seconds": 0}):
        with pytest.raises(ConfigError):
            ServerConfig(**values).validate()
    with pytest.raises(ConfigError, match="health_listen must be HOST:PORT"):
        ServerConfig(health_listen="50052").validate()
    assert ServerConfig(listen="127.0.0.1:7000").effective_health_listen == "127.0.0.1:0"
    assert ServerConfig().max_streams == 56
