"""From an audit to a pruning run: CNP removes what the audit flagged, vanilla LRP pruning
is the same run without the projection (ALGORITHMS.md section 4).

The reference set the criterion scores on is drawn from the training split, seeded, per
class; fine-tuning runs over the training split; with ``relearn_subspaces`` the concept
is learned again on each fine-tuned model by the audit's own sequence
(:func:`cnp_core.concepts.learn_concepts`), because concepts drift.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .concepts import ConceptAudit, learn_concepts
from .data import ImageTable, SplitRows, make_loader
from .devices import compute_device
from .errors import InvalidSpec, LayerError, NoFlaggedSubspace
from .pruning.criteria import pruning_criterion
from .pruning.projection import Projection, projection_readers
from .pruning.schedule import PruneOutcome, prune
from .spec import AuditSpec
from .stages import StepCallback


def check_prune(model: nn.Module, spec: AuditSpec) -> None:
    """What the pruning stage needs of the model, checked before the audit runs: a
    projection kept in the model must fold exactly into the layers that read the
    audited layer(s)."""
    prune_spec = spec.prune
    if prune_spec is None or not prune_spec.keep_projection:
        return
    if not pruning_criterion(prune_spec.method).uses_concept:
        return
    for layer in spec.layers:
        try:
            projection_readers(model, layer)
        except LayerError as err:
            raise InvalidSpec(
                f"prune.keep_projection: {err}; audit a layer that convolutions read (e.g. "
                "the pooled block output), or keep the projection out (--no-keep-projection)"
            ) from None


def reference_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A seeded reference set: ``per_class`` indices of each class (all when fewer), sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.append(rng.choice(members, size=min(per_class, members.size), replace=False))
    return np.sort(np.concatenate(picks))


def reference_set(
    table: ImageTable, splits: SplitRows, spec: AuditSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, true classes) of the reference set: ``spec.prune.reference_per_class``
    training images (or table rows) of each class."""
    train = np.asarray(splits.train)
    rows = train[reference_indices(table.labels[train], spec.prune.reference_per_class, spec.seed)]
    images = table.samples(rows, spec.dataset).stack()
    return images, torch.as_tensor(table.labels[rows])


def concept_to_remove(concepts: ConceptAudit, spec: AuditSpec) -> Projection | None:
    """The projection of ``spec.prune.attribute`` (default: the first audited attribute)
    from the audit; NoFlaggedSubspace when the criterion needs one and none was flagged."""
    attribute = spec.prune.attribute or spec.attributes[0]
    projection = concepts.projection(attribute)
    if projection is None and pruning_criterion(spec.prune.method).uses_concept:
        raise NoFlaggedSubspace(
            f"{spec.prune.method.upper()} was asked to remove {attribute!r}, but the audit "
            f"flagged no subspace for it (flag_threshold {spec.flag_threshold}, adjusted to each "
            "value's base rate): lower "
            "flag_threshold, audit with more subspaces (n_subspaces), or use the supervised "
            "method 'cav'"
        )
    return projection


def debias(
    model: nn.Module,
    table: ImageTable,
    splits: SplitRows,
    spec: AuditSpec,
    projection: Projection | None,
    *,
    progress: StepCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> PruneOutcome:
    """Prune ``model`` as ``spec.prune`` says; ``projection`` is the flagged concept (see
    :meth:`~cnp_core.concepts.ConceptAudit.projection`), read by criteria that use one.
    Vanilla pruning without a projection ranks the convolutions upstream of the first
    audited layer when the scope is "upstream"."""
    relearn = None
    if projection is not None and spec.prune.relearn_subspaces:
        relearn = relearner(table, splits, spec, projection, cancelled)
    train_loader = make_loader(
        table.labelled(splits.train, spec.dataset),
        spec.batch_size,
        shuffle=True,
        seed=spec.seed,
    )
    return prune(
        model,
        spec.prune,
        reference_set(table, splits, spec),
        train_loader=train_loader,
        projection=projection,
        relearn=relearn,
        keep_projection=spec.prune.keep_projection,
        layer=projection.layer if projection is not None else spec.layers[0],
        batch_size=spec.batch_size,
        device=compute_device(spec.device),
        seed=spec.seed,
        progress=progress,
        cancelled=cancelled,
    )


def relearner(
    table: ImageTable,
    splits: SplitRows,
    spec: AuditSpec,
    previous: Projection,
    cancelled: Callable[[], bool] | None = None,
) -> Callable[[nn.Module], Projection]:
    """relearn(model) -> the projection of the attribute being removed, learned again on
    ``model`` at the projection's layer; the last projection stays when nothing is flagged."""
    attribute = spec.prune.attribute or spec.attributes[0]
    local = copy.copy(spec)
    local.layers, local.attributes = [previous.layer], [attribute]
    state = {"projection": previous}

    def relearn(current: nn.Module) -> Projection:
        found = learn_concepts(current, table, splits, local, cancelled=cancelled)
        found = found.projection(attribute)
        if found is not None:
            state["projection"] = found
        return state["projection"]

    return relearn
