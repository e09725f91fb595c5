"""Coupled channels: what Torch-Pruning's dependency graph removes together.

A ResNet's residual stream couples the output channels of several convolutions (and
their BatchNorms): removing one root channel removes it in every coupled layer. Groups
rooted at a convolution hold filters; groups rooted at a hidden Linear hold neurons.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import dense_convs, hidden_linears


@dataclass
class ChannelGroup:
    """Output channels Torch-Pruning couples: removing root channel i removes, in every
    module of ``outputs``, the channel ``outputs[module][i]`` (convs, Linears, BatchNorms).

    ``kind`` is "filter" for a group rooted at a convolution and "neuron" for one rooted
    at a hidden Linear; the two kinds are ranked separately.
    """

    root: str
    size: int
    outputs: dict[str, list[int]]
    # The scored layers among ``outputs``, one unit each per root channel: convolutions
    # (filters) in a "filter" group, hidden Linears (neurons) in a "neuron" group.
    convs: list[str]
    kind: str = "filter"


_OUTPUT_HANDLERS = (
    tp.prune_conv_out_channels,
    tp.prune_linear_out_channels,
    tp.prune_batchnorm_out_channels,
)


def _is_output(item) -> bool:
    """Does this group item remove output channels (of a conv, a Linear or a BatchNorm)?"""
    # Handlers are bound methods, a new object on every access: compare with ==, never `is`.
    return any(item.dep.handler == handler for handler in _OUTPUT_HANDLERS)


def graph_of(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph of a clean model (no hooks, no projection); tracing puts the
    model into eval mode, so callers pass a copy they own."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, verbose=False
        )


def root_handler(module: nn.Module):
    """Torch-Pruning's handler removing the output channels of a group's root."""
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_conv_out_channels


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Every group of coupled output channels rooted at a prunable convolution ("filter"
    groups) or at a hidden Linear ("neuron" groups). The model's output layer is left
    out, and so is every group that would remove its outputs (the classes)."""
    clean = copy.deepcopy(model).cpu()
    x = example_input[:1].cpu()
    hidden = hidden_linears(clean, x)
    graph = graph_of(clean, x)
    names = {m: n for n, m in clean.named_modules()}
    scored = {"filter": set(dense_convs(clean)), "neuron": set(hidden)}
    output_layers = [
        m for m, name in names.items() if isinstance(m, nn.Linear) and name not in hidden
    ]
    groups = []
    for group in graph.get_all_groups(
        ignored_layers=output_layers, root_module_types=[nn.Conv2d, nn.Linear]
    ):
        root_module = group[0].dep.target.module
        kind = "neuron" if isinstance(root_module, nn.Linear) else "filter"
        outputs: dict[str, list[int]] = {}
        for item in group:
            module = item.dep.target.module
            if _is_output(item) and isinstance(module, nn.Conv2d | nn.Linear | _BatchNorm):
                order = np.argsort(item.root_idxs)
                outputs[names[module]] = [int(item.idxs[i]) for i in order]
        convs = [name for name in outputs if name in scored[kind]]
        if convs:
            root = names[root_module]
            groups.append(ChannelGroup(root, len(outputs[root]), outputs, convs, kind))
    return groups
