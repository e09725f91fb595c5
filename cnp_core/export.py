"""Saving a pruned (compact) model so that it loads without cnp.

Three files, written side by side:

- ``model.pt2``: a ``torch.export`` program; ``torch.export.load(path).module()`` runs it
  with nothing but torch installed.
- ``model.onnx``: the same graph for ONNX runtimes (legacy TorchScript exporter; the
  dynamo exporter would need ``onnxscript``, which is not installed).
- ``model.safetensors`` + ``architecture.json``: the weights, and the base architecture
  with every layer's shape (channel counts after pruning), from which
  :func:`load_compact` rebuilds an ordinary ``nn.Module`` to fine-tune or audit again.

The compact model cnp ships is made ready for inference by :func:`for_inference` (same
function, to float rounding): every BatchNorm that directly follows a convolution is folded
into it, and the 4-d weights are stored channels-last, which lets oneDNN pick its fast
NHWC kernels for the uneven channel counts pruning leaves behind.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import ModelError
from .models import save_weights
from .shapes import ARCHITECTURE_FILE, WEIGHTS_FILE, describe, rebuild

if TYPE_CHECKING:
    from .pruning.schedule import PruneOutcome
    from .spec import AuditSpec

PROGRAM_FILE = "model.pt2"
ONNX_FILE = "model.onnx"


# ------------------------------------------------------------------ inference form


def _conv_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names where the BatchNorm reads only that conv's output and
    the conv feeds nothing else, each module called once: the pairs that fold exactly.
    Found on the torch.fx graph; a model fx cannot trace has none."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - fx refuses dynamic control flow: fold nothing
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and type(modules[source.target]) is nn.Conv2d
            and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
            and modules[node.target].running_mean is not None
        ):
            pairs.append((source.target, node.target))
    return pairs


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm that directly follows a convolution into it, in place, from the
    running statistics (so in eval mode only): with s = gamma / sqrt(var + eps),
    W'[o] = s[o] W[o] and b'[o] = s[o] (b[o] - mean[o]) + beta[o]; the BatchNorm becomes
    ``nn.Identity``. Returns how many were folded."""
    if model.training:
        raise ModelError("fold BatchNorm only in eval mode (it uses the running statistics)")
    pairs = _conv_batchnorm_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _replace(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace(model, bn_name, nn.Identity())
    return len(pairs)


def for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy computing the same function, faster: BatchNorms folded into their
    convolutions (:func:`fold_batchnorm`) and 4-d weights in channels-last memory format
    (outputs of such convolutions come out channels-last too, so the layout carries through)."""
    fast = copy.deepcopy(model).eval()
    with torch.no_grad():
        fold_batchnorm(fast)
    return fast.to(memory_format=torch.channels_last)


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
        try:
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
        except Exception as err:  # noqa: BLE001 - the exporter's errors have no common type
            # An operator ONNX cannot express (e.g. VGG's 7x7 adaptive pool on a 2x2 map
            # at 64 px) costs this one file, not the pruned model in the other formats.
            (directory / ONNX_FILE).unlink(missing_ok=True)
            reason = str(err).strip().split("\n")[0][:200] or type(err).__name__
            warnings.warn(f"no ONNX file for this model: {reason}", stacklevel=2)
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


def save_pruned(outcome: PruneOutcome, directory: str | Path, spec: AuditSpec) -> dict[str, str]:
    """Both pruned models under ``directory``: the masked state_dict and the compact model
    in every format. Returns artifact name -> path; the names say what and which format,
    and the client picks a model by them."""
    directory = Path(directory)
    masked = save_weights(outcome.masked, directory / "masked.safetensors")
    paths = save_compact(
        outcome.compact,
        directory / "compact",
        outcome.example_input,
        architecture=spec.model.architecture,
        num_classes=spec.model.num_classes,
        method=spec.prune.method,
        rate=spec.prune.rate,
    )
    artifacts = {"model_masked.safetensors": str(masked)}
    for name, path in paths.items():
        suffix = "architecture.json" if name == "architecture" else name
        artifacts[f"model_compact.{suffix}"] = str(path)
    return artifacts
