"""The service's MLflow record on a tracking server deployed as a team runs one: a real
``mlflow server`` with a PostgreSQL backend store and proxied artifacts (clients see
``mlflow-artifacts:`` URIs; the files land in the server's artifacts destination), killed
-9 and started again on the same port and store while an audit runs.

One real pruning audit (the real engine on the small synthetic benchmark) is the
scenario; the tests read what it left through MLflow's client and in the PostgreSQL
database itself. The same tracker against a sqlite-backed server that is absent, frozen
or killed between jobs: test_fault_injection.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import pytest
from postgres import free_port
from test_server_support import ServerProcess, wait_for

from cnp_client import AuditClient, AuditReportView, Job
from cnp_core.spec import PruneSpec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("benchmarks")]

EXPERIMENT = "team-audits"
TAGS = {"git.commit": "0123abc"}
MODEL_NAME = "shapes-cnp-pg"
# The metrics the finished job logs once (the running job logs progress/ and stage_seconds/).
FINAL_METRICS = {"audit", "before", "after", "pruning", "timing"}
# Cheap but real: few resamples keep the job within seconds (as in test_server_e2e.py).
CHEAP = {"drsa_max_epochs": 200, "drsa_restarts": 1, "bootstrap": 20, "heatmap_samples": 2}


class TrackingServer:
    """``mlflow server`` on a PostgreSQL database with proxied artifacts, in its own
    session so that a kill reaches its uvicorn worker too."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path) -> None:
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> TrackingServer:
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            self.artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            # The Host header clients send; anything else is refused (DNS rebinding).
            "--allowed-hosts",
            f"127.0.0.1:{self.port}",
            "--workers",
            "1",
            "--uvicorn-opts",
            "--no-access-log",
        ]
        # No runner for MLflow's own background jobs (GenAI evaluation): one process less
        # to start on shared cores.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def up(self) -> bool:
        try:
            with urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_up(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"mlflow server exited:\n{self.log.read_text()}"
            return self.up()

        wait_for(ready, timeout=timeout, interval=0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture(scope="module")
def bench():
    from cnp_core.synthetic import ensure_benchmark

    return ensure_benchmark()


@pytest.fixture(scope="module")
def database(postgres) -> str:
    """The tracking server's PostgreSQL database (its backend and model registry store)."""
    return postgres.url(postgres.create_database("mlflow"))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, database):
    root = tmp_path_factory.mktemp("mlflow-server")
    (root / "artifacts").mkdir()
    server = TrackingServer(database, root / "artifacts", root / "mlflow.log").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def service(tmp_path_factory, bench, tracking):
    """cnp-server with the real engine, logging to the tracking server by URI; it starts
    (and warms its worker) while the tracking server does."""
    process = ServerProcess(
        tmp_path_factory.mktemp("cnp-data"),
        [bench.dataset.parent],
        engine="cnp_server.engine",
        settings={
            # Fail fast while the tracking server is away and retry soon once it is back.
            "tracking_retry_seconds": 0.1,
            "tracking_live_seconds": 0.5,
            "tracking_http_retries": 0,
            "tracking_http_timeout": 5,
            "tracking_max_attempts": 1000,
        },
        args=["--tracking-uri", tracking.uri],
    ).start()
    tracking.wait_up()
    yield process
    process.stop()


@dataclass
class Audit:
    job: Job  # once final and recorded
    report: AuditReportView
    run_id_before_restart: str
    killed_at: float  # epoch seconds


@pytest.fixture(scope="module")
def audit(service, tracking, bench) -> Audit:
    """A pruning audit whose tracking server is killed -9 once the job prunes (its last
    stage, its run already open) and started again on the same port and database. The
    server takes seconds to start, so the job usually ends while it is away and its final
    record waits; either way the tracker's calls fail meanwhile and are retried."""
    spec = bench.audit_spec(**CHEAP)
    spec.method = "cav"  # flags the watermark reliably here (see test_server_e2e.py)
    spec.prune = PruneSpec(method="cnp", rate=0.3)
    with AuditClient(service.address, token=service.token, timeout=60) as client:
        audit_id = client.submit(
            spec, experiment=EXPERIMENT, tags=TAGS, register_model=MODEL_NAME
        ).id
        pruning = wait_for(
            lambda: (
                (j := client.get(audit_id)).done or (j.stage == "prune" and j.mlflow_run_id) and j
            ),
            timeout=300,
        )
        assert not pruning.done, f"the job ended before its prune stage: {pruning}"
        killed_at = time.time()
        tracking.kill()
        tracking.start()
        job = client.wait(audit_id, timeout=300)
        tracking.wait_up()
        job = wait_for(
            lambda: (j := client.get(audit_id)).tracking_state in {"done", "failed"} and j,
            timeout=120,
            interval=0.2,
        )
        return Audit(job, client.report(audit_id), pruning.mlflow_run_id, killed_at)


@pytest.fixture(scope="module")
def mlflow(tracking):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_the_job_succeeds_and_its_record_survives_the_restart(audit, service, mlflow):
    job = audit.job
    assert job.succeeded and job.tracking_state == "done", job.tracking_error
    # The outage was felt: the tracker's calls were refused, then retried.
    assert f"MLflow logging of {job.id} failed" in service.log
    assert job.mlflow_run_id == audit.run_id_before_restart  # the run opened before it
    (run,) = mlflow.search_runs(
        [job.mlflow_experiment_id], filter_string=f"tags.`cnp.audit_id` = '{job.id}'"
    )
    assert run.info.run_id == job.mlflow_run_id and run.info.status == "FINISHED"
    assert run.info.start_time < audit.killed_at * 1000 < run.info.end_time
    assert mlflow.get_experiment(job.mlflow_experiment_id).name == EXPERIMENT


def test_params_metrics_tags_and_dataset(audit, mlflow):
    run = mlflow.get_run(audit.job.mlflow_run_id)
    report = audit.report.proto
    assert run.data.params["prune.method"] == "cnp" and run.data.params["method"] == "cav"
    assert run.data.tags["git.commit"] == "0123abc"
    assert run.data.tags["cnp.model_sha256"] == report.model_sha256
    flagged = report.attributes[0].flagged_subspace
    assert flagged >= 0
    key = next(k for k in run.data.metrics if k.endswith(f"/S{flagged + 1}/ap_attribute"))
    assert run.data.metrics[key] == pytest.approx(
        report.attributes[0].subspaces[flagged].ap_attribute.value
    )
    assert run.data.metrics["pruning/filters_removed"] == report.pruning.filters_removed > 0
    assert run.data.metrics["after/parameters"] == report.after.parameters
    assert any(k.startswith("progress/") for k in run.data.metrics)  # logged as it ran
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == report.dataset_digest[:36]


def _files(mlflow, run_id: str, path: str | None = None):
    """Every artifact file of the run, as MLflow lists it through the proxy."""
    for item in mlflow.list_artifacts(run_id, path):
        if item.is_dir:
            yield from _files(mlflow, run_id, item.path)
        else:
            yield item


def test_artifacts_go_through_the_proxy_to_its_destination(
    audit, service, tracking, mlflow, tmp_path
):
    run = mlflow.get_run(audit.job.mlflow_run_id)
    run_id, experiment_id = run.info.run_id, audit.job.mlflow_experiment_id
    assert run.info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts"
    stored = {f.path: f.file_size for f in _files(mlflow, run_id)}
    assert {"audit_table.json", "report.json", "model/MLmodel"} <= set(stored)
    # Each heatmap once in MLflow's image view, though its record was retried.
    heatmaps = [a for a in audit.report.artifacts if a.name.startswith("heatmap")]
    images = [p for p in stored if p.startswith("images/") and p.endswith(".png")]
    assert heatmaps and len(images) == len(heatmaps), images
    # The files are in the tracking server's destination, none in cnp's data directory.
    destination = tracking.artifacts / experiment_id / run_id / "artifacts"
    there = {str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file()}
    assert there == set(stored)
    assert not any((service.data_dir / name).exists() for name in ("mlartifacts", "mlflow.db"))
    # Every artifact of the report arrived whole: the small ones downloaded through the
    # proxy, the models compared in the destination.
    digests = set()
    for path, size in stored.items():
        if size < 1 << 20:
            local = mlflow.download_artifacts(run_id, path, str(tmp_path / "download"))
        else:
            local = destination / path
        digests.add(_sha256(Path(local)))
    missing = [a.name for a in audit.report.artifacts if a.sha256 not in digests]
    assert not missing, missing


def test_the_pruned_model_is_logged_registered_and_read_back(
    audit, tracking, mlflow, tmp_path, monkeypatch
):
    """The MLflow model of the pruned network, registered in the PostgreSQL registry, is
    what the service reads back for an audit of models:/NAME/1 (through the proxy)."""
    from mlflow.models import get_model_info

    from cnp_server import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)  # for get_model_info's runs:/
    run_id = audit.job.mlflow_run_id
    info = get_model_info(f"runs:/{run_id}/model")
    assert info.signature is not None and info.metadata["cnp"]["audit_id"] == audit.job.id
    (version,) = mlflow.search_model_versions(f"name = '{MODEL_NAME}'")
    assert (version.version, version.run_id) == ("1", run_id)
    assert mlflow.get_run(run_id).data.tags["cnp.registered_model"] == f"models:/{MODEL_NAME}/1"
    source = registry.resolve(f"models:/{MODEL_NAME}/1", tracking.uri)
    weights, source = registry.fetch(source, tmp_path / "model", tracking.uri, 1 << 30)
    compact = next(a for a in audit.report.artifacts if a.name == "model_compact.safetensors")
    assert _sha256(weights) == compact.sha256
    assert (weights.parent / "architecture.json").is_file()


def test_the_record_is_in_postgresql_once(audit, database):
    """Read in the database itself: one run per audit, each final metric once, one
    registered version, under MLflow's own (Alembic) schema."""
    import sqlalchemy as sa

    job, run_id = audit.job, audit.job.mlflow_run_id
    engine = sa.create_engine(database)
    try:
        with engine.connect() as db:
            runs = db.execute(
                sa.text(
                    "SELECT r.run_uuid, r.status, r.artifact_uri FROM runs r JOIN tags t"
                    " ON t.run_uuid = r.run_uuid WHERE t.key = 'cnp.audit_id' AND t.value = :id"
                ),
                {"id": job.id},
            ).all()
            artifacts = f"mlflow-artifacts:/{job.mlflow_experiment_id}/{run_id}/artifacts"
            assert [tuple(r) for r in runs] == [(run_id, "FINISHED", artifacts)]
            counts = dict(
                db.execute(
                    sa.text("SELECT key, count(*) FROM metrics WHERE run_uuid = :r GROUP BY key"),
                    {"r": run_id},
                ).all()
            )
            final = {k: n for k, n in counts.items() if k.split("/")[0] in FINAL_METRICS}
            assert final and set(final.values()) == {1}, final
            assert counts["model/balanced_accuracy"] == 2  # before and after pruning
            versions = db.execute(
                sa.text("SELECT version, run_id FROM model_versions WHERE name = :n"),
                {"n": MODEL_NAME},
            ).all()
            assert [tuple(v) for v in versions] == [(1, run_id)]
            assert db.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
