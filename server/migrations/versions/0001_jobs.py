"""The jobs table as the first release created it.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(256), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("error_code", sa.String(32), nullable=False),
        sa.Column("error_message", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=False),
        sa.Column("stage_started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("report", sa.LargeBinary, nullable=True),
        sa.Column("artifacts_json", sa.Text, nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=False),
        sa.Column("tracking_state", sa.String(16), nullable=False),
        sa.Column("tracking_error", sa.Text, nullable=False),
        sa.Column("tracking_attempts", sa.Integer, nullable=False),
        # Unnamed, as create_all made it: the database names it (PostgreSQL:
        # jobs_request_id_key), the same in a store of that release and in a new one.
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_jobs_id", "jobs", ["id"], unique=True)
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_tracking_state", "jobs", ["tracking_state"])


def downgrade() -> None:
    op.drop_table("jobs")
