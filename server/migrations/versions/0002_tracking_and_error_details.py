"""The client's MLflow options, the run's experiment id and the error's details.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Each with a server default: the rows already there get it, and a server of the
# previous release, which does not write these columns, can still insert.
COLUMNS = (
    ("tracking_json", sa.Text(), "{}"),
    ("mlflow_experiment_id", sa.String(64), ""),
    ("error_details", sa.Text(), ""),
)


def upgrade() -> None:
    for name, type_, default in COLUMNS:
        op.add_column("jobs", sa.Column(name, type_, nullable=False, server_default=default))


def downgrade() -> None:
    # SQLite alters a table only by copying it: the batch mode does that.
    with op.batch_alter_table("jobs") as batch:
        for name, _, _ in reversed(COLUMNS):
            batch.drop_column(name)
