"""Alembic's environment: the migrations run on the connection the server hands over
(``config.attributes["connection"]``), inside its transaction (see ``upgrade_to_head``)."""

from __future__ import annotations

from alembic import context

from cnp_server.store import Base

connection = context.config.attributes["connection"]
# target_metadata lets `alembic check` and tests compare the models with the migrations.
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():  # a no-op inside the caller's transaction
    context.run_migrations()
