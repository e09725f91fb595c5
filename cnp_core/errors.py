"""Typed errors of the engine.

Every failure a user can cause raises a subclass of :class:`CnpError` whose message says
what was wrong and how to fix it. ``status`` names the gRPC status code the service maps
it to (the one place that does so is ``cnp_server.errors``); the engine itself knows
nothing of gRPC.
"""

from __future__ import annotations


class CnpError(Exception):
    """Base of all errors a request can cause; the message is safe to show to users."""

    status = "INVALID_ARGUMENT"


class InvalidSpec(CnpError):
    """The audit or pruning specification is inconsistent or out of range."""


class ModelError(CnpError):
    """The model reference cannot be loaded (architecture, factory or weights)."""


class UnsafeFile(ModelError):
    """A file would need arbitrary code execution (e.g. a pickle) to be loaded."""


class WeightsMismatch(ModelError):
    """The weights do not fit the architecture."""


class DatasetError(CnpError):
    """The dataset reference, its labels.csv or one of its images is unusable."""


class LayerError(CnpError):
    """The named layer does not exist or cannot be audited or pruned."""


class NoFlaggedSubspace(CnpError):
    """Pruning was asked to remove a concept the audit did not flag."""

    status = "FAILED_PRECONDITION"


class GroupTooSmall(CnpError):
    """A group needed for an evaluation has fewer samples than the configured minimum."""

    status = "FAILED_PRECONDITION"


class Cancelled(CnpError):
    """The job was cancelled while it ran."""

    status = "CANCELLED"
