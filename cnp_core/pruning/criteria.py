"""Pruning criteria: how the filters (and hidden neurons) of a model are scored.

A criterion is a callable ``(model, images, targets) -> {layer name: scores}`` over the
reference set (images and their true classes), one score per output channel of every
prunable convolution and hidden Linear; higher means keep. Like Torch-Pruning's
``Importance``, it knows nothing of how channels are grouped or how many go.

Every criterion is registered here with a factory that builds it for one pruning step;
``PruneSpec.method`` chooses among them. Add one with one decorated function:

    @register("name", uses_concept=False, description="...")
    def name(spec, projection, *, batch_size, device):
        return SomeCriterion(...)

The module imports nothing heavy (the spec reads the table without torch): factories
import their implementation when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InvalidSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..spec import PruneSpec
    from .projection import Projection


class Criterion(Protocol):
    def __call__(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class PruningCriterion:
    name: str
    # (prune spec, concept projection or None, *, batch_size, device) -> Criterion
    make: Callable[..., Criterion]
    uses_concept: bool  # needs the audit's flagged subspace (CNP)
    description: str


CRITERIA: dict[str, PruningCriterion] = {}


def register(
    name: str, *, uses_concept: bool, description: str = ""
) -> Callable[[Callable[..., Criterion]], Callable[..., Criterion]]:
    """Decorator: add a criterion factory to :data:`CRITERIA` under ``name``."""

    def add(make: Callable[..., Criterion]) -> Callable[..., Criterion]:
        CRITERIA[name] = PruningCriterion(name, make, uses_concept, description)
        return make

    return add


def pruning_criterion(name: str) -> PruningCriterion:
    entry = CRITERIA.get(name)
    if entry is None:
        raise InvalidSpec(f"prune.method must be one of {', '.join(CRITERIA)}, got {name!r}")
    return entry


@register("cnp", uses_concept=True, description="LRP scores with the flagged concept projected out")
def cnp(spec: PruneSpec, projection: Projection | None, **options: Any) -> Criterion:
    from .relevance import LRPCriterion

    return LRPCriterion(spec.composite, projection, **options)


@register("lrp", uses_concept=False, description="LRP scores (PXP), vanilla LRP pruning")
def lrp(spec: PruneSpec, projection: Projection | None, **options: Any) -> Criterion:
    from .relevance import LRPCriterion

    return LRPCriterion(spec.composite, None, **options)
