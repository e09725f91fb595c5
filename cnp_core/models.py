"""Models, loaded safely: the model a spec's ``ModelRef`` names, with its weights.

A torchvision architecture named in :mod:`cnp_core.architectures` (built with
``weights=None``, never downloaded), cnp's ``mlp`` shaped by ``layer_sizes``, or an
importable factory ``package.module:function``,
plus a weights file: ``.safetensors``, or a state_dict read with
``torch.load(weights_only=True)`` and no fallback, so a pickle that would run code is
refused (:class:`UnsafeFile`), never executed.

Error messages are shown to users: they name paths as the user gave them, never the
server's absolute paths.
"""

import difflib
import importlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import architectures
from .errors import LayerError, ModelError, UnsafeFile, WeightsMismatch
from .paths import PathLike, listing, resolve_inside
from .shapes import ARCHITECTURE_FILE, WEIGHTS_FILE, rebuild
from .spec import FACTORY_PATTERN, ModelRef

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict")
# Largest weights file, and largest total a .pt archive may expand to: VGG-16 is 0.55 GB,
# the largest torchvision classifiers about 2.5 GB.
MAX_WEIGHTS_BYTES = 4 << 30
# torch.save stores its archive members uncompressed: a member that expands more than
# this is not a torch.save file but a decompression bomb.
MAX_EXPANSION = 4

# ---------------------------------------------------------------------------- models


def build_model(ref: ModelRef) -> nn.Module:
    """The model a reference names, with freshly initialised weights (nothing downloaded)."""
    if bool(ref.architecture) == bool(ref.factory):
        raise ModelError("model: give exactly one of an architecture name or a factory")
    if ref.architecture:
        return architectures.build(ref.architecture, ref.num_classes, ref.layer_sizes)
    return _call_factory(ref.factory, ref.num_classes)


def _call_factory(spec: str, num_classes: int) -> nn.Module:
    """Import ``package.module`` and call ``function(num_classes=N)``."""
    match = FACTORY_PATTERN.match(spec.strip())
    if not match:
        raise ModelError(
            f"factory {spec!r} is not of the form 'package.module:function' "
            "(e.g. 'torchvision.models:resnet18')"
        )
    module_name, attr = match["module"], match["attr"]
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(
            f"factory {spec!r}: cannot import module {module_name!r} ({err}); "
            "the package must be installed on the server"
        ) from None
    except (Exception, SystemExit) as err:  # the module's own top-level code failed
        raise ModelError(
            f"factory {spec!r}: importing {module_name!r} raised {type(err).__name__}: {err}"
        ) from None
    owner = module_name
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelError(f"factory {spec!r}: {owner!r} has no attribute {part!r}{hint}")
        target = getattr(target, part)
        owner = f"{owner}.{part}"
    if not callable(target):
        raise ModelError(f"factory {spec!r}: {attr!r} is a {type(target).__name__}, not a callable")
    try:
        model = target(num_classes=num_classes)
    except TypeError as err:
        raise ModelError(
            f"factory {spec!r} cannot be called as {attr}(num_classes={num_classes}): {err}"
        ) from None
    except (Exception, SystemExit) as err:
        raise ModelError(f"factory {spec!r} raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def check_weights_file(path: Path, shown: str, max_bytes: int = MAX_WEIGHTS_BYTES) -> None:
    """The cheap checks of a weights file, reading its header only (no tensor is loaded):
    type, size at most ``max_bytes``, a valid safetensors header, or a .pt archive whose
    members expand neither beyond ``max_bytes`` in all nor ``MAX_EXPANSION`` times each.

    ``shown`` is how messages name the file (the path as the user gave it).
    """
    if not path.exists():
        raise ModelError(f"weights file {shown!r} does not exist")
    if not path.is_file():
        raise ModelError(f"weights {shown!r} is not a regular file")
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ModelError(
            f"weights {shown!r}: unsupported file type {suffix or '(none)'!r}; use "
            f".safetensors or a state_dict saved with torch.save ({', '.join(PICKLE_SUFFIXES)})"
        )
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"weights file {shown!r} is empty")
    if size > max_bytes:
        raise ModelError(f"weights {shown!r} is {_gib(size)}, over this server's {_gib(max_bytes)}")
    if suffix in SAFETENSORS_SUFFIXES:
        try:  # parses and bounds-checks the header; the tensors stay on disk
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(f"weights {shown!r} is not a valid safetensors file: {err}") from None
    elif zipfile.is_zipfile(path):  # torch.save's format (older ones are plain pickles)
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise ModelError(f"weights {shown!r} is a corrupt archive: {err}") from None
        expanded = sum(m.file_size for m in members)
        if expanded > max_bytes or any(
            m.file_size > MAX_EXPANSION * max(m.compress_size, 1 << 20) for m in members
        ):
            raise ModelError(
                f"weights {shown!r} expands to {_gib(expanded)}: a compressed archive that "
                "torch.save does not write (a decompression bomb?); save a plain state_dict"
            )


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


def read_state_dict(
    path: Path, shown: str, max_bytes: int = MAX_WEIGHTS_BYTES
) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, checked first (:func:`check_weights_file`), without
    running any code stored in it.

    ``shown`` is how messages name the file (the path as the user gave it).
    """
    check_weights_file(path, shown, max_bytes)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            loaded: object = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(f"weights {shown!r} is not a valid safetensors file: {err}") from None
    else:
        loaded = _torch_load(path, shown)
    return _unwrap(loaded, shown)


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)")


def _torch_load(path: Path, shown: str) -> object:
    """``torch.load(weights_only=True)``; what it refuses is refused, never retried unsafely."""
    advice = (
        "cnp loads .pt/.pth/.bin only with torch.load(weights_only=True) and never runs "
        "pickled code: save a plain state_dict (torch.save(model.state_dict(), path)) or a "
        ".safetensors file"
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" not in text:
            raise ModelError(f"weights {shown!r} is corrupt or not a state_dict: {text}") from None
        needs = _UNSUPPORTED_GLOBAL.search(text)
        if needs:
            reason = f"it would call {needs[1]} to load"
        else:
            detail = _UNPICKLER_ERROR.search(text)
            reason = f"the safe unpickler refused it ({detail[1] if detail else 'unsupported'})"
        raise UnsafeFile(f"weights {shown!r} cannot be loaded safely: {reason}. {advice}") from None
    except RuntimeError as err:
        if "TorchScript" in str(err):
            raise ModelError(
                f"weights {shown!r} is a TorchScript archive, which this server does not "
                "accept; save the model's state_dict instead"
            ) from None
        raise ModelError(f"weights {shown!r} is corrupt or not a torch.save file: {err}") from None
    except (EOFError, KeyError, ValueError, OSError) as err:
        raise ModelError(
            f"weights {shown!r} is corrupt or not a torch.save file ({type(err).__name__}: {err})"
        ) from None


def _unwrap(loaded: object, shown: str) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a state_dict or a ``{"state_dict": ...}`` checkpoint,
    without the ``module.`` prefix that DataParallel adds."""
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_WRAPPERS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise ModelError(
            f"weights {shown!r} holds a {type(loaded).__name__}, not a state_dict "
            "(a mapping from parameter names to tensors)"
        )
    if not loaded:
        raise ModelError(f"weights {shown!r} holds no tensors")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelError(
                f"weights {shown!r} is not a state_dict: entry {key!r} is a "
                f"{type(value).__name__}, not a tensor; save model.state_dict() or wrap it as "
                f"{{{', '.join(repr(k) for k in STATE_DICT_WRAPPERS)}: ...}}"
            )
    state = dict(loaded)
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], described: str) -> None:
    """Copy ``state`` into ``model``, or raise :class:`WeightsMismatch` saying what differs.

    A missing BatchNorm ``num_batches_tracked`` counter is tolerated: it does not affect
    evaluation, and older checkpoints lack it.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)} vs got {tuple(v.shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (
            ("missing key", missing),
            ("unexpected key", unexpected),
            ("shape mismatch", shapes),
        ):
            if items:
                plural = "es" if label.endswith("h") else "s"
                name = label if len(items) == 1 else label + plural
                parts.append(f"{len(items)} {name}: {listing(items)}")
        raise WeightsMismatch(
            f"{described} do not fit the model: {'; '.join(parts)}. "
            "Check the architecture and num_classes."
        )
    model.load_state_dict(state, strict=False)


def load_model(ref: ModelRef, *, allowed_roots: Sequence[PathLike] | None = None) -> nn.Module:
    """The referenced model with its weights, in eval mode on the CPU.

    Without a weights file the model keeps the initialisation of its architecture or factory.
    """
    model = build_model(ref)
    if ref.weights:
        path = resolve_inside(ref.weights, allowed_roots, "weights", ModelError)
        model = _compact_shapes(model, path, ref)
        state = read_state_dict(path, ref.weights)
        name = ref.architecture or ref.factory
        load_weights(
            model, state, f"weights {ref.weights!r} for {name} (num_classes={ref.num_classes})"
        )
    return model.to("cpu").eval()


def _compact_shapes(model: nn.Module, weights: Path, ref: ModelRef) -> nn.Module:
    """A compact (pruned) model cnp exported has its layer shapes in ``architecture.json``
    beside its ``model.safetensors``: the model is rebuilt with those shapes (plain JSON,
    only known layer types), so its weights fit."""
    described = weights.parent / ARCHITECTURE_FILE
    if weights.name != WEIGHTS_FILE or not described.is_file():
        return model
    try:
        description = json.loads(described.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"the architecture.json beside {ref.weights!r} is unreadable") from err
    if not isinstance(description, dict):
        raise ModelError(f"the architecture.json beside {ref.weights!r} is not a description")
    named = description.get("architecture", "")
    if ref.architecture and named and named != ref.architecture:
        raise ModelError(
            f"weights {ref.weights!r} are a compact {named} model, not {ref.architecture}"
        )
    try:
        return rebuild(description, base=model)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelError(
            f"the architecture.json beside {ref.weights!r} does not describe this model"
        ) from err


def save_weights(model: nn.Module, path: PathLike) -> Path:
    """Write ``model.state_dict()`` as safetensors, atomically.

    Every tensor is copied to its own contiguous CPU storage: safetensors refuses shared or
    strided storage, and :func:`load_model` expects every state_dict key in the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in model.state_dict().items()
    }
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, path)
    return path


def layer_names(model: nn.Module) -> list[str]:
    """Names of every submodule, as ``named_modules`` gives them (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a :class:`LayerError` lists the valid names if none."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = layer_names(model)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise LayerError(f"the model has no layer {name!r}.{hint} Layers: {listing(names, 20)}")
