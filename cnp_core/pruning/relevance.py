"""The LRP relevance criterion (PXP; Yeom et al. 2021, Hatefi et al. 2024).

Filter score of output channel c of conv l over reference samples n, with R the LRP
relevance at the conv's output explaining the one-hot true class:

    score(l, c) = sum_n | sum_{h,w} R(n, c, h, w) |

and the same for the neurons j of every hidden fully connected layer:
score(l, j) = sum_n |R(n, j)| at the Linear's output. With a concept projection (CNP)
the scores are computed through an attribution copy in which P follows the audited
layer, so filters that served only the removed subspace score ~0; without it this is
vanilla LRP pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from zennit.composites import LayerMapComposite, MixedComposite
from zennit.rules import Epsilon

from ..devices import BatchRunner
from ..errors import InvalidSpec, LayerError
from ..lrp import attribution_copy, make_composite
from .layers import scored_layers
from .projection import PROJECTION_EPSILON, ConceptProjection, Projection, insert_projection


def composite_for(name: str, model: nn.Module, projected: bool):
    base = make_composite(name, model)
    if not projected:
        return base
    # The projection's own rule is matched first; the base composite covers the rest and
    # brings its canonizers.
    rule = LayerMapComposite([(ConceptProjection, Epsilon(epsilon=PROJECTION_EPSILON))])
    return MixedComposite([rule, base])


class _Relevance(torch.autograd.Function):
    """Identity on a conv output; its backward reads the relevance arriving there.

    In zennit the tensor flowing backward between layers is the relevance itself, so the
    gradient at the conv's output is R(n, c, h, w). A function node (not a tensor hook)
    keeps it right when an in-place ReLU later modifies the output.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sink: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.sink = sink
        return x.clone()

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        ctx.sink(relevance.detach())
        return relevance, None


def _width(module: nn.Module) -> int:
    """Output channels of a conv, output neurons of a Linear."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def filter_scores(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    composite: str = "epsilon_plus_flat",
    projection: Projection | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """score(l, c) = sum_n |sum_{h,w} R(n, c, h, w)| for every prunable conv l, and
    score(l, j) = sum_n |R(n, j)| for every hidden Linear l (:func:`hidden_linears`), as
    CPU tensors keyed by layer name.

    R is the LRP relevance (``composite``, canonizers merging BatchNorm into the convs, so
    R is taken after the merged BatchNorm) at each layer's output, starting from the
    one-hot true class ``targets``. With ``projection`` (CNP), P is inserted after its
    layer in the attribution copy; the caller's model is never modified.
    """
    if len(images) != len(targets) or len(images) == 0:
        raise InvalidSpec("filter scores need a non-empty reference set with one target each")
    device = torch.device(device)
    clone = attribution_copy(model).to(device)
    modules = dict(clone.named_modules())
    layers = scored_layers(clone, images)
    if not layers:
        raise LayerError(
            "the model has no prunable convolution (dense nn.Conv2d) or hidden linear layer"
        )
    watched = {name: modules[name] for name in layers}  # by identity: names shift below P
    if projection is not None:
        insert_projection(clone, projection)
        layer = dict(clone.named_modules())[projection.layer][0]
    scores = {name: torch.zeros(_width(m), dtype=torch.float64) for name, m in watched.items()}
    found: dict[str, torch.Tensor] = {}  # the scores of the chunk being explained
    calls = [0]

    def recorder(name: str):
        linear = isinstance(watched[name], nn.Linear)

        def sink(relevance: torch.Tensor) -> None:
            if linear:  # neurons on the last axis (also for N x T x d inputs)
                relevance = relevance.movedim(-1, 1)
            dims = tuple(range(2, relevance.dim()))
            per_image = relevance.sum(dim=dims) if dims else relevance
            found[name] = found.get(name, 0) + per_image.abs().sum(0).double().cpu()

        def hook(module, inputs, output):
            return _Relevance.apply(output, sink)

        return hook

    def count(module, inputs, output):
        calls[0] += 1
        if output.dim() not in (2, 4) or output.shape[1] != projection.dim:
            raise LayerError(
                f"layer {projection.layer!r} outputs {tuple(output.shape[1:])}, which a "
                f"{projection.dim}-dimensional projection cannot follow"
            )

    def explain(x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scores of one chunk (the sinks fill ``found``; a failed chunk's are dropped)."""
        found.clear()
        x = x.to(device).requires_grad_(True)
        calls[0] = 0
        with torch.enable_grad():
            logits = clone(x)
            if projection is not None and calls[0] != 1:
                raise LayerError(
                    f"layer {projection.layer!r} runs {calls[0]} times per forward pass "
                    "(a shared module, e.g. a ResNet's ReLU): project after a block output"
                )
            start = nn.functional.one_hot(target.to(device), logits.shape[1])
            torch.autograd.grad(logits, x, start.to(logits.dtype))
        return dict(found)

    runner = BatchRunner(device, "scoring filters for pruning")
    with composite_for(composite, clone, projection is not None).context(clone):
        # Registered after the composite's hooks: the recorders see the rule-wrapped output.
        handles = [m.register_forward_hook(recorder(name)) for name, m in watched.items()]
        if projection is not None:
            handles.append(layer.register_forward_hook(count))
        try:
            for batch in range(0, len(images), batch_size):
                part = slice(batch, batch + batch_size)
                for chunk in runner.map(explain, images[part], targets[part]):
                    for name, score in chunk.items():
                        scores[name] += score
        finally:
            for handle in handles:
                handle.remove()
    return {name: s.float() for name, s in scores.items()}


@dataclass
class LRPCriterion:
    """The PXP criterion as a pruning criterion (:mod:`.criteria`): :func:`filter_scores`
    with these rules, through ``projection`` when one is given (CNP)."""

    composite: str = "epsilon_plus_flat"
    projection: Projection | None = None
    batch_size: int = 32
    device: str | torch.device = "cpu"

    def __call__(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return filter_scores(model, images, targets, **vars(self))
