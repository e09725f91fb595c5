"""The Python client: imports without torch, typed results and errors, retries, TLS."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time

import pytest
from test_server_support import (
    REPO,
    ServerProcess,
    make_spec,
    prune_spec,
    self_signed_certificate,
)

from cnp_client import (
    AuditClient,
    AuditReportView,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
    error_for,
)
from cnp_client.client import default_token
from cnp_core.results import AuditResult

BLOCKED = ("torch", "torchvision", "numpy", "sqlalchemy", "mlflow", "zennit", "sklearn")

NO_TORCH = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import cnp_client
from cnp.v1 import report_pb2, service_pb2, service_pb2_grpc, spec_pb2
from cnp_client import AuditClient, AuditReportView, AuditSpec, DatasetRef, ModelRef
spec = AuditSpec(model=ModelRef(architecture="resnet18", weights="/w"),
                 dataset=DatasetRef(root="/d"), layers=["layer3"], attributes=["wm"])
view = AuditReportView(report_pb2.AuditReport(audit_id="a", spec=spec_pb2.AuditSpec()))
assert view.to_result().spec.negative_class == -1
client = AuditClient("127.0.0.1:1", token="t")
client.close()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not loaded, loaded
print("ok")
"""


def test_client_imports_and_works_without_torch():
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_typed_errors_carry_code_and_message():
    err = error_for("INVALID_ARGUMENT", "unknown layer 'x'", audit_id="aud-1")
    assert isinstance(err, InvalidArgument) and isinstance(err, ServiceError)
    assert err.code == "INVALID_ARGUMENT" and err.message == "unknown layer 'x'"
    assert str(err) == "INVALID_ARGUMENT: unknown layer 'x'" and err.audit_id == "aud-1"
    assert err.status_code.name == "INVALID_ARGUMENT"
    assert isinstance(error_for("CANCELLED", "stop"), Cancelled)
    odd = error_for("DATA_LOSS", "gone")
    assert type(odd) is ServiceError and odd.code == "DATA_LOSS"


def test_token_lookup_order(tmp_path, monkeypatch):
    for name in ("CNP_TOKEN", "CNP_TOKEN_FILE", "CNP_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_token() is None
    (tmp_path / ".cnp").mkdir()
    (tmp_path / ".cnp" / "token").write_text("local\n")
    (tmp_path / ".cnp" / "token").chmod(0o604)
    with pytest.raises(PermissionError, match="accessible by others"):
        default_token()  # a token others can read is refused, as ssh refuses such a key
    (tmp_path / ".cnp" / "token").chmod(0o600)
    assert default_token() == "local"  # the embedded server's token in ./.cnp
    monkeypatch.setenv("CNP_DATA_DIR", str(tmp_path / "elsewhere"))
    assert default_token() is None
    (tmp_path / "file").write_text("from-file\n")
    (tmp_path / "file").chmod(0o600)
    monkeypatch.setenv("CNP_TOKEN_FILE", str(tmp_path / "file"))
    assert default_token() == "from-file"
    monkeypatch.setenv("CNP_TOKEN", "from-env")
    assert default_token() == "from-env"
    assert default_token(token_file=tmp_path / "file") == "from-file"
    assert default_token("explicit", tmp_path / "file") == "explicit"


def test_unavailable_is_retried_with_backoff_then_raised():
    with AuditClient("127.0.0.1:9", token="t", retries=2, backoff=0.2, timeout=2) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client.get("aud-1")
        assert time.monotonic() - started >= 0.6  # waited 0.2 + 0.4 between three tries
    with AuditClient("127.0.0.1:9", token="t", retries=0, backoff=5, timeout=2) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client.get("aud-1")
        assert time.monotonic() - started < 4


# --- against a server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, refs):
    process = ServerProcess(tmp_path_factory.mktemp("data"), [refs], args=["--no-tracking"])
    yield process.start()
    process.stop()


def test_audit_returns_a_typed_report(server, refs):
    with AuditClient(server.address, token_file=server.data_dir / "token") as client:
        report = client.audit(make_spec(refs, "sleep:3", prune=prune_spec()), timeout=60)
        assert isinstance(report, AuditReportView)
        result = report.to_result()
        assert isinstance(result, AuditResult)
        assert result.attributes[0].subspaces[1].ap_attribute.value == pytest.approx(0.95)
        assert result.after.groups[0].count == 25 and result.pruning.removed == {"conv": [1, 5, 7]}
        assert "model_compact" in result.artifacts
        assert report.to_dict()["attributes"][1]["flagged_subspace"] == -1
        assert report.proto.attributes[0].subspaces[2].ap_class.value == pytest.approx(0.97)
        jobs = client.list(page_size=1)
        assert jobs[0].id == report.audit_id and jobs[0].succeeded
        assert isinstance(jobs[0].finished, datetime.datetime)


def test_no_retry_on_user_errors_and_failures_raise_typed(server, refs):
    with AuditClient(server.address, token=server.token, retries=3, backoff=5.0) as client:
        started = time.monotonic()
        with pytest.raises(InvalidArgument, match="no column"):
            client.submit(make_spec(refs, attributes=["missing"]))
        assert time.monotonic() - started < 5.0  # not retried (the first backoff is 5 s)
        with pytest.raises(FailedPrecondition, match="scripted failure") as err:
            client.audit(make_spec(refs, "fail:FAILED_PRECONDITION"), timeout=60)
        job = client.get(err.value.audit_id)
        assert job.state == "FAILED" and isinstance(job.error(), FailedPrecondition)
        slow = client.submit(make_spec(refs, "sleep:300"))
        updates = client.watch(slow.id)
        next(updates)
        client.cancel(slow.id)
        assert [u for u in updates][-1].state == "CANCELLED"
        with pytest.raises(Cancelled):
            client.audit(make_spec(refs, "fail:CANCELLED"), timeout=60)


def test_wait_times_out_with_deadline_exceeded(server, refs):
    with AuditClient(server.address, token=server.token) as client:
        job = client.submit(make_spec(refs, "sleep:300"))
        with pytest.raises(ServiceError) as err:
            client.wait(job.id, timeout=0.5)
        assert err.value.code == "DEADLINE_EXCEEDED"
        client.cancel(job.id)
        assert client.wait(job.id, timeout=30).state == "CANCELLED"


def test_mutual_tls_from_the_client_and_the_cli(tmp_path, refs, capsys):
    from cnp_client.cli import main

    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    cert, key = self_signed_certificate(tmp_path / "server")
    client_cert, client_key = self_signed_certificate(tmp_path / "client")  # its own CA
    server = ServerProcess(
        tmp_path / "data",
        [refs],
        args=["--no-tracking", "--tls-cert", str(cert), "--tls-key", str(key)]
        + ["--tls-client-ca", str(client_cert)],
    ).start()
    try:
        identity = {"client_certificate": client_cert, "client_key": client_key}
        with AuditClient(
            server.address, token=server.token, root_certificates=cert, **identity
        ) as c:
            assert c.metadata().tls and c.audit(make_spec(refs), timeout=60).audit_id
        anonymous = AuditClient(
            server.address, token=server.token, root_certificates=cert, retries=0, timeout=3
        )
        with anonymous, pytest.raises(Unavailable):  # no client certificate: no handshake
            anonymous.metadata()
        connection = ["--server", server.address, "--token-file", str(server.data_dir / "token")]
        tls = ["--tls-ca", str(cert), "--tls-cert", str(client_cert), "--tls-key", str(client_key)]
        assert main(["jobs", *connection, *tls]) == 0
        assert main(["jobs", *connection, *tls[:4]]) == 2
        assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    finally:
        server.stop()


def test_tls_with_a_given_certificate(tmp_path, refs):
    cert, key = self_signed_certificate(tmp_path)
    server = ServerProcess(
        tmp_path / "data",
        [refs],
        args=["--no-tracking", "--tls-cert", str(cert), "--tls-key", str(key)],
    ).start()
    try:
        with AuditClient(server.address, token=server.token, root_certificates=cert) as client:
            meta = client.metadata()
            assert meta.tls and meta.auth_required
            assert client.audit(make_spec(refs), timeout=60).audit_id
        plain = AuditClient(server.address, token=server.token, retries=0, timeout=3)
        with plain, pytest.raises(Unavailable):  # a plaintext client cannot talk to it
            plain.metadata()
    finally:
        server.stop()
