"""Server parts in-process: configuration, job store, error mapping, path checks, token,
the local executor's pre-warmed workers."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import test_server_support as support

from cnp_core import convert
from cnp_core.errors import DatasetError, InvalidSpec, ModelError
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef
from cnp_server.auth import ensure_token
from cnp_server.config import ConfigError, ServerConfig, load_config, mask_url
from cnp_server.engine import check_references
from cnp_server.errors import (
    BadRequest,
    NotFound,
    PermissionDenied,
    QueueFull,
    WrongState,
    classify,
)
from cnp_server.executor import LocalExecutor
from cnp_server.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TRACKING_PENDING
from cnp_server.store import JobStore

# --- configuration --------------------------------------------------------------------


def test_config_precedence_file_then_environment_then_flags(tmp_path):
    config_file = tmp_path / "cnp.toml"
    config_file.write_text(
        'listen = "127.0.0.1:7000"\nmax_queued = 5\nworkers = 2\n'
        "stage_timeouts = { default = 60, fit = 10 }\n"
    )
    env = {"CNP_CONFIG": str(config_file), "CNP_MAX_QUEUED": "7", "CNP_AUTH": "false"}
    config = load_config(["--workers", "3", "--set", "cancel_grace_seconds=1.5"], environ=env)
    assert config.listen == "127.0.0.1:7000"  # file
    assert config.max_queued == 7  # environment over file
    assert config.workers == 3  # flag over file
    assert config.auth is False and config.cancel_grace_seconds == 1.5
    assert config.stage_timeout("fit") == 10 and config.stage_timeout("collect") == 60


def test_config_defaults_live_in_the_data_dir(tmp_path):
    config = load_config(["--data-dir", str(tmp_path), "--allow-root", "rel"], environ={})
    assert config.effective_database_url == f"sqlite:///{tmp_path}/jobs.db"
    assert config.effective_tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert config.effective_token_file == tmp_path / "token"
    assert config.allow_roots[0].endswith("/rel") and config.allow_roots[0].startswith("/")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--set", "nonsense=1"], {}, "unknown configuration key"),
        ([], {"CNP_MAX_QUEUED": "many"}, "cannot read"),
        (["--listen", "nohostport"], {}, "HOST:PORT"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/k"], {}, "no such file"),
        ([], {"CNP_CONFIG": "/nonexistent.toml"}, "not found"),
    ],
)
def test_bad_configuration_is_refused(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv, environ=env)


def test_secrets_are_masked(tmp_path):
    config = load_config(
        ["--data-dir", str(tmp_path), "--database-url", "postgresql://cnp:s3cret@db:5432/jobs"],
        environ={"CNP_TOKEN": "tok-123"},
    )
    masked = config.masked()
    assert "s3cret" not in str(masked) and "tok-123" not in str(masked)
    assert masked["database_url"] == "postgresql://cnp:***@db:5432/jobs"
    assert mask_url("http://mlflow:5000") == "http://mlflow:5000"


# --- the job store --------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """An empty database: a SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    postgres = request.getfixturevalue("postgres")
    return postgres.url(postgres.create_database("store"))


@pytest.fixture
def store(store_url):
    s = JobStore(store_url, migrate=True)
    yield s
    s.close()


def test_claim_progress_and_finish_are_fenced_by_attempt(store):
    job = store.create("{}", request_id="r1")
    assert job.state == QUEUED and job.attempts == 0
    claimed = store.claim_next("node-a")
    assert claimed.id == job.id and claimed.state == RUNNING and claimed.attempts == 1
    assert store.claim_next("node-a") is None
    assert store.report_progress(job.id, 1, "fit", 0.5, "half", new_stage=True)
    assert not store.report_progress(job.id, 2, "fit", 0.6, "stale attempt", new_stage=False)
    assert store.requeue(job.id, 1, "interrupted")
    assert store.claim_next("node-b").attempts == 2
    assert not store.finish(job.id, 1, SUCCEEDED)  # the first attempt's late outcome is void
    assert store.finish(job.id, 2, SUCCEEDED, report=b"r")
    done = store.get(job.id)
    assert done.state == SUCCEEDED and done.progress == 1.0 and done.report == b"r"
    assert done.tracking_state == TRACKING_PENDING


def test_request_id_is_unique_and_refusals_are_stored(store):
    refused = store.create("{}", request_id="r1", error=("INVALID_ARGUMENT", "bad layer"))
    assert refused.state == FAILED and refused.error_message == "bad layer"
    assert store.find_by_request_id("r1").id == refused.id
    again = store.create("{}", request_id="r1")  # lost race: the existing job comes back
    assert again.id == refused.id
    with pytest.raises(NotFound):
        store.get("aud-missing")
    # PostgreSQL enforces the column's length (SQLite would keep any): refused alike.
    with pytest.raises(BadRequest, match="257 characters long; at most 256") as err:
        store.create("{}", request_id="r" * 257)
    assert err.value.request_field == "request_id"
    assert store.create("{}", request_id="r" * 256).request_id == "r" * 256


def test_queue_bound(store):
    store.create("{}", max_queued=2)
    store.create("{}", max_queued=2)
    with pytest.raises(QueueFull, match="queue is full"):
        store.create("{}", max_queued=2)
    assert store.count(QUEUED) == 2


def test_cancel_queued_at_once_running_by_flag(store):
    running, queued = store.create("{}"), store.create("{}")
    assert store.claim_next("n").id == running.id  # the oldest is claimed first
    assert store.request_cancel(queued.id).state == CANCELLED
    flagged = store.request_cancel(running.id)
    assert flagged.state == RUNNING and flagged.cancel_requested
    assert store.cancel_requested(running.id)


def test_recover_requeues_cancels_or_gives_up(store):
    jobs = [store.create("{}") for _ in range(3)]
    for _ in jobs:
        store.claim_next("dead-node")
    store.request_cancel(jobs[1].id)
    for _ in range(2):  # jobs[2] reaches its third attempt
        store.requeue(jobs[2].id, store.get(jobs[2].id).attempts, "x")
        store.claim_next("dead-node")
    assert store.recover(max_attempts=3, owner="other-node") == []
    actions = dict(store.recover(max_attempts=3, owner="dead-node"))
    assert actions == {jobs[0].id: QUEUED, jobs[1].id: CANCELLED, jobs[2].id: FAILED}
    gave_up = store.get(jobs[2].id)
    assert gave_up.error_code == "ABORTED" and "3 times" in gave_up.error_message
    # Their replica is gone: any other records them in MLflow.
    ended = [j.id for j in store.tracking_pending(owner="other-node") if j.done]
    assert ended == [jobs[1].id, jobs[2].id]


def test_recover_stale_heartbeats_only(store):
    fresh, stale = store.create("{}"), store.create("{}")
    store.claim_next("a")
    store.claim_next("b")
    time.sleep(0.05)
    cut = time.time()  # both claims beat before it, the fresh job's heartbeat after it
    time.sleep(0.01)
    store.heartbeat([fresh.id], "a")
    actions = store.recover(max_attempts=3, stale_before=cut)
    assert actions == [(stale.id, QUEUED)]


def test_list_pages_newest_first(store):
    ids = [store.create("{}").id for _ in range(5)]
    page, token = store.list(page_size=2)
    assert [j.id for j in page] == ids[::-1][:2] and token
    seen = [j.id for j in page]
    while token:
        page, token = store.list(page_size=2, page_token=token)
        seen += [j.id for j in page]
    assert seen == ids[::-1]
    assert [j.id for j in store.list(state=QUEUED)[0]] == ids[::-1]
    with pytest.raises(BadRequest):
        store.list(page_token="garbage!")
    with pytest.raises(BadRequest):
        store.list(state="SLEEPING")


def test_the_queue_bound_holds_for_replicas_creating_at_once(postgres):
    """Each replica counts the waiting jobs before adding one: counted at once, they
    must not all slip under the bound. (SQLite: one server per store, which already
    creates one job at a time.)"""
    import threading

    store_url = postgres.url(postgres.create_database("bound"))
    JobStore(store_url, migrate=True).close()
    creators, bound = 8, 3
    start = threading.Barrier(creators)
    outcomes: list[str] = []

    def create() -> None:
        store = JobStore(store_url)
        start.wait()
        try:
            store.create("{}", max_queued=bound)
            outcomes.append("queued")
        except QueueFull:
            outcomes.append("full")
        finally:
            store.close()

    threads = [threading.Thread(target=create) for _ in range(creators)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert sorted(outcomes) == ["full"] * (creators - bound) + ["queued"] * bound


def test_a_replica_records_the_jobs_it_ran_and_one_run_wins(store):
    """Replicas share the store, not their disks: each records in MLflow the jobs it ran
    (and those no replica ran); two runs opened for one job at once: the first stored wins."""
    mine, theirs, never_ran = store.create("{}"), store.create("{}"), store.create("{}")
    assert store.claim_next("a").id == mine.id
    assert store.claim_next("b").id == theirs.id
    store.request_cancel(never_ran.id)  # cancelled while queued: no owner
    assert [j.id for j in store.tracking_pending(owner="a")] == [mine.id, never_ran.id]
    assert [j.id for j in store.tracking_pending(owner="b")] == [theirs.id, never_ran.id]
    assert len(store.tracking_pending()) == 3
    assert store.adopt_run(never_ran.id, "run-of-a", "1") == "run-of-a"
    assert store.adopt_run(never_ran.id, "run-of-b", "1") == "run-of-a"
    assert store.get(never_ran.id).mlflow_experiment_id == "1"

    # b is gone (a new pod, a new node id): its ended job, unrecorded for long enough, is
    # adopted by a; a job still running elsewhere never is.
    store.finish(theirs.id, 1, SUCCEEDED, report=b"", message="done")
    ended = store.get(theirs.id).finished_at
    assert theirs.id not in {j.id for j in store.tracking_pending("a", orphaned_before=ended)}
    late = {j.id for j in store.tracking_pending("c", orphaned_before=ended + 1)}
    assert late == {theirs.id, never_ran.id}


def test_claimers_racing_on_one_queue_each_take_different_jobs(store_url):
    """Several claimers (threads, each with its own store and connections, as replicas
    have) empty one queue at once: every job is claimed exactly once, by one owner."""
    import threading

    seeded = JobStore(store_url, migrate=True)
    ids = {seeded.create("{}").id for _ in range(60)}
    claimers = 6
    start = threading.Barrier(claimers)
    claimed: dict[str, list[str]] = {}

    def claim_all(owner: str) -> None:
        store = JobStore(store_url)
        start.wait()
        mine = claimed.setdefault(owner, [])
        while (job := store.claim_next(owner)) is not None:
            mine.append(job.id)
        store.close()

    threads = [threading.Thread(target=claim_all, args=(f"n{i}",)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    every_claim = [audit_id for jobs in claimed.values() for audit_id in jobs]
    assert sorted(every_claim) == sorted(ids)  # each once, none left behind
    for owner, jobs in claimed.items():
        for audit_id in jobs:
            job = seeded.get(audit_id)
            assert (job.state, job.attempts, job.owner) == (RUNNING, 1, owner)
    assert seeded.count(QUEUED) == 0
    seeded.close()


def _schema_changes(url: str) -> list:
    """What Alembic's autogenerate would change to make the database match JobRow."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from cnp_server.store import Base

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    from sqlalchemy import create_engine

    from cnp_server.migrations import current_revision

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return current_revision(connection)
    finally:
        engine.dispose()


def test_migrations_build_the_schema_the_models_describe(store, store_url):
    """Migrating an empty database gives exactly JobRow's table (columns, types,
    nullability, defaults, indexes); 0002 goes down and up again on both databases."""
    from alembic import command
    from sqlalchemy import inspect

    from cnp_server.migrations import _config

    assert _revision(store_url) == "0002"
    assert _schema_changes(store_url) == []
    job = store.create("{}", tracking_json='{"experiment": "x"}')
    with store.engine.begin() as connection:
        command.downgrade(_config(connection), "0001")
    with store.engine.connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("jobs")}
    assert "tracking_json" not in columns and "spec_json" in columns
    assert _revision(store_url) == "0001"
    JobStore(store_url, migrate=True).close()
    assert _revision(store_url) == "0002" and _schema_changes(store_url) == []
    assert store.get(job.id).tracking_json == "{}"  # the default, for a row from before


def test_a_store_migrated_by_a_newer_release_is_refused_clearly(store, store_url):
    from sqlalchemy import text

    from cnp_server.migrations import NewerSchema

    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0009'"))
    with pytest.raises(NewerSchema, match="at schema revision 0009, which this release"):
        JobStore(store_url, migrate=True)
    assert _revision(store_url) == "0009"  # left as it was


def test_replicas_migrating_one_empty_database_at_once_all_succeed(postgres):
    """Replicas of a new deployment start together: one creates the schema, the others
    wait for it (an advisory lock) and find it current, instead of failing."""
    import threading

    url = postgres.url(postgres.create_database("race"))
    start = threading.Barrier(4)
    outcomes: list[object] = []

    def open_store() -> None:
        start.wait()
        try:
            JobStore(url, migrate=True).close()
            outcomes.append("ok")
        except Exception as exc:  # noqa: BLE001 - the failure is what the test reports
            outcomes.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert outcomes == ["ok"] * 4
    assert _revision(url) == "0002" and _schema_changes(url) == []


def test_a_worker_store_uses_the_tables_without_alembic(tmp_path):
    """A worker opens the store for every job: it must not migrate, nor pay Alembic's
    import and log lines. Without the server's migration there are no tables at all."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    script = (
        "import sys\n"
        "from sqlalchemy import inspect\n"
        "from cnp_server.store import JobStore\n"
        f"store = JobStore({url!r})\n"
        "print(inspect(store.engine).get_table_names(), 'alembic' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["[]", "False"], done.stderr
    JobStore(url, migrate=True).close()
    script = script.replace("get_table_names()", "get_table_names(), store.count('QUEUED')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["['alembic_version',", "'jobs']", "0", "False"], done.stderr


# --- errors, paths, token -------------------------------------------------------------


def test_user_errors_keep_code_and_message():
    assert classify(DatasetError("labels.csv lacks column wm")) == (
        "INVALID_ARGUMENT",
        "labels.csv lacks column wm",
    )
    assert classify(QueueFull("full"))[0] == "RESOURCE_EXHAUSTED"


def _raised(action) -> BaseException:
    try:
        action()
    except BaseException as exc:  # noqa: BLE001 - the real exception is the point
        return exc
    raise AssertionError("nothing was raised")


def test_out_of_memory_and_a_full_disk_are_resource_exhausted():
    """Real failures, not constructed ones: the allocator's refusals and the kernel's
    ENOSPC (/dev/full answers every write with it)."""
    import torch

    def full_disk():
        with open("/dev/full", "wb") as handle:
            handle.write(b"report")

    for action, fragment in (
        (lambda: bytearray(1 << 62), "ran out of memory"),
        (lambda: torch.empty(1 << 60, dtype=torch.uint8), "ran out of memory"),
        (full_disk, "no space left"),
    ):
        code, message = classify(_raised(action))
        assert code == "RESOURCE_EXHAUSTED" and fragment in message


def test_unexpected_errors_become_internal_with_a_correlation_id(caplog):
    with caplog.at_level(logging.ERROR):
        code, message = classify(KeyError("/srv/secret/path"))
    assert code == "INTERNAL" and "/srv/secret" not in message
    correlation = message.split("correlation id ")[1].rstrip(")")
    assert correlation in caplog.text and "/srv/secret/path" in caplog.text


def _spec(weights: str, root: str) -> AuditSpec:
    return AuditSpec(
        model=ModelRef(architecture="resnet18", weights=weights),
        dataset=DatasetRef(root=root),
        layers=["x"],
        attributes=["a"],
    )


def test_paths_must_stay_under_an_allowed_root(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "w.safetensors").write_bytes(b"x")
    config = ServerConfig(allow_roots=[str(allowed)], data_dir=str(tmp_path / "data"))
    check_references(_spec(str(allowed / "w.safetensors"), str(allowed)), config)
    # MLflow URIs are not paths: they name models in the server's own MLflow.
    with pytest.raises(NotFound, match="no such model in MLflow"):
        check_references(_spec("models:/m/1", str(allowed)), config)
    with pytest.raises(ModelError, match="not an MLflow model URI"):
        check_references(_spec("mlflow-artifacts:/x/y", str(allowed)), config)
    config.tracking_enabled = False
    with pytest.raises(WrongState, match="--no-tracking"):
        check_references(_spec("models:/m/1", str(allowed)), config)
    with pytest.raises(PermissionDenied, match="not under an allowed root"):
        check_references(_spec(str(outside / "w.pt"), str(allowed)), config)
    with pytest.raises(PermissionDenied, match="not under an allowed root"):
        check_references(_spec(str(allowed / "w.pt"), str(allowed / ".." / "outside")), config)
    (allowed / "escape").symlink_to(outside)
    with pytest.raises(PermissionDenied):
        check_references(_spec(str(allowed / "w.pt"), str(allowed / "escape")), config)
    with pytest.raises(InvalidSpec, match="absolute"):
        check_references(_spec("w.pt", str(allowed)), config)
    with pytest.raises(PermissionDenied, match="--allow-root"):
        check_references(_spec(str(allowed / "w.pt"), str(allowed)), ServerConfig())


def test_weights_over_the_operators_size_limit_are_refused_by_their_size(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x" * 2048)
    spec = _spec(str(tmp_path / "w.pt"), str(tmp_path))
    check_references(spec, ServerConfig(allow_roots=[str(tmp_path)], max_weights_bytes=2048))
    small = ServerConfig(allow_roots=[str(tmp_path)], max_weights_bytes=2047)
    with pytest.raises(InvalidSpec, match="max_weights_bytes"):
        check_references(spec, small)


def test_factories_run_only_when_the_operator_lists_them(tmp_path):
    spec = _spec("", str(tmp_path))
    spec.model.architecture, spec.model.factory = "", "hostile_factory:make"
    with pytest.raises(PermissionDenied, match="allow_factories"):
        check_references(spec, ServerConfig(allow_roots=[str(tmp_path)]))
    listed = ServerConfig(allow_roots=[str(tmp_path)], allow_factories=["hostile_factory:make"])
    check_references(spec, listed)  # allowed by name; nothing is imported here either
    with pytest.raises(ConfigError, match="package.module:function"):
        ServerConfig(allow_factories=["../evil.py"]).validate()


def test_token_file_is_private_and_stable(tmp_path):
    path = tmp_path / "sub" / "token"
    token = ensure_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token(path) == token
    path.chmod(0o640)  # a token the group can read may have leaked: refused, not reused
    with pytest.raises(ConfigError, match="chmod 600"):
        ensure_token(path)


def test_the_shipped_example_configuration_loads():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "deploy" / "cnp-server.toml"
    config = load_config(["--config", str(example)], environ={"CNP_TOKEN": "x"})
    assert config.allow_roots == ["/models", "/datasets"] and config.auth
    assert config.stage_timeout("fit") == 7200 and config.stage_timeout("audit") == 21600


# --- the executor's pre-warmed workers ------------------------------------------------
# The engine of these tests is this module: the scripted engine of test_server_support,
# slow to import in a worker (IMPORT_SECONDS, as torch is), whose job writes down what its
# process saw (pid, GPU and OpenMP settings) when it ran and when the engine was imported.

IMPORT_SECONDS = 1.5


def _environment() -> dict[str, str]:
    return {
        "pid": str(os.getpid()),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
        "omp": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }


_at_import = _environment()
_warmed_up = False
if multiprocessing.parent_process() is not None:  # imported by a worker as its engine
    time.sleep(IMPORT_SECONDS)


def warm_up() -> None:
    global _warmed_up
    _warmed_up = True


def run_audit(spec, *, workdir, **options):
    result = support.run_audit(spec, workdir=workdir, **options)
    seen = workdir / "environment.json"
    seen.write_text(
        json.dumps({"run": _environment(), "import": _at_import, "warmed_up": _warmed_up})
    )
    result.artifacts["environment"] = str(seen)
    return result


validate, capabilities = support.validate, support.capabilities


@pytest.fixture
def executors(tmp_path):
    """Start in-process LocalExecutors on this module's engine; stops them afterwards."""
    refs = tmp_path / "refs"
    support.make_references(refs)
    started: list[LocalExecutor] = []

    def start(**settings) -> LocalExecutor:
        config = ServerConfig(
            data_dir=str(tmp_path / f"data{len(started)}"),
            allow_roots=[str(refs)],
            engine=__name__,
            poll_seconds=0.05,
            cancel_grace_seconds=5.0,
            **settings,
        )
        config.jobs_path.mkdir(parents=True)
        executor = LocalExecutor(config, JobStore(config.effective_database_url, migrate=True))
        executor.refs = refs
        executor.start()
        started.append(executor)
        return executor

    yield start
    for executor in started:
        executor.stop(0.0)
        executor.store.close()


def _submit(executor: LocalExecutor, script: str = "") -> str:
    spec = convert.spec_to_json(support.make_spec(executor.refs, script))
    job = executor.store.create(spec)
    executor.wake()
    return job.id


def _finished(executor: LocalExecutor, audit_id: str, timeout: float = 30.0):
    return support.wait_for(
        lambda: (job := executor.store.get(audit_id)).done and not executor.running and job,
        timeout=timeout,
    )


def _spares(
    executor: LocalExecutor, old: set[int] = frozenset(), warm: bool = True
) -> dict[int, int]:
    """slot -> pid once every slot has a spare (warm, if asked) that is not one of ``old``."""

    def ready() -> dict[int, int] | None:
        spares = executor.spares
        if len(spares) == executor.slots and all(
            (ready or not warm) and pid not in old for pid, ready in spares.values()
        ):
            return {slot: pid for slot, (pid, _) in spares.items()}
        return None

    return support.wait_for(ready, timeout=30)


def _alive(pid: int) -> bool:
    stat_file = Path(f"/proc/{pid}/stat")
    try:
        return stat_file.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_jobs_start_in_warm_workers_set_up_for_their_gpu_and_none_outlive_stop(executors):
    executor = executors(gpus=[3, 5])
    assert executor.slots == 2
    spares = _spares(executor)
    ids = [_submit(executor), _submit(executor)]
    jobs = [_finished(executor, audit_id) for audit_id in ids]
    for job in jobs:
        assert job.state == SUCCEEDED
        # No import delay: the job ran in a process that had imported the engine before.
        assert job.finished_at - job.started_at < IMPORT_SECONDS
        workdir = executor.config.jobs_path / job.id
        seen = json.loads((workdir / job.artifacts["environment"]["path"]).read_text())
        slot = {pid: slot for slot, pid in spares.items()}[int(seen["run"]["pid"])]
        # The slot's GPU and passive OpenMP were in place before the engine was imported.
        expected = {"pid": seen["run"]["pid"], "cuda": str([3, 5][slot]), "omp": "PASSIVE"}
        assert seen["import"] == expected and seen["run"] == expected and seen["warmed_up"]
    assert len({json.loads(_read_env(executor, j))["run"]["pid"] for j in jobs}) == 2
    # Replaced after the jobs; stop ends them too, even halfway through their imports.
    fresh = _spares(executor, old=set(spares.values()), warm=False)
    executor.stop(0.0)
    assert executor.spares == {} and not any(
        _alive(pid) for pid in [*spares.values(), *fresh.values()]
    )


def _read_env(executor: LocalExecutor, job) -> str:
    return (executor.config.jobs_path / job.id / "environment.json").read_text()


def test_spares_are_replaced_and_jobs_on_them_cancel_and_fail_visibly(executors):
    executor = executors()
    (first,) = _spares(executor).values()
    os.kill(first, signal.SIGKILL)  # a spare that dies while waiting is replaced
    (second,) = _spares(executor, old={first}, warm=False).values()

    running = _submit(executor, "sleep:300")
    support.wait_for(lambda: executor.store.get(running).stage == "work")
    assert executor._running[running].process.pid == second
    # While the only slot is busy and nothing waits, no spare competes with the job for CPU;
    # a queued job gets one warming at once.
    assert executor.spares == {}
    crashing = _submit(executor, "exit")
    (third,) = _spares(executor, old={second}, warm=False).values()

    executor.store.request_cancel(running)
    cancelled = _finished(executor, running)
    assert cancelled.state == CANCELLED and cancelled.finished_at - cancelled.started_at < 10
    failed = _finished(executor, crashing)  # the worker died mid-job: a final FAILED state
    assert failed.state == FAILED and "exited with code 3" in failed.error_message
    assert not _alive(second) and not _alive(third)


def test_without_prewarming_each_job_starts_a_new_worker(executors):
    executor = executors(prewarm_workers=False)
    job = _finished(executor, _submit(executor))
    assert job.state == SUCCEEDED and executor.spares == {}
    assert job.finished_at - job.started_at > IMPORT_SECONDS  # it waited for the import
    seen = json.loads(_read_env(executor, job))
    assert not seen["warmed_up"] and seen["run"]["omp"] == "PASSIVE"


@pytest.mark.parametrize(
    "value", ["", ".", "..", "../../x/y", "/etc", "ü", "a b", "=1+1", "w" * 300, "层", " "]
)
def test_metric_names_from_dataset_values_are_valid_for_mlflow(value):
    """An empty attribute cell once made a metric name MLflow refused (and every later job
    went unrecorded): every value now gives a valid, bounded, distinct name."""
    from mlflow.utils.validation import _validate_metric_name  # MLflow's own check

    from cnp_server.tracking import MAX_KEY, _key

    key = _key("audit", "wm", value, "layer2", "S1", "ap_attribute.ci_low")
    _validate_metric_name(key)
    assert len(key) <= MAX_KEY
    assert key != _key("audit", "wm", value + "x", "layer2", "S1", "ap_attribute.ci_low")
    assert _key("a", "ü") != _key("a", "ö")


def test_a_failure_loop_logs_once_per_window_and_counts_the_rest():
    from cnp_server.logs import RepeatFilter

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # keep what passes the filter
    handler.addFilter(RepeatFilter(window=0.2))
    logger = logging.getLogger("cnp-test-repeats")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(100):  # the executor's loop every poll while the disk is full
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                logger.exception("executor loop error")
        logger.warning("job %s started", "aud-1")  # other messages still pass
        logger.warning("job %s started", "aud-2")
        time.sleep(0.25)
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            logger.exception("executor loop error")
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert messages == [
        "executor loop error",
        "job aud-1 started",
        "job aud-2 started",
        "executor loop error (99 identical messages in the last 0.2 s not logged)",
    ]


def test_the_clients_mlflow_options_are_checked_before_a_job_exists(tmp_path):
    from cnp.v1 import service_pb2
    from cnp_server.tracking import tracking_options

    config = ServerConfig(data_dir=str(tmp_path))

    def options(**fields):
        return service_pb2.TrackingOptions(**fields)

    chosen = tracking_options(
        options(experiment=" ci ", tags={"git.commit": "abc"}, register_model="shapes"),
        config,
        prunes=True,
    )
    assert json.loads(chosen) == {
        "experiment": "ci",
        "tags": {"git.commit": "abc"},
        "register_model": "shapes",
    }
    refused = [
        (options(tags={"cnp.audit_id": "x"}), True, "reserved"),
        (options(tags={"mlflow.user": "x"}), True, "reserved"),
        (options(tags={"a\nb": "x"}), True, "not a valid MLflow tag key"),
        (options(tags={"../up": "x"}), True, "not a valid MLflow tag key"),
        (options(tags={f"k{i}": "v" for i in range(51)}), True, "at most 50 tags"),
        (options(tags={"k": "v" * 5001}), True, "at most 5000"),
        (options(experiment="x\x1b[2J"), True, "printable"),
        (options(register_model="../x"), True, "not a model name"),
        (options(register_model="shapes"), False, "without a pruning stage"),
    ]
    for message, prunes, match in refused:
        with pytest.raises(BadRequest, match=match) as err:
            tracking_options(message, config, prunes=prunes)
        assert err.value.request_field.startswith("tracking.")
    config.tracking_enabled = False
    with pytest.raises(WrongState, match="no model registry"):
        tracking_options(options(register_model="shapes"), config, prunes=True)


@pytest.mark.parametrize("release", ["first", "before-migrations"])
def test_a_store_from_an_older_release_is_stamped_and_upgraded(store_url, release, caplog):
    """An older release made the table with create_all and kept no Alembic version. The
    first release lacked three columns (the client's MLflow options, the experiment id,
    the error's details): stamped 0001, they are added. The release just before
    migrations had them all: stamped 0002, nothing changes. Old jobs stay readable."""
    from sqlalchemy import create_engine, text

    from cnp_server.store import Base

    engine = create_engine(store_url)
    Base.metadata.create_all(engine)  # as those releases did
    old = JobStore(store_url).create(json.dumps({"layers": ["x"]}), request_id="r-old")
    if release == "first":
        with engine.begin() as connection:
            for column in ("tracking_json", "mlflow_experiment_id", "error_details"):
                connection.execute(text(f"ALTER TABLE jobs DROP COLUMN {column}"))
    engine.dispose()
    stamped = "0001" if release == "first" else "0002"

    with caplog.at_level(logging.INFO):
        store = JobStore(store_url, migrate=True)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("alembic", "cnp"))]
    assert lines == [f"job store of an earlier release (revision {stamped}) now at revision 0002"]
    job = store.get(old.id)
    assert job.request_id == "r-old" and json.loads(job.spec_json) == {"layers": ["x"]}
    assert (job.tracking_json, job.mlflow_experiment_id, job.error_details) == ("{}", "", "")
    assert _revision(store_url) == "0002" and _schema_changes(store_url) == []
    store.close()
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the next start finds it current
        JobStore(store_url, migrate=True).close()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("cnp")] == [
        "job store schema is current (revision 0002)"
    ]


def test_a_registry_model_is_unavailable_at_once_while_mlflow_is_away(tmp_path, monkeypatch):
    """CreateAudit's check of models:/ with the tracking server down: UNAVAILABLE with a
    retry delay, within the server's HTTP bounds (MLflow alone retries for minutes)."""
    from cnp_server.registry import TrackingUnavailable

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ServerConfig(
        data_dir=str(tmp_path),
        tracking_uri=f"http://127.0.0.1:{port}",
        tracking_http_retries=0,
        tracking_http_timeout=2,
    )
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # what limit_http sets
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        check_references(_spec("models:/shapes/1", str(tmp_path)), config)
    assert time.monotonic() - started < 10
    assert err.value.reason == "TRACKING_UNAVAILABLE" and err.value.retry_after == 15.0
    assert "models:/shapes/1" in str(err.value) and str(port) not in str(err.value)
