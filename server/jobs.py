"""The job record: what the store keeps about one audit, as a plain dataclass.

Kept free of SQLAlchemy so the job converter (``convert``) can use it without a database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

QUEUED = "QUEUED"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

# MLflow record of a job: nothing to log, waiting to be logged (or retried), logged,
# given up after the server's tracking_max_attempts (tracking_error says why).
TRACKING_NONE = ""
TRACKING_PENDING = "pending"
TRACKING_DONE = "done"
TRACKING_FAILED = "failed"

# Stage of a job refused by CreateAudit's validation (it never ran).
STAGE_VALIDATE = "validate"


@dataclass
class JobRecord:
    """One row of the jobs table. Times are seconds since the epoch (UTC), 0 when unset."""

    id: str
    seq: int
    state: str
    spec_json: str
    request_id: str | None = None
    stage: str = ""
    progress: float = 0.0
    message: str = ""
    error_code: str = ""
    error_message: str = ""
    error_details: str = ""  # cnp_server.errors.Failure.details_json(): reason, field, retry
    attempts: int = 0
    cancel_requested: bool = False
    owner: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float = 0.0
    stage_started_at: float = 0.0
    heartbeat_at: float = 0.0
    report: bytes | None = None
    artifacts_json: str = "{}"
    mlflow_run_id: str = ""
    tracking_state: str = TRACKING_NONE
    tracking_error: str = ""
    tracking_attempts: int = 0
    tracking_json: str = "{}"
    mlflow_experiment_id: str = ""

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        """Artifact name -> {"path": relative to the job's workdir, "size", "sha256", "content_type"}."""
        return json.loads(self.artifacts_json or "{}")

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(self.spec_json)

    @property
    def tracking(self) -> dict[str, Any]:
        """The client's MLflow options: {"experiment", "tags", "register_model"}."""
        return json.loads(self.tracking_json or "{}")
