"""One job in one worker process: run the engine, write progress and the outcome to the store.

The process is started with ``multiprocessing`` *spawn* (a fresh interpreter: no locks or
CUDA state inherited from the server's threads). It dies with the server: the kernel
sends it SIGKILL when the spawning thread exits (``PR_SET_PDEATHSIG``) and a watchdog
thread checks the parent as a fallback. Every write carries the attempt number, so a
straggler from an interrupted attempt cannot overwrite the current one.

Two entry points: :func:`run` starts cold with its task; :func:`serve` is a *pre-warmed*
worker that sets up its environment (GPU, OpenMP), imports the engine (torch and the
rest, seconds) while no job waits, then receives one task through a pipe and runs it
exactly as :func:`run` would. Either way a process runs one job and exits. A Ray actor
(:mod:`.ray_executor`) goes through the same steps (:func:`prepare_process`,
:func:`warm_up_engine`, :func:`run_handed`), without the parent-death signal: Ray ends
it with its owner.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import mimetypes
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from cnp.v1 import report_pb2
from cnp_core import convert
from cnp_core.errors import Cancelled
from cnp_core.results import AuditResult
from cnp_core.spec import AuditSpec

from . import __version__, mlflow_model, registry
from .errors import describe
from .jobs import CANCELLED, FAILED, SUCCEEDED, JobRecord

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("cnp_server.worker")

REPORT_NAME = "report.json"
SOURCE_MODEL_DIR = "source_model"  # an MLflow model's weights, fetched for this job


@dataclass(frozen=True)
class WorkerTask:
    """Everything a worker process needs (picklable; the process starts from nothing)."""

    audit_id: str
    attempt: int
    database_url: str
    workdir: str
    engine: str
    allowed_roots: tuple[str, ...]
    parent_pid: int
    service_version: str
    log_level: str = "INFO"
    cuda_visible_devices: str | None = None
    progress_interval: float = 0.5
    environment: dict[str, str] = field(default_factory=dict)
    memory_limit: int = 0  # bytes the job may allocate (RLIMIT_DATA); 0: none
    tracking_uri: str = ""  # MLflow, for model URIs and the pruned model's MLflow models
    max_weights_bytes: int = 4 << 30

    @property
    def setup(self) -> WorkerSetup:
        """The part of the task a pre-warmed worker must have been started with."""
        return WorkerSetup(
            engine=self.engine,
            parent_pid=self.parent_pid,
            log_level=self.log_level,
            cuda_visible_devices=self.cuda_visible_devices,
            environment=dict(self.environment),
        )


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process needs before it knows its job: the environment that must be
    in place before torch loads (GPU, OpenMP) and the engine it imports."""

    engine: str
    parent_pid: int
    log_level: str = "INFO"
    cuda_visible_devices: str | None = None
    environment: dict[str, str] = field(default_factory=dict)


def task_for(job: JobRecord, config: ServerConfig, setup: WorkerSetup) -> WorkerTask:
    """The task of ``job``'s current attempt for a worker set up as ``setup``."""
    return WorkerTask(
        audit_id=job.id,
        attempt=job.attempts,
        database_url=config.effective_database_url,
        workdir=str(config.jobs_path / job.id),
        engine=setup.engine,
        allowed_roots=tuple(config.allow_roots),
        parent_pid=setup.parent_pid,
        service_version=__version__,
        log_level=setup.log_level,
        cuda_visible_devices=setup.cuda_visible_devices,
        environment=dict(setup.environment),
        progress_interval=min(0.5, config.poll_seconds),
        memory_limit=config.worker_memory_bytes,
        tracking_uri=config.effective_tracking_uri if config.tracking_enabled else "",
        max_weights_bytes=config.max_weights_bytes,
    )


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class ProgressWriter:
    """The engine's progress callback: writes to the store, throttled except on stage changes."""

    def __init__(self, store: Any, task: WorkerTask) -> None:
        self.store, self.task = store, task
        self.stage = ""
        self._last = 0.0

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        new_stage = stage != self.stage
        if not new_stage and fraction < 1.0 and now - self._last < self.task.progress_interval:
            return
        self.stage, self._last = stage, now
        fraction = min(max(float(fraction), 0.0), 1.0)
        try:
            current = self.store.report_progress(
                self.task.audit_id, self.task.attempt, stage, fraction, message, new_stage
            )
        except SQLAlchemyError as exc:  # progress is best effort; the outcome is not
            log.warning("progress not recorded (store unavailable): %s", exc)
            self.stage = "" if new_stage else self.stage  # retry the stage change next time
            return
        if not current:  # re-queued or finished elsewhere: this attempt is void
            raise Cancelled("this attempt of the job is no longer current")


class CancelCheck:
    """The engine's cancellation check: reads the store's flag at most every interval."""

    def __init__(self, store: Any, audit_id: str, interval: float) -> None:
        self.store, self.audit_id, self.interval = store, audit_id, interval
        self._last = 0.0
        self._flag = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._flag and now - self._last >= self.interval:
            self._last = now
            try:
                self._flag = self.store.cancel_requested(self.audit_id)
            except SQLAlchemyError as exc:
                log.warning("cancellation flag not read (store unavailable): %s", exc)
        return self._flag


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_artifacts(paths: dict[str, str], workdir: Path) -> dict[str, dict[str, Any]]:
    """name -> {path relative to workdir, size, sha256, content type}.

    Files outside the workdir are copied in, so everything a job owns lives in one place
    and a download can never reach beyond it.
    """
    workdir = workdir.resolve()
    described: dict[str, dict[str, Any]] = {}
    for name, value in sorted(paths.items()):
        path = Path(value)
        path = (workdir / path if not path.is_absolute() else path).resolve()
        if not path.is_file():
            log.warning("artifact %s: %s is not a file; skipped", name, path)
            continue
        if not path.is_relative_to(workdir):
            target = workdir / "artifacts" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            path = target
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        described[name] = {
            "path": str(path.relative_to(workdir)),
            "size": path.stat().st_size,
            "sha256": _sha256(path),
            "content_type": kind,
        }
    return described


def _fetch_model(
    spec: AuditSpec, task: WorkerTask, workdir: Path
) -> tuple[registry.ModelSource, AuditSpec]:
    """The MLflow model the spec names, fetched into the job's directory; returns where it
    came from and the spec that reads the fetched weights."""
    source = registry.resolve(spec.model.weights, task.tracking_uri)
    local, source = registry.fetch(
        source, workdir / SOURCE_MODEL_DIR, task.tracking_uri, task.max_weights_bytes
    )
    model = dataclasses.replace(spec.model, weights=str(local))
    return source, dataclasses.replace(spec, model=model)


def _save_mlflow_models(result: AuditResult, job: JobRecord, workdir: Path) -> None:
    """The pruned model as MLflow models, for the tracker to log (and register)."""
    weights = result.artifacts.get("model_compact.safetensors")
    if not weights:
        return
    spec = result.spec
    metadata = {
        "audit_id": job.id,
        "architecture": spec.model.architecture,
        "num_classes": spec.model.num_classes,
        "classes": list(spec.model.classes),
        "prune_method": spec.prune.method if spec.prune else "",
        "prune_rate": spec.prune.rate if spec.prune else 0.0,
    }
    mlflow_model.save_models(Path(weights).parent, workdir, metadata, spec.dataset.input_size)


def finish_success(
    result: AuditResult,
    task: WorkerTask,
    workdir: Path,
    source: registry.ModelSource | None = None,
) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """The serialized report and the artifact list; writes the canonical report.json.

    The engine's own report.json (if any) is replaced by the canonical proto JSON, which
    names artifacts instead of listing server paths.
    """
    canonical = (workdir / REPORT_NAME).resolve()
    paths = {
        name: path
        for name, path in result.artifacts.items()
        if Path(path).resolve() != canonical and name != REPORT_NAME
    }
    artifacts = describe_artifacts(paths, workdir)
    report = convert.report_to_proto(
        result,
        audit_id=task.audit_id,
        artifacts=artifacts,
        service_version=task.service_version,
    )
    if source is not None:
        report.model_source.CopyFrom(
            report_pb2.ModelSource(
                uri=source.uri,
                name=source.name,
                version=source.version,
                run_id=source.run_id,
                artifact_path=source.artifact_path,
            )
        )
    canonical.write_text(convert.report_to_json(report) + "\n")
    artifacts.update(describe_artifacts({REPORT_NAME: str(canonical)}, workdir))
    return report.SerializeToString(), artifacts


def _persist(write: Callable[[], object], attempts: int = 6) -> None:
    """Write the job's outcome, riding out a short store outage (e.g. a database restart)."""
    for attempt in range(attempts):
        try:
            write()
            return
        except SQLAlchemyError as exc:
            if attempt == attempts - 1:
                raise
            log.warning("outcome not recorded yet (store unavailable), retrying: %s", exc)
            time.sleep(min(2.0**attempt, 30.0))


def _prepare_workdir(path: Path) -> None:
    """A fresh directory per attempt: files of an interrupted attempt must not leak in."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _log_as(label: str, level: str) -> None:
    """Worker log lines name the job (or "spare" while a pre-warmed worker waits for one)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level)
    root.setLevel(level)
    formatter = logging.Formatter(
        f"%(asctime)s %(levelname)s worker[{label}] %(name)s: %(message)s"
    )
    for handler in root.handlers:
        handler.setFormatter(formatter)


def _set_up(setup: WorkerSetup, label: str) -> None:
    """Set-up of a worker process the local executor started: it dies with the server."""
    _die_with_parent(setup.parent_pid)
    prepare_process(setup, label)


def prepare_process(setup: WorkerSetup, label: str) -> None:
    """Process-wide set-up, before anything imports torch. A Ray actor calls this alone:
    Ray, not the parent's death signal, ends it with its owner."""
    # Spinning OpenMP threads stall a worker that shares its cores
    # (measured: a 128x128 eigh in DRSA 684 ms instead of 1.7 ms under load).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.update(setup.environment)
    # CUDA reads this when it initialises; a pre-warmed worker sets it before its imports.
    if setup.cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = setup.cuda_visible_devices
    _log_as(label, setup.log_level)


def run(task: WorkerTask) -> None:
    """Entry point of a worker process started for ``task`` (cold: it imports the engine now)."""
    _set_up(task.setup, task.audit_id)
    run_job(task)


def serve(setup: WorkerSetup, conn: Connection) -> None:
    """Entry point of a pre-warmed worker: import the engine, say so, wait for one task.

    Sends ``("ready", seconds)`` once warm; a closed pipe (the executor let it go) ends
    the process without a job.
    """
    _set_up(setup, "spare")
    seconds = warm_up_engine(setup.engine)
    try:
        conn.send(("ready", seconds))
        task = conn.recv()
    except (EOFError, OSError):
        return
    finally:
        conn.close()
    run_handed(task)


def warm_up_engine(engine: str) -> float:
    """Import the engine (torch and the rest) and let it warm up; the seconds it took.

    A failure is logged, not raised: the job imports the engine again and fails with the
    error as a cold worker would.
    """
    began = time.monotonic()
    try:
        from .engine import load_engine

        warm_up = getattr(load_engine(engine), "warm_up", None)
        if callable(warm_up):
            warm_up()
    except Exception:
        log.exception("warm-up of engine %s failed", engine)
    return time.monotonic() - began


def run_handed(task: WorkerTask) -> None:
    """Run a task handed to a pre-warmed process; from now on its log lines name the job."""
    _log_as(task.audit_id, task.log_level)
    run_job(task)


def run_job(task: WorkerTask) -> None:
    """Run the task's job in this (set up) process and record its outcome in the store."""
    from .engine import load_engine
    from .store import JobStore

    store = JobStore(task.database_url)
    workdir = Path(task.workdir)
    try:
        if task.memory_limit:  # the job's allocations fail (MemoryError) beyond it
            resource.setrlimit(resource.RLIMIT_DATA, (task.memory_limit, task.memory_limit))
        job = store.get(task.audit_id)
        spec = convert.spec_from_json(job.spec_json)
        _prepare_workdir(workdir)
        roots = [Path(r) for r in task.allowed_roots]
        source, local_spec = None, spec
        if registry.is_model_uri(spec.model.weights):
            source, local_spec = _fetch_model(spec, task, workdir)
            roots.append(workdir / SOURCE_MODEL_DIR)
        engine = load_engine(task.engine)
        result = engine.run_audit(
            local_spec,
            workdir=workdir,
            progress=ProgressWriter(store, task),
            cancelled=CancelCheck(store, task.audit_id, task.progress_interval),
            allowed_roots=roots,
        )
        result.spec = spec  # the report names the model as the client did
        if task.tracking_uri:
            _save_mlflow_models(result, job, workdir)
        report, artifacts = finish_success(result, task, workdir, source)
        _persist(
            lambda: store.finish(
                task.audit_id,
                task.attempt,
                SUCCEEDED,
                report=report,
                artifacts_json=json.dumps(artifacts, sort_keys=True),
                message="done",
            )
        )
        log.info("succeeded")
    except Cancelled as exc:
        error = describe(exc).record()
        _persist(lambda: store.finish(task.audit_id, task.attempt, CANCELLED, error=error))
        log.info("cancelled")
    except BaseException as exc:
        failure = describe(exc)
        error = failure.record()
        _persist(lambda: store.finish(task.audit_id, task.attempt, FAILED, error=error))
        log.info("failed with %s: %s", failure.code, failure.message)
        if not isinstance(exc, Exception):
            raise
    finally:
        store.close()
