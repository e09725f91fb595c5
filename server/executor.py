"""Executors run queued jobs. One interface; the local one starts worker processes.

:class:`LocalExecutor` has one slot per GPU (or one on CPU). A dispatcher thread claims
QUEUED jobs from the store, starts a spawned worker process per job (pinned to its GPU
with ``CUDA_VISIBLE_DEVICES``), and watches over them: heartbeats, cancellation (the
worker stops cooperatively; after a grace period it is terminated), per-stage timeouts,
and workers that die without writing an outcome. The same thread stays alive until its
workers are gone, because their death signal is tied to the thread that started them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import __version__
from .config import ServerConfig
from .errors import StageTimeout
from .jobs import CANCELLED, FAILED, RUNNING
from .store import JobStore
from .worker import WorkerTask, run

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the service needs from an executor (local processes now; Ray later)."""

    slots: int

    def start(self) -> None: ...

    def wake(self) -> None:
        """A job was queued or a cancellation requested: look now, not at the next tick."""

    def stop(self, drain_seconds: float) -> None:
        """Stop claiming; let running jobs finish for up to ``drain_seconds``; re-queue the rest."""


def detect_gpus() -> list[int]:
    """GPU indices visible to this process, without initialising CUDA here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [i for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]


@dataclass
class _Running:
    task: WorkerTask
    process: multiprocessing.process.BaseProcess
    slot: int
    cancel_seen: float = 0.0
    terminated: float = 0.0
    outcome: tuple[str, tuple[str, str]] | None = field(default=None)


class LocalExecutor:
    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        on_finished: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.store = config, store
        self.gpus = list(config.gpus) or detect_gpus()
        self.slots = config.workers or max(1, len(self.gpus))
        self._on_finished = on_finished or (lambda audit_id: None)
        self._context = multiprocessing.get_context("spawn")
        self._running: dict[str, _Running] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_deadline = 0.0
        self._thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self._last_heartbeat = 0.0
        self._last_recovery = 0.0

    # --- interface --------------------------------------------------------------------

    def start(self) -> None:
        log.info(
            "local executor: %d slot(s) on %s",
            self.slots,
            f"GPUs {self.gpus}" if self.gpus else "CPU",
        )
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, drain_seconds: float) -> None:
        self._drain_deadline = time.monotonic() + drain_seconds
        self._stopping.set()
        self._wake.set()
        self._thread.join()

    @property
    def running(self) -> list[str]:
        return list(self._running)

    # --- the dispatcher thread --------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self._reap()
                if self._stopping.is_set():
                    if not self._running:
                        return
                    if time.monotonic() >= self._drain_deadline:
                        self._interrupt_all()
                        return
                else:
                    self._watch()
                    self._recover_stale()
                    self._dispatch()
                self._heartbeat()
            except Exception:  # the loop must survive a database hiccup
                log.exception("executor loop error")
            self._wake.wait(self.config.poll_seconds)
            self._wake.clear()

    def _free_slot(self) -> int | None:
        used = {r.slot for r in self._running.values()}
        return next((s for s in range(self.slots) if s not in used), None)

    def _dispatch(self) -> None:
        while (slot := self._free_slot()) is not None:
            job = self.store.claim_next(self.config.node_id)
            if job is None:
                return
            task = WorkerTask(
                audit_id=job.id,
                attempt=job.attempts,
                database_url=self.config.effective_database_url,
                workdir=str(self.config.jobs_path / job.id),
                engine=self.config.engine,
                allowed_roots=tuple(self.config.allow_roots),
                parent_pid=os.getpid(),
                service_version=__version__,
                log_level=self.config.log_level,
                cuda_visible_devices=str(self.gpus[slot]) if self.gpus else None,
                progress_interval=min(0.5, self.config.poll_seconds),
            )
            process = self._context.Process(
                target=run, args=(task,), name=f"cnp-worker-{job.id}", daemon=False
            )
            process.start()
            self._running[job.id] = _Running(task, process, slot)
            log.info("job %s attempt %d started in pid %s", job.id, job.attempts, process.pid)

    def _reap(self) -> None:
        for audit_id, item in list(self._running.items()):
            if item.process.is_alive():
                continue
            item.process.join()
            del self._running[audit_id]
            job = self.store.get(audit_id)
            if job.state == RUNNING and job.attempts == item.task.attempt:
                # The worker wrote no outcome: we stopped it, or it crashed (OOM, signal).
                state, error = item.outcome or (
                    FAILED,
                    ("INTERNAL", f"the worker process exited with code {item.process.exitcode}"),
                )
                self.store.finish(audit_id, item.task.attempt, state, error=error)
                log.warning("job %s: %s (%s)", audit_id, error[1], state)
            self._on_finished(audit_id)

    def _terminate(self, item: _Running, outcome: tuple[str, tuple[str, str]]) -> None:
        now = time.monotonic()
        if not item.terminated:
            item.outcome, item.terminated = outcome, now
            item.process.terminate()
        elif now - item.terminated > 5.0:
            item.process.kill()

    def _watch(self) -> None:
        now = time.monotonic()
        for audit_id, item in list(self._running.items()):
            if item.terminated:
                self._terminate(item, item.outcome)  # escalate to SIGKILL if still alive
                continue
            job = self.store.get(audit_id)
            if job.cancel_requested:
                item.cancel_seen = item.cancel_seen or now
                if now - item.cancel_seen > self.config.cancel_grace_seconds:
                    log.warning("job %s ignored cancellation; terminating it", audit_id)
                    self._terminate(item, (CANCELLED, ("CANCELLED", "cancelled (terminated)")))
                continue
            limit = self.config.stage_timeout(job.stage)
            if job.stage_started_at and time.time() - job.stage_started_at > limit:
                error = StageTimeout(f"stage {job.stage!r} exceeded its time limit of {limit:g} s")
                self._terminate(item, (FAILED, (error.status, str(error))))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self._running and now - self._last_heartbeat >= self.config.heartbeat_seconds:
            self.store.heartbeat(self._running, self.config.node_id)
            self._last_heartbeat = now

    def _recover_stale(self) -> None:
        """Jobs of another replica that stopped sending heartbeats are re-queued."""
        now = time.monotonic()
        if now - self._last_recovery < self.config.lease_seconds / 2:
            return
        self._last_recovery = now
        for audit_id, state in self.store.recover(
            max_attempts=self.config.max_attempts,
            stale_before=time.time() - self.config.lease_seconds,
        ):
            if audit_id not in self._running:
                log.warning(
                    "job %s had no heartbeat for %gs: %s",
                    audit_id,
                    self.config.lease_seconds,
                    state,
                )

    def _interrupt_all(self) -> None:
        """The drain period is over: stop the remaining workers and put their jobs back."""
        for audit_id, item in list(self._running.items()):
            item.process.terminate()
            item.process.join(5.0)
            if item.process.is_alive():
                item.process.kill()
                item.process.join()
            requeued = self.store.requeue(
                audit_id, item.task.attempt, "re-queued: the server shut down while it ran"
            )
            log.info("job %s interrupted by shutdown; re-queued=%s", audit_id, requeued)
            del self._running[audit_id]


def workdir_of(config: ServerConfig, audit_id: str) -> Path:
    return config.jobs_path / audit_id
