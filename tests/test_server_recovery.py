"""Restarts: kill -9 while a job runs, graceful shutdown with and without time to drain.

Every accepted job must reach a visible final state (or run again), never be lost or
stuck, and its MLflow run must not be duplicated.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server_support import ServerProcess, make_references, make_spec, wait_for

from cnp_client import AuditClient, Unavailable
from cnp_server.jobs import QUEUED, RUNNING, SUCCEEDED
from cnp_server.store import JobStore

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return state.exists() and state.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _store(data_dir: Path) -> JobStore:
    return JobStore(f"sqlite:///{data_dir / 'jobs.db'}")


def test_kill_9_during_a_running_job_then_restart_reruns_it_once(tmp_path):
    refs = tmp_path / "refs"
    make_references(refs)
    server = ServerProcess(tmp_path / "data", [refs]).start()
    try:
        client = AuditClient(server.address, token=server.token)
        job = client.submit(make_spec(refs, "sleep:30"))
        wait_for(lambda: client.get(job.id).stage == "work", timeout=30)
        workers = _children(server.process.pid)
        assert workers, "the job runs in a worker process"
        server.kill()  # SIGKILL: no shutdown code runs
        client.close()
        # The worker dies with the server instead of running on as an orphan.
        wait_for(lambda: not any(_alive(p) for p in workers), timeout=10)
        store = _store(server.data_dir)
        stuck = store.get(job.id)
        store.close()
        assert stuck.state == RUNNING and stuck.attempts == 1

        server.start()
        with AuditClient(server.address, token=server.token) as client:
            done = client.wait(job.id, timeout=60)
            assert done.state == SUCCEEDED and done.attempt == 2
            report = client.report(job.id)
            assert len(report.attributes) == 2 and report.before is not None
            # The run exists from the job's start; its record is complete once "done".
            wait_for(lambda: client.get(job.id).tracking_state == "done", timeout=60)
            run_id = client.get(job.id).mlflow_run_id
    finally:
        server.stop()

    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{server.data_dir / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("cnp-audits")
    runs = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`cnp.audit_id` = '{job.id}'"
    )
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.run_name == job.id and run.info.status == "FINISHED"
    assert run.data.tags["cnp.attempts"] == "2"
    key = "audit/wm/1/layer/S2/ap_attribute"
    assert run.data.metrics[key] == pytest.approx(0.95)
    assert len(mlflow.get_metric_history(run_id, key)) == 1
    assert {a.path for a in mlflow.list_artifacts(run_id)} >= {"report.json", "audit_table.csv"}


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_graceful_shutdown_drains_running_jobs_or_requeues_them(tmp_path):
    refs = tmp_path / "refs"
    make_references(refs)
    data = tmp_path / "data"
    settings = {"drain_seconds": 20}
    server = ServerProcess(data, [refs], settings=settings, args=["--no-tracking"]).start()
    with AuditClient(server.address, token=server.token, retries=0) as client:
        short = client.submit(make_spec(refs, "sleep:50"))
        wait_for(lambda: client.get(short.id).state == RUNNING, timeout=30)
        workers = _children(server.process.pid)
        server.process.send_signal(signal.SIGTERM)
        # While draining: not serving, no new audits, the running job goes on.
        wait_for(lambda: _health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(Unavailable, match="shutting down"):
            client.submit(make_spec(refs))
        assert server.process.wait(30) == 0
    # No worker, pre-warmed or running, outlives the server.
    wait_for(lambda: not any(_alive(p) for p in workers), timeout=10)
    store = _store(data)
    finished = store.get(short.id)
    assert finished.state == SUCCEEDED and finished.attempts == 1
    store.close()

    # No time to drain: the running job is put back in the queue and runs after restart.
    server = ServerProcess(data, [refs], settings={"drain_seconds": 0.5}, args=["--no-tracking"])
    server.start()
    with AuditClient(server.address, token=server.token) as client:
        long = client.submit(make_spec(refs, "sleep:40"))
        wait_for(lambda: client.get(long.id).stage == "work", timeout=30)
        # A job was queued behind it, so a spare warms up beside the running worker.
        alone = len(_children(server.process.pid))
        queued = client.submit(make_spec(refs, "sleep:40"))
        wait_for(lambda: len(_children(server.process.pid)) > alone, timeout=10)
        workers = _children(server.process.pid)
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 15
    wait_for(lambda: not any(_alive(p) for p in workers), timeout=10)
    store = _store(data)
    requeued = store.get(long.id)
    store.close()
    assert requeued.state == QUEUED and "shut down" in requeued.message
    server.start()
    try:
        with AuditClient(server.address, token=server.token) as client:
            done = client.wait(long.id, timeout=60)
            assert done.state == SUCCEEDED and done.attempt == 2
            assert client.wait(queued.id, timeout=60).state == SUCCEEDED
    finally:
        server.stop()
