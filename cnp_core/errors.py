"""Typed errors of the engine.

Every failure a user can cause raises a subclass of :class:`CnpError` whose message says
what was wrong and how to fix it. ``status`` names the gRPC status code the service maps
it to (the one place that does so is ``cnp_server.errors``); the engine itself knows
nothing of gRPC. ``reason`` is the stable machine-readable name of the failure (UPPER_SNAKE,
part of the API: clients branch on it, so it never changes once released).
"""

from __future__ import annotations


class CnpError(Exception):
    """Base of all errors a request can cause; the message is safe to show to users.

    ``field``: the spec field at fault as a dotted path (``prune.rate``, ``layers[0]``),
    or "" when no single field is; the service names it in its error details.
    """

    status = "INVALID_ARGUMENT"
    reason = ""  # "": the status code's name stands in

    def __init__(self, *args: object, field: str = "") -> None:
        super().__init__(*args)
        self.field = field  # kept by pickling too (BaseException pickles __dict__)


class InvalidSpec(CnpError):
    """The audit or pruning specification is inconsistent or out of range."""

    reason = "INVALID_SPEC"


class ModelError(CnpError):
    """The model reference cannot be loaded (architecture, factory or weights)."""

    reason = "INVALID_MODEL"


class UnsafeFile(ModelError):
    """A file would need arbitrary code execution (e.g. a pickle) to be loaded."""

    reason = "UNSAFE_FILE"


class WeightsMismatch(ModelError):
    """The weights do not fit the architecture."""

    reason = "WEIGHTS_MISMATCH"


class DatasetError(CnpError):
    """The dataset reference, its labels.csv or one of its images is unusable."""

    reason = "INVALID_DATASET"


class LayerError(CnpError):
    """The named layer does not exist or cannot be audited or pruned."""

    reason = "INVALID_LAYER"


class NoFlaggedSubspace(CnpError):
    """Pruning was asked to remove a concept the audit did not flag."""

    status = "FAILED_PRECONDITION"
    reason = "NO_FLAGGED_SUBSPACE"


class GroupTooSmall(CnpError):
    """A group needed for an evaluation has fewer samples than the configured minimum."""

    status = "FAILED_PRECONDITION"
    reason = "GROUP_TOO_SMALL"


class Cancelled(CnpError):
    """The job was cancelled while it ran."""

    status = "CANCELLED"
    reason = "CANCELLED"
