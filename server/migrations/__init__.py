"""The job store's schema, through Alembic migrations (``versions/``, one file a revision).

The server brings the store to the newest revision as it starts (``upgrade_to_head``);
its workers only use the tables. A store made by a release before migrations existed
has the tables but no ``alembic_version``: it is stamped at the revision its columns
match, then upgraded. Replicas starting at once on one PostgreSQL database take turns
(a transaction-scoped advisory lock); the second finds the schema current.

A new revision: a file in ``versions/`` whose ``down_revision`` is the current head,
adding to the schema without breaking a server of the previous release that still runs
(new columns get server defaults). ``JobRow`` in ``cnp_server.store`` changes with it;
the tests compare the two.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPT_LOCATION = "cnp_server:migrations"
# Any fixed bigint that no other tool on the database uses: "cnp_jobs" in ASCII.
LOCK_KEY = int.from_bytes(b"cnp_jobs", "big")
# Columns each revision added to the jobs table, to recognise an unversioned store.
ADDED_BY_0002 = frozenset({"tracking_json", "mlflow_experiment_id", "error_details"})


class NewerSchema(Exception):
    """The store was migrated by a newer release: this one must not write to it."""


def _config(connection: Connection) -> Config:
    from alembic.config import Config  # here: slow to import, and only the server needs it

    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["connection"] = connection
    return config


def _revision_of_unversioned(connection: Connection) -> str | None:
    """The revision an older release's store matches; None for an empty database or one
    that Alembic already keeps."""
    tables = set(inspect(connection).get_table_names())
    if "jobs" not in tables or "alembic_version" in tables:
        return None
    columns = {c["name"] for c in inspect(connection).get_columns("jobs")}
    return "0002" if columns >= ADDED_BY_0002 else "0001"


def current_revision(connection: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _refuse_unknown(config: Config, revision: str | None) -> None:
    """A revision this release lacks means a newer release migrated the store (a rollback
    after an upgrade): say so, instead of Alembic's "Can't locate revision"."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(config)
    known = {s.revision for s in script.walk_revisions()}
    if revision is not None and revision not in known:
        raise NewerSchema(
            f"the job store is at schema revision {revision}, which this release does not "
            f"know (its newest is {script.get_current_head()}): a newer cnp-server migrated "
            "it; run that release, or restore the store from before the upgrade"
        )


def upgrade_to_head(engine: Engine) -> str:
    """Bring the store at ``engine`` to the newest revision; returns a line for the log."""
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    # Alembic logs its plugins as it loads and each step at INFO: one line of ours instead.
    alembic_log.setLevel(logging.WARNING)
    try:
        from alembic import command

        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Held to the commit: a second replica waits here, then finds it done.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            config = _config(connection)
            stamped = _revision_of_unversioned(connection)
            if stamped is not None:
                command.stamp(config, stamped)
            before = current_revision(connection)
            _refuse_unknown(config, before)
            command.upgrade(config, "head")
            after = current_revision(connection)
    finally:
        alembic_log.setLevel(level)
    if stamped is not None:
        return f"job store of an earlier release (revision {stamped}) now at revision {after}"
    if before is None:
        return f"job store created at revision {after}"
    if before != after:
        return f"job store upgraded from revision {before} to {after}"
    return f"job store schema is current (revision {after})"
