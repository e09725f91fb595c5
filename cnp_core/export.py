"""Saving a pruned (compact) model so that it loads without cnp.

Three files, written side by side:

- ``model.pt2``: a ``torch.export`` program; ``torch.export.load(path).module()`` runs it
  with nothing but torch installed.
- ``model.onnx``: the same graph for ONNX runtimes (legacy TorchScript exporter; the
  dynamo exporter would need ``onnxscript``, which is not installed).
- ``model.safetensors`` + ``architecture.json``: the weights, and the base architecture
  with every layer's shape (channel counts after pruning), from which
  :func:`load_compact` rebuilds an ordinary ``nn.Module`` to fine-tune or audit again.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ModelError

FORMAT_VERSION = 1
ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"
PROGRAM_FILE = "model.pt2"
ONNX_FILE = "model.onnx"


_DESCRIBED = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Linear)


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
    return None


def describe(
    model: nn.Module, *, architecture: str = "", num_classes: int = 0, **extra
) -> dict[str, Any]:
    """The architecture description: the base (torchvision name) and every conv, BatchNorm
    and linear layer's shape, so a pruned model can be rebuilt from its base."""
    layers = {}
    for name, module in model.named_modules():
        if type(module) in _DESCRIBED:
            layers[name] = _describe_module(module)
        elif isinstance(module, nn.Conv2d | _BatchNorm | nn.Linear):
            raise ModelError(f"cannot describe layer {name!r} of type {type(module).__name__}")
    channels = {name: d["out_channels"] for name, d in layers.items() if d["type"] == "Conv2d"}
    return {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "num_classes": num_classes,
        "channels": channels,
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
    raise ModelError(f"unknown layer type {kind!r} in the architecture description")


def rebuild(description: dict[str, Any], base: nn.Module | None = None) -> nn.Module:
    """The base model (``base``, or the torchvision architecture named in the description)
    with every described layer replaced by one of the described shape. Weights are not
    loaded (see :func:`load_compact`)."""
    if description.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"unsupported architecture description version {description.get('format_version')}"
        )
    if base is None:
        name = description.get("architecture", "")
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ModelError(f"unknown torchvision architecture {name!r}: pass the base model")
        base = torchvision.models.get_model(
            name, weights=None, num_classes=description["num_classes"]
        )
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    for name, spec in description["layers"].items():
        if name not in modules:
            raise ModelError(f"layer {name!r} of the description is not in the base model")
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent], attr, _build_module(spec))
    return model.eval()


def save_compact(
    model: nn.Module,
    directory: str | Path,
    example_input: torch.Tensor,
    *,
    architecture: str = "",
    num_classes: int = 0,
    formats: tuple[str, ...] = ("safetensors", "pt2", "onnx"),
    **extra,
) -> dict[str, Path]:
    """Write the model in ``formats`` under ``directory``; returns format -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    x = example_input[:1].cpu()
    paths: dict[str, Path] = {}
    if "safetensors" in formats:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        description = describe(
            model,
            architecture=architecture,
            num_classes=num_classes,
            input_shape=list(x.shape),
            **extra,
        )
        (directory / ARCHITECTURE_FILE).write_text(json.dumps(description, indent=2))
        paths["safetensors"] = directory / WEIGHTS_FILE
        paths["architecture"] = directory / ARCHITECTURE_FILE
    if "pt2" in formats:
        # Batch size stays dynamic; traced with 2 rows since torch specialises sizes 0 and 1.
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(
            model, (x.expand(2, *x.shape[1:]).clone(),), dynamic_shapes=({0: batch},)
        )
        torch.export.save(program, directory / PROGRAM_FILE)
        paths["pt2"] = directory / PROGRAM_FILE
    if "onnx" in formats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (x,),
                str(directory / ONNX_FILE),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        paths["onnx"] = directory / ONNX_FILE
    unknown = set(formats) - {"safetensors", "pt2", "onnx"}
    if unknown:
        raise ModelError(f"unknown export formats {sorted(unknown)}")
    return paths


def load_compact(directory: str | Path, base: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved compact model from ``architecture.json`` and ``model.safetensors``
    (a plain ``nn.Module`` in eval mode); ``base`` for models not from torchvision."""
    directory = Path(directory)
    description = json.loads((directory / ARCHITECTURE_FILE).read_text())
    model = rebuild(description, base)
    try:
        model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=True)
    except RuntimeError as err:
        raise ModelError(
            f"the saved weights do not fit the described architecture: {err}"
        ) from None
    return model.eval()
