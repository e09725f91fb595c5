"""The architecture description of a compact (pruned) model: its base architecture and
every conv, BatchNorm and linear layer's shape, as plain JSON (``architecture.json``),
from which the model is rebuilt with only known layer types, nothing imported or
unpickled. Written by :mod:`cnp_core.export`, read back by it and by
:func:`cnp_core.models.load_model`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .architectures import ARCHITECTURES, MLP, build
from .errors import ModelError

FORMAT_VERSION = 1
ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"  # the compact model's weights, beside it

_DESCRIBED = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Linear, nn.Identity)


def _memory_format(model: nn.Module) -> str:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs):
        return "channels_last"
    return "contiguous"


def _describe_module(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Conv2d):
        return {
            "type": "Conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": list(module.padding)
            if not isinstance(module.padding, str)
            else module.padding,
            "dilation": list(module.dilation),
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        return {
            "type": type(module).__name__,
            "num_features": module.num_features,
            "eps": module.eps,
            "momentum": module.momentum,
            "affine": module.affine,
            "track_running_stats": module.track_running_stats,
        }
    if isinstance(module, nn.Linear):
        return {
            "type": "Linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if type(module) is nn.Identity:  # e.g. a BatchNorm folded into its convolution
        return {"type": "Identity"}
    return None


def describe(
    model: nn.Module, *, architecture: str = "", num_classes: int = 0, **extra
) -> dict[str, Any]:
    """The architecture description: the base (torchvision name), every conv, BatchNorm
    and linear layer's shape and every identity (a folded BatchNorm), and the weights'
    memory format, so a pruned model can be rebuilt from its base."""
    layers = {}
    for name, module in model.named_modules():
        if type(module) in _DESCRIBED:
            layers[name] = _describe_module(module)
        elif isinstance(module, nn.Conv2d | _BatchNorm | nn.Linear):
            raise ModelError(f"cannot describe layer {name!r} of type {type(module).__name__}")
    channels = {name: d["out_channels"] for name, d in layers.items() if d["type"] == "Conv2d"}
    if isinstance(model, MLP):  # the base to rebuild: an MLP is shaped by its sizes
        extra = {"layer_sizes": model.layer_sizes, **extra}
    return {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "num_classes": num_classes,
        "channels": channels,
        "memory_format": _memory_format(model),
        "layers": layers,
        **extra,
    }


def _build_module(spec: dict[str, Any]) -> nn.Module:
    kind = spec["type"]
    if kind == "Conv2d":
        padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
        return nn.Conv2d(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            stride=tuple(spec["stride"]),
            padding=padding,
            dilation=tuple(spec["dilation"]),
            groups=spec["groups"],
            bias=spec["bias"],
            padding_mode=spec["padding_mode"],
        )
    if kind in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):
        return getattr(nn, kind)(
            spec["num_features"],
            eps=spec["eps"],
            momentum=spec["momentum"],
            affine=spec["affine"],
            track_running_stats=spec["track_running_stats"],
        )
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    if kind == "Identity":
        return nn.Identity()
    raise ModelError(f"unknown layer type {kind!r} in the architecture description")


def rebuild(description: dict[str, Any], base: nn.Module | None = None) -> nn.Module:
    """The base model (``base``, or the architecture named in the description: an MLP
    with its ``layer_sizes``)
    with every described layer replaced by one of the described shape, in the described
    memory format. Weights are not loaded (see :func:`load_compact`)."""
    if description.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"unsupported architecture description version {description.get('format_version')}"
        )
    if base is None:
        name = description.get("architecture", "")
        if name not in ARCHITECTURES:
            raise ModelError(f"unknown torchvision architecture {name!r}: pass the base model")
        base = build(name, description["num_classes"], description.get("layer_sizes", ()))
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    for name, spec in description["layers"].items():
        if name not in modules:
            raise ModelError(f"layer {name!r} of the description is not in the base model")
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent], attr, _build_module(spec))
    if description.get("memory_format") == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
