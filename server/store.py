"""The job store: the system of record for every audit (SQLAlchemy; SQLite or PostgreSQL).

Every state change is one conditional UPDATE, so concurrent writers (the server's
threads, worker processes, other replicas) cannot step on each other: a worker's writes
carry its attempt number and are ignored once the job was re-queued or finished; a
job is claimed by ``UPDATE ... WHERE state = 'QUEUED'`` on a row that PostgreSQL locked
for this claimer (``FOR UPDATE SKIP LOCKED``), so replicas claiming at once take
different jobs.

The schema is Alembic's (``cnp_server.migrations``): the server migrates the store as it
starts (``JobStore(url, migrate=True)``); a worker's store only uses the tables.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import Aborted, BadRequest, NotFound, QueueFull, WrongState, describe
from .jobs import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    TRACKING_PENDING,
    JobRecord,
)

log = logging.getLogger(__name__)

# Longest request id a job keeps (the column's length; SQLite would not enforce it).
MAX_REQUEST_ID = 256
# PostgreSQL advisory lock taken while a job is counted into the queue: "cnpqueue".
QUEUE_LOCK_KEY = int.from_bytes(b"cnpqueue", "big")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    request_id: Mapped[str | None] = mapped_column(
        String(MAX_REQUEST_ID), unique=True, nullable=True
    )
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(64), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    spec_json: Mapped[str] = mapped_column(Text)
    error_code: Mapped[str] = mapped_column(String(32), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    owner: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[float] = mapped_column(Float, default=0.0)
    started_at: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)
    finished_at: Mapped[float] = mapped_column(Float, default=0.0)
    stage_started_at: Mapped[float] = mapped_column(Float, default=0.0)
    heartbeat_at: Mapped[float] = mapped_column(Float, default=0.0)
    report: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    artifacts_json: Mapped[str] = mapped_column(Text, default="{}")
    mlflow_run_id: Mapped[str] = mapped_column(String(64), default="")
    tracking_state: Mapped[str] = mapped_column(String(16), default="", index=True)
    tracking_error: Mapped[str] = mapped_column(Text, default="")
    tracking_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Added after the first release (migration 0002).
    tracking_json: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")
    mlflow_experiment_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    error_details: Mapped[str] = mapped_column(Text, default="", server_default="")


_COLUMNS = [c.key for c in JobRow.__table__.columns]


def _record(row: JobRow) -> JobRecord:
    return JobRecord(**{name: getattr(row, name) for name in _COLUMNS})


def _error_columns(error: tuple[str, ...] | None) -> dict[str, str]:
    """``error`` = (code, message), or Failure.record(): (code, message, details_json)."""
    code, message, details = (*error, "")[:3] if error else ("", "", "")
    return {"error_code": code, "error_message": message, "error_details": details}


def new_audit_id() -> str:
    return "aud-" + uuid.uuid4().hex[:16]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the workers write progress while the server reads; wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class JobStore:
    """All reads and writes of job rows. Safe to use from several threads and processes."""

    def __init__(self, url: str, *, migrate: bool = False) -> None:
        """``migrate``: bring the schema to the newest revision first (the server, as it
        starts); without it the tables must be there (a worker: no Alembic to import)."""
        self.url = url
        self.engine = make_engine(url)
        if migrate:
            from .migrations import upgrade_to_head

            try:
                log.info("%s", upgrade_to_head(self.engine))
            except BaseException:
                self.engine.dispose()
                raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def _update(self, *conditions: Any, **values: Any) -> int:
        values.setdefault("updated_at", time.time())
        with self._session() as session:
            result = session.execute(update(JobRow).where(*conditions).values(**values))
            return result.rowcount

    # --- creation and lookup ----------------------------------------------------------

    def create(
        self,
        spec_json: str,
        *,
        request_id: str | None = None,
        max_queued: int | None = None,
        error: tuple[str, ...] | None = None,
        stage: str = "",
        tracking_json: str = "{}",
    ) -> JobRecord:
        """A new job, QUEUED; or FAILED with ``error`` = (code, message) when refused.

        Raises QueueFull when ``max_queued`` jobs already wait. A concurrent insert with
        the same request id loses the race and gets the winner's job back.
        """
        if request_id and len(request_id) > MAX_REQUEST_ID:
            raise BadRequest(
                f"request_id is {len(request_id)} characters long; at most {MAX_REQUEST_ID}",
                request_field="request_id",
            )
        now = time.time()
        row = JobRow(
            id=new_audit_id(),
            request_id=request_id or None,
            state=FAILED if error else QUEUED,
            stage=stage,
            message=error[1] if error else "queued",
            spec_json=spec_json,
            tracking_json=tracking_json,
            **_error_columns(error),
            created_at=now,
            updated_at=now,
            finished_at=now if error else 0.0,
        )
        try:
            with self._session() as session:
                if max_queued is not None and not error:
                    if self.engine.dialect.name == "postgresql":
                        # Replicas count and insert one at a time (until the commit), or
                        # all could count the same jobs and pass the bound together. One
                        # SQLite store has one server, whose service already does this.
                        session.execute(select(func.pg_advisory_xact_lock(QUEUE_LOCK_KEY)))
                    waiting = session.scalar(
                        select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED)
                    )
                    if waiting >= max_queued:
                        raise QueueFull(f"the queue is full ({waiting} jobs waiting); retry later")
                session.add(row)
            return _record(row)
        except IntegrityError:
            if request_id:
                existing = self.find_by_request_id(request_id)
                if existing is not None:
                    return existing
            raise

    def get(self, audit_id: str) -> JobRecord:
        with self._session() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == audit_id))
            if row is None:
                raise NotFound(f"no audit {audit_id!r}")
            return _record(row)

    def find_by_request_id(self, request_id: str) -> JobRecord | None:
        with self._session() as session:
            row = session.scalar(select(JobRow).where(JobRow.request_id == request_id))
            return _record(row) if row is not None else None

    def list(
        self, *, page_size: int = 50, page_token: str = "", state: str | None = None
    ) -> tuple[list[JobRecord], str]:
        """Newest first; returns (jobs, next_page_token) with "" on the last page."""
        query = select(JobRow).order_by(JobRow.seq.desc()).limit(page_size + 1)
        if page_token:
            query = query.where(JobRow.seq < decode_page_token(page_token))
        if state:
            if state not in STATES:
                raise BadRequest(f"unknown state {state!r}; one of {', '.join(STATES)}")
            query = query.where(JobRow.state == state)
        with self._session() as session:
            rows = list(session.scalars(query))
        jobs = [_record(r) for r in rows[:page_size]]
        token = encode_page_token(jobs[-1].seq) if len(rows) > page_size else ""
        return jobs, token

    def count(self, state: str) -> int:
        with self._session() as session:
            return session.scalar(
                select(func.count()).select_from(JobRow).where(JobRow.state == state)
            )

    def delete(self, audit_id: str) -> JobRecord:
        job = self.get(audit_id)
        if not job.done:
            raise WrongState(f"audit {audit_id} is {job.state}; cancel it before deleting it")
        with self._session() as session:
            session.execute(delete(JobRow).where(JobRow.id == audit_id))
        return job

    # --- execution --------------------------------------------------------------------

    def claim_next(self, owner: str) -> JobRecord | None:
        """Move the oldest QUEUED job to RUNNING for ``owner`` (attempt + 1); None if none."""
        while True:
            with self._session() as session:
                # PostgreSQL locks the row for this transaction and other claimers skip
                # it, so replicas claiming at once take different jobs instead of queueing
                # on one row. SQLite has no row locks (it writes one at a time): there the
                # state condition below decides, and the loser tries the next job.
                candidate = session.scalar(
                    select(JobRow.id)
                    .where(JobRow.state == QUEUED)
                    .order_by(JobRow.seq)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if candidate is None:
                    return None
                now = time.time()
                claimed = session.execute(
                    update(JobRow)
                    .where(JobRow.id == candidate, JobRow.state == QUEUED)
                    .values(
                        state=RUNNING,
                        attempts=JobRow.attempts + 1,
                        owner=owner,
                        stage="starting",
                        progress=0.0,
                        message="starting a worker",
                        tracking_state=TRACKING_PENDING,  # its MLflow run opens as it starts
                        started_at=now,
                        stage_started_at=now,
                        heartbeat_at=now,
                        updated_at=now,
                    )
                ).rowcount
                if claimed:  # read back, not RETURNING: SQLite's gives 0 for a REAL 0.0
                    return _record(session.scalar(select(JobRow).where(JobRow.id == candidate)))

    def report_progress(
        self,
        audit_id: str,
        attempt: int,
        stage: str,
        progress: float,
        message: str,
        new_stage: bool,
    ) -> bool:
        """Written by the worker; ignored (False) when the attempt is no longer current."""
        now = time.time()
        values: dict[str, Any] = {
            "stage": stage,
            "progress": progress,
            "message": message,
            "heartbeat_at": now,
        }
        if new_stage:
            values["stage_started_at"] = now
        return bool(
            self._update(
                JobRow.id == audit_id,
                JobRow.state == RUNNING,
                JobRow.attempts == attempt,
                **values,
            )
        )

    def cancel_requested(self, audit_id: str) -> bool:
        with self._session() as session:
            flag = session.scalar(select(JobRow.cancel_requested).where(JobRow.id == audit_id))
            return bool(flag)

    def finish(
        self,
        audit_id: str,
        attempt: int | None,
        state: str,
        *,
        error: tuple[str, ...] | None = None,
        report: bytes | None = None,
        artifacts_json: str = "{}",
        message: str = "",
        track: bool = True,
        owner_gone: bool = False,
    ) -> bool:
        """RUNNING -> a final state; False when the job was not RUNNING that attempt.

        ``owner_gone``: the replica that ran it is gone (recovery): the owner is cleared,
        so that any replica records it in MLflow (a job that ended so has no files).
        """
        assert state in FINAL_STATES
        conditions = [JobRow.id == audit_id, JobRow.state == RUNNING]
        if attempt is not None:
            conditions.append(JobRow.attempts == attempt)
        now = time.time()
        return bool(
            self._update(
                *conditions,
                **({"owner": ""} if owner_gone else {}),
                state=state,
                progress=1.0 if state == SUCCEEDED else JobRow.progress,
                message=message or (error[1] if error else state.lower()),
                **_error_columns(error),
                report=report,
                artifacts_json=artifacts_json,
                finished_at=now,
                tracking_state=TRACKING_PENDING if track else "",
            )
        )

    def request_cancel(self, audit_id: str) -> JobRecord:
        """QUEUED: cancelled at once. RUNNING: flagged for the worker. Final: unchanged."""
        now = time.time()
        message = "cancelled before it started"
        self._update(
            JobRow.id == audit_id,
            JobRow.state == QUEUED,
            state=CANCELLED,
            cancel_requested=True,
            message=message,
            error_code="CANCELLED",
            error_message=message,
            finished_at=now,
            tracking_state=TRACKING_PENDING,  # an accepted job: its run records the cancel
        )
        self._update(
            JobRow.id == audit_id,
            JobRow.state == RUNNING,
            cancel_requested=True,
            message="cancellation requested",
        )
        return self.get(audit_id)

    def heartbeat(self, audit_ids: Iterable[str], owner: str) -> None:
        ids = list(audit_ids)
        if ids:
            self._update(
                JobRow.id.in_(ids),
                JobRow.state == RUNNING,
                JobRow.owner == owner,
                heartbeat_at=time.time(),
                updated_at=JobRow.updated_at,  # a heartbeat is not news for watchers
            )

    def requeue(self, audit_id: str, attempt: int, reason: str) -> bool:
        """RUNNING -> QUEUED (this attempt was interrupted by a shutdown, not by the job)."""
        return bool(
            self._update(
                JobRow.id == audit_id,
                JobRow.state == RUNNING,
                JobRow.attempts == attempt,
                state=QUEUED,
                owner="",
                stage="",
                progress=0.0,
                message=reason,
            )
        )

    def recover(
        self, *, max_attempts: int, owner: str | None = None, stale_before: float | None = None
    ) -> list[tuple[str, str]]:
        """Re-queue (or give up on) RUNNING jobs whose worker is gone.

        A job is orphaned when ``owner`` (this node, just restarted) ran it, or when its
        heartbeat is older than ``stale_before``. It is re-queued for another attempt,
        cancelled if that was asked, or failed (ABORTED) after ``max_attempts``.
        Returns (audit id, new state) pairs.
        """
        conditions = [JobRow.state == RUNNING]
        with self._session() as session:
            rows = list(session.scalars(select(JobRow).where(*conditions)))
        actions: list[tuple[str, str]] = []
        for row in rows:
            orphaned = (owner is not None and row.owner == owner) or (
                stale_before is not None and row.heartbeat_at < stale_before
            )
            if not orphaned:
                continue
            if row.cancel_requested:
                done = self.finish(
                    row.id,
                    row.attempts,
                    CANCELLED,
                    error=("CANCELLED", "cancelled; the server stopped while it ran"),
                    owner_gone=True,
                )
                state = CANCELLED
            elif row.attempts >= max_attempts:
                error = Aborted(
                    f"the server stopped {row.attempts} times while this job ran; given up"
                )
                done = self.finish(
                    row.id, row.attempts, FAILED, error=describe(error).record(), owner_gone=True
                )
                state = FAILED
            else:
                done = self.requeue(
                    row.id, row.attempts, f"re-queued after attempt {row.attempts} was interrupted"
                )
                state = QUEUED
            if done:
                actions.append((row.id, state))
        return actions

    # --- MLflow record ----------------------------------------------------------------

    def tracking_pending(
        self, owner: str | None = None, orphaned_before: float | None = None
    ) -> list[JobRecord]:
        """Jobs whose MLflow record is due, oldest first. With ``owner`` (a replica's node
        id) only those it ran, or that no replica ran (cancelled while queued): one
        tracker at a time writes a job's run, the one beside the job's files. With
        ``orphaned_before`` also the final jobs of any owner that ended before then: the
        replica that ran them is gone (a new pod has a new node id), and the files are on
        the volume the replicas share."""
        query = select(JobRow).where(JobRow.tracking_state == TRACKING_PENDING)
        if owner is not None:
            mine = JobRow.owner.in_([owner, ""])
            if orphaned_before is not None:
                orphaned = JobRow.state.in_(FINAL_STATES) & (JobRow.finished_at < orphaned_before)
                mine = mine | orphaned
            query = query.where(mine)
        with self._session() as session:
            return [_record(r) for r in session.scalars(query.order_by(JobRow.seq))]

    def adopt_run(self, audit_id: str, run_id: str, experiment_id: str) -> str:
        """Make ``run_id`` the job's MLflow run unless it has one already; returns the job's
        run. Two trackers that opened a run for one job at once: the first stored wins
        and the other deletes its own."""
        self._update(
            JobRow.id == audit_id,
            JobRow.mlflow_run_id == "",
            mlflow_run_id=run_id,
            mlflow_experiment_id=experiment_id,
        )
        return self.get(audit_id).mlflow_run_id

    def set_tracking(
        self,
        audit_id: str,
        *,
        state: str | None = None,
        run_id: str | None = None,
        experiment_id: str | None = None,
        error: str = "",
    ) -> None:
        values: dict[str, Any] = {"tracking_error": error}
        if state is not None:
            values["tracking_state"] = state
        if run_id is not None:
            values["mlflow_run_id"] = run_id
        if experiment_id is not None:
            values["mlflow_experiment_id"] = experiment_id
        if error:
            values["tracking_attempts"] = JobRow.tracking_attempts + 1
        self._update(JobRow.id == audit_id, **values)


def encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def decode_page_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        kind, _, value = text.partition(":")
        if kind != "seq":
            raise ValueError(token)
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"invalid page token {token!r}") from None
