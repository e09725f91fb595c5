"""The MLflow record of each audit: one run per job, written with explicit run ids.

MLflow is a record, not the system of record, kept in step with the job by a background
thread: the run opens when the job starts (in the experiment the client named, with its
tags), shows the stage and its progress while the job runs (every
``tracking_live_seconds``), and receives everything when the job ends: metrics numbered
as the reports number them, the dataset as the run's input, the audit table as an MLflow
table, heatmaps as images, the pruned model as MLflow models (registered under the name
the client gave), and the run's final status (FINISHED, FAILED or KILLED).

Logging is idempotent, so a retry after a partial attempt or a crash duplicates nothing:
the run is found again by its id in the job row or by its ``cnp.audit_id`` tag, params,
metrics, inputs, images, models and versions already present are skipped, and artifacts
overwrite themselves. While the tracking server is away, the job goes on and its record
is retried every ``tracking_retry_seconds``.

One job never blocks another's record: names from a dataset become valid, bounded
MLflow keys; a job whose logging fails is retried with its own back-off while the
others go ahead, and after ``tracking_max_attempts`` it is given up (tracking state
``failed``, with the reason) and its run, if one was opened, is closed as FAILED.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnp.v1 import report_pb2
from cnp_core.results import AP_COLUMNS
from cnp_core.safe_text import visible

from . import __version__, mlflow_model, registry
from .config import ServerConfig
from .errors import BadRequest, WrongState
from .jobs import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    RUNNING,
    SUCCEEDED,
    TRACKING_DONE,
    TRACKING_FAILED,
    JobRecord,
)
from .store import JobStore

log = logging.getLogger(__name__)

TAG_AUDIT_ID = "cnp.audit_id"
_RUN_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", CANCELLED: "KILLED"}
_BATCH = 500  # MLflow accepts at most 1000 metrics per log_batch
TABLE_FILE = "audit_table.json"


MAX_KEY = 250  # MLflow's limit on metric and param names
# A job's record waits at most this many tracking_retry_seconds between two tries (10 min
# by default): a store back from an outage receives every record soon after.
MAX_BACKOFF_FACTOR = 10
_STOP_AFTER = 3  # consecutive failures in one pass: the tracking store is probably away
# A final job still unrecorded this many leases after it ended is adopted by any replica:
# the one that ran it would have recorded it by then unless it is gone.
ORPHAN_AFTER_LEASES = 2


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


def _metric_values(
    prefix: tuple, metric: report_pb2.Metric, *, base_rate: bool = True
) -> dict[str, float]:
    values = {
        _key(*prefix): metric.value,
        _key(*prefix[:-1], prefix[-1] + ".ci_low"): metric.ci_low,
        _key(*prefix[:-1], prefix[-1] + ".ci_high"): metric.ci_high,
    }
    if base_rate:
        values[_key(*prefix[:-1], prefix[-1] + ".base_rate")] = metric.base_rate
    return values


def _metric_fields(message: Any) -> list[str]:
    """The fields of a message type that hold a Metric, in field order."""
    return [
        f.name
        for f in message.DESCRIPTOR.fields
        if f.message_type is not None and f.message_type.name == "Metric"
    ]


# Group rates (accuracy, selection rate, TPR, FPR) and disparities of a fairness breakdown.
FAIRNESS_RATES = _metric_fields(report_pb2.FairnessGroup)
DISPARITIES = _metric_fields(report_pb2.GroupFairness)


def fairness_name(names: Any) -> str:
    """One segment for the attributes of a breakdown, or the values of a group:
    ``sex``, ``sex x race`` (an intersection); each name made safe on its own."""
    return " x ".join(_part(name) for name in names)


def _fairness_metrics(scope: str, evaluation: report_pb2.Evaluation) -> dict[str, float]:
    """``before/fairness/sex x race/equalized_odds_difference`` (with its interval), and
    per group ``.../group/female x black/selection_rate`` and its count."""
    metrics: dict[str, float] = {}
    for breakdown in evaluation.fairness:
        head = (scope, "fairness", fairness_name(breakdown.attributes))
        for field in DISPARITIES:
            metrics.update(
                _metric_values((*head, field), getattr(breakdown, field), base_rate=False)
            )
        for g in breakdown.groups:
            group = (*head, "group", fairness_name(g.values))
            for field in FAIRNESS_RATES:
                metrics.update(_metric_values((*group, field), getattr(g, field), base_rate=False))
            metrics[_key(*group, "count")] = g.count
    return metrics


def subspace_name(index: int) -> str:
    """The reports' name of a subspace: S1 is index 0."""
    return f"S{index + 1}"


def _class_name(group: report_pb2.GroupMetric) -> str:
    return group.label_name or f"class {group.label}"


def _summary_metrics(report: report_pb2.AuditReport) -> dict[str, float]:
    """A multi-valued attribute as a whole, comparable across runs: per value its best
    test AP_attribute; how many values flagged a subspace, how many subspaces serve two
    or more values, how many CNP removes for the attribute."""
    metrics: dict[str, float] = {}
    for summary in report.attribute_summaries:
        if len(summary.values) < 2:  # a binary attribute: its one table says it all
            continue
        head = ("attribute", summary.attribute, summary.layer)
        for v in summary.values:
            metrics.update(_metric_values((*head, v.value, "best_ap_attribute"), v.ap_attribute))
        metrics[_key(*head, "values_flagged")] = sum(
            v.flagged_subspace >= 0 for v in summary.values
        )
        metrics[_key(*head, "shared_subspaces")] = len(summary.shared)
        metrics[_key(*head, "removed_subspaces")] = len(summary.removed)
    return metrics


def report_metrics(report: report_pb2.AuditReport) -> dict[str, float]:
    """Every AP (with interval and base rate), group metric, pruning count and timing;
    subspaces are numbered as the reports number them (S1, S2, ...)."""
    metrics: dict[str, float] = {}
    for audit in report.attributes:
        head = ("audit", audit.attribute, audit.value, audit.layer)
        metrics[_key(*head, "flagged_subspace")] = audit.flagged_subspace + 1
        metrics[_key(*head, "n_subspaces")] = audit.n_subspaces
        for s in audit.subspaces:
            name = subspace_name(s.index)
            metrics[_key(*head, name, "mean_relevance")] = s.mean_relevance
            for field, _, _ in AP_COLUMNS:
                metrics.update(_metric_values((*head, name, field), getattr(s, field)))
    metrics.update(_summary_metrics(report))
    for name in ("before", "after"):
        if not report.HasField(name):
            continue
        evaluation = getattr(report, name)
        metrics.update(_metric_values((name, "balanced_accuracy"), evaluation.balanced_accuracy))
        metrics.update(
            _metric_values((name, "worst_group_accuracy"), evaluation.worst_group_accuracy)
        )
        for g in evaluation.groups:
            group = (name, "group", _class_name(g), g.attribute, g.value)
            metrics.update(_metric_values((*group, "accuracy"), g.accuracy))
            metrics[_key(*group, "count")] = g.count
        metrics.update(_fairness_metrics(name, evaluation))
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


def model_steps(report: report_pb2.AuditReport) -> list[tuple[str, float, int]]:
    """(key, value, step): the model before pruning at step 0 and after it at step 1, so
    MLflow charts the change."""
    points = []
    for step, name in enumerate(("before", "after")):
        if report.HasField(name):
            evaluation = getattr(report, name)
            for field in ("balanced_accuracy", "worst_group_accuracy"):
                points.append((f"model/{field}", getattr(evaluation, field).value, step))
            points.append(("model/parameters", float(evaluation.parameters), step))
            for breakdown in evaluation.fairness:  # disparities, charted before -> after
                head = ("fairness", fairness_name(breakdown.attributes))
                points += [
                    (_key(*head, field), getattr(breakdown, field).value, step)
                    for field in DISPARITIES
                ]
    return points


def audit_table(report: report_pb2.AuditReport) -> dict[str, list[Any]]:
    """The audit table as columns, for ``log_table`` (MLflow's table view)."""
    columns: dict[str, list[Any]] = {
        name: [] for name in ("attribute", "value", "layer", "subspace", "flagged")
    }
    columns["mean_relevance"] = []
    for field, _, _ in AP_COLUMNS:
        for suffix in ("", "_ci_low", "_ci_high"):
            columns[field + suffix] = []
    for audit in report.attributes:
        for s in audit.subspaces:
            columns["attribute"].append(audit.attribute)
            columns["value"].append(audit.value)
            columns["layer"].append(audit.layer)
            columns["subspace"].append(subspace_name(s.index))
            columns["flagged"].append(s.index == audit.flagged_subspace)
            columns["mean_relevance"].append(s.mean_relevance)
            for field, _, _ in AP_COLUMNS:
                metric = getattr(s, field)
                columns[field].append(metric.value)
                columns[field + "_ci_low"].append(metric.ci_low)
                columns[field + "_ci_high"].append(metric.ci_high)
    return columns


def model_uri(spec: dict[str, Any]) -> str:
    model = spec.get("model", {})
    weights = model.get("weights", "")
    if weights and "://" not in weights and not registry.is_model_uri(weights):
        weights = Path(weights).as_uri() if Path(weights).is_absolute() else weights
    source = (
        f"torchvision:{model['architecture']}"
        if model.get("architecture")
        else model.get("factory", "")
    )
    return f"{source}+{weights}" if weights else source


# --- the client's options ------------------------------------------------------------

RESERVED_TAG_PREFIXES = ("cnp.", "mlflow.")
MAX_TAGS = 50
MAX_TAG_VALUE = 5000  # MLflow's limit on a tag value
MAX_EXPERIMENT_NAME = 500
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}")
_TAG_KEY = re.compile(r"[A-Za-z0-9_\-. /]{1,250}")


def tracking_options(options: Any, config: ServerConfig, prunes: bool) -> str:
    """The client's ``TrackingOptions``, checked, as the JSON the job row keeps; ``prunes``:
    the job has a pruning stage (the model to register)."""
    experiment, register = options.experiment.strip(), options.register_model.strip()
    if len(experiment) > MAX_EXPERIMENT_NAME or not experiment.isprintable():
        raise BadRequest(
            f"tracking.experiment: at most {MAX_EXPERIMENT_NAME} printable characters",
            request_field="tracking.experiment",
        )
    if len(options.tags) > MAX_TAGS:
        raise BadRequest(
            f"tracking.tags: at most {MAX_TAGS} tags, got {len(options.tags)}",
            request_field="tracking.tags",
        )
    for key, value in options.tags.items():
        if not _TAG_KEY.fullmatch(key) or ".." in key.split("/"):
            raise BadRequest(
                f"tracking.tags: {visible(key)!r} is not a valid MLflow tag key (letters, "
                "digits, '_', '-', '.', ' ', '/'; at most 250)",
                request_field="tracking.tags",
            )
        if key.startswith(RESERVED_TAG_PREFIXES):
            raise BadRequest(
                f"tracking.tags: {key!r} is reserved (keys starting with "
                f"{' or '.join(RESERVED_TAG_PREFIXES)} are set by cnp and MLflow)",
                request_field="tracking.tags",
            )
        if len(value) > MAX_TAG_VALUE:
            raise BadRequest(
                f"tracking.tags[{key!r}]: at most {MAX_TAG_VALUE} characters",
                request_field="tracking.tags",
            )
    if register and not _MODEL_NAME.fullmatch(register):
        raise BadRequest(
            f"tracking.register_model: {visible(register)!r} is not a model name (letters, "
            "digits, '_', '-', '.', ' '; at most 256; starting with a letter or digit)",
            request_field="tracking.register_model",
        )
    if register and not prunes:
        raise BadRequest(
            "tracking.register_model: an audit without a pruning stage makes no new model "
            "to register; add a prune stage, or leave register_model out",
            request_field="tracking.register_model",
        )
    if register and not config.tracking_enabled:
        raise WrongState(
            "tracking.register_model: this server keeps no MLflow record "
            "(started with --no-tracking), so it has no model registry",
            request_field="tracking.register_model",
        )
    chosen = {"experiment": experiment, "tags": dict(sorted(options.tags.items()))}
    if register:
        chosen["register_model"] = register
    return json.dumps(chosen, sort_keys=True)


# --- writing runs --------------------------------------------------------------------


def limit_http(config: ServerConfig) -> None:
    """Bound every MLflow HTTP call of this process and its workers (MLflow's own default
    retries for minutes): the tracker, and CreateAudit's check of a models:/ URI."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(config.tracking_http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(config.tracking_http_timeout)))


@dataclass
class _Live:
    """What the tracker has already mirrored of a running job."""

    opened: bool = False
    stage: str = ""
    stage_started_at: float = 0.0


class RunLogger:
    """Writes jobs' runs to one MLflow tracking URI, through ``MlflowClient``."""

    def __init__(self, config: ServerConfig, store: JobStore) -> None:
        limit_http(config)
        from mlflow.tracking import MlflowClient

        self.config, self.store = config, store
        uri = config.effective_tracking_uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._experiments: dict[str, str] = {}

    def experiment_id(self, name: str = "") -> str:
        """The id of experiment ``name`` (the server's default when empty), created if new."""
        from mlflow.exceptions import MlflowException

        name = name or self.config.tracking_experiment
        if name not in self._experiments:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    self._experiments[name] = self.client.create_experiment(
                        name, artifact_location=self.config.tracking_artifact_location
                    )
                except MlflowException:  # created meanwhile by another replica
                    experiment = self.client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
            if experiment is not None:
                if experiment.lifecycle_stage != "active":
                    raise ValueError(f"MLflow experiment {name!r} is deleted; restore it")
                self._experiments[name] = experiment.experiment_id
        return self._experiments[name]

    def _run_id(self, job: JobRecord) -> str:
        """The job's run: the one stored in its row, else the one tagged with its id, else new."""
        if job.mlflow_run_id:
            return job.mlflow_run_id
        experiment = self.experiment_id(job.tracking.get("experiment", ""))
        found = self.client.search_runs(
            [experiment],
            filter_string=f"tags.`{TAG_AUDIT_ID}` = '{job.id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run = self.client.create_run(
                experiment,
                start_time=int((job.started_at or job.created_at) * 1000),
                # The client's tags from the first moment the run is visible, not a log later.
                tags=self._tags(job, None),
                run_name=job.id,
            )
            run_id = run.info.run_id
        stored = self.store.adopt_run(job.id, run_id, experiment)
        if stored != run_id and not found:  # another replica opened the job's run first
            self.client.delete_run(run_id)
        return stored

    def _tags(self, job: JobRecord, report: report_pb2.AuditReport | None) -> dict[str, str]:
        tags = {
            **job.tracking.get("tags", {}),
            TAG_AUDIT_ID: job.id,
            "cnp.request_id": job.request_id or "",
            "cnp.model_uri": model_uri(job.spec),
            "cnp.service_version": __version__,
            "cnp.state": job.state,
            "cnp.stage": job.stage,
            "cnp.attempts": str(job.attempts),
        }
        if report is not None:
            tags["cnp.model_sha256"] = report.model_sha256
            tags["cnp.dataset_digest"] = report.dataset_digest
            # What the job computed on (the spec may say "auto"), and which GPU.
            for key in ("device", "gpu"):
                if report.versions.get(key):
                    tags[f"cnp.{key}"] = report.versions[key]
            if report.HasField("model_source"):
                source = report.model_source
                tags["cnp.model_source"] = (
                    f"models:/{source.name}/{source.version}" if source.name else source.uri
                )
        if job.error_code:
            tags["cnp.error_code"] = job.error_code
            tags["cnp.error_message"] = job.error_message[:MAX_TAG_VALUE]
        return tags

    def _open(self, run_id: str, job: JobRecord, report: Any = None) -> Any:
        """Params (those not yet logged) and tags; returns the run as it was before."""
        from mlflow.entities import Param, RunTag

        run = self.client.get_run(run_id)
        params = {
            k: v[:6000] for k, v in flatten_spec(job.spec).items() if k not in run.data.params
        }
        self.client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in self._tags(job, report).items()],
        )
        return run

    def live(self, job: JobRecord, seen: _Live) -> None:
        """Mirror a running job: its run opens at once, then stage, progress and the
        seconds each finished stage took, as they happen (step = seconds since start)."""
        from mlflow.entities import Metric, RunTag

        run_id = self._run_id(job)
        if not seen.opened:
            self._open(run_id, job)
            seen.opened = True
        now = time.time()
        stamp, step = int(now * 1000), max(0, int(now - (job.started_at or now)))
        metrics = [Metric(_key("progress", job.stage or "starting"), job.progress, stamp, step)]
        tags = []
        if job.stage != seen.stage:
            if seen.stage:
                took = max(0.0, job.stage_started_at - seen.stage_started_at)
                metrics.append(Metric(_key("stage_seconds", seen.stage), took, stamp, 0))
            tags.append(RunTag("cnp.stage", job.stage))
            seen.stage, seen.stage_started_at = job.stage, job.stage_started_at
        self.client.log_batch(run_id, metrics=metrics, tags=tags)

    def log(self, job: JobRecord, workdir: Path) -> str:
        """Record one finished job; returns the run id. Safe to call again after a failure."""
        from mlflow.entities import Metric

        run_id = self._run_id(job)
        report = report_pb2.AuditReport.FromString(job.report) if job.report else None
        run = self._open(run_id, job, report)
        if report is not None:
            stamp = int((job.finished_at or job.updated_at) * 1000)
            missing = [
                Metric(k, float(v), stamp, 0)
                for k, v in report_metrics(report).items()
                if k not in run.data.metrics
            ]
            if "model/balanced_accuracy" not in run.data.metrics:
                missing += [Metric(k, v, stamp, step) for k, v, step in model_steps(report)]
            for start in range(0, len(missing), _BATCH):
                self.client.log_batch(run_id, metrics=missing[start : start + _BATCH])
            self._log_dataset(run_id, run, job, report)
            self._log_files(run_id, job, report, workdir)
            self._log_models(run_id, run, job, workdir)
        self.client.set_terminated(
            run_id,
            status=_RUN_STATUS.get(job.state, "FINISHED"),
            end_time=int(job.finished_at * 1000),
        )
        return run_id

    def _log_dataset(self, run_id: str, run: Any, job: JobRecord, report: Any) -> None:
        """The audit dataset as the run's input, named by its directory, with its digest."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        if not report.dataset_digest:
            return
        digest = report.dataset_digest[:36]  # MLflow's limit on a dataset digest
        logged = run.inputs.dataset_inputs if run.inputs else []
        if any(d.dataset.digest == digest for d in logged):
            return
        root = job.spec.get("dataset", {}).get("root", "")
        dataset = Dataset(
            name=_part(Path(root).name or "dataset")[:500],
            digest=digest,
            source_type="local",
            source=json.dumps({"uri": Path(root).as_uri() if root.startswith("/") else root}),
        )
        context = InputTag("mlflow.data.context", "audit")
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[context])])

    def _log_files(self, run_id: str, job: JobRecord, report: Any, workdir: Path) -> None:
        """Artifacts as files; the audit table as an MLflow table; PNGs as images."""
        from PIL import Image

        logged_images = {
            Path(f.path).name.split("%")[0] for f in self.client.list_artifacts(run_id, "images")
        }
        for name, info in job.artifacts.items():
            path = workdir / info["path"]
            if not path.is_file():
                continue
            parent = str(Path(info["path"]).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)
            key = _key(*Path(name).with_suffix("").parts)
            if info.get("content_type") == "image/png" and _image_file(key) not in logged_images:
                try:
                    with Image.open(path) as image:
                        picture = image.convert("RGB")
                except (OSError, Image.DecompressionBombError):
                    log.warning("job %s: %s is not an image MLflow can show", job.id, name)
                    continue
                self.client.log_image(run_id, picture, key=key, step=0)
        if report.attributes:
            self.client.log_table(run_id, data=audit_table(report), artifact_file=TABLE_FILE)

    def _log_models(self, run_id: str, run: Any, job: JobRecord, workdir: Path) -> None:
        """The pruned model's MLflow models (pytorch, ONNX), registered when asked."""
        uploaded = {f.path for f in self.client.list_artifacts(run_id)}
        for flavor, artifact_path in mlflow_model.ARTIFACT_PATHS.items():
            local = workdir / mlflow_model.DIRECTORY / flavor
            if local.is_dir() and artifact_path not in uploaded:
                self.client.log_artifacts(run_id, str(local), artifact_path)
        name = job.tracking.get("register_model", "")
        if name and (workdir / mlflow_model.DIRECTORY / mlflow_model.PYTORCH).is_dir():
            self._register(run_id, run, name, job.id)

    def _register(self, run_id: str, run: Any, name: str, audit_id: str) -> None:
        from mlflow.exceptions import MlflowException

        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if not versions:
            try:
                self.client.create_registered_model(name)
            except MlflowException as err:
                if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{run.info.artifact_uri.rstrip('/')}/{mlflow_model.ARTIFACT_PATHS['pytorch']}"
            versions = [
                self.client.create_model_version(
                    name, source=source, run_id=run_id, tags={TAG_AUDIT_ID: audit_id}
                )
            ]
        self.client.set_tag(run_id, "cnp.registered_model", f"models:/{name}/{versions[0].version}")


def _image_file(key: str) -> str:
    """The file-name stem MLflow gives an image logged under ``key``."""
    return key.replace("/", "#")


class Tracker:
    """Background thread that keeps each job's MLflow run in step with the job: opened when
    it starts, progress mirrored while it runs, everything logged when it ends; retried
    with back-off while MLflow is unavailable."""

    def __init__(self, config: ServerConfig, store: JobStore) -> None:
        limit_http(config)  # before any worker is spawned: they inherit it
        self.config, self.store = config, store
        self._logger: RunLogger | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tracker", daemon=True)
        self._retry_at: dict[str, float] = {}  # job id -> monotonic time of its next try
        self._live: dict[str, _Live] = {}  # running job id -> what its run already shows

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
            # While a job runs its run follows it every tracking_live_seconds.
            wait = self.config.tracking_retry_seconds
            if self._live:
                wait = min(wait, self.config.tracking_live_seconds)
            self._wake.wait(wait)
            self._wake.clear()

    def flush(self) -> int:
        """Bring every pending job's run up to date (a running job's progress, a finished
        job's whole record) unless its back-off has not passed; returns how many finished
        jobs were recorded. A failure postpones that job only; the pass stops after a few
        failures in a row, when the tracking store itself is probably away."""
        logged = failed = 0
        # This replica's jobs (their files are on its disk), and any job whose record
        # waited long enough that the replica which ran it is probably gone.
        pending = self.store.tracking_pending(
            owner=self.config.node_id,
            orphaned_before=time.time() - ORPHAN_AFTER_LEASES * self.config.lease_seconds,
        )
        running = {job.id for job in pending if job.state == RUNNING}
        for gone in set(self._live) - running:
            del self._live[gone]
        for job in pending:
            if self._stop.is_set() or failed >= _STOP_AFTER:
                break
            if self._retry_at.get(job.id, 0.0) > time.monotonic() or job.state not in (
                RUNNING,
                *FINAL_STATES,
            ):
                continue
            try:
                if self._logger is None:
                    self._logger = RunLogger(self.config, self.store)
                if job.state == RUNNING:
                    self._logger.live(job, self._live.setdefault(job.id, _Live()))
                    self._retry_at.pop(job.id, None)
                    continue
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
