"""Executors run queued jobs. One interface; the local one starts worker processes (the
Ray one, :mod:`.ray_executor`, runs each job in a Ray actor on a cluster).

:class:`LocalExecutor` has one slot per GPU (or one on CPU). A dispatcher thread claims
QUEUED jobs from the store, runs each in its own spawned worker process (pinned to its
GPU with ``CUDA_VISIBLE_DEVICES``), and watches over them: heartbeats, cancellation (the
worker stops cooperatively; after a grace period it is terminated), per-stage timeouts,
and workers that die without writing an outcome. The same thread stays alive until its
workers are gone, because their death signal is tied to the thread that started them.
That loop and the watching are :class:`PollingExecutor`'s, which the Ray executor shares.

Pre-warmed workers: a fresh worker spends seconds importing torch and the engine before
the job starts. So each slot keeps one *spare*, a worker process started with that
slot's environment (its GPU set before torch loads) that has done its imports and waits
for a task on a pipe; a claimed job goes to its slot's spare (a cold process only when
there is none). The next spare is started once the slot is free again, so its imports do
not compete with the running job for CPU, or at once when jobs are already waiting, so
they find a warm worker. Spares that die are replaced (with back-off); on stop they go
at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from .config import ServerConfig
from .errors import StageTimeout
from .jobs import CANCELLED, FAILED, QUEUED, RUNNING
from .store import JobStore
from .worker import WorkerSetup, WorkerTask, run, serve, task_for

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the service needs from an executor (local worker processes, or Ray actors)."""

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
    conn: Connection | None = None  # the pipe the task went through (pre-warmed worker)


@dataclass
class _Spare:
    """A pre-warmed worker process of one slot, waiting for its task."""

    setup: WorkerSetup
    process: multiprocessing.process.BaseProcess
    conn: Connection
    warm_seconds: float | None = None  # set once it reports its imports done


class PollingExecutor:
    """What both executors share: one dispatcher thread claims jobs from the store and
    watches the running ones (heartbeats, cancellation, stage timeouts, other replicas'
    stale jobs); a subclass says how a job runs and stops (its ``_Running`` items have
    ``task``, ``slot``, ``cancel_seen``, ``terminated`` and ``outcome``)."""

    slots: int

    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        on_finished: Callable[[str], None] | None = None,
        on_started: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.store = config, store
        self._on_started = on_started or (lambda audit_id: None)
        self._on_finished = on_finished or (lambda audit_id: None)
        self._running: dict[str, Any] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_deadline = 0.0
        self._thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self._last_heartbeat = 0.0
        self._last_recovery = 0.0
        self._spare_failures: dict[int, int] = {}  # slot -> spares that died before warm
        self._spare_not_before: dict[int, float] = {}  # slot -> back-off after such deaths

    # --- interface --------------------------------------------------------------------

    def start(self) -> None:
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

    # --- what a subclass does -----------------------------------------------------------

    def _reap(self) -> None:
        """Finish the jobs whose worker has ended."""
        raise NotImplementedError

    def _dispatch(self) -> None:
        """Claim jobs for the free slots and start them."""
        raise NotImplementedError

    def _keep_spares(self) -> None:
        """Keep the pre-warmed workers of the slots."""

    def _discard_spares(self) -> None:
        """Stop the pre-warmed workers (they hold no job)."""

    def _spare_failed(self, slot: int, now: float) -> None:
        """A slot's spare died before it was warm: wait longer before each next one."""
        failures = self._spare_failures.get(slot, 0) + 1
        self._spare_failures[slot] = failures
        self._spare_not_before[slot] = now + min(2.0**failures, 60.0)

    def _terminate(self, item: Any, outcome: tuple[str, tuple[str, str]]) -> None:
        """Stop a running job's worker; its job ends with ``outcome`` once it is gone.
        Called again on every round until then (to escalate)."""
        raise NotImplementedError

    def _interrupt_all(self) -> None:
        """The drain period is over: stop the remaining workers and put their jobs back."""
        raise NotImplementedError

    # --- the dispatcher thread --------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self._reap()
                if self._stopping.is_set():
                    self._discard_spares()
                    if not self._running:
                        return
                    if time.monotonic() >= self._drain_deadline:
                        self._interrupt_all()
                        return
                else:
                    self._watch()
                    self._recover_stale()
                    self._dispatch()
                    self._keep_spares()
                self._heartbeat()
            except Exception:  # the loop must survive a database hiccup
                log.exception("executor loop error")
            self._wake.wait(self.config.poll_seconds)
            self._wake.clear()

    def _free_slot(self) -> int | None:
        used = {r.slot for r in self._running.values()}
        return next((s for s in range(self.slots) if s not in used), None)

    def _watch(self) -> None:
        now = time.monotonic()
        for audit_id, item in list(self._running.items()):
            if item.terminated:
                self._terminate(item, item.outcome)  # escalate if it is still there
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


class LocalExecutor(PollingExecutor):
    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        on_finished: Callable[[str], None] | None = None,
        on_started: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config, store, on_finished, on_started)
        self.gpus = list(config.gpus) or detect_gpus()
        self.slots = config.workers or max(1, len(self.gpus))
        self._context = multiprocessing.get_context("spawn")
        self._running: dict[str, _Running] = {}
        self._spares: dict[int, _Spare] = {}

    def start(self) -> None:
        log.info(
            "local executor: %d slot(s) on %s",
            self.slots,
            f"GPUs {self.gpus}" if self.gpus else "CPU",
        )
        super().start()

    @property
    def spares(self) -> dict[int, tuple[int, bool]]:
        """slot -> (pid, warm) of its pre-warmed worker (for logs and tests)."""
        return {
            slot: (s.process.pid or 0, s.warm_seconds is not None)
            for slot, s in list(self._spares.items())
        }

    def _setup(self, slot: int) -> WorkerSetup:
        return WorkerSetup(
            engine=self.config.engine,
            parent_pid=os.getpid(),
            log_level=self.config.log_level,
            # More slots than GPUs (workers > GPUs): they share the GPUs in turn.
            cuda_visible_devices=str(self.gpus[slot % len(self.gpus)]) if self.gpus else None,
        )

    def _dispatch(self) -> None:
        while (slot := self._free_slot()) is not None:
            job = self.store.claim_next(self.config.node_id)
            if job is None:
                return
            self._on_started(job.id)
            task = task_for(job, self.config, self._setup(slot))
            item = self._hand_to_spare(slot, task)
            if item is None:
                process = self._context.Process(
                    target=run, args=(task,), name=f"cnp-worker-{job.id}", daemon=False
                )
                process.start()
                item = _Running(task, process, slot)
            self._running[job.id] = item
            log.info(
                "job %s attempt %d started in %s pid %s",
                job.id,
                job.attempts,
                "pre-warmed" if item.conn is not None else "new",
                item.process.pid,
            )

    def _hand_to_spare(self, slot: int, task: WorkerTask) -> _Running | None:
        """Send the task to the slot's spare (warm or still warming: either is ahead of a
        new process); None when there is no usable spare."""
        spare = self._spares.pop(slot, None)
        if spare is None:
            return None
        if spare.process.is_alive() and spare.setup == task.setup:
            try:
                spare.conn.send(task)
                return _Running(task, spare.process, slot, conn=spare.conn)
            except OSError:  # it died just now
                pass
        self._end_spare(spare)
        return None

    def _reap(self) -> None:
        for audit_id, item in list(self._running.items()):
            if item.process.is_alive():
                continue
            item.process.join()
            if item.conn is not None:
                item.conn.close()
            del self._running[audit_id]
            job = self.store.get(audit_id)
            if job.state == RUNNING and job.attempts == item.task.attempt:
                # The worker wrote no outcome: we stopped it, or it crashed (OOM, signal).
                state, error = item.outcome or (FAILED, _crash(item.process.exitcode))
                self.store.finish(audit_id, item.task.attempt, state, error=error)
                log.warning("job %s: %s (%s)", audit_id, error[1], state)
            self._on_finished(audit_id)

    # --- pre-warmed workers -------------------------------------------------------------

    def _keep_spares(self) -> None:
        """One spare per slot: replace dead ones; start a missing one when its slot is free,
        or while the slot is busy only if jobs are waiting (they will want it next)."""
        if not self.config.prewarm_workers:
            return
        busy = {item.slot for item in self._running.values()}
        backlog: bool | None = None  # asked of the store only when it matters
        now = time.monotonic()
        for slot in range(self.slots):
            spare = self._spares.get(slot)
            if spare is not None:
                if spare.process.is_alive():
                    self._check_warm(slot, spare)
                    continue
                self._lost_spare(slot, spare, now)
            if now < self._spare_not_before.get(slot, 0.0):
                continue
            if slot in busy:
                if backlog is None:
                    backlog = self.store.count(QUEUED) > 0
                if not backlog:
                    continue
            self._start_spare(slot)

    def _start_spare(self, slot: int) -> None:
        setup = self._setup(slot)
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=serve, args=(setup, theirs), name=f"cnp-worker-spare-{slot}", daemon=False
        )
        process.start()
        theirs.close()  # the child holds its end; ours sees EOF if the child dies
        self._spares[slot] = _Spare(setup, process, ours)
        log.debug("slot %d: pre-warming worker pid %s", slot, process.pid)

    def _check_warm(self, slot: int, spare: _Spare) -> None:
        if spare.warm_seconds is not None:
            return
        try:
            if not spare.conn.poll():
                return
            _, seconds = spare.conn.recv()
        except (EOFError, OSError):
            return  # it died: the next round replaces it
        spare.warm_seconds = float(seconds)
        self._spare_failures.pop(slot, None)
        log.info("slot %d: worker pid %s warm in %.1f s", slot, spare.process.pid, seconds)

    def _lost_spare(self, slot: int, spare: _Spare, now: float) -> None:
        """A spare died while waiting (OOM, a signal, a broken engine import)."""
        del self._spares[slot]
        self._end_spare(spare)
        if spare.warm_seconds is None:  # died while warming up: back off before the next
            self._spare_failed(slot, now)
        log.warning(
            "slot %d: pre-warmed worker pid %s exited with code %s; replacing it",
            slot,
            spare.process.pid,
            spare.process.exitcode,
        )

    def _end_spare(self, spare: _Spare) -> None:
        """Stop a spare (it holds no job, so nothing is lost) and reap it."""
        spare.conn.close()
        if spare.process.is_alive():
            spare.process.terminate()
            spare.process.join(5.0)
            if spare.process.is_alive():
                spare.process.kill()
        spare.process.join()

    def _discard_spares(self) -> None:
        while self._spares:
            self._end_spare(self._spares.popitem()[1])

    # --- stopping workers -------------------------------------------------------------

    def _terminate(self, item: _Running, outcome: tuple[str, tuple[str, str]]) -> None:
        now = time.monotonic()
        if not item.terminated:
            item.outcome, item.terminated = outcome, now
            item.process.terminate()
        elif now - item.terminated > 5.0:
            item.process.kill()

    def _interrupt_all(self) -> None:
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
            if item.conn is not None:
                item.conn.close()
            del self._running[audit_id]


def _crash(exitcode: int | None) -> tuple[str, str]:
    """The error of a worker that died without writing its outcome. A SIGKILL we did not
    send is the kernel's OOM killer, the usual reason."""
    if exitcode == -signal.SIGKILL:
        return (
            "RESOURCE_EXHAUSTED",
            "the worker was killed by the kernel (SIGKILL), most likely out of memory: audit "
            "fewer or smaller images (fit_images, batch_size) or give the server more memory",
        )
    return "INTERNAL", f"the worker process exited with code {exitcode}"


def workdir_of(config: ServerConfig, audit_id: str) -> Path:
    return config.jobs_path / audit_id
