"""Which channels go: a global ranking of the scored units (ALGORITHMS.md section 4).

Filters are ranked globally over all prunable convolutions (no per-layer normalisation),
and hidden neurons globally over all hidden Linears, apart from the filters: LRP
conserves relevance layer by layer and a neuron's share of it is far smaller than a
filter's, so one joint ranking would remove the neurons first. The coupled channels of
a group are one unit whose score is the mean of its scored layers' scores; the lowest
units go until the requested fraction is removed, keeping at least one channel per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidSpec, LayerError
from .groups import ChannelGroup


@dataclass
class Selection:
    """Which channels go: per group root (its own indexing) and per module."""

    groups: dict[str, list[int]]  # root conv or Linear -> removed root channels
    removed: dict[str, list[int]]  # conv -> removed filters (output channels)
    zeroed: dict[str, list[int]]  # conv, Linear or BatchNorm -> channels zeroed when masked
    filters_total: int
    neurons: dict[str, list[int]] = field(default_factory=dict)  # hidden Linear -> neurons
    neurons_total: int = 0

    @property
    def filters_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def neurons_removed(self) -> int:
        return sum(len(v) for v in self.neurons.values())


def totals(groups: list[ChannelGroup]) -> dict[str, int]:
    """Filters and neurons the groups hold: kind -> count."""
    counts = {"filter": 0, "neuron": 0}
    for g in groups:
        counts[g.kind] += g.size * len(g.convs)
    return counts


def unit_scores(group: ChannelGroup, scores: dict[str, torch.Tensor]) -> np.ndarray:
    """Mean LRP score over the group's coupled filters, per root channel (what
    Torch-Pruning would compute for the group's root channels)."""
    per_conv = [scores[name][group.outputs[name]].double().numpy() for name in group.convs]
    return np.mean(per_conv, axis=0)


def select_filters(
    scores: dict[str, torch.Tensor],
    rate: float,
    groups: list[ChannelGroup] | None = None,
    *,
    already: dict[str, list[int]] | None = None,
    min_keep: int = 1,
) -> Selection:
    """Remove the globally lowest-scoring units until ``rate`` of all filters are gone,
    and, ranked separately, until ``rate`` of all hidden neurons are gone.

    Filters compete only with filters and neurons only with neurons (``ChannelGroup.kind``):
    a neuron's LRP score is far below a filter's, so a joint ranking would remove every
    neuron first. Without ``groups`` every scored channel is a filter of its own. ``already``
    (root -> channels, from an earlier step) stays removed and counts towards the rate.
    Each group keeps at least ``min_keep`` channels (a fully pruned group would be skipped
    by Torch-Pruning).
    """
    if not 0.0 < rate < 1.0:
        raise InvalidSpec(f"pruning rate must lie strictly between 0 and 1, got {rate}")
    if groups is None:
        groups = [
            ChannelGroup(name, len(s), {name: list(range(len(s)))}, [name])
            for name, s in scores.items()
        ]
    missing = {n for g in groups for n in g.convs} - set(scores)
    if missing:
        raise LayerError(f"no filter scores for {sorted(missing)}")
    counts = totals(groups)
    chosen = {g.root: set((already or {}).get(g.root, [])) for g in groups}
    for kind, total in counts.items():
        _remove_lowest(scores, groups, kind, int(round(rate * total)), chosen, min_keep)
    selection = Selection({}, {}, {}, counts["filter"], neurons_total=counts["neuron"])
    for g in groups:
        picked = sorted(chosen[g.root])
        if not picked:
            continue
        selection.groups[g.root] = picked
        scored = selection.removed if g.kind == "filter" else selection.neurons
        for name, channels in g.outputs.items():
            mapped = sorted(channels[i] for i in picked)
            selection.zeroed[name] = mapped
            if name in g.convs:
                scored[name] = mapped
    return selection


def _remove_lowest(
    scores: dict[str, torch.Tensor],
    groups: list[ChannelGroup],
    kind: str,
    target: int,
    chosen: dict[str, set[int]],
    min_keep: int,
) -> None:
    """Add the lowest-scoring units of the groups of ``kind`` to ``chosen`` until ``target``
    scored channels of that kind are removed, in place."""
    removed = sum(len(chosen[g.root]) * len(g.convs) for g in groups if g.kind == kind)
    units = [
        (float(s), gi, int(i))
        for gi, g in enumerate(groups)
        if g.kind == kind
        for i, s in enumerate(unit_scores(g, scores))
    ]
    units.sort()  # ties broken by group and channel order: deterministic
    for _, gi, i in units:
        if removed >= target:
            break
        g = groups[gi]
        if i in chosen[g.root] or len(chosen[g.root]) >= g.size - min_keep:
            continue
        chosen[g.root].add(i)
        removed += len(g.convs)
