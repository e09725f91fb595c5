"""Table datasets (``DatasetRef.format == "table"``): one row of numeric features per sample.

A directory with ``labels.csv`` (columns ``label``, ``split``, the attribute columns and
the numeric feature columns) and ``features.txt`` beside it: the feature column names,
one per line, in the model's input order. Only those columns reach the model; every
other column (an audited attribute such as sex or race) never does, so a protected
attribute can be audited without being a feature. Feature values are finite numbers,
used as written (whoever wrote the table scaled them); the image fields of the
DatasetRef (input_size, mean, std, max_pixels) do not apply.

Labels, splits, attributes and class names (``classes.txt`` / ``model.classes``) read as
for images (:mod:`cnp_core.data`), and so do the root's safety checks. The digest covers
labels.csv, features.txt and classes.txt. Messages name rows by their labels.csv line and
columns by name, never the server's paths.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .data import (
    ImageTable,
    _class_names,
    _label,
    _split,
    check_attribute_values,
    errors_on_root,
    read_labels,
    read_name_list,
)
from .errors import DatasetError
from .paths import PathLike, listing
from .spec import MAX_NAME, MAX_UNITS, MLP_ARCHITECTURE, DatasetRef, ModelRef

FEATURES_FILE = "features.txt"
TABLE_COLUMNS = ("label", "split")
MAX_FEATURES_BYTES = MAX_UNITS * (MAX_NAME + 2)  # every name at its longest, with CRLF


@dataclass
class FeatureTable(ImageTable):
    """An :class:`~cnp_core.data.ImageTable` whose samples are rows of features:
    ``features[i]`` is the model input of row ``i`` (``paths[i]`` names its labels.csv
    line, for messages)."""

    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    feature_names: list[str] = field(default_factory=list)

    def samples(self, indices: Sequence[int] | np.ndarray, ref: DatasetRef) -> Dataset:
        return FeatureRows(self, indices)


class FeatureRows(Dataset):
    """Rows ``indices`` of a table as ``(feature vector, row index)`` pairs."""

    def __init__(self, table: FeatureTable, indices: Sequence[int] | np.ndarray):
        self.table = table
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[n])
        return torch.from_numpy(self.table.features[index]), index

    def stack(self) -> torch.Tensor:
        """Every row as one N x F tensor."""
        return torch.from_numpy(self.table.features[self.indices])


def load_table(
    ref: DatasetRef,
    attributes: list[str],
    *,
    classes: Sequence[str] = (),
    allowed_roots: Sequence[PathLike] | None = None,
    digest: bool = True,
) -> FeatureTable:
    """Read and check ``labels.csv`` and ``features.txt`` under ``ref.root`` (the table
    counterpart of :func:`cnp_core.data.load_dataset`)."""
    with errors_on_root():
        return _read_table(ref, attributes, classes, allowed_roots, digest)


def _read_table(
    ref: DatasetRef,
    attributes: list[str],
    classes: Sequence[str],
    allowed_roots: Sequence[PathLike] | None,
    digest: bool,
) -> FeatureTable:
    root, raw, text = read_labels(ref, allowed_roots, "label, split, the features")
    names, classes_txt = _class_names(root, classes)
    feature_names, features_txt = _read_features_file(root)
    parsed = _parse(text, attributes, feature_names, names)
    table = FeatureTable(
        root=root,
        paths=np.array([f"labels.csv line {line}" for line in parsed.lines], dtype=str),
        labels=np.array(parsed.labels, dtype=np.int64),
        splits=np.array(parsed.splits, dtype=str),
        attributes={
            name: np.array([values[i] for values in parsed.attributes], dtype=str)
            for i, name in enumerate(attributes)
        },
        digest=_digest(raw, features_txt, classes_txt) if digest else "",
        class_names=names,
        features=_numbers(parsed.cells, parsed.lines, feature_names),
        feature_names=feature_names,
    )
    check_attribute_values(table, attributes)
    return table


def _read_features_file(root: Path) -> tuple[list[str], bytes]:
    """features.txt's column names, one a line (surrounding spaces ignored), and its bytes."""
    limit = f"{MAX_UNITS} names of at most {MAX_NAME} characters"
    read = read_name_list(root, FEATURES_FILE, MAX_FEATURES_BYTES, limit, "feature names")
    if read is None:
        raise DatasetError(
            f"a table dataset needs a {FEATURES_FILE} beside labels.csv: the feature column "
            "names, one per line, in the model's input order"
        )
    lines, raw = read
    seen: dict[str, int] = {}
    for number, name in enumerate(lines, start=1):
        where = f"{FEATURES_FILE} line {number}"
        if not name:
            raise DatasetError(f"{where} is empty: one feature column name per line")
        if name in TABLE_COLUMNS:
            raise DatasetError(f"{where}: {name!r} is the {name} column, not a feature")
        if name in seen:
            raise DatasetError(f"{where} repeats the feature {name!r} of line {seen[name]}")
        seen[name] = number
    if not lines:
        raise DatasetError(f"{FEATURES_FILE} names no feature column")
    if len(lines) > MAX_UNITS:
        raise DatasetError(f"{FEATURES_FILE} names {len(lines)} features, over {MAX_UNITS}")
    return lines, raw


@dataclass
class _Parsed:
    lines: list[int]
    labels: list[int]
    splits: list[str]
    attributes: list[list[str]]
    cells: list[list[str]]  # the feature cells of each row, in features.txt order


def _parse(
    text: str, attributes: list[str], feature_names: list[str], names: Sequence[str]
) -> _Parsed:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise DatasetError(
                "labels.csv is empty: it needs a header label,split,<attributes...>,"
                "<features...> and one row per sample"
            )
        columns = [cell.strip() for cell in header]
        _check_columns(columns, attributes, feature_names)
        at = {name: columns.index(name) for name in (*TABLE_COLUMNS, *attributes)}
        feature_at = [columns.index(name) for name in feature_names]
        index = {name: i for i, name in enumerate(names)}
        parsed = _Parsed([], [], [], [], [])
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(columns):
                raise DatasetError(
                    f"labels.csv line {line}: {len(cells)} fields, but the header has "
                    f"{len(columns)}"
                )
            parsed.lines.append(line)
            parsed.labels.append(_label(cells[at["label"]], line, index))
            parsed.splits.append(_split(cells[at["split"]], line))
            parsed.attributes.append([cells[at[name]].strip() for name in attributes])
            parsed.cells.append([cells[i] for i in feature_at])
    except csv.Error as err:
        raise DatasetError(f"labels.csv line {reader.line_num}: {err}") from None
    if not parsed.lines:
        raise DatasetError("labels.csv has a header but no rows")
    return parsed


def _check_columns(columns: list[str], attributes: list[str], feature_names: list[str]) -> None:
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise DatasetError(f"labels.csv repeats the column(s) {', '.join(duplicated)}")
    missing = [c for c in TABLE_COLUMNS if c not in columns]
    if missing:
        raise DatasetError(
            f"labels.csv lacks the required column(s) {', '.join(missing)}; found: "
            f"{listing(columns, 20)} (a table needs label, split, attribute and feature columns)"
        )
    absent = [name for name in feature_names if name not in columns]
    if absent:
        line = feature_names.index(absent[0]) + 1
        raise DatasetError(
            f"feature column {absent[0]!r} ({FEATURES_FILE} line {line}) is not in labels.csv"
            + (f"; {len(absent)} features are missing in all" if len(absent) > 1 else "")
        )
    available = [c for c in columns if c not in TABLE_COLUMNS]
    unknown = [a for a in attributes if a not in available]
    if unknown:
        raise DatasetError(
            f"attribute(s) {', '.join(map(repr, unknown))} not in labels.csv; columns: "
            f"{listing(available, 20) if available else 'none'}"
        )


def _numbers(cells: list[list[str]], lines: list[int], feature_names: list[str]) -> np.ndarray:
    """The feature cells as an N x F float32 matrix; the first cell that is not a finite
    number is named by its line and column."""
    try:
        values = np.array(cells, dtype=np.float64)
    except ValueError:
        for row, line in zip(cells, lines, strict=True):
            for cell, name in zip(row, feature_names, strict=True):
                try:
                    float(cell)
                except ValueError:
                    raise DatasetError(
                        f"labels.csv line {line}, feature {name!r}: {cell.strip()!r} is not a "
                        "number"
                    ) from None
        raise  # unreachable: some cell failed above
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        row, column = bad[0]
        raise DatasetError(
            f"labels.csv line {lines[row]}, feature {feature_names[column]!r}: "
            f"{cells[row][column].strip()!r} is not a finite number"
            + (f" ({len(bad)} such cells in all)" if len(bad) > 1 else "")
        )
    too_large = np.abs(values) > np.finfo(np.float32).max
    if too_large.any():
        row, column = np.argwhere(too_large)[0]
        raise DatasetError(
            f"labels.csv line {lines[row]}, feature {feature_names[column]!r}: "
            f"{cells[row][column].strip()!r} is too large for a float32 model input"
        )
    return values.astype(np.float32)


def _digest(csv_bytes: bytes, features_txt: bytes, classes_txt: bytes) -> str:
    """sha256 over labels.csv, features.txt (the model's inputs) and classes.txt if any."""
    total = hashlib.sha256(b"labels.csv\0")
    total.update(hashlib.sha256(csv_bytes).digest())
    total.update(b"features.txt\0" + hashlib.sha256(features_txt).digest())
    if classes_txt:
        total.update(b"classes.txt\0" + hashlib.sha256(classes_txt).digest())
    return total.hexdigest()


def check_model_inputs(ref: ModelRef, table: ImageTable) -> None:
    """The model takes as many inputs as the table has features (without building it):
    an MLP's in_features, ``model.layer_sizes[0]``."""
    if not isinstance(table, FeatureTable) or ref.architecture != MLP_ARCHITECTURE:
        return
    wanted, found = ref.layer_sizes[0], len(table.feature_names)
    if wanted != found:
        raise DatasetError(
            f"model.layer_sizes[0] (in_features) is {wanted}, but {FEATURES_FILE} names "
            f"{found} features: give one model input per feature column",
            field="model.layer_sizes",
        )


def check_model_runs(model: nn.Module, table: ImageTable) -> None:
    """A loaded model accepts one row of the table's features (a factory's model too)."""
    if not isinstance(table, FeatureTable):
        return
    row = torch.zeros(1, len(table.feature_names))
    try:
        with torch.no_grad():
            model.eval()(row)
    except (RuntimeError, ValueError, TypeError) as err:
        reason = str(err).strip().split("\n")[0][:200]
        raise DatasetError(
            f"the model does not take the {row.shape[1]} features of {FEATURES_FILE} as "
            f"one input row: {reason}",
            field="dataset.root",
        ) from None
