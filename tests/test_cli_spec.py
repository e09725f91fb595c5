"""``cnp spec`` and ``cnp audit --spec FILE``: the spec as a file, the flags over it.

Every test reads what ``cnp audit --dry-run`` prints: the CreateAuditRequest the command
would send (the client's own request builder), so what is checked is what a server gets.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from cnp.v1 import service_pb2
from cnp_client.cli import EXIT_BAD_INPUT, main
from cnp_core import convert
from cnp_core.spec import AuditSpec, PruneSpec


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_run(capsys, *argv: str) -> service_pb2.CreateAuditRequest:
    """The request ``cnp audit ... --dry-run`` prints, parsed as the proto it claims to be."""
    code, out, err = run(capsys, "audit", *argv, "--dry-run")
    assert code == 0, err
    return json_format.Parse(out, service_pb2.CreateAuditRequest())


def sent_spec(capsys, *argv: str) -> AuditSpec:
    return convert.spec_from_proto(dry_run(capsys, *argv).spec)


def edited_default(
    capsys, tmp_path: Path, name: str = "audit.yaml", model: dict | None = None, **changes
) -> Path:
    """``cnp spec > audit.yaml``, then the edits a user makes."""
    code, text, _ = run(capsys, "spec")
    assert code == 0
    data = yaml.safe_load(text)
    data["model"].update(architecture="resnet18", weights="weights/model.safetensors")
    data["model"].update(model or {})
    data["dataset"]["root"] = "data"
    data["attributes"] = ["watermark"]
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def test_spec_prints_every_field_at_its_default(capsys):
    code, text, _ = run(capsys, "spec")
    assert code == 0 and text.startswith("# cnp audit spec")
    assert yaml.safe_load(text) == json.loads(json.dumps(AuditSpec().to_dict()))
    code, text, _ = run(capsys, "spec", "--format", "json", "--prune")
    assert code == 0
    assert json.loads(text) == json.loads(json.dumps(AuditSpec(prune=PruneSpec()).to_dict()))


def test_edited_spec_file_is_the_request(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = edited_default(capsys, tmp_path, n_subspaces=[4], bootstrap=50)
    spec = sent_spec(capsys, "--spec", str(path))
    expected = AuditSpec().to_dict()
    expected["model"].update(
        architecture="resnet18", weights=str(tmp_path / "weights" / "model.safetensors")
    )
    expected["dataset"]["root"] = str(tmp_path / "data")  # relative: the current directory's
    expected.update(attributes=["watermark"], n_subspaces=[4], bootstrap=50)
    assert spec.to_dict() == expected


def test_flags_override_the_file_and_only_flags_given(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = edited_default(
        capsys,
        tmp_path,
        "audit.json",
        bootstrap=50,
        layers=["layer2"],
        positive_class_name="ring",
        prune={"method": "lrp", "rate": 0.3},
        model={"classes": ["plain", "ring"]},
    )
    base = sent_spec(capsys, "--spec", str(path))
    assert base.positive_class_name == "ring" and base.prune.rate == 0.3
    assert base.model.classes == ["plain", "ring"] and base.bootstrap == 50

    spec = sent_spec(
        capsys, "--spec", str(path), "--bootstrap", "0", "--layer", "layer3", "--layer", "layer4",
        "--positive-class", "0", "--prune-rate", "0.2", "--factory", "pkg.models:make",
    )  # fmt: skip
    assert spec.bootstrap == 0 and spec.layers == ["layer3", "layer4"]  # replaced, not added
    assert (spec.positive_class, spec.positive_class_name) == (0, "")  # the index wins
    assert (spec.prune.method, spec.prune.rate) == ("lrp", 0.2)  # no --prune needed here
    assert (spec.model.factory, spec.model.architecture) == ("pkg.models:make", "")
    # Everything not given on the command line is the file's.
    assert spec.dataset.root == base.dataset.root and spec.attributes == ["watermark"]
    assert spec.model.classes == base.model.classes

    spec = sent_spec(capsys, "--spec", str(path), "--prune", "cnp", "--no-keep-projection")
    assert (spec.prune.method, spec.prune.rate, spec.prune.keep_projection) == ("cnp", 0.3, False)


def test_spec_from_stdin_and_pruning_flags_need_a_prune_section(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = edited_default(capsys, tmp_path).read_text()
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert sent_spec(capsys, "--spec", "-", "--seed", "9").seed == 9
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    code, _, err = run(capsys, "audit", "--spec", "-", "--prune-rate", "0.2", "--dry-run")
    assert code == EXIT_BAD_INPUT
    assert "--prune-rate: pruning flags need --prune cnp|lrp (or a prune section in --spec)" in err


def test_dry_run_prints_the_tracking_options(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = edited_default(capsys, tmp_path)
    request = dry_run(
        capsys, "--spec", str(path), "--prune", "cnp", "--request-id", "ci-42",
        "--experiment", "shapes-ci", "--tag", "git_commit=abc123", "--tag", "pipeline=7=8",
        "--register-model", "shapes-pruned",
    )  # fmt: skip
    assert request.request_id == "ci-42"
    assert request.tracking.experiment == "shapes-ci"
    assert dict(request.tracking.tags) == {"git_commit": "abc123", "pipeline": "7=8"}
    assert request.tracking.register_model == "shapes-pruned"
    plain = dry_run(capsys, "--spec", str(path))
    assert plain.tracking == service_pb2.TrackingOptions() and plain.request_id  # a fresh id


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "a.yaml",
            "model:\n  architectur: resnet18\n",
            "unknown key 'model.architectur'; the model fields are: architecture, factory",
        ),
        ("a.yaml", "prune:\n  rat: 0.2\n", "unknown key 'prune.rat'"),
        ("a.yaml", "bootstrapp: 5\n", "unknown key 'bootstrapp'"),
        ("a.yaml", "prune:\n  rate: high\n", "prune.rate: Couldn't parse float: high"),
        ("a.json", '{"seed": true}', "seed: Bool value True is not acceptable for integer field"),
        ("a.yaml", "dataset:\n  mean: [0.5, x, 0.5]\n", "dataset.mean[1]: Couldn't parse float: x"),
        ("a.yaml", "model: resnet18\n", "model: expected a mapping, got 'resnet18'"),
        ("a.yaml", "- model\n", "expected a mapping of spec fields"),
        ("a.yaml", "", "expected a mapping of spec fields (as `cnp spec` prints), got NoneType"),
        ("a.yaml", "layers: [layer2\n", "not valid YAML"),
        ("a.json", '{"layers": ', "not valid JSON"),
        ("a.txt", '{"bootstrap": 1,}', "not valid JSON"),  # JSON by content
    ],
)
def test_bad_spec_files_exit_2_naming_the_field(capsys, tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    code, out, err = run(capsys, "audit", "--spec", str(path), "--dry-run")
    assert code == EXIT_BAD_INPUT and out == ""
    assert f"cnp: error: --spec {path}: {message}" in err


def test_missing_spec_file_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "audit", "--spec", str(tmp_path / "none.yaml"))
    assert code == EXIT_BAD_INPUT
    assert f"--spec {tmp_path / 'none.yaml'}: No such file or directory" in err


def test_the_merged_spec_is_validated(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = edited_default(capsys, tmp_path, positive_class=5)
    code, _, err = run(capsys, "audit", "--spec", str(path), "--dry-run")
    assert code == EXIT_BAD_INPUT and "positive_class 5 is not a class" in err
    assert sent_spec(capsys, "--spec", str(path), "--positive-class", "0").positive_class == 0
