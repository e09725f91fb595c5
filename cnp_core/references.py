"""Model and dataset references, loaded safely.

Models: a torchvision architecture from :data:`ARCHITECTURES` (built with ``weights=None``,
never downloaded) or an importable factory ``package.module:function``, plus a weights
file: ``.safetensors``, or a state_dict read with ``torch.load(weights_only=True)`` and no
fallback, so a pickle that would run code is refused (:class:`UnsafeFile`), never executed.

Datasets: a directory with ``labels.csv`` (columns ``path, label, split``, then one column
per attribute) and the images it names. Every path is canonicalised (symlinks resolved)
and must stay inside the dataset root, and the root inside the allowed roots. Images are
decoded by PIL under a per-image pixel cap (decompression bombs become
:class:`DatasetError`).

Error messages are shown to users: they name paths as the user gave them (weights,
dataset root) or relative to the dataset root (images), never the server's absolute paths.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import importlib
import io
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import CnpError, DatasetError, LayerError, ModelError, UnsafeFile, WeightsMismatch
from .spec import DatasetRef, ModelRef

# Small enough to build in seconds on CPU, standard enough for LRP canonizers.
ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
)
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict")
REQUIRED_COLUMNS = ("path", "label", "split")
SPLITS = ("train", "val", "test")
TRUE_VALUES = frozenset({"1", "true", "yes"})
FALSE_VALUES = frozenset({"0", "false", "no"})
LISTED = 8  # names shown in an error message before "... and N more"
_CHUNK = 1 << 20

PathLike = str | Path


def _listing(items: Sequence[str], limit: int = LISTED) -> str:
    """'a, b, c' or 'a, b, c, ... and 12 more': long lists stay readable."""
    shown = ", ".join(items[:limit])
    return f"{shown}, ... and {len(items) - limit} more" if len(items) > limit else shown


def _resolve(
    given: str,
    allowed_roots: Sequence[PathLike] | None,
    what: str,
    error: type[CnpError],
) -> Path:
    """Canonical path of a user-given file or directory.

    A relative path is looked up under each allowed root (first existing one wins), else
    against the working directory. With ``allowed_roots``, the resolved path (symlinks
    followed) must lie inside one of them; this is checked before existence so that
    nothing is revealed about files elsewhere.
    """
    path = Path(given)
    roots = None if allowed_roots is None else [Path(r).resolve() for r in allowed_roots]
    if roots and not path.is_absolute():
        candidates = [root / path for root in roots]
        path = next((c for c in candidates if c.exists()), candidates[0])
    resolved = path.resolve()
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        raise error(
            f"{what} {given!r} lies outside the allowed roots (symlinks resolved): "
            "place it under one of the server's configured data roots"
        )
    return resolved


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files can be gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ---------------------------------------------------------------------------- models


def build_model(ref: ModelRef) -> nn.Module:
    """The model a reference names, with freshly initialised weights (nothing downloaded)."""
    if bool(ref.architecture) == bool(ref.factory):
        raise ModelError("model: give exactly one of an architecture name or a factory")
    if ref.architecture:
        if ref.architecture not in ARCHITECTURES:
            close = difflib.get_close_matches(ref.architecture, ARCHITECTURES, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ModelError(
                f"unknown architecture {ref.architecture!r}{hint}; "
                f"allowed: {', '.join(ARCHITECTURES)}"
            )
        return torchvision.models.get_model(
            ref.architecture, weights=None, num_classes=ref.num_classes
        )
    return _call_factory(ref.factory, ref.num_classes)


_FACTORY = re.compile(r"^(?P<module>\w+(?:\.\w+)*):(?P<attr>\w+(?:\.\w+)*)$")


def _call_factory(spec: str, num_classes: int) -> nn.Module:
    """Import ``package.module`` and call ``function(num_classes=N)``."""
    match = _FACTORY.match(spec.strip())
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
    except Exception as err:  # the module's own top-level code failed
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
    except Exception as err:
        raise ModelError(f"factory {spec!r} raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def read_state_dict(path: Path, shown: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, without running any code stored in it.

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
    if path.stat().st_size == 0:
        raise ModelError(f"weights file {shown!r} is empty")
    if suffix in SAFETENSORS_SUFFIXES:
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
                parts.append(f"{len(items)} {name}: {_listing(items)}")
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
        path = _resolve(ref.weights, allowed_roots, "weights", ModelError)
        state = read_state_dict(path, ref.weights)
        name = ref.architecture or ref.factory
        load_weights(
            model, state, f"weights {ref.weights!r} for {name} (num_classes={ref.num_classes})"
        )
    return model.to("cpu").eval()


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
    raise LayerError(f"the model has no layer {name!r}.{hint} Layers: {_listing(names, 20)}")


# -------------------------------------------------------------------------- datasets


@dataclass
class ImageTable:
    """The rows of a dataset's labels.csv, validated. Row ``i`` is image ``paths[i]``."""

    root: Path  # canonical dataset root (internal: never shown in messages)
    paths: np.ndarray  # str, relative to root, as written in labels.csv
    labels: np.ndarray  # int64 class indices
    splits: np.ndarray  # str: "train" | "val" | "test"
    attributes: dict[str, np.ndarray]  # requested attribute -> str values as written
    digest: str  # sha256 over labels.csv and every image's bytes
    max_pixels: int = DatasetRef.max_pixels  # decompression-bomb cap per image

    def __len__(self) -> int:
        return len(self.paths)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split, ascending."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        return np.flatnonzero(self.splits == split)

    def has_split(self, name: str) -> bool:
        return bool(np.any(self.splits == name))

    def _column(self, attribute: str) -> np.ndarray:
        if attribute not in self.attributes:
            raise DatasetError(
                f"attribute {attribute!r} was not loaded; loaded: {', '.join(self.attributes)}"
            )
        return self.attributes[attribute]

    def values(self, attribute: str) -> list[str]:
        """Distinct values of an attribute, sorted."""
        return [str(v) for v in np.unique(self._column(attribute))]

    def is_binary(self, attribute: str) -> bool:
        """True when the values are one 'present' spelling (1/true/yes) and one 'absent'
        spelling (0/false/no), case-insensitive."""
        lowered = {v.strip().lower() for v in self.values(attribute)}
        return (
            len(lowered & TRUE_VALUES) == 1
            and len(lowered & FALSE_VALUES) == 1
            and len(lowered) == 2
        )

    def is_present(self, attribute: str) -> np.ndarray:
        """Boolean mask of rows where a binary attribute is present."""
        if not self.is_binary(attribute):
            raise DatasetError(
                f"attribute {attribute!r} is not binary (values: "
                f"{_listing(self.values(attribute))}); binary means one of 1/true/yes and "
                "one of 0/false/no"
            )
        lowered = np.char.lower(np.char.strip(self._column(attribute).astype(str)))
        return np.isin(lowered, list(TRUE_VALUES))


def load_dataset(
    ref: DatasetRef,
    attributes: list[str],
    *,
    allowed_roots: Sequence[PathLike] | None = None,
) -> ImageTable:
    """Read and check ``<root>/labels.csv`` and the images it lists; hash them all."""
    if not ref.root:
        raise DatasetError("dataset.root is required")
    root = _resolve(ref.root, allowed_roots, "dataset root", DatasetError)
    if not root.exists():
        raise DatasetError(f"dataset root {ref.root!r} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {ref.root!r} is not a directory")
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        raise DatasetError(
            f"dataset root {ref.root!r} has no labels.csv (columns: path, label, split, "
            "then one column per attribute)"
        )
    if not csv_path.resolve().is_relative_to(root):
        raise DatasetError("labels.csv is a symlink that leads outside the dataset root")
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"labels.csv is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    rows = _parse_csv(text, attributes)
    paths = [r[0] for r in rows]
    _check_paths(root, paths, [r[3] for r in rows])
    table = ImageTable(
        root=root,
        paths=np.array(paths, dtype=str),
        labels=np.array([r[1] for r in rows], dtype=np.int64),
        splits=np.array([r[2] for r in rows], dtype=str),
        attributes={
            name: np.array([r[4][i] for r in rows], dtype=str) for i, name in enumerate(attributes)
        },
        digest=_digest(raw, root, paths),
        max_pixels=ref.max_pixels,
    )
    for name in attributes:
        distinct = table.values(name)
        if len(distinct) < 2:
            raise DatasetError(
                f"attribute {name!r} has only the value {distinct[0]!r}: nothing to audit"
            )
    return table


# One parsed row: path, label, split, line number, requested attribute values.
_Row = tuple[str, int, str, int, list[str]]


def _parse_csv(text: str, attributes: list[str]) -> list[_Row]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise DatasetError(
                "labels.csv is empty: it needs a header path,label,split,<attributes...> "
                "and one row per image"
            )
        columns = [cell.strip() for cell in header]
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise DatasetError(f"labels.csv repeats the column(s) {', '.join(duplicated)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DatasetError(
                f"labels.csv lacks the required column(s) {', '.join(missing)}; "
                f"found: {', '.join(columns)} (required: {', '.join(REQUIRED_COLUMNS)})"
            )
        available = [c for c in columns if c not in REQUIRED_COLUMNS]
        unknown = [a for a in attributes if a not in available]
        if unknown:
            listed = ", ".join(available) if available else "none"
            raise DatasetError(
                f"attribute(s) {', '.join(map(repr, unknown))} not in labels.csv; "
                f"attribute columns: {listed}"
            )
        at = {name: columns.index(name) for name in (*REQUIRED_COLUMNS, *attributes)}
        rows: list[_Row] = []
        seen: dict[str, int] = {}
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(columns):
                raise DatasetError(
                    f"labels.csv line {line}: {len(cells)} fields, but the header has "
                    f"{len(columns)}"
                )
            path = cells[at["path"]].strip()
            if path in seen:
                raise DatasetError(
                    f"labels.csv line {line}: image {path!r} is already listed on line {seen[path]}"
                )
            seen[path] = line
            rows.append(
                (
                    path,
                    _label(cells[at["label"]], line),
                    _split(cells[at["split"]], line),
                    line,
                    [cells[at[name]].strip() for name in attributes],
                )
            )
    except csv.Error as err:
        raise DatasetError(f"labels.csv line {reader.line_num}: {err}") from None
    if not rows:
        raise DatasetError("labels.csv has a header but no rows")
    return rows


def _label(cell: str, line: int) -> int:
    text = cell.strip()
    if not re.fullmatch(r"\d+", text):
        raise DatasetError(
            f"labels.csv line {line}: label {text!r} is not a class index (an integer >= 0)"
        )
    return int(text)


def _split(cell: str, line: int) -> str:
    split = cell.strip().lower()
    if split not in SPLITS:
        raise DatasetError(
            f"labels.csv line {line}: split {cell.strip()!r} must be one of {', '.join(SPLITS)}"
        )
    return split


def _check_paths(root: Path, paths: Sequence[str], lines: Sequence[int]) -> None:
    """Every image path is relative, stays inside the root once symlinks are resolved,
    and names an existing file."""
    for path, line in zip(paths, lines, strict=True):
        where = f"labels.csv line {line}: image path {path!r}"
        if not path:
            raise DatasetError(f"labels.csv line {line}: empty image path")
        if PurePosixPath(path).is_absolute() or PureWindowsPath(path).anchor:
            raise DatasetError(f"{where} is absolute; give it relative to the dataset root")
        if ".." in PurePosixPath(path.replace("\\", "/")).parts:
            raise DatasetError(f"{where} uses '..' to leave the dataset root")
        full = (root / path).resolve()
        if not full.is_relative_to(root):
            raise DatasetError(f"{where} resolves outside the dataset root (a symlink?)")
        if not full.is_file():
            raise DatasetError(f"{where}: no such image file")


def _digest(csv_bytes: bytes, root: Path, paths: Iterable[str]) -> str:
    """sha256 of labels.csv and of every image's (path, content sha256), in sorted order.

    Files are hashed on a few threads: hashlib releases the GIL, so reading and hashing
    overlap across files.
    """
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda p: file_sha256(root / p), unique))
    total = hashlib.sha256(b"labels.csv\0")
    total.update(hashlib.sha256(csv_bytes).digest())
    for path, digest in zip(unique, hashes, strict=True):
        total.update(f"{path}\0{digest}\n".encode())
    return total.hexdigest()


# ---------------------------------------------------------------------------- images


def _scrub(message: str, path: Path, rel: str) -> str:
    """A library message with the absolute path replaced by the relative one."""
    return message.replace(str(path), rel)


def open_image(root: Path, rel: str, max_pixels: int) -> Image.Image:
    """Open (header only) an image under ``root``, refusing more than ``max_pixels`` pixels.

    PIL's own decompression-bomb warning and error become :class:`DatasetError` too, so
    the effective cap is min(max_pixels, PIL.Image.MAX_IMAGE_PIXELS).
    """
    path = root / rel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"image {rel!r} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DatasetError(
            f"image {rel!r} is too large (possible decompression bomb): over PIL's limit of "
            f"{Image.MAX_IMAGE_PIXELS} pixels"
        ) from None
    except UnidentifiedImageError:
        raise DatasetError(f"image {rel!r} is not an image file PIL can read") from None
    except Exception as err:  # PIL's format plugins raise many types on bad headers
        raise DatasetError(
            f"image {rel!r} has a corrupt header: {_scrub(str(err), path, rel)}"
        ) from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        image.close()
        raise DatasetError(
            f"image {rel!r} declares {image.width}x{image.height} = {pixels} pixels, over "
            f"dataset.max_pixels = {max_pixels}: refused as a possible decompression bomb"
        )
    return image


def read_image(root: Path, rel: str, max_pixels: int) -> Image.Image:
    """Decode an image fully, as RGB (grayscale, palette and alpha images converted)."""
    image = open_image(root, rel, max_pixels)
    try:
        with image:
            image.load()
            return image.convert("RGB")
    except Exception as err:  # truncated data, bad chunks, decoder errors
        raise DatasetError(
            f"image {rel!r} is corrupt or truncated: {_scrub(str(err), root / rel, rel)}"
        ) from None


def validate_images(table: ImageTable, indices: Sequence[int] | np.ndarray | None = None) -> int:
    """Check the headers of images fast (open, pixel cap, ``verify()``) without decoding.

    Raises one :class:`DatasetError` listing the unusable images; returns how many were
    checked.
    """
    chosen = np.arange(len(table)) if indices is None else np.unique(np.asarray(indices))
    problems: list[str] = []
    for index in chosen:
        rel = str(table.paths[index])
        try:
            with open_image(table.root, rel, table.max_pixels) as image:
                image.verify()
        except DatasetError as err:
            problems.append(str(err))
        except Exception as err:
            detail = _scrub(str(err), table.root / rel, rel) or type(err).__name__
            problems.append(f"image {rel!r} is corrupt: {detail}")
    if problems:
        raise DatasetError(
            f"{len(problems)} of {len(chosen)} images are unusable: {_listing(problems, 5)}"
        )
    return len(chosen)


class ImageDataset(Dataset):
    """Rows ``indices`` of a table as ``(C x H x W float tensor, row index)`` pairs.

    Each image is decoded as RGB, resized to ``input_size x input_size`` (bilinear, with
    PIL's antialiasing) and normalised: x = (pixel / 255 - mean) / std per channel.
    """

    def __init__(self, table: ImageTable, indices: Sequence[int] | np.ndarray, ref: DatasetRef):
        self.table = table
        self.indices = np.asarray(indices, dtype=np.int64)
        self.ref = ref
        self._mean = torch.tensor(ref.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(ref.std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[n])
        image = read_image(self.table.root, str(self.table.paths[index]), self.ref.max_pixels)
        size = self.ref.input_size
        pixels = np.array(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self._mean) / self._std, index


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose shuffling order is fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
    )
