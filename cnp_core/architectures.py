"""What cnp knows about the architectures it builds by name: one table.

Per family of torchvision models: the names a spec may give (the allow-list), the zennit
canonizers LRP needs (BatchNorm merged into its convolution, residual sums made explicit)
and the layer an audit looks at by default. Building a model by name, choosing its
canonizers, the benchmark's default layer and rebuilding an exported compact model all
read this table.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn
from torchvision.models import VGG, EfficientNet, MobileNetV2, MobileNetV3, ResNet
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

from .errors import ModelError


def _late_conv(model: nn.Module, input_size: int) -> str:
    """A late but not the last convolution: concepts are formed, space is left."""
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    return convs[(3 * len(convs)) // 4]


def _resnet_layer(model: nn.Module, input_size: int) -> str:
    """``layer3`` when it keeps at least 4x4 positions: ResNets downsample by 16 up to it,
    so below 64 px it holds 2x2, too few to sample instances from; ``layer2`` there."""
    return "layer3" if input_size >= 64 else "layer2"


@dataclass(frozen=True)
class Family:
    model_type: type[nn.Module]  # the torchvision class its builders return
    names: tuple[str, ...]  # builders a spec may name; small enough to build on CPU
    canonizers: Callable[[], list]
    default_layer: Callable[[nn.Module, int], str]  # (model, input size) -> layer name


FAMILIES = (
    Family(
        ResNet, ("resnet18", "resnet34", "resnet50"), lambda: [ResNetCanonizer()], _resnet_layer
    ),
    Family(
        VGG,
        ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn"),
        lambda: [VGGCanonizer()],
        _late_conv,
    ),
    Family(MobileNetV2, ("mobilenet_v2",), lambda: [SequentialMergeBatchNorm()], _late_conv),
    Family(MobileNetV3, ("mobilenet_v3_small",), lambda: [SequentialMergeBatchNorm()], _late_conv),
    Family(EfficientNet, ("efficientnet_b0",), lambda: [SequentialMergeBatchNorm()], _late_conv),
)

ARCHITECTURES = tuple(name for family in FAMILIES for name in family.names)


def build(name: str, num_classes: int) -> nn.Module:
    """The architecture ``name`` with fresh weights (never downloaded)."""
    if name not in ARCHITECTURES:
        close = difflib.get_close_matches(name, ARCHITECTURES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(
            f"unknown architecture {name!r}{hint}; allowed: {', '.join(ARCHITECTURES)}"
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def family_of(model: nn.Module) -> Family | None:
    """The family a model belongs to (also one built by a factory), None if unknown."""
    return next((f for f in FAMILIES if isinstance(model, f.model_type)), None)


def canonizers_for(model: nn.Module) -> list:
    """zennit canonizers for ``model``; BatchNorm merging alone for an unknown family."""
    family = family_of(model)
    return family.canonizers() if family else [SequentialMergeBatchNorm()]


def default_layer(name: str, input_size: int) -> str:
    """The layer an audit of architecture ``name`` at ``input_size`` px looks at first."""
    model = build(name, 2)
    return family_of(model).default_layer(model, input_size)
