"""The MLflow record of each audit: one run per job, written with explicit run ids.

MLflow is a record, not the system of record. A finished job is marked ``pending`` in
the store; a background thread logs it (at once, at start-up, and every
``tracking_retry_seconds`` while the tracking server is away). Logging is idempotent,
so a retry after a partial attempt or a crash duplicates nothing: the run is found again
by its id in the job row or by its ``cnp.audit_id`` tag, params and metrics already
present are skipped, and artifacts overwrite themselves.

One job never blocks another's record: names from a dataset become valid, bounded
MLflow keys; a job whose logging fails is retried with its own back-off while the
others go ahead, and after ``tracking_max_attempts`` it is given up (tracking state
``failed``, with the reason) and its run, if one was opened, is closed as FAILED.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from cnp.v1 import report_pb2
from cnp_core.results import AP_COLUMNS

from . import __version__
from .config import ServerConfig
from .jobs import CANCELLED, FAILED, SUCCEEDED, TRACKING_DONE, TRACKING_FAILED, JobRecord
from .store import JobStore

log = logging.getLogger(__name__)

TAG_AUDIT_ID = "cnp.audit_id"
_RUN_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", CANCELLED: "KILLED"}
_BATCH = 500  # MLflow accepts at most 1000 metrics per log_batch


MAX_KEY = 250  # MLflow's limit on metric and param names
# A job's record waits at most this many tracking_retry_seconds between two tries (10 min
# by default): a store back from an outage receives every record soon after.
MAX_BACKOFF_FACTOR = 10
_STOP_AFTER = 3  # consecutive failures in one pass: the tracking store is probably away


def _part(text: Any) -> str:
    """One path segment of a key: characters MLflow refuses become '_' and a segment it
    would read as a path (empty, '.', '..') becomes one it does not; a changed segment
    gets a digest of the original, so that "ü" and "ö" stay two metrics."""
    text = str(text)
    part = re.sub(r"[^A-Za-z0-9_\-. ]", "_", text).strip()
    if part.strip(".") and part == text:
        return part
    return f"{part}_{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def _key(*parts: Any) -> str:
    """A valid MLflow metric name from parts (an attribute value, a layer name...); one
    too long keeps its start and a digest, so distinct names stay distinct."""
    key = "/".join(_part(p) for p in parts)
    if len(key) > MAX_KEY:
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        key = f"{key[: MAX_KEY - 13]}_{digest}"
    return key


def flatten_spec(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Params: ``model.architecture``, ``dataset.mean`` = "0.5,0.5,0.5", ``prune`` = "none"..."""
    params: dict[str, str] = {}
    for name, value in spec.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            params.update(flatten_spec(value, key + "."))
        elif value is None:
            params[key] = "none"
        elif isinstance(value, (list, tuple)):
            params[key] = ",".join(str(v) for v in value)
        else:
            params[key] = str(value)
    return params


def _metric_values(prefix: tuple, metric: report_pb2.Metric) -> dict[str, float]:
    return {
        _key(*prefix): metric.value,
        _key(*prefix[:-1], prefix[-1] + ".ci_low"): metric.ci_low,
        _key(*prefix[:-1], prefix[-1] + ".ci_high"): metric.ci_high,
        _key(*prefix[:-1], prefix[-1] + ".base_rate"): metric.base_rate,
    }


def report_metrics(report: report_pb2.AuditReport) -> dict[str, float]:
    """Every AP (with interval and base rate), group metric, pruning count and timing."""
    metrics: dict[str, float] = {}
    for audit in report.attributes:
        head = ("audit", audit.attribute, audit.value, audit.layer)
        metrics[_key(*head, "flagged_subspace")] = audit.flagged_subspace
        metrics[_key(*head, "n_subspaces")] = audit.n_subspaces
        for s in audit.subspaces:
            metrics[_key(*head, f"s{s.index}", "mean_relevance")] = s.mean_relevance
            for field, _, _ in AP_COLUMNS:
                metrics.update(_metric_values((*head, f"s{s.index}", field), getattr(s, field)))
    for name in ("before", "after"):
        if not report.HasField(name):
            continue
        evaluation = getattr(report, name)
        metrics.update(_metric_values((name, "balanced_accuracy"), evaluation.balanced_accuracy))
        metrics.update(
            _metric_values((name, "worst_group_accuracy"), evaluation.worst_group_accuracy)
        )
        for g in evaluation.groups:
            group = (name, "group", f"class {g.label}", g.attribute, g.value)
            metrics.update(_metric_values((*group, "accuracy"), g.accuracy))
            metrics[_key(*group, "count")] = g.count
        for field in ("parameters", "flops", "latency_ms"):
            metrics[_key(name, field)] = getattr(evaluation, field)
    if report.HasField("pruning"):
        metrics[_key("pruning", "filters_total")] = report.pruning.filters_total
        metrics[_key("pruning", "filters_removed")] = report.pruning.filters_removed
        if report.pruning.neurons_total:
            metrics[_key("pruning", "neurons_total")] = report.pruning.neurons_total
            metrics[_key("pruning", "neurons_removed")] = report.pruning.neurons_removed
    for stage, seconds in report.timings.items():
        metrics[_key("timing", stage)] = seconds
    return metrics


def model_uri(spec: dict[str, Any]) -> str:
    model = spec.get("model", {})
    weights = model.get("weights", "")
    if weights and "://" not in weights and not weights.startswith(("models:/", "runs:/")):
        weights = Path(weights).as_uri() if Path(weights).is_absolute() else weights
    source = (
        f"torchvision:{model['architecture']}"
        if model.get("architecture")
        else model.get("factory", "")
    )
    return f"{source}+{weights}" if weights else source


class RunLogger:
    """Logs finished jobs to one MLflow tracking URI, through ``MlflowClient``."""

    def __init__(self, config: ServerConfig, store: JobStore) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(config.tracking_http_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(config.tracking_http_timeout)))
        from mlflow.tracking import MlflowClient

        self.config, self.store = config, store
        self.client = MlflowClient(tracking_uri=config.effective_tracking_uri)
        self._experiment_id: str | None = None

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = self.config.tracking_experiment
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                self._experiment_id = self.client.create_experiment(
                    name, artifact_location=self.config.tracking_artifact_location
                )
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _run_id(self, job: JobRecord) -> str:
        """The job's run: the one stored in its row, else the one tagged with its id, else new."""
        if job.mlflow_run_id:
            return job.mlflow_run_id
        found = self.client.search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`{TAG_AUDIT_ID}` = '{job.id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run = self.client.create_run(
                self.experiment_id(),
                start_time=int((job.started_at or job.created_at) * 1000),
                tags={TAG_AUDIT_ID: job.id},
                run_name=job.id,
            )
            run_id = run.info.run_id
        self.store.set_tracking(job.id, run_id=run_id)
        return run_id

    def log(self, job: JobRecord, workdir: Path) -> str:
        """Record one finished job; returns the run id. Safe to call again after a failure."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = self._run_id(job)
        run = self.client.get_run(run_id)
        spec = job.spec
        report = report_pb2.AuditReport.FromString(job.report) if job.report else None
        tags = {
            TAG_AUDIT_ID: job.id,
            "cnp.request_id": job.request_id or "",
            "cnp.model_uri": model_uri(spec),
            "cnp.model_sha256": report.model_sha256 if report else "",
            "cnp.dataset_digest": report.dataset_digest if report else "",
            "cnp.service_version": __version__,
            "cnp.state": job.state,
            "cnp.attempts": str(job.attempts),
        }
        if job.error_code:
            tags["cnp.error_code"] = job.error_code
            tags["cnp.error_message"] = job.error_message[:5000]
        params = {k: v[:6000] for k, v in flatten_spec(spec).items() if k not in run.data.params}
        self.client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        if report is not None:
            stamp = int((job.finished_at or job.updated_at) * 1000)
            missing = [
                Metric(k, float(v), stamp, 0)
                for k, v in report_metrics(report).items()
                if k not in run.data.metrics
            ]
            for start in range(0, len(missing), _BATCH):
                self.client.log_batch(run_id, metrics=missing[start : start + _BATCH])
            for info in job.artifacts.values():
                path = workdir / info["path"]
                if path.is_file():
                    parent = str(Path(info["path"]).parent)
                    self.client.log_artifact(run_id, str(path), None if parent == "." else parent)
        self.client.set_terminated(
            run_id,
            status=_RUN_STATUS.get(job.state, "FINISHED"),
            end_time=int(job.finished_at * 1000),
        )
        return run_id


class Tracker:
    """Background thread that logs pending jobs and retries while MLflow is unavailable."""

    def __init__(self, config: ServerConfig, store: JobStore) -> None:
        self.config, self.store = config, store
        self._logger: RunLogger | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tracker", daemon=True)
        self._retry_at: dict[str, float] = {}  # job id -> monotonic time of its next try

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.flush()
            except Exception:
                log.exception("tracking loop error")
            self._wake.wait(self.config.tracking_retry_seconds)
            self._wake.clear()

    def flush(self) -> int:
        """Log every pending job whose back-off has passed; returns how many were logged.

        A failure postpones that job only; the pass stops after a few failures in a row,
        when the tracking store itself is probably away.
        """
        logged = failed = 0
        for job in self.store.tracking_pending():
            if self._stop.is_set() or failed >= _STOP_AFTER:
                break
            if self._retry_at.get(job.id, 0.0) > time.monotonic():
                continue
            try:
                if self._logger is None:
                    self._logger = RunLogger(self.config, self.store)
                run_id = self._logger.log(job, self.config.jobs_path / job.id)
            except Exception as exc:
                failed += 1
                self._logger = None  # reconnect next time
                self._failed(job, f"{type(exc).__name__}: {exc}"[:2000])
                continue
            failed = 0
            self._retry_at.pop(job.id, None)
            self.store.set_tracking(job.id, state=TRACKING_DONE, run_id=run_id)
            log.info("job %s recorded in MLflow run %s", job.id, run_id)
            logged += 1
        return logged

    def _failed(self, job: JobRecord, message: str) -> None:
        attempts = job.tracking_attempts + 1
        if attempts < self.config.tracking_max_attempts:
            delay = self.config.tracking_retry_seconds * min(
                2 ** (attempts - 1), MAX_BACKOFF_FACTOR
            )
            self._retry_at[job.id] = time.monotonic() + delay
            self.store.set_tracking(job.id, error=message)
            log.warning("MLflow logging of %s failed; retry in %.0f s: %s", job.id, delay, message)
            return
        self._retry_at.pop(job.id, None)
        self.store.set_tracking(job.id, state=TRACKING_FAILED, error=message)
        log.error("MLflow logging of %s given up after %d tries: %s", job.id, attempts, message)
        run_id = self.store.get(job.id).mlflow_run_id
        if run_id:  # a run left RUNNING would look like a job still going
            try:
                RunLogger(self.config, self.store).client.set_terminated(run_id, status="FAILED")
            except Exception as exc:
                log.warning("could not close MLflow run %s of %s: %s", run_id, job.id, exc)
