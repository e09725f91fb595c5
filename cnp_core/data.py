"""Datasets, loaded safely: the directory a spec's ``DatasetRef`` names.

A directory with ``labels.csv`` (columns ``path, label, split``, then one column per
attribute) and the images it names. Every path is canonicalised (symlinks resolved) and
must stay inside the dataset root, and the root inside the allowed roots. Images are
decoded by PIL under a per-image pixel cap (decompression bombs become
:class:`DatasetError`). A *split* is the ``split`` column's value: train, val or test.

A label is a class index or a class name. Names need the model's class names in output
order, from ``model.classes`` or from a ``classes.txt`` beside labels.csv (one name per
line). The order is never guessed: a model trained on a torchvision ImageFolder has the
sorted folder names, which must be written out.

Error messages name paths as the user gave them (dataset root) or relative to the dataset
root (images), never the server's absolute paths.
"""

import csv
import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import DatasetError
from .paths import PathLike, file_sha256, listing, resolve_inside
from .spec import MAX_CLASSES, MAX_NAME, DatasetRef, check_class_names

REQUIRED_COLUMNS = ("path", "label", "split")
SPLITS = ("train", "val", "test")
TRUE_VALUES = frozenset({"1", "true", "yes"})
FALSE_VALUES = frozenset({"0", "false", "no"})
CLASSES_FILE = "classes.txt"
MAX_CLASSES_BYTES = MAX_CLASSES * (MAX_NAME + 2)  # every name at its longest, with CRLF
# labels.csv is read whole into memory: 1 GiB holds millions of rows of a wide table.
MAX_LABELS_BYTES = 1 << 30

# -------------------------------------------------------------------------- datasets


@dataclass
class ImageTable:
    """The rows of a dataset's labels.csv, validated. Row ``i`` is image ``paths[i]``."""

    root: Path  # canonical dataset root (internal: never shown in messages)
    paths: np.ndarray  # str, relative to root, as written in labels.csv
    labels: np.ndarray  # int64 class indices
    splits: np.ndarray  # str: "train" | "val" | "test"
    attributes: dict[str, np.ndarray]  # requested attribute -> str values as written
    digest: str  # sha256 over labels.csv, classes.txt if any, and every image's bytes
    max_pixels: int = DatasetRef.max_pixels  # decompression-bomb cap per image
    class_names: list[str] = field(default_factory=list)  # output order; empty: none given

    def __len__(self) -> int:
        return len(self.paths)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split, ascending."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        return np.flatnonzero(self.splits == split)

    def has_split(self, name: str) -> bool:
        return bool(np.any(self.splits == name))

    def samples(self, indices: Sequence[int] | np.ndarray, ref: DatasetRef) -> Dataset:
        """Rows ``indices`` as (model input, row index) pairs: decoded images here, rows of
        features in a table (:class:`cnp_core.tables.FeatureTable`)."""
        return ImageDataset(self, indices, ref)

    def labelled(self, indices: Sequence[int] | np.ndarray, ref: DatasetRef) -> Dataset:
        """Rows ``indices`` as (model input, class label) pairs, for training."""
        return Labelled(self.samples(indices, ref))

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
                f"{listing(self.values(attribute))}); binary means one of 1/true/yes and "
                "one of 0/false/no"
            )
        lowered = np.char.lower(np.char.strip(self._column(attribute).astype(str)))
        return np.isin(lowered, list(TRUE_VALUES))

    def audited_values(self, attribute: str) -> list[tuple[str, np.ndarray]]:
        """(value, rows that have it) per audited value: the present value of a binary
        attribute, or every value (one-vs-rest) of a multi-valued one."""
        if self.is_binary(attribute):
            present = self.is_present(attribute)
            shown = str(self.attributes[attribute][present][0]) if present.any() else "1"
            return [(shown, present)]
        column = self._column(attribute)
        return [(str(v), column == v) for v in self.values(attribute)]


@dataclass
class SplitRows:
    """The table rows of each split an audit uses.

    ``train``: subspaces are fitted and pruned models fine-tuned on it; ``val``: K and the
    flagged subspace are chosen on it (held out of train when the dataset has no val
    split); ``test``: every reported number.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_rows(table: ImageTable, seed: int, holdout: float = 0.3) -> SplitRows:
    """The splits of ``table``; without a val split, ``holdout`` of train (seeded) is val."""
    if not table.has_split("test"):
        raise DatasetError("labels.csv has no rows with split 'test': the audit reports on them")
    if not table.has_split("train"):
        raise DatasetError("labels.csv has no rows with split 'train': subspaces are fit on them")
    train = table.indices("train")
    if table.has_split("val"):
        return SplitRows(train=train, val=table.indices("val"), test=table.indices("test"))
    shuffled = np.random.default_rng(seed).permutation(train)
    cut = int(round(holdout * len(train)))
    return SplitRows(
        train=np.sort(shuffled[cut:]), val=np.sort(shuffled[:cut]), test=table.indices("test")
    )


def load_dataset(
    ref: DatasetRef,
    attributes: list[str],
    *,
    classes: Sequence[str] = (),
    allowed_roots: Sequence[PathLike] | None = None,
    digest: bool = True,
) -> ImageTable:
    """Read and check ``<root>/labels.csv`` and the image paths it lists; with ``digest``,
    hash every image (without, the table's digest is empty and no image is read). A
    table dataset (``ref.format == "table"``) is read by :func:`cnp_core.tables.load_table`.

    ``classes``: the model's class names (``model.classes``); a ``classes.txt`` beside
    labels.csv must then name the same. Labels given by name become their indices.
    """
    if ref.is_table:
        raise DatasetError(
            "a table dataset is read by cnp_core.tables.load_table", field="dataset.format"
        )
    with errors_on_root():
        return _load_table(ref, attributes, classes, allowed_roots, digest)


@contextmanager
def errors_on_root() -> Iterator[None]:
    """A DatasetError without a field is about what dataset.root holds."""
    try:
        yield
    except DatasetError as err:
        err.field = err.field or "dataset.root"
        raise


def _load_table(
    ref: DatasetRef,
    attributes: list[str],
    classes: Sequence[str],
    allowed_roots: Sequence[PathLike] | None,
    digest: bool,
) -> ImageTable:
    root, raw, text = read_labels(ref, allowed_roots, "path, label, split")
    names, classes_txt = _class_names(root, classes)
    rows = _parse_csv(text, attributes, names)
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
        digest=_digest(raw, root, paths, classes_txt) if digest else "",
        max_pixels=ref.max_pixels,
        class_names=names,
    )
    check_attribute_values(table, attributes)
    return table


def check_attribute_values(table: ImageTable, attributes: Sequence[str]) -> None:
    """Every audited attribute takes at least two values."""
    for name in attributes:
        distinct = table.values(name)
        if len(distinct) < 2:
            raise DatasetError(
                f"attribute {name!r} has only the value {distinct[0]!r}: nothing to audit"
            )


def read_labels(
    ref: DatasetRef, allowed_roots: Sequence[PathLike] | None, columns: str
) -> tuple[Path, bytes, str]:
    """The canonical dataset root and ``labels.csv`` (bytes and text), checked: inside
    the allowed roots, at most MAX_LABELS_BYTES, UTF-8 without control characters.
    ``columns`` names the required columns in messages."""
    if not ref.root:
        raise DatasetError("dataset.root is required")
    root = resolve_inside(ref.root, allowed_roots, "dataset root", DatasetError)
    if not root.exists():
        raise DatasetError(f"dataset root {ref.root!r} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {ref.root!r} is not a directory")
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        raise DatasetError(
            f"dataset root {ref.root!r} has no labels.csv (columns: {columns}, "
            "then one column per attribute)"
        )
    if not csv_path.resolve().is_relative_to(root):
        raise DatasetError("labels.csv is a symlink that leads outside the dataset root")
    size = csv_path.stat().st_size
    if size > MAX_LABELS_BYTES:
        raise DatasetError(
            f"labels.csv is {size} bytes, over the limit of {MAX_LABELS_BYTES} bytes"
        )
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"labels.csv is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    _refuse_control_characters(text)
    return root, raw, text


# One parsed row: path, label, split, line number, requested attribute values.
_Row = tuple[str, int, str, int, list[str]]


# Control characters other than tab and line breaks: no image path or attribute value
# needs one, and they make paths fail (NUL) or reports misleading (terminal escapes).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _refuse_control_characters(
    text: str, name: str = "labels.csv", what: str = "paths and attribute values"
) -> None:
    found = _CONTROL.search(text)
    if found:
        line = text.count("\n", 0, found.start()) + 1
        raise DatasetError(
            f"{name} line {line}: control character U+{ord(found.group()):04X}; "
            f"{what} must be printable text"
        )


def _class_names(root: Path, classes: Sequence[str]) -> tuple[list[str], bytes]:
    """The class names, ``classes`` (the model's) or classes.txt's, equal when both exist;
    and classes.txt's bytes (b"" without one)."""
    listed, raw = _read_classes_file(root)
    if classes and listed and list(classes) != listed:
        pairs = enumerate(zip(classes, listed, strict=False))
        where = next((i for i, (given, read) in pairs if given != read), None)
        detail = (
            f"model.classes[{where}] is {classes[where]!r}, classes.txt line {where + 1} "
            f"is {listed[where]!r}"
            if where is not None
            else f"model.classes names {len(classes)} classes, classes.txt {len(listed)}"
        )
        raise DatasetError(
            f"model.classes and {CLASSES_FILE} disagree ({detail}): give the class names "
            "once, or the same in both",
            field="model.classes",
        )
    return list(classes) or listed, raw


def read_name_list(
    root: Path, name: str, max_bytes: int, limit: str, what: str
) -> tuple[list[str], bytes] | None:
    """A file beside labels.csv naming one thing a line (classes.txt, features.txt):
    its lines (UTF-8, surrounding spaces ignored, trailing blank lines dropped) and its
    bytes; None without one. ``limit`` explains ``max_bytes``; ``what`` names the lines."""
    path = root / name
    if not path.exists():
        return None
    if not path.resolve().is_relative_to(root):
        raise DatasetError(f"{name} is a symlink that leads outside the dataset root")
    if not path.is_file():
        raise DatasetError(f"{name} is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise DatasetError(f"{name} is {size} bytes, over the limit of {max_bytes} ({limit})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{name} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    _refuse_control_characters(text, name, what)
    # split("\n"), not splitlines(): U+2028 and friends would shift the line numbers.
    lines = [line.strip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines, raw


def _read_classes_file(root: Path) -> tuple[list[str], bytes]:
    """classes.txt's names, one a line, and its bytes; nothing without one."""
    limit = f"{MAX_CLASSES} names of at most {MAX_NAME} characters"
    read = read_name_list(root, CLASSES_FILE, MAX_CLASSES_BYTES, limit, "class names")
    if read is None:
        return [], b""
    lines, raw = read
    check_class_names(
        lines,
        CLASSES_FILE,
        lambda i: f"{CLASSES_FILE} line {i + 1}",
        DatasetError,
        field="dataset.root",
    )
    return lines, raw


def _parse_csv(text: str, attributes: list[str], names: Sequence[str] = ()) -> list[_Row]:
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
        index = {name: i for i, name in enumerate(names)}
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
                    _label(cells[at["label"]], line, index),
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


def _label(cell: str, line: int, index: dict[str, int]) -> int:
    """A class index, or a class name's index: a name that reads as an index stands at
    that index (check_class_names), so both readings agree."""
    text = cell.strip()
    if text in index:
        return index[text]
    if re.fullmatch(r"\d+", text):
        return int(text)
    if index:
        raise DatasetError(
            f"labels.csv line {line}: label {text!r} is neither a class name nor a class "
            f"index; classes: {listing([repr(n) for n in index])}"
        )
    raise DatasetError(
        f"labels.csv line {line}: label {text!r} is not a class index (an integer >= 0), "
        "and no class names are given to read it as a name: list them in model.classes or "
        f"in a {CLASSES_FILE} beside labels.csv, one per line in the model's output order "
        "(for a model trained on a torchvision ImageFolder: its sorted folder names)"
    )


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


def _digest(csv_bytes: bytes, root: Path, paths: Iterable[str], classes_txt: bytes = b"") -> str:
    """sha256 of labels.csv, of classes.txt when there is one (it gives name labels their
    meaning) and of every image's (path, content sha256), in sorted order.

    Files are hashed on a few threads: hashlib releases the GIL, so reading and hashing
    overlap across files.
    """
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda p: file_sha256(root / p), unique))
    total = hashlib.sha256(b"labels.csv\0")
    total.update(hashlib.sha256(csv_bytes).digest())
    if classes_txt:  # after labels.csv: datasets without one keep their digest
        total.update(b"classes.txt\0" + hashlib.sha256(classes_txt).digest())
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
            f"{len(problems)} of {len(chosen)} images are unusable: {listing(problems, 5)}"
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

    def stack(self) -> torch.Tensor:
        """Every image of the dataset as one N x C x H x W tensor (for small sets)."""
        return torch.stack([self[n][0] for n in range(len(self))])


class Labelled(Dataset):
    """``(model input, class label)`` pairs of a dataset of ``(model input, row index)``
    pairs (:meth:`ImageTable.samples`: images, or rows of a table), for training."""

    def __init__(self, samples: Dataset):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, n: int) -> tuple[torch.Tensor, int]:
        item, index = self.samples[n]
        return item, int(self.samples.table.labels[index])


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
