"""Which layers of a model are scored and pruned, and which of them feed a given layer.

Filters: the output channels of every dense convolution. Neurons: the outputs of every
hidden fully connected layer (each nn.Linear but the model's output layer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LayerError
from .projection import ConceptProjection


def dense_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every dense (groups == 1) convolution but an inserted concept projection."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not isinstance(m, ConceptProjection) and m.groups == 1
    }


def prunable_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Convolutions whose output channels (filters) can be ranked: dense Conv2d layers."""
    convs = dense_convs(model)
    if not convs:
        raise LayerError("the model has no prunable convolution (dense nn.Conv2d)")
    return convs


def _linears_in_run_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the nn.Linear layers in the order they first run in one eval forward pass."""
    names = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            names.setdefault(m, name)
    order: list[str] = []

    def hook(module, inputs, output):
        if names[module] not in order:
            order.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names]
    training = model.training
    param = next(model.parameters(), None)
    try:
        with torch.no_grad():
            model.eval()(example_input[:1].to(param.device if param is not None else "cpu"))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return order


def hidden_linears(model: nn.Module, example_input: torch.Tensor) -> dict[str, nn.Linear]:
    """Fully connected layers whose output neurons can be ranked: every nn.Linear that runs
    in a forward pass except the last one to run, the model's output layer (its neurons
    are the classes). Found with one forward pass of ``example_input[:1]``."""
    modules = dict(model.named_modules())
    return {name: modules[name] for name in _linears_in_run_order(model, example_input)[:-1]}


def scored_layers(model: nn.Module, example_input: torch.Tensor) -> dict[str, nn.Module]:
    """The layers a criterion scores: dense convolutions and hidden Linears, by name."""
    return {**dense_convs(model), **hidden_linears(model, example_input)}


def upstream_convs(model: nn.Module, layer: str, example_input: torch.Tensor) -> set[str]:
    """The prunable convolutions whose output reaches ``layer``'s output: the ones whose
    filter scores a projection after ``layer`` can change (found by autograd, so branches
    and skips count as the graph says, not as the modules happen to be ordered)."""
    return reaching(model, layer, example_input, prunable_convs(model))


def reaching(
    model: nn.Module, layer: str, example_input: torch.Tensor, candidates: dict[str, nn.Module]
) -> set[str]:
    """The ``candidates`` (name -> module) whose output reaches ``layer``'s output."""
    modules = dict(model.named_modules())
    if layer not in modules:
        raise LayerError(f"unknown layer {layer!r} for the pruning scope")
    if not candidates:
        return set()
    outputs: dict[str, torch.Tensor] = {}
    target: list[torch.Tensor] = []

    def keep(name: str):
        def hook(module, inputs, output):
            outputs[name] = output

        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in candidates.items()]
    handles.append(modules[layer].register_forward_hook(lambda m, i, o: target.append(o)))
    training = model.training
    try:
        with torch.enable_grad():
            model.eval()(example_input[:1].detach().clone().requires_grad_(True))
            names = [n for n in candidates if n in outputs]
            grads = torch.autograd.grad(
                target[0].sum(), [outputs[n] for n in names], allow_unused=True
            )
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return {n for n, g in zip(names, grads, strict=True) if g is not None}
