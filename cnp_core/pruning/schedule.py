"""The pruning schedules: one-shot (PXP) and iterative (Yeom: prune a step, fine-tune,
recompute the scores, repeat), for any registered criterion.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..devices import BatchRunner
from ..errors import Cancelled, InvalidSpec, NoFlaggedSubspace
from ..results import PruningSummary
from ..spec import PruneSpec
from ..stages import StepCallback
from .criteria import pruning_criterion
from .groups import channel_groups
from .layers import reaching, scored_layers
from .projection import Projection, fold_projection
from .selection import Selection, select_filters, totals
from .surgery import compact_model, mask_channels

# --- fine-tuning


def finetune(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int,
    learning_rate: float,
    zeroed: dict[str, list[int]] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    cancelled: Callable[[], bool] | None = None,
) -> list[float]:
    """Adam on cross-entropy over ``loader`` batches (images, labels, ...), in place; pruned
    channels are re-zeroed after every step so they stay dead. Returns the mean loss per epoch.

    A batch that runs out of GPU memory is run in halves whose gradients add up to the
    batch's (one optimiser step per batch still; BatchNorm then sees half batches)."""
    torch.manual_seed(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=learning_rate)
    runner = BatchRunner(device, "fine-tuning the pruned model")

    def gradients(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[float, list]:
        """This chunk's share of the batch's mean loss and its gradients (not yet applied)."""
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device)) * (len(y) / n)
        return float(loss.detach()), torch.autograd.grad(loss, params, allow_unused=True)

    losses = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            if cancelled is not None and cancelled():
                raise Cancelled("the job was cancelled")
            x, y = batch[0], batch[1]
            optimiser.zero_grad(set_to_none=True)
            loss = 0.0
            for part_loss, grads in runner.map(partial(gradients, n=len(y)), x, y):
                loss += part_loss
                for param, grad in zip(params, grads, strict=True):
                    if grad is not None:
                        param.grad = grad if param.grad is None else param.grad + grad
            optimiser.step()
            if zeroed:
                mask_channels(model, zeroed)
            total, count = total + loss * len(y), count + len(y)
        losses.append(total / max(count, 1))
    return losses


# --- the schedule


@dataclass
class PruneStep:
    step: int
    rate: float  # cumulative fraction of filters (and of hidden neurons) removed
    filters_removed: int
    finetune_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    neurons_removed: int = 0


@dataclass
class PruneOutcome:
    """Both forms of the pruned model (same function) and how they came about."""

    masked: nn.Module
    compact: nn.Module
    summary: PruningSummary
    history: list[PruneStep]
    selection: Selection
    example_input: torch.Tensor  # one input the models were traced with (for export)
    projection: Projection | None = None  # the last projection used (CNP)


def prune(
    model: nn.Module,
    spec: PruneSpec,
    reference: tuple[torch.Tensor, torch.Tensor],
    *,
    train_loader: Iterable | None = None,
    projection: Projection | None = None,
    relearn: Callable[[nn.Module], Projection] | None = None,
    keep_projection: bool = False,
    layer: str = "",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: StepCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> PruneOutcome:
    """Prune a copy of ``model`` with the criterion ``spec.method`` names (:mod:`.criteria`):
    CNP scores through ``projection``, vanilla LRP pruning without it; one-shot or iterative.

    ``reference`` = (images, true labels) the criterion scores on. Step t of ``spec.steps``
    removes filters, and hidden neurons of fully connected layers (ranked apart), up to the
    cumulative rate ``spec.rate * t / steps``, then fine-tunes ``spec.finetune_epochs``
    over ``train_loader``; with ``spec.relearn_subspaces`` the caller's ``relearn(model)``
    returns the next projection. ``keep_projection`` folds P into the model itself (exact,
    see :func:`~.projection.fold_projection`). ``spec.scope == "upstream"`` ranks only the
    convolutions and hidden Linears that feed the audited layer (the projection's, else
    ``layer``), for every criterion alike; the rate is then a fraction of those.
    """
    spec.validate([spec.attribute] if spec.attribute else [])
    criterion = pruning_criterion(spec.method)
    if criterion.uses_concept and projection is None:
        raise NoFlaggedSubspace(
            f"{spec.method} needs a flagged concept subspace to project out, and none was "
            "flagged: lower flag_threshold, try more subspaces, or use the supervised 'cav' "
            "method"
        )
    if spec.finetune_epochs > 0 and train_loader is None:
        raise InvalidSpec("fine-tuning needs training data (train_loader)")
    if criterion.uses_concept and spec.relearn_subspaces and relearn is None:
        raise InvalidSpec("relearn_subspaces needs a relearn(model) callback")
    scope_layer = projection.layer if projection is not None else layer
    if spec.scope == "upstream" and not scope_layer:
        raise InvalidSpec("prune.scope 'upstream' needs the audited layer")
    if not criterion.uses_concept:
        projection = None
    images, targets = reference
    example = images[:1].cpu()
    report = progress or (lambda fraction, message: None)

    work = copy.deepcopy(model).cpu()
    if keep_projection and projection is not None:
        work = fold_projection(work, projection)
    groups = channel_groups(work, example)
    if spec.scope == "upstream":
        feeding = reaching(work, scope_layer, example, scored_layers(work, example))
        groups = [g for g in groups if set(g.convs) <= feeding]
    counts = totals(groups)
    selection = Selection({}, {}, {}, counts["filter"], neurons_total=counts["neuron"])
    history = []
    for step in range(1, spec.steps + 1):
        if cancelled is not None and cancelled():
            raise Cancelled("the job was cancelled")
        began = time.perf_counter()
        report((step - 1) / spec.steps, f"step {step}/{spec.steps}: filter scores")
        score = criterion.make(spec, projection, batch_size=batch_size, device=device)
        scores = score(work.eval(), images, targets)
        rate = spec.rate * step / spec.steps
        selection = select_filters(scores, rate, groups, already=selection.groups)
        mask_channels(work, selection.zeroed)
        record = PruneStep(
            step, rate, selection.filters_removed, neurons_removed=selection.neurons_removed
        )
        if spec.finetune_epochs > 0:
            report((step - 0.5) / spec.steps, f"step {step}/{spec.steps}: fine-tuning")
            record.finetune_loss = finetune(
                work,
                train_loader,
                epochs=spec.finetune_epochs,
                learning_rate=spec.learning_rate,
                zeroed=selection.zeroed,
                device=device,
                seed=seed + step,
                cancelled=cancelled,
            )
            work = work.cpu().eval()
            if projection is not None and spec.relearn_subspaces:
                projection = relearn(work)
                if keep_projection:
                    work = mask_channels(fold_projection(work, projection), selection.zeroed)
        record.seconds = round(time.perf_counter() - began, 3)
        history.append(record)
    work = work.cpu().eval()
    compact = compact_model(work, selection, example).eval()
    report(1.0, "pruned")
    summary = PruningSummary(
        method=spec.method,
        rate=spec.rate,
        filters_total=selection.filters_total,
        filters_removed=selection.filters_removed,
        removed=selection.removed,
        neurons_total=selection.neurons_total,
        neurons_removed=selection.neurons_removed,
    )
    return PruneOutcome(work, compact, summary, history, selection, example, projection)
