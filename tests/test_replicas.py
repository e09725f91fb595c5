"""Two ``cnp-server`` replicas on one PostgreSQL database: one queue, each job claimed
exactly once; kill -9 of one replica mid-job and the other takes the job over once its
lease runs out; exactly one MLflow run per job.

Each replica has its own data directory (its token, its jobs' files) and its own
``node_id``; they share the database and one MLflow store (a SQLite file here; the real
MLflow server on PostgreSQL has its own test).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server_support import ServerProcess, make_spec, wait_for

from cnp_client import AuditClient
from cnp_server.jobs import RUNNING, SUCCEEDED, TRACKING_DONE
from cnp_server.store import JobStore

pytestmark = pytest.mark.slow

EXPERIMENT = "cnp-audits"  # the servers' default experiment
NODES = ("replica-a", "replica-b")
SHORT_JOBS = 6


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, refs, postgres):
    """Both replicas, started at once on an empty database (both migrate it), with one
    MLflow store; yields (servers by node id, database URL, MLflow client)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("replicas")
    url = postgres.url(postgres.create_database("replicas"))
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    # Created here, once: the replicas find it by name instead of racing to create the
    # store's tables, and its artifacts go under this test's directory.
    mlflow = MlflowClient(tracking_uri)
    mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
    settings = {
        "database_url": url,
        "tracking_uri": tracking_uri,
        # A job whose replica stopped beating for 3 s is taken over.
        "lease_seconds": 3,
        "heartbeat_seconds": 0.5,
        "tracking_retry_seconds": 1,
        "tracking_live_seconds": 1,
    }
    servers = {
        node: ServerProcess(root / node, [refs], settings={**settings, "node_id": node})
        for node in NODES
    }
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            for started in [pool.submit(s.start) for s in servers.values()]:
                started.result()
        yield servers, url, mlflow
    finally:
        for server in servers.values():
            server.stop()


def _runs_of(mlflow, audit_id: str) -> list:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    return mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`cnp.audit_id` = '{audit_id}'"
    )


def test_both_replicas_migrate_once_and_say_so_in_one_line(replicas):
    servers, url, _ = replicas
    lines = [
        line
        for server in servers.values()
        for line in server.log.splitlines()
        if "job store" in line or "alembic" in line.lower()
    ]
    # One created the schema while the other waited on the lock, then found it current.
    assert len(lines) == 2, lines
    assert sum("job store created at revision 0002" in line for line in lines) == 1
    assert sum("job store schema is current (revision 0002)" in line for line in lines) == 1


def test_jobs_submitted_to_both_replicas_each_run_once(replicas, refs):
    servers, url, mlflow = replicas
    clients = [AuditClient(s.address, token=s.token) for s in servers.values()]
    try:
        ids = [
            clients[i % 2].submit(make_spec(refs, "sleep:3"), request_id=f"short-{i}").id
            for i in range(SHORT_JOBS)
        ]
        for audit_id in ids:  # either replica answers for any job: one store
            assert clients[0].wait(audit_id, timeout=60).state == SUCCEEDED
    finally:
        for client in clients:
            client.close()
    store = JobStore(url)  # the test's view of the shared store (no migration)
    jobs = [store.get(audit_id) for audit_id in ids]
    assert [job.attempts for job in jobs] == [1] * SHORT_JOBS  # claimed once, run once
    assert {job.owner for job in jobs} == set(NODES)  # both replicas took jobs
    wait_for(lambda: all(store.get(a).tracking_state == TRACKING_DONE for a in ids), timeout=30)
    for job in jobs:
        runs = _runs_of(mlflow, job.id)
        assert [r.info.run_id for r in runs] == [store.get(job.id).mlflow_run_id]
        assert runs[0].info.status == "FINISHED"
        # Recorded by the replica that ran it: its files are there, not on the other.
        artifacts = {a.path for a in mlflow.list_artifacts(runs[0].info.run_id)}
        assert {"report.json", "audit_table.csv"} <= artifacts, job.owner
    store.close()


def test_a_killed_replicas_job_is_finished_by_the_other(replicas, refs, tmp_path):
    """Last of the module: it kills one replica."""
    servers, url, mlflow = replicas
    gate = tmp_path / "gate"
    entry = servers[NODES[0]]
    with AuditClient(entry.address, token=entry.token) as client:
        audit_id = client.submit(make_spec(refs, f"hold:held:{gate}")).id
        wait_for(lambda: client.get(audit_id).stage == "held", timeout=30)
    store = JobStore(url)  # the test's view of the shared store (no migration)
    running = store.get(audit_id)
    assert (running.state, running.attempts) == (RUNNING, 1)
    survivor_node = next(node for node in NODES if node != running.owner)
    victim, survivor = servers[running.owner], servers[survivor_node]
    wait_for(lambda: store.get(audit_id).mlflow_run_id, timeout=30)  # its run is open
    run_id = store.get(audit_id).mlflow_run_id

    victim.kill()  # SIGKILL: no drain, no re-queue; its worker dies with it
    killed_at = time.monotonic()
    gate.touch()  # the next attempt passes the gate at once
    with AuditClient(survivor.address, token=survivor.token) as client:
        done = client.wait(audit_id, timeout=60)
    taken_over_in = time.monotonic() - killed_at
    assert done.state == SUCCEEDED and done.attempt == 2
    assert store.get(audit_id).owner == survivor_node
    assert f"job {audit_id} had no heartbeat for 3s: QUEUED" in survivor.log
    # The lease (3 s), the survivor's look for stale jobs (every 1.5 s), a worker's start.
    assert taken_over_in < 15, taken_over_in

    wait_for(lambda: store.get(audit_id).tracking_state == TRACKING_DONE, timeout=30)
    runs = _runs_of(mlflow, audit_id)
    assert [r.info.run_id for r in runs] == [run_id]  # the victim's run, completed
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["cnp.attempts"] == "2"
    store.close()


def test_an_unreachable_database_stops_the_server_with_one_clear_line(tmp_path, refs):
    """No traceback, no password: the masked URL and the driver's reason, exit status 2."""
    from postgres import free_port

    url = f"postgresql+psycopg://cnp:s3cret@127.0.0.1:{free_port()}/jobs"
    server = ServerProcess(tmp_path / "data", [refs], settings={"database_url": url})
    with pytest.raises(RuntimeError, match="exited with 2") as err:
        server.start(timeout=30)
    log = str(err.value)
    assert "cannot open the job store at postgresql+psycopg://cnp:***@127.0.0.1:" in log
    assert "Connection refused" in log
    assert "s3cret" not in log and "Traceback" not in log
