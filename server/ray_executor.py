"""The Ray executor (``executor = "ray"``): each job runs in a Ray actor of its own.

Same semantics as :class:`.executor.LocalExecutor`, whose dispatcher loop it shares
(:class:`.executor.PollingExecutor`): jobs are claimed from the store, at most ``slots``
at once, with heartbeats, cancellation (cooperative through the store's flag; after
``cancel_grace_seconds`` the actor is killed), per-stage timeouts, drain on stop and
re-queue of what is left. Only where a job runs differs: in a Ray actor that asks for
one GPU when the cluster has GPUs, else a share of one node's CPUs, and whose process
runs :func:`.worker.run_job` exactly as a local worker does (progress, attempt fencing,
the cancellation flag, the outcome, the memory limit). One job per actor process: the
actor is killed (``ray.kill``) once its job ends. A job whose actor dies (its process
killed, its node lost) is finished as FAILED with Ray's reason, like a killed worker.

Pre-warmed actors: as the local executor keeps a spare process per slot, this one keeps
a spare actor per slot that has imported the engine; a job is claimed for a slot only
once its spare is warm (placed on a node, imports done), so a cluster without free
resources leaves jobs QUEUED for other replicas instead of holding them.

What the cluster must provide (Ray ships the task, not files):

- the job store's database and the jobs directory (``data_dir/jobs``) reachable at the
  same URL and path from every Ray node: PostgreSQL and a shared volume in a real
  cluster, the same machine in tests;
- the same Python, Ray and cnp versions as the server, and the engine module
  importable on the nodes (e.g. the cnp image for the Ray nodes; for the tests' scripted
  engine, the head is started with ``tests/`` on ``PYTHONPATH``).

``ray_address``: empty starts a Ray instance in the server process (no dashboard, a
small object store, usage stats off, token authentication with a token that only its
processes see) and stops it with the server; ``HOST:PORT`` joins the cluster whose head
(GCS) listens there, from a machine that is a node of it; ``ray://HOST:10001`` connects
as a Ray Client from anywhere (the KubeRay set-up); ``auto`` finds the local cluster. A
cluster with token authentication needs its token in ``RAY_AUTH_TOKEN`` (or a file named
by ``RAY_AUTH_TOKEN_PATH``) in the server's environment.

The cluster's nodes are read at start-up and every few seconds after: ``workers = 0``
means one slot per GPU (at least one), actors ask for a GPU when a node has one, and no
job is claimed while no node has CPUs or GPUs (KubeRay's head runs none; its GPU workers
may join after the server). Actors are owned by the server: Ray kills them when it exits. If the cluster's head stays
unreachable longer than Ray's ``gcs_rpc_server_reconnect_timeout_s`` (60 s), Ray ends
the server process; its jobs are then re-queued on restart or by another replica's
lease recovery. In a shorter outage Ray's calls wait for the head (heartbeats pause);
a failed call is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError

from .config import ConfigError, ServerConfig
from .errors import Failure
from .executor import PollingExecutor
from .jobs import FAILED, QUEUED, RUNNING
from .store import JobStore, make_engine
from .worker import WorkerSetup, WorkerTask, prepare_process, run_handed, task_for, warm_up_engine

log = logging.getLogger(__name__)

NAMESPACE = "cnp"
# A local Ray holds only the tasks (a few KiB each); Ray's minimum is 75 MiB.
LOCAL_OBJECT_STORE_BYTES = 100 * 1024 * 1024
CONNECT_TIMEOUT_SECONDS = 5.0  # Ray itself retries an absent head for minutes
PING_SECONDS = 5.0  # a warm spare answers in milliseconds; one that does not is lost
KILL_WAIT_SECONDS = 10.0  # after ray.kill, Ray confirms the death within this, or never
PENDING_WARN_SECONDS = 60.0  # a spare not placed by then: the cluster lacks resources
SPARE_FAILURES_BEFORE_COLD = 3  # then jobs go to cold actors, which fail visibly
CLUSTER_LOOK_SECONDS = 10.0  # how often the cluster's nodes are read again
REASON_CHARS = 300


class JobActor:
    """One Ray worker process for one job: a spare until its task comes, then that job."""

    def __init__(self, setup: WorkerSetup, database_url: str) -> None:
        prepare_process(setup, "spare")
        self.engine, self.database_url = setup.engine, database_url

    def ready(self, import_engine: bool) -> tuple[int, str, float]:
        """(pid, node address, seconds the warm-up took, 0 when not asked)."""
        began = time.monotonic()
        if import_engine:
            warm_up_engine(self.engine)
            # SQLAlchemy imports the store's dialect and driver on first use: 0.3 s of
            # each job's start in an actor, measured, unless done here (no connection yet).
            make_engine(self.database_url).dispose()
        return os.getpid(), ray.util.get_node_ip_address(), time.monotonic() - began

    def run(self, task: WorkerTask) -> None:
        run_handed(task)


@dataclass
class _Actor:
    handle: Any  # ray.actor.ActorHandle
    ready: Any  # ObjectRef of JobActor.ready: where it runs, once it is placed
    created: float  # time.monotonic()
    pid: int = 0
    node: str = ""
    warm_seconds: float | None = None  # set once ready answered
    warned: bool = False  # said that it waits for resources


@dataclass
class _Running:
    task: WorkerTask
    actor: _Actor
    done: Any  # ObjectRef of JobActor.run
    slot: int
    cancel_seen: float = 0.0
    terminated: float = 0.0
    outcome: tuple[str, tuple[str, str]] | None = None


class RayExecutor(PollingExecutor):
    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        on_finished: Callable[[str], None] | None = None,
        on_started: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config, store, on_finished, on_started)
        connect(config.ray_address)
        self.slots, self.resources = plan(ray.nodes(), config.workers)
        self._last_look = time.monotonic()
        self._actor_class = ray.remote(JobActor)
        self._running: dict[str, _Running] = {}
        self._spares: dict[int, _Actor] = {}

    def start(self) -> None:
        log.info(
            "ray executor: %d slot(s), each job in a Ray actor with %s (cluster: %s)",
            self.slots,
            self.resources or "nothing yet (no node with CPUs or GPUs: jobs stay queued)",
            self.config.ray_address or "started in this process",
        )
        super().start()

    def stop(self, drain_seconds: float) -> None:
        super().stop(drain_seconds)
        try:
            ray.shutdown()  # a Ray started here stops; a cluster's connection closes
        except Exception as err:  # the server stops anyway
            log.warning("Ray did not shut down cleanly: %s", _first_line(err))

    @property
    def spares(self) -> dict[int, tuple[int, bool]]:
        """slot -> (pid, warm) of its pre-warmed actor (for logs and tests)."""
        return {slot: (a.pid, a.warm_seconds is not None) for slot, a in list(self._spares.items())}

    # --- starting jobs ----------------------------------------------------------------

    def _setup(self) -> WorkerSetup:
        # Ray sets CUDA_VISIBLE_DEVICES (the actor's GPU) and OMP_NUM_THREADS (its CPUs).
        return WorkerSetup(
            engine=self.config.engine, parent_pid=os.getpid(), log_level=self.config.log_level
        )

    def _new_actor(self, import_engine: bool) -> _Actor:
        assert self.resources is not None  # no claims and no spares without them
        # Never restarted: a job's actor that dies is a job that failed.
        options = {**self.resources, "max_restarts": 0, "max_task_retries": 0}
        handle = self._actor_class.options(**options).remote(
            self._setup(), self.config.effective_database_url
        )
        return _Actor(handle, handle.ready.remote(import_engine), time.monotonic())

    def _look_at_cluster(self) -> None:
        """Follow the cluster's nodes: Ray workers that join after the server (GPU pods
        pulling their image), nodes that leave. Spares made for the old plan go (they
        hold no job); running jobs keep their actors."""
        now = time.monotonic()
        if now - self._last_look < CLUSTER_LOOK_SECONDS:
            return
        self._last_look = now
        slots, resources = plan(ray.nodes(), self.config.workers)
        if (slots, resources) == (self.slots, self.resources):
            return
        log.warning(
            "the Ray cluster changed: %d slot(s), each job in a Ray actor with %s",
            slots,
            resources or "nothing yet (no node with CPUs or GPUs: jobs stay queued)",
        )
        self.slots, self.resources = slots, resources
        self._discard_spares()

    def _claimable(self, slot: int) -> bool:
        """Whether a job may be claimed for ``slot`` now: its spare is warm (or it has
        none by design, or its spares keep dying: a job then shows why)."""
        if self.resources is None:
            return False
        if not self.config.prewarm_workers:
            return True
        spare = self._spares.get(slot)
        if spare is not None and spare.warm_seconds is not None:
            return True
        return self._spare_failures.get(slot, 0) >= SPARE_FAILURES_BEFORE_COLD

    def _dispatch(self) -> None:
        self._look_at_cluster()
        busy = {item.slot for item in self._running.values()}
        for slot in range(self.slots):
            if slot in busy or not self._claimable(slot):
                continue
            job = self.store.claim_next(self.config.node_id)
            if job is None:
                return
            self._on_started(job.id)
            task = task_for(job, self.config, self._setup())
            actor = self._take_spare(slot)
            warm = actor is not None
            actor = actor or self._new_actor(import_engine=False)
            item = _Running(task, actor, actor.handle.run.remote(task), slot)
            self._running[job.id] = item
            log.info(
                "job %s attempt %d started in a %s Ray actor%s",
                job.id,
                job.attempts,
                "pre-warmed" if warm else "new",
                f": pid {actor.pid} on {actor.node}" if warm else "",
            )

    def _take_spare(self, slot: int) -> _Actor | None:
        """The slot's warm spare if it still answers; None otherwise (a new actor then)."""
        spare = self._spares.pop(slot, None)
        if spare is None or spare.warm_seconds is None:
            if spare is not None:
                _kill(spare.handle)
            return None
        try:
            ray.get(spare.handle.ready.remote(False), timeout=PING_SECONDS)
            return spare
        except (RayError, GetTimeoutError) as err:
            log.warning(
                "slot %d: pre-warmed actor pid %s is gone: %s", slot, spare.pid, ray_reason(err)
            )
            _kill(spare.handle)
            return None

    # --- pre-warmed actors ------------------------------------------------------------

    def _keep_spares(self) -> None:
        """One spare per slot, as the local executor keeps one worker process per slot."""
        if not self.config.prewarm_workers or self.resources is None:
            return
        busy = {item.slot for item in self._running.values()}
        backlog: bool | None = None  # asked of the store only when it matters
        now = time.monotonic()
        for slot in range(self.slots):
            spare = self._spares.get(slot)
            if spare is not None:
                self._check_warm(slot, spare, now)
                continue
            if now < self._spare_not_before.get(slot, 0.0):
                continue
            if slot in busy:
                if backlog is None:
                    backlog = self.store.count(QUEUED) > 0
                if not backlog:
                    continue
            self._spares[slot] = self._new_actor(import_engine=True)
            log.debug("slot %d: pre-warming a Ray actor", slot)

    def _check_warm(self, slot: int, spare: _Actor, now: float) -> None:
        if spare.warm_seconds is not None:
            return
        if not ray.wait([spare.ready], timeout=0)[0]:
            if not spare.warned and now - spare.created > PENDING_WARN_SECONDS:
                spare.warned = True
                log.warning(
                    "slot %d: Ray has not started its actor after %g s: the cluster has no "
                    "free %s; jobs stay queued until it does",
                    slot,
                    PENDING_WARN_SECONDS,
                    self.resources,
                )
            return
        try:
            spare.pid, spare.node, spare.warm_seconds = ray.get(spare.ready)
        except RayError as err:  # it died while starting: replace it, with back-off
            del self._spares[slot]
            self._spare_failed(slot, now)
            code, message, _ = worker_died(err)
            log.warning(
                "slot %d: pre-warmed Ray actor failed to start (%s): %s", slot, code, message
            )
            return
        self._spare_failures.pop(slot, None)
        log.info(
            "slot %d: Ray actor pid %s on %s warm in %.1f s",
            slot,
            spare.pid,
            spare.node,
            spare.warm_seconds,
        )

    def _discard_spares(self) -> None:
        while self._spares:
            _kill(self._spares.popitem()[1].handle)

    # --- ending jobs ------------------------------------------------------------------

    def _reap(self) -> None:
        if not self._running:
            return
        self._note_placed()
        by_ref = {item.done: audit_id for audit_id, item in self._running.items()}
        ended, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in ended:
            audit_id = by_ref[ref]
            self._end(audit_id, self._running[audit_id], _failure_of(ref))

    def _note_placed(self) -> None:
        """Log where a new actor's job runs, once Ray has placed it."""
        for audit_id, item in self._running.items():
            actor = item.actor
            if actor.pid or not ray.wait([actor.ready], timeout=0)[0]:
                continue
            try:
                actor.pid, actor.node, _ = ray.get(actor.ready)
            except RayError:  # it died before it started: its run call says why
                actor.pid = -1
                continue
            log.info("job %s runs in Ray actor pid %s on %s", audit_id, actor.pid, actor.node)

    def _end(self, audit_id: str, item: _Running, death: BaseException | None) -> None:
        """The job's actor is gone (or going): free the slot and finish the job if its
        worker wrote no outcome (we stopped it, or it died)."""
        _kill(item.actor.handle)  # one job per actor process; a no-op if it is dead
        del self._running[audit_id]
        job = self.store.get(audit_id)
        if job.state == RUNNING and job.attempts == item.task.attempt:
            state, error = item.outcome or (FAILED, worker_died(death))
            self.store.finish(audit_id, item.task.attempt, state, error=error)
            log.warning("job %s: %s (%s)", audit_id, error[1], state)
        self._on_finished(audit_id)

    def _terminate(self, item: _Running, outcome: tuple[str, tuple[str, str]]) -> None:
        now = time.monotonic()
        if not item.terminated:
            item.outcome, item.terminated = outcome, now
            _kill(item.actor.handle)
        elif now - item.terminated > KILL_WAIT_SECONDS:  # Ray lost track of it (its node)
            self._end(item.task.audit_id, item, None)

    def _interrupt_all(self) -> None:
        for audit_id, item in list(self._running.items()):
            _kill(item.actor.handle)
            # A straggler's writes are fenced off by the attempt number.
            requeued = self.store.requeue(
                audit_id, item.task.attempt, "re-queued: the server shut down while it ran"
            )
            log.info("job %s interrupted by shutdown; re-queued=%s", audit_id, requeued)
            del self._running[audit_id]


def _kill(handle: Any) -> None:
    """Kill an actor's process now (no restart); a Ray that cannot be reached is logged,
    not raised: the slot must be freed whatever Ray says."""
    try:
        ray.kill(handle, no_restart=True)
    except Exception as err:  # RayError, ValueError for a handle Ray no longer knows
        log.warning("could not kill a Ray actor: %s", _first_line(err))


def _failure_of(ref: Any) -> BaseException | None:
    """The error a finished ``JobActor.run`` call ended with, None if it returned."""
    try:
        ray.get(ref, timeout=PING_SECONDS)
    except (RayError, GetTimeoutError) as err:
        return err
    return None


# --- connecting -----------------------------------------------------------------------


def connect(address: str) -> None:
    """Connect this process to the Ray cluster at ``address`` (empty: start one here);
    ConfigError, naming ``ray_address``, when that fails."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE)
        else:
            # Ray turns on token auth for a new local instance and would save a token in
            # ~/.ray; one in the environment is seen by its processes alone.
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
            ray.init(
                address="local",  # a new instance, whatever RAY_ADDRESS says
                namespace=NAMESPACE,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            )
    except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError...
        raise ConfigError(
            f"cannot connect to the Ray cluster at ray_address={address!r}: {_first_line(err)}"
        ) from None


def _check_reachable(address: str) -> None:
    """Fail fast when nothing listens at the head's address (Ray would retry for minutes)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"ray_address must be HOST:PORT, ray://HOST:PORT or auto, got {address!r}"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_SECONDS).close()
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at ray_address={address!r} "
            f"({err.strerror or err}): start its head (ray start --head) or correct "
            "ray_address"
        ) from None


def plan(nodes: list[dict[str, Any]], workers: int) -> tuple[int, dict[str, float] | None]:
    """(slots, what each job's actor asks Ray for) on a cluster of ``nodes`` (as
    ``ray.nodes()`` lists them). ``workers`` 0: one slot per GPU, at least one. None
    while no alive node has CPUs or GPUs (e.g. a head that runs no jobs, its workers not
    there yet): an actor asking for a CPU then would land on a GPU node without its GPU."""
    usable = [
        n["Resources"]
        for n in nodes
        if n.get("Alive") and (n["Resources"].get("CPU", 0) >= 1 or n["Resources"].get("GPU", 0))
    ]
    gpus = int(sum(n.get("GPU", 0) for n in usable))
    slots = workers or max(1, gpus)
    return slots, actor_resources(usable, slots) if usable else None


def actor_resources(nodes: list[dict[str, float]], slots: int) -> dict[str, float]:
    """What each job's actor asks Ray for, given the nodes' resources: one GPU and that
    node's CPUs per GPU when there are GPU nodes; else an equal share of the cluster's
    CPUs among the slots, at most one node's (an actor runs on one node)."""
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
    if gpu_nodes:
        per_gpu = min(int(n.get("CPU", 0) // n["GPU"]) for n in gpu_nodes)
        return {"num_gpus": 1, "num_cpus": max(1, per_gpu)}
    cpus = [int(n.get("CPU", 0)) for n in nodes]
    share = sum(cpus) // max(1, slots)
    return {"num_cpus": max(1, min(max(cpus, default=1), share))}


# --- a dead actor's error ---------------------------------------------------------------

_PATH = re.compile(r"(?<![\w.~-])/[^\s:'\"()]+")
_ADVICE = re.compile(r"\s*(Some common causes|There are some potential root causes|Refer to).*")


def ray_reason(error: BaseException | None) -> str:
    """Ray's reason for an actor's death, short and without file paths."""
    if error is None:
        return "Ray gave no reason"
    text = str(error)
    if isinstance(error, RayActorError) and error.actor_init_failed:
        # A traceback of the actor's start: its last line is the exception.
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
    else:
        # Ray's own lines: its base message, then tab-indented ids (pid, ip, namespace).
        lines = [line for line in text.splitlines() if line.strip() and line[0] != "\t"]
        text = " ".join(lines)
        for base in (ActorDiedError.BASE_ERROR_MSG, RayActorError.BASE_ERROR_MSG):
            text = text.replace(base, "")
    text = _ADVICE.sub("", _PATH.sub("<path>", text))
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def worker_died(error: BaseException | None) -> tuple[str, str, str]:
    """The job's error (code, message, details) when its Ray actor ended without an
    outcome. Only Ray knows why; its reason is quoted (paths removed)."""
    reason = ray_reason(error)
    if isinstance(error, RayActorError) and error.actor_init_failed:
        failure = Failure(
            "INTERNAL",
            f"the Ray worker could not start the job's actor: {reason}",
            "WORKER_START_FAILED",
        )
    elif "NODE_OUT_OF_MEMORY" in reason or "running low on memory" in reason:
        failure = Failure(
            "RESOURCE_EXHAUSTED",
            "Ray killed the job's worker because its node ran out of memory: audit fewer or "
            "smaller images (fit_images, batch_size) or give the Ray nodes more memory",
            "OUT_OF_MEMORY",
        )
    elif (isinstance(error, RayActorError) and error.preempted) or "node has died" in reason:
        failure = Failure(
            "UNAVAILABLE",
            f"the Ray node running the job was lost: submit the audit again ({reason})",
            "NODE_LOST",
            retry_after=15.0,
        )
    elif error is None or not isinstance(error, RayActorError):
        failure = Failure(
            "INTERNAL",
            f"the Ray worker ended without recording the job's outcome ({reason})",
            "WORKER_DIED",
        )
    else:
        failure = Failure(
            "INTERNAL",
            f"the Ray worker process running the job died without recording an outcome ({reason})",
            "WORKER_DIED",
        )
    return failure.record()


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = _PATH.sub("<path>", lines[0] if lines else type(error).__name__)
    return text[:REASON_CHARS]
