"""MLflow: one run per audit, idempotent logging, a real tracking server, and outages.

MLflow starts slowly (seconds per process), so these tests are marked slow.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote
from urllib.request import Request, urlopen

import numpy as np
import pytest
import test_server_support as scripted
from test_server_support import ServerProcess, make_references, make_spec, prune_spec, wait_for

from cnp.v1 import report_pb2
from cnp_client import AuditClient
from cnp_server.config import ServerConfig
from cnp_server.jobs import FAILED, SUCCEEDED, TRACKING_DONE, TRACKING_FAILED, TRACKING_PENDING
from cnp_server.store import JobStore
from cnp_server.tracking import RunLogger, Tracker, flatten_spec, model_steps, report_metrics
from cnp_server.worker import WorkerTask, finish_success

pytestmark = pytest.mark.slow


def _finished_job(store: JobStore, config: ServerConfig, refs: Path, script: str = ""):
    """A job that really ran the scripted engine in this process and was stored as done."""
    spec = make_spec(refs, script, prune=prune_spec())
    job = store.create(json.dumps(spec.to_dict()), request_id=f"req-{script or 'ok'}")
    store.claim_next(config.node_id)
    workdir = config.jobs_path / job.id
    workdir.mkdir()
    result = scripted.run_audit(spec, workdir=workdir)
    task = WorkerTask(job.id, 1, store.url, str(workdir), "x", (), 0, "test")
    report, artifacts = finish_success(result, task, workdir)
    store.finish(job.id, 1, SUCCEEDED, report=report, artifacts_json=json.dumps(artifacts))
    return store.get(job.id)


def test_logging_twice_duplicates_nothing(tmp_path):
    refs = tmp_path / "refs"
    make_references(refs)
    config = ServerConfig(data_dir=str(tmp_path / "data"))
    config.jobs_path.mkdir(parents=True)
    store = JobStore(config.effective_database_url, migrate=True)
    job = _finished_job(store, config, refs)
    logger = RunLogger(config, store)
    run_id = logger.log(job, config.jobs_path / job.id)
    # A crash after the run was created but before its id was stored: the retry must
    # find the run by its tag, skip what is logged, and add nothing twice.
    store.set_tracking(job.id, state=TRACKING_PENDING, run_id="")
    again = store.get(job.id)
    assert again.mlflow_run_id == ""
    assert RunLogger(config, store).log(again, config.jobs_path / job.id) == run_id

    client = logger.client
    runs = client.search_runs([logger.experiment_id()])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    report = report_pb2.AuditReport.FromString(job.report)
    expected = report_metrics(report)
    steps = {key for key, _, _ in model_steps(report)}
    assert set(run.data.metrics) == set(expected) | steps and len(expected) > 100
    history = client.get_metric_history(run_id, "model/worst_group_accuracy")
    assert sorted(m.step for m in history) == [0, 1]  # before and after pruning
    for key in ("audit/wm/1/layer/S2/ap_attribute", "after/balanced_accuracy.ci_low"):
        assert len(client.get_metric_history(run_id, key)) == 1
    assert run.data.metrics["before/flops"] == 3e9
    assert run.data.params == flatten_spec(job.spec)
    assert run.data.params["prune.rate"] == "0.3" and run.data.params["layers"] == "layer"
    tags = run.data.tags
    assert tags["cnp.audit_id"] == job.id and tags["cnp.request_id"] == "req-ok"
    assert tags["cnp.model_sha256"] == "ab" * 32 and tags["cnp.dataset_digest"] == "cd" * 32
    assert tags["cnp.model_uri"].startswith("torchvision:scripted+file://")
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.json", "audit_table.csv", "model_compact.safetensors", "heatmaps"} <= artifacts
    store.close()


def test_a_failed_job_is_recorded_with_its_error_and_the_tracker_marks_it_done(tmp_path):
    refs = tmp_path / "refs"
    make_references(refs)
    config = ServerConfig(data_dir=str(tmp_path / "data"))
    config.jobs_path.mkdir(parents=True)
    store = JobStore(config.effective_database_url, migrate=True)
    job = store.create(json.dumps(make_spec(refs).to_dict()))
    store.claim_next(config.node_id)
    store.finish(job.id, 1, FAILED, error=("INVALID_ARGUMENT", "no such layer 'x'"))
    tracker = Tracker(config, store)
    assert tracker.flush() == 1
    done = store.get(job.id)
    assert done.tracking_state == TRACKING_DONE and done.mlflow_run_id
    run = tracker._logger.client.get_run(done.mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {}
    assert run.data.tags["cnp.error_code"] == "INVALID_ARGUMENT"
    assert run.data.tags["cnp.error_message"] == "no such layer 'x'"
    assert tracker.flush() == 0  # nothing pending any more
    store.close()


def test_a_job_that_cannot_be_recorded_blocks_no_other_and_is_given_up(tmp_path):
    """The reported failure: one job MLflow could not take stopped every later record
    and left its run RUNNING. Now it is retried on its own and given up, visibly."""
    from cnp.v1 import service_pb2
    from cnp_server.convert import operation_of
    from cnp_server.store import JobRow

    refs = tmp_path / "refs"
    make_references(refs)
    config = ServerConfig(
        data_dir=str(tmp_path / "data"), tracking_retry_seconds=0.0, tracking_max_attempts=3
    )
    config.jobs_path.mkdir(parents=True)
    store = JobStore(config.effective_database_url, migrate=True)
    bad = _finished_job(store, config, refs, "sleep:0")
    store._update(JobRow.id == bad.id, report=b"\xff not a report")  # logging it always fails
    good = _finished_job(store, config, refs)
    tracker = Tracker(config, store)
    assert tracker.flush() == 1  # the good job, although the bad one came first
    assert store.get(good.id).tracking_state == TRACKING_DONE
    first = store.get(bad.id)
    assert (first.tracking_state, first.tracking_attempts) == (TRACKING_PENDING, 1)
    assert "DecodeError" in first.tracking_error
    assert tracker.flush() == 0 and tracker.flush() == 0  # tries 2 and 3: given up
    given_up = store.get(bad.id)
    assert (given_up.tracking_state, given_up.tracking_attempts) == (TRACKING_FAILED, 3)
    assert tracker.flush() == 0 and store.get(bad.id).tracking_attempts == 3  # not retried
    progress = service_pb2.AuditProgress()
    operation_of(given_up, with_response=False).metadata.Unpack(progress)
    assert progress.tracking_state == "failed" and "DecodeError" in progress.tracking_error
    logger = RunLogger(config, store)
    runs = {
        r.data.tags["cnp.audit_id"]: r for r in logger.client.search_runs([logger.experiment_id()])
    }
    assert set(runs) == {bad.id, good.id}  # exactly one run per job
    assert runs[bad.id].info.status == "FAILED"  # closed, not left RUNNING
    assert runs[good.id].info.status == "FINISHED"
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_outage_then_a_real_mlflow_server_receives_the_run(tmp_path):
    refs = tmp_path / "refs"
    make_references(refs)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        tmp_path / "data",
        [refs],
        settings={
            "tracking_retry_seconds": 1,
            "tracking_http_retries": 0,
            "tracking_http_timeout": 3,
        },
        args=["--tracking-uri", uri],
    ).start()
    mlflow_server = None
    try:
        with AuditClient(server.address, token=server.token) as client:
            # MLflow is down: the audit still succeeds, and its record waits.
            job = client.wait(client.submit(make_spec(refs, prune=prune_spec())).id, timeout=60)
            assert job.succeeded
            store = JobStore(f"sqlite:///{server.data_dir / 'jobs.db'}")
            wait_for(lambda: store.get(job.id).tracking_attempts >= 1, timeout=60)
            pending = store.get(job.id)
            assert pending.tracking_state == TRACKING_PENDING and pending.tracking_error
            store.close()
            seen = client.get(job.id)  # what a client (and `cnp jobs`) sees of the record
            assert seen.tracking_state == "pending" and seen.tracking_error
            model = client.download_model(job.id, tmp_path / "downloaded.safetensors")

            log = (tmp_path / "mlflow.log").open("w")
            mlflow_server = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{tmp_path / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(tmp_path / "mlartifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            run_id = wait_for(lambda: client.get(job.id).mlflow_run_id, timeout=120, interval=0.5)
            wait_for(lambda: _tracking_state(server) == TRACKING_DONE, timeout=60)
            assert client.get(job.id).tracking_state == "done"

        # Read back through MLflow's REST API: an independent check of what the server holds.
        experiment = _rest(uri, "experiments/get-by-name?experiment_name=cnp-audits")
        experiment_id = experiment["experiment"]["experiment_id"]
        runs = _rest(uri, "runs/search", {"experiment_ids": [experiment_id]})["runs"]
        assert [r["info"]["run_id"] for r in runs] == [run_id]
        run = runs[0]
        assert run["info"]["run_name"] == job.id and run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert params["model.architecture"] == "scripted" and params["prune.method"] == "cnp"
        assert metrics["after/balanced_accuracy"] == pytest.approx(0.85)
        key = "audit/wm/1/layer/S2/ap_attribute"
        assert metrics[key] == pytest.approx(0.95)
        history = _rest(uri, f"metrics/get-history?run_id={run_id}&metric_key={quote(key)}")
        assert len(history["metrics"]) == 1
        url = f"{uri}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/"
        fetched = tmp_path / "from_mlflow.safetensors"
        with urlopen(url + "model_compact.safetensors", timeout=30) as response:
            fetched.write_bytes(response.read())
        from safetensors.numpy import load_file

        weights = load_file(str(fetched))["conv.weight"]
        assert np.array_equal(weights, load_file(str(model))["conv.weight"])
    finally:
        server.stop()
        if mlflow_server is not None:
            mlflow_server.terminate()
            mlflow_server.wait(30)


def _rest(uri: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = Request(f"{uri}/api/2.0/mlflow/{path}", data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _tracking_state(server: ServerProcess) -> str:
    store = JobStore(f"sqlite:///{server.data_dir / 'jobs.db'}")
    try:
        jobs, _ = store.list(page_size=1)
        return jobs[0].tracking_state
    finally:
        store.close()


def test_pruning_counts_are_metrics_and_neurons_only_when_pruned():
    report = report_pb2.AuditReport()
    report.pruning.filters_total, report.pruning.filters_removed = 960, 288
    metrics = report_metrics(report)
    assert (metrics["pruning/filters_total"], metrics["pruning/filters_removed"]) == (960, 288)
    assert not any("neurons" in key for key in metrics)  # a ResNet has no hidden neurons
    report.pruning.neurons_total, report.pruning.neurons_removed = 8192, 2458
    metrics = report_metrics(report)
    assert (metrics["pruning/neurons_total"], metrics["pruning/neurons_removed"]) == (8192, 2458)
