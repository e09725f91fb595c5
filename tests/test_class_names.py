"""Class names as labels: labels.csv may name classes, in the order model.classes or a
classes.txt beside labels.csv gives; the spec may name its classes; reports show names.

Real files and the real pipeline throughout (an untrained, seeded resnet18 on 96 noise
images audits in about a second).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnp_client.reports import markdown_summary, text_summary
from cnp_core import convert
from cnp_core.data import load_dataset
from cnp_core.errors import CnpError, DatasetError, InvalidSpec
from cnp_core.pipeline import run_audit, summary, validate
from cnp_core.report import write_report
from cnp_core.results import (
    AP_COLUMNS,
    AttributeAudit,
    AuditResult,
    Evaluation,
    GroupMetric,
    Metric,
    SubspaceScore,
)
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef

CLASSES = ["three", "eight", "blank"]
ROWS = [  # path, label as written, split, watermark
    ("a0.png", "three", "train", "1"),
    ("a1.png", "eight", "train", "0"),
    ("a2.png", "2", "train", "1"),  # an index still reads as one beside names
    ("a3.png", "eight", "val", "0"),
    ("a4.png", " three ", "test", "1"),  # surrounding spaces, as in any hand-edited CSV
    ("a5.png", "blank", "test", "0"),
]


def _write(root: Path, rows=ROWS, classes: list[str] | None = CLASSES, size: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (path, *_rest) in enumerate(rows):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / path)
    with (root / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split", "watermark"), *rows])
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    return root


def _spec(root: Path, **fields) -> AuditSpec:
    model = fields.pop("model", ModelRef(architecture="resnet18", num_classes=3))
    return AuditSpec(
        model=model,
        dataset=DatasetRef(root=str(root), input_size=8),
        attributes=["watermark"],
        **fields,
    )


# --------------------------------------------------------------------------- loading


def test_names_resolve_to_indices_in_the_order_classes_txt_gives(tmp_path):
    table = load_dataset(DatasetRef(root=str(_write(tmp_path))), ["watermark"])
    assert table.labels.tolist() == [0, 1, 2, 1, 0, 2] and table.labels.dtype == np.int64
    assert table.class_names == CLASSES


def test_model_classes_give_the_order_without_classes_txt(tmp_path):
    root = _write(tmp_path, classes=None)
    table = load_dataset(DatasetRef(root=str(root)), [], classes=["blank", "three", "eight"])
    assert table.labels.tolist() == [1, 2, 2, 2, 1, 0]
    # The same list in both places is fine; a different one is refused.
    (root / "classes.txt").write_text("blank\nthree\neight\r\n", encoding="utf-8-sig")
    again = load_dataset(DatasetRef(root=str(root)), [], classes=["blank", "three", "eight"])
    assert again.labels.tolist() == table.labels.tolist()


def test_integer_labels_read_as_before_and_gain_names_from_classes_txt(tmp_path):
    rows = [(p, str(i % 3), s, w) for i, (p, _, s, w) in enumerate(ROWS)]
    root = _write(tmp_path / "plain", rows, classes=None)
    plain = load_dataset(DatasetRef(root=str(root)), ["watermark"])
    assert plain.labels.tolist() == [0, 1, 2, 0, 1, 2] and plain.class_names == []
    (root / "classes.txt").write_text("\n".join(CLASSES))
    named = load_dataset(DatasetRef(root=str(root)), ["watermark"])
    assert named.labels.tolist() == plain.labels.tolist() and named.class_names == CLASSES


def test_the_digest_covers_classes_txt(tmp_path):
    """classes.txt gives name labels their meaning: another order is another dataset."""
    root = _write(tmp_path)
    before = load_dataset(DatasetRef(root=str(root)), [])
    (root / "classes.txt").write_text("eight\nthree\nblank\n")
    after = load_dataset(DatasetRef(root=str(root)), [])
    assert after.digest != before.digest and after.labels.tolist() != before.labels.tolist()


@pytest.mark.parametrize(
    ("classes_txt", "model_classes", "expected", "field"),
    [
        # No order given: both ways to give one are named, nothing is guessed.
        (None, [], "line 2: label 'three' is not a class index", "dataset.root"),
        (None, [], "list them in model.classes or in a classes.txt", "dataset.root"),
        (
            b"three\neight\n",
            [],
            "line 7: label 'blank' is neither a class name nor",
            "dataset.root",
        ),
        (b"three\neight\n", [], "classes: 'three', 'eight'", "dataset.root"),
        (b"three\n\nblank\n", [], "classes.txt line 2: class name is empty", "dataset.root"),
        (
            b"three\neight\nthree\n",
            [],
            "line 3: class name 'three' repeats classes.txt line 1",
            "dataset.root",
        ),
        (
            b"three\ne\x1bight\nblank",
            [],
            "classes.txt line 2: control character U+001B",
            "dataset.root",
        ),
        (b"three\n\xffeight\nblank", [], "classes.txt is not UTF-8 text", "dataset.root"),
        (
            b"1\n0\nblank",
            [],
            "line 1: class name '1' reads as class index 1 but names class 0",
            "dataset.root",
        ),
        (
            b"three\neight\nblank",
            ["three", "blank", "eight"],
            "model.classes[1] is 'blank', classes.txt line 2 is 'eight'",
            "model.classes",
        ),
        (
            b"three\neight",
            ["three", "eight", "blank"],
            "names 3 classes, classes.txt 2",
            "model.classes",
        ),
    ],
)
def test_unusable_class_names(tmp_path, classes_txt, model_classes, expected, field):
    root = _write(tmp_path, classes=None)
    if classes_txt is not None:
        (root / "classes.txt").write_bytes(classes_txt)
    with pytest.raises(DatasetError) as err:
        load_dataset(DatasetRef(root=str(root)), [], classes=model_classes)
    assert expected in str(err.value) and err.value.field == field


def test_classes_txt_may_not_lead_outside_the_root(tmp_path):
    root = _write(tmp_path / "data", classes=None)
    (tmp_path / "elsewhere.txt").write_text("\n".join(CLASSES))
    os.symlink(tmp_path / "elsewhere.txt", root / "classes.txt")
    with pytest.raises(DatasetError, match="classes.txt is a symlink that leads outside"):
        load_dataset(DatasetRef(root=str(root)), [])


# ------------------------------------------------------------------------------ spec


@pytest.mark.parametrize(
    ("fields", "expected", "field"),
    [
        (
            {"classes": ["a", "b"]},
            "model.classes names 2 classes, but model.num_classes is 3",
            "model.classes",
        ),
        ({"classes": ["a", "", "c"]}, "model.classes[1]: class name is empty", "model.classes[1]"),
        ({"classes": ["a", "b", "a"]}, "'a' repeats model.classes[0]", "model.classes[2]"),
        ({"classes": ["a", " b", "c"]}, "leading or trailing spaces", "model.classes[1]"),
        ({"classes": ["a", "b\nc", "d"]}, "holds a control character", "model.classes[1]"),
        ({"classes": ["a", "b", "x" * 257]}, "longer than 256 characters", "model.classes[2]"),
        ({"classes": ["a", "b", 3]}, "3 is not text", "model.classes[2]"),
    ],
)
def test_model_classes_are_checked_with_the_spec(fields, expected, field):
    spec = _spec(Path("/d"), model=ModelRef(architecture="resnet18", num_classes=3, **fields))
    with pytest.raises(InvalidSpec) as err:
        spec.validate()
    assert expected in str(err.value) and err.value.field == field


@pytest.mark.parametrize(
    ("fields", "expected", "field"),
    [
        (
            {"positive_class_name": "ring"},
            "'ring' is not a class name of the model; classes: 'three', 'eight', 'blank'",
            "positive_class_name",
        ),
        (
            {"positive_class": 2, "positive_class_name": "eight"},
            "positive_class 2 and positive_class_name 'eight' (class 1) disagree",
            "positive_class_name",
        ),
        (
            {"negative_class": 2, "negative_class_name": "three"},
            "negative_class 2 and negative_class_name 'three' (class 0) disagree",
            "negative_class_name",
        ),
        (
            {"positive_class_name": "three", "negative_class": 0},
            "negative_class must differ from positive_class",
            "negative_class",
        ),
        (
            {"positive_class_name": "blank", "negative_class_name": "blank"},
            "must differ",
            "negative_class_name",
        ),
        (
            {"positive_class_name": "x" * 300},
            "positive_class_name is longer than 256",
            "positive_class_name",
        ),
    ],
)
def test_class_names_in_the_spec_resolve_or_are_refused(fields, expected, field):
    model = ModelRef(architecture="resnet18", num_classes=3, classes=list(CLASSES))
    spec = _spec(Path("/d"), model=model, **fields)
    with pytest.raises(InvalidSpec) as err:
        spec.validate()
    assert expected in str(err.value) and err.value.field == field


def test_a_name_agreeing_with_its_index_resolves_and_stays_valid():
    model = ModelRef(architecture="resnet18", num_classes=3, classes=list(CLASSES))
    spec = _spec(Path("/d"), model=model, positive_class_name="blank", negative_class_name="three")
    assert spec.validate().class_indices(CLASSES) == (2, 0)
    assert (spec.positive_class, spec.negative_class) == (1, -1)  # validate() changes nothing
    spec.resolve_classes(CLASSES)
    assert (spec.positive_class, spec.negative_class) == (2, 0)
    assert spec.validate() is spec  # the resolved spec (the report's) is valid as it is


def test_new_spec_fields_cross_the_proto_and_json():
    model = ModelRef(architecture="resnet18", num_classes=3, classes=list(CLASSES))
    spec = _spec(Path("/d"), model=model, positive_class_name="blank")
    message = convert.spec_to_proto(spec)
    assert list(message.model.classes) == CLASSES and message.positive_class_name == "blank"
    assert not message.HasField("negative_class_name") or message.negative_class_name == ""
    assert (
        convert.spec_from_proto(message)
        == spec
        == convert.spec_from_json(convert.spec_to_json(spec))
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": {"architecture": "resnet18", "clases": ["a"]}}, "model.clases"),
        ({"dataset": {"roots": "/d"}}, "dataset.roots"),
        ({"prune": {"rates": 0.1}}, "prune.rates"),
        ({"positive_class_nam": "a"}, "positive_class_nam"),
    ],
)
def test_unknown_fields_are_named_by_their_path(data, field):
    with pytest.raises(InvalidSpec) as err:
        AuditSpec.from_dict(data)
    assert str(err.value) == f"spec: unknown field {field!r}" and err.value.field == field


def test_error_fields_survive_pickling_across_processes():
    import pickle

    err = pickle.loads(pickle.dumps(InvalidSpec("prune.rate must lie ...", field="prune.rate")))
    assert (str(err), err.field) == ("prune.rate must lie ...", "prune.rate")
    assert CnpError("no field").field == ""


# -------------------------------------------------------------- submission (cheap checks)


def test_submission_resolves_names_against_classes_txt(tmp_path):
    root = _write(tmp_path)
    spec = _spec(root, positive_class_name="blank", negative_class_name="three")
    table = validate(spec)
    assert table.digest == "" and table.class_names == CLASSES
    assert (spec.positive_class, spec.negative_class) == (2, 0)


@pytest.mark.parametrize(
    ("fields", "classes_txt", "error", "expected", "field"),
    [
        (
            {"positive_class_name": "ring"},
            CLASSES,
            InvalidSpec,
            "'ring' is not a class name",
            "positive_class_name",
        ),
        (
            {"positive_class_name": "eight"},
            None,
            DatasetError,
            "label 'three' is not a class index",
            "dataset.root",
        ),
        (
            {},
            ["three", "eight"],
            DatasetError,
            "classes.txt names 2 classes, but the model has 3",
            "dataset.root",
        ),
        (
            {"positive_class": 2, "positive_class_name": "eight"},
            CLASSES,
            InvalidSpec,
            "disagree",
            "positive_class_name",
        ),
    ],
)
def test_submission_refuses_bad_names(tmp_path, fields, classes_txt, error, expected, field):
    rows = [(path, "2" if label == "blank" else label, *rest) for path, label, *rest in ROWS]
    spec = _spec(_write(tmp_path, rows, classes=classes_txt), **fields)
    with pytest.raises(error) as err:
        validate(spec)
    assert expected in str(err.value) and err.value.field == field


def test_a_named_class_without_images_is_named_in_the_error(tmp_path):
    rows = [r for r in ROWS if r[1] not in ("blank", "2")]
    spec = _spec(_write(tmp_path, rows), positive_class_name="blank")
    with pytest.raises(DatasetError, match=r"the positive class blank \(2\) has no images") as err:
        validate(spec)
    assert err.value.field == "positive_class_name"


# --------------------------------------------------------------------------- reports


def _result(class_names: list[str]) -> AuditResult:
    m = Metric(0.5, 0.4, 0.6)
    groups = [
        GroupMetric(label, "wm", "1", 12, m, label_name=class_names[label] if class_names else "")
        for label in (0, 2)
    ]
    worst = "class 0 + wm=1" if not class_names else f"{class_names[0]} (0) + wm=1"
    score = SubspaceScore(0, 0.1, *[m] * len(AP_COLUMNS))
    return AuditResult(
        spec=_spec(Path("/d"), positive_class=2, negative_class=0),
        model_sha256="",
        dataset_digest="",
        attributes=[AttributeAudit("wm", "1", "layer2", 1, [score])],
        before=Evaluation(m, m, worst, groups),
        class_names=class_names,
    )


def _report(class_names: list[str]) -> dict:
    report = convert.report_to_proto(_result(class_names), audit_id="aud-1")
    return convert.report_to_dict(report)


def test_reports_show_class_names():
    report = _report(["=three", "eight", "b|l*ank"])
    assert report["class_names"] == ["=three", "eight", "b|l*ank"]
    assert [g["label_name"] for g in report["before"]["groups"]] == ["=three", "b|l*ank"]
    markdown = markdown_summary(report)
    assert "Classes: b|l\\*ank (2) vs =three (0)." in markdown  # Markdown escaped
    assert "| =three (0), wm=1 | 12 |" in markdown and "b\\|l\\*ank (2), wm=1" in markdown
    text = text_summary(report)
    assert "classes: b|l*ank (2) vs =three (0)" in text and "  =three (0), wm=1" in text


def test_audit_table_csv_names_the_class_pair_as_a_spreadsheet_shows_it(tmp_path):
    write_report(_result(["=three", "eight", "@blank"]), tmp_path)
    with (tmp_path / "audit_table.csv").open(newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert (row["positive_class"], row["negative_class"]) == ("'@blank (2)", "'=three (0)")
    assert json.loads((tmp_path / "report.json").read_text())["class_names"][2] == "@blank"


def test_reports_of_index_labelled_models_read_as_before():
    report = _report([])
    assert report["class_names"] == [] and report["before"]["groups"][0]["label_name"] == ""
    markdown, text = markdown_summary(report), text_summary(report)
    assert "Classes:" not in markdown and "classes:" not in text
    assert "| class 0, wm=1 | 12 |" in markdown and "  class 2, wm=1" in text


# ------------------------------------------------------------------------ end to end


def _generated(tmp_path: Path, named: bool) -> Path:
    """96 seeded noise images of three classes, a watermark column, labelled by index or
    by name (then with classes.txt). What the images show does not matter here: both
    twins must measure the same."""
    root = tmp_path / ("named" if named else "indexed")
    rows = []
    for i in range(96):
        label, split = i % 3, ("train", "train", "val", "test")[i // 3 % 4]
        rows.append((f"{i}.png", CLASSES[label] if named else str(label), split, str(i // 12 % 2)))
    _write(root, rows, classes=CLASSES if named else None, size=32)
    return root


def _audit(root: Path, workdir: Path, **classes):
    spec = AuditSpec(
        model=ModelRef(architecture="resnet18", num_classes=3),
        dataset=DatasetRef(root=str(root), input_size=32),
        attributes=["watermark"],
        n_subspaces=[2],
        drsa_max_epochs=10,
        fit_images=32,
        positions_per_image=4,
        bootstrap=20,
        min_group_size=1,
        heatmap_samples=1,
        **classes,
    )
    return run_audit(spec, workdir=workdir)


def _numbers(result) -> str:
    """What an audit measured (without names and the measured latency), as JSON."""
    data = dataclasses.asdict(result)
    before = data["before"]
    del before["worst_group"], before["latency_ms"]
    for group in before["groups"]:
        del group["label_name"]
    return json.dumps({"attributes": data["attributes"], "before": before}, sort_keys=True)


def test_a_name_labelled_dataset_audits_exactly_like_its_index_labelled_twin(tmp_path, one_thread):
    indexed = _audit(
        _generated(tmp_path, named=False), tmp_path / "w1", positive_class=1, negative_class=0
    )
    named = _audit(
        _generated(tmp_path, named=True),
        tmp_path / "w2",
        positive_class_name="eight",
        negative_class_name="three",
    )
    # The same numbers: names only change how classes are written.
    assert named.attributes and _numbers(named) == _numbers(indexed)
    assert indexed.class_names == [] and named.class_names == CLASSES
    assert (named.spec.positive_class, named.spec.negative_class) == (1, 0)
    labels = {(g.label, g.label_name) for g in named.before.groups}
    assert labels == {(0, "three"), (1, "eight"), (2, "blank")}
    assert {g.label_name for g in indexed.before.groups} == {""}
    worst = indexed.before.worst_group  # e.g. "class 2 + watermark=0"
    label = int(worst.split()[1])
    assert named.before.worst_group == worst.replace(
        f"class {label}", f"{CLASSES[label]} ({label})"
    )
    # The report carries the names: report.json, the proto, the text summary, the CSV.
    on_disk = json.loads((tmp_path / "w2" / "report.json").read_text())
    assert on_disk["class_names"] == CLASSES
    assert on_disk["spec"]["positive_class_name"] == "eight"
    message = convert.report_to_proto(named, audit_id="aud-2")
    assert list(message.class_names) == CLASSES
    assert {g.label_name for g in message.before.groups} == set(CLASSES)
    assert "classes: eight (1) vs three (0)" in summary(named)
    with (tmp_path / "w2" / "audit_table.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (row["positive_class"], row["negative_class"]) == ("eight (1)", "three (0)")
    with (tmp_path / "w1" / "audit_table.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (row["positive_class"], row["negative_class"]) == ("class 1", "class 0")
