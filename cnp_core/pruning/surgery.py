"""The pruned model, twice from one selection: ``masked`` (same architecture, removed
channels zeroed, e.g. to fine-tune) and ``compact`` (channels removed physically with
Torch-Pruning's dependency graph), which compute the same function.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import LayerError
from ..export import for_inference
from .groups import graph_of, root_handler
from .selection import Selection


def mask_channels(model: nn.Module, zeroed: dict[str, list[int]]) -> nn.Module:
    """Make channels exactly dead, in place: conv filters, Linear weight rows, their biases
    and the BatchNorm scale and shift zeroed, so every consumer sees 0 (as if the channel
    were removed)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, channels in zeroed.items():
            module, idx = modules[name], torch.as_tensor(channels, dtype=torch.long)
            module.weight[idx] = 0
            if module.bias is not None:
                module.bias[idx] = 0
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                module.running_mean[idx] = 0
                module.running_var[idx] = 1
    return model


def compact_model(
    model: nn.Module,
    selection: Selection,
    example_input: torch.Tensor,
    *,
    inference: bool = True,
) -> nn.Module:
    """A physically smaller copy: the selected channels (filters and hidden neurons)
    removed with Torch-Pruning's dependency graph (coupled layers pruned together, e.g. a
    removed neuron's input column of the next Linear). With ``inference`` (what
    :func:`prune` ships) it is also made ready for inference, same function: eval mode,
    BatchNorms folded into their convolutions, channels-last weights
    (:func:`cnp_core.export.for_inference`); without, it keeps the architecture and the
    model's train/eval mode, e.g. to fine-tune it further."""

    clean = copy.deepcopy(model).cpu()
    training = clean.training
    graph = graph_of(clean, example_input.cpu())
    modules = dict(clean.named_modules())
    for root, channels in selection.groups.items():
        module = modules[root]
        group = graph.get_pruning_group(module, root_handler(module), channels)
        if not graph.check_pruning_group(group):
            raise LayerError(f"pruning {len(channels)} channels of {root!r} would empty a layer")
        group.prune()
    return for_inference(clean) if inference else clean.train(training)
