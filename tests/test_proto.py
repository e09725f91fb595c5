"""The cnp.v1 API: committed stubs are current, and the proto mirrors the dataclasses."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from google.protobuf import json_format

from cnp.v1 import report_pb2, service_pb2, spec_pb2
from cnp_core import convert, results
from cnp_core.errors import InvalidSpec
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef, PruneSpec
from cnp_server import protogen
from cnp_server.convert import operation_of
from cnp_server.jobs import FAILED, SUCCEEDED, JobRecord


def test_generated_stubs_match_the_proto_sources(tmp_path):
    generated = protogen.generate(tmp_path)
    committed = sorted(protogen.API_DIR.glob("*_pb2*.py"))
    assert [p.name for p in generated] == [p.name for p in committed]
    for fresh, current in zip(generated, committed, strict=True):
        assert fresh.read_bytes() == current.read_bytes(), (
            f"{current.name} is stale: run make proto"
        )


def test_generated_imports_are_package_qualified():
    text = (protogen.API_DIR / "service_pb2.py").read_text()
    assert "from cnp.v1 import report_pb2" in text
    assert "from google.longrunning import operations_pb2" in text


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (AuditSpec, spec_pb2.AuditSpec),
        (ModelRef, spec_pb2.ModelRef),
        (DatasetRef, spec_pb2.DatasetRef),
        (PruneSpec, spec_pb2.PruneSpec),
        (results.Metric, report_pb2.Metric),
        (results.SubspaceScore, report_pb2.SubspaceScore),
        (results.AttributeAudit, report_pb2.AttributeAudit),
        (results.GroupMetric, report_pb2.GroupMetric),
        (results.Evaluation, report_pb2.Evaluation),
        (results.PruningSummary, report_pb2.PruningSummary),
    ],
)
def test_proto_fields_mirror_the_dataclass(cls, message):
    assert {f.name for f in dataclasses.fields(cls)} == set(message.DESCRIPTOR.fields_by_name)


def test_report_carries_every_result_field():
    names = set(report_pb2.AuditReport.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(results.AuditResult)} <= names


def _result(prune: bool) -> results.AuditResult:
    m = results.Metric
    score = results.SubspaceScore(
        index=0,
        mean_relevance=0.25,
        ap_attribute=m(0.93, 0.9, 0.96, 0.5),
        ap_attribute_pos=m(0.9, 0.85, 0.95, 0.5),
        ap_attribute_neg=m(0.1, 0.05, 0.15, 0.5),
        ap_class=m(0.0, 0.0, 0.0, 0.5),  # zeros must still be printed
        ap_class_attr=m(0.6, 0.5, 0.7, 0.5),
        ap_class_no_attr=m(math.nan, math.nan, math.nan, 0.0),
    )
    audits = [
        results.AttributeAudit("wm", "1", "layer3", 2, [score, score], flagged_subspace=0),
        results.AttributeAudit("wm", "0", "layer3", 2, [score], flagged_subspace=-1),
    ]
    group = results.GroupMetric(1, "wm", "0", 12, m(0.4, 0.2, 0.6), too_small=False)
    evaluation = results.Evaluation(m(0.8, 0.7, 0.9), m(0.4, 0.2, 0.6), "class 1 wm=0", [group])
    evaluation.flops = 4_100_000_000
    spec = AuditSpec(
        model=ModelRef(architecture="resnet18", weights="/m.safetensors"),
        dataset=DatasetRef(root="/d", mean=(0.1, 0.2, 0.3)),
        layers=["layer3"],
        attributes=["wm"],
        prune=PruneSpec(rate=0.25) if prune else None,
    )
    return results.AuditResult(
        spec=spec,
        model_sha256="a" * 64,
        dataset_digest="b" * 64,
        attributes=audits,
        before=evaluation,
        after=evaluation if prune else None,
        pruning=results.PruningSummary("cnp", 0.25, 100, 25, {"layer3.0.conv1": [3, 4]})
        if prune
        else None,
        timings={"fit": 1.5},
        versions={"torch": "2.14.1"},
        artifacts={"audit_table": "/srv/jobs/x/audit_table.csv"},
    )


@pytest.mark.parametrize("prune", [False, True])
def test_spec_round_trip(prune):
    spec = _result(prune).spec
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert convert.spec_from_json(convert.spec_to_json(spec)) == spec


def test_unset_fields_take_library_defaults():
    message = spec_pb2.AuditSpec(layers=["l"], attributes=["a"])
    message.dataset.root = "/d"
    spec = convert.spec_from_proto(message)
    assert (
        spec.negative_class == -1 and spec.n_subspaces == [4, 8] and spec.dataset.mean == (0.5,) * 3
    )
    assert spec.prune is None and spec.dataset.root == "/d"
    message.negative_class = 0  # explicitly set zero is kept, not replaced by the default
    assert convert.spec_from_proto(message).negative_class == 0


def test_bad_spec_values_raise_invalid_spec():
    message = spec_pb2.AuditSpec()
    message.dataset.mean.extend([0.5, 0.5])  # validate() reports the length; conversion keeps it
    assert convert.spec_from_proto(message).dataset.mean == (0.5, 0.5)
    with pytest.raises(InvalidSpec):
        convert.spec_from_proto(message).validate()


def _valid_spec() -> AuditSpec:
    return AuditSpec(
        model=ModelRef(architecture="resnet18"), dataset=DatasetRef(root="/d"), attributes=["wm"]
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda s: setattr(s, "bootstrap", 10**9),
            "bootstrap must lie in [0, 10000], got 1000000000",
        ),
        (
            lambda s: setattr(s, "positions_per_image", 4096),
            "positions_per_image must lie in [1, 1024]",
        ),
        (lambda s: setattr(s, "fit_images", 0), "fit_images must lie in [1, 100000], got 0"),
        (lambda s: setattr(s, "n_subspaces", [10**6]), "n_subspaces: give 1 to 16 numbers"),
        (lambda s: setattr(s, "n_subspaces", list(range(1, 40))), "each in [1, 512]"),
        (lambda s: setattr(s, "batch_size", 10**6), "batch_size must lie in [1, 1024]"),
        (lambda s: setattr(s, "drsa_max_epochs", 10**7), "drsa_max_epochs must lie in [1, 20000]"),
        (lambda s: setattr(s, "heatmap_samples", 10**4), "heatmap_samples must lie in [0, 64]"),
        (lambda s: setattr(s, "attributes", ["a" * 300]), "at most 256 characters"),
        (
            lambda s: setattr(s.model, "num_classes", 10**9),
            "model.num_classes must lie in [2, 100000]",
        ),
        (
            lambda s: setattr(s, "prune", PruneSpec(finetune_epochs=10**6, schedule="iterative")),
            "prune.finetune_epochs must lie in [0, 1000]",
        ),
        (
            lambda s: setattr(s, "prune", PruneSpec(steps=10**4, schedule="iterative")),
            "prune.steps must lie in [1, 100]",
        ),
    ],
)
def test_every_size_a_request_sets_is_bounded(change, expected):
    spec = _valid_spec()
    assert spec.validate() is spec  # the defaults lie inside every bound
    change(spec)
    with pytest.raises(InvalidSpec) as err:
        spec.validate()
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: setattr(s.model, "architecture", ""), "model.architecture"),
        (lambda s: setattr(s.model, "factory", "m:f"), "model.factory"),
        (lambda s: setattr(s.model, "num_classes", 1), "model.num_classes"),
        (lambda s: setattr(s.dataset, "root", ""), "dataset.root"),
        (lambda s: setattr(s.dataset, "std", (1.0, 0.0, 1.0)), "dataset.std"),
        (lambda s: setattr(s.dataset, "mean", (0.5,)), "dataset.mean"),
        (lambda s: setattr(s.dataset, "max_pixels", 0), "dataset.max_pixels"),
        (lambda s: setattr(s, "layers", ["ok", "x" * 300]), "layers[1]"),
        (lambda s: setattr(s, "layers", ["l"] * 17), "layers"),
        (lambda s: setattr(s, "attributes", []), "attributes"),
        (lambda s: setattr(s, "method", "nonsense"), "method"),
        (lambda s: setattr(s, "n_subspaces", [0]), "n_subspaces"),
        (lambda s: setattr(s, "positive_class", 5), "positive_class"),
        (lambda s: setattr(s, "negative_class", 1), "negative_class"),
        (lambda s: setattr(s, "bootstrap", -1), "bootstrap"),
        (lambda s: setattr(s, "device", "tpu"), "device"),
        (lambda s: setattr(s, "prune", PruneSpec(rate=1.5)), "prune.rate"),
        (lambda s: setattr(s, "prune", PruneSpec(steps=2)), "prune.steps"),
        (lambda s: setattr(s, "prune", PruneSpec(attribute="age")), "prune.attribute"),
        (
            lambda s: setattr(s, "prune", PruneSpec(reference_per_class=0)),
            "prune.reference_per_class",
        ),
    ],
)
def test_spec_errors_name_the_field_at_fault(change, field):
    spec = _valid_spec()
    change(spec)
    with pytest.raises(InvalidSpec) as err:
        spec.validate()
    assert err.value.field == field


@pytest.mark.parametrize("prune", [False, True])
def test_result_round_trip_without_server_paths(prune):
    result = _result(prune)
    report = convert.report_to_proto(
        result, audit_id="aud-1", artifacts={"audit_table": {"size": 3, "sha256": "f" * 64}}
    )
    back = convert.result_from_proto(report)
    assert back.artifacts == {"audit_table": "audit_table"}
    back.artifacts = result.artifacts
    # NaN != NaN: compare through the canonical JSON instead of ==.
    again = convert.report_to_proto(
        back, audit_id="aud-1", artifacts={"audit_table": {"size": 3, "sha256": "f" * 64}}
    )
    assert convert.report_to_json(again) == convert.report_to_json(report)
    assert "/srv/jobs" not in convert.report_to_json(report)
    assert report.HasField("after") == prune and report.HasField("pruning") == prune


def test_canonical_json_paths_defaults_and_numbers():
    report = convert.report_to_proto(_result(prune=False), audit_id="aud-1")
    data = json.loads(convert.report_to_json(report))
    sub = data["attributes"][0]["subspaces"][1]
    assert sub["ap_attribute"]["value"] == pytest.approx(0.93)
    assert sub["ap_class"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "base_rate": 0.5}
    assert sub["index"] == 0  # default-valued fields are printed
    assert [a["flagged_subspace"] for a in data["attributes"]] == [0, -1]
    group = data["before"]["groups"][0]
    assert {k: group[k] for k in ("label", "attribute", "value", "count")} == {
        "label": 1,
        "attribute": "wm",
        "value": "0",
        "count": 12,
    }
    assert data["before"]["flops"] == 4_100_000_000  # int64 as a number, not a string
    assert "after" not in data and "pruning" not in data
    assert sub["ap_class_no_attr"]["value"] == "NaN"
    assert convert.report_to_dict(report) == data
    parsed = convert.report_from_json(convert.report_to_json(report))
    assert json_format.MessageToDict(parsed) == json_format.MessageToDict(report)


def _job(state: str, **values) -> JobRecord:
    spec_json = convert.spec_to_json(_result(False).spec)
    return JobRecord(id="aud-9", seq=1, state=state, spec_json=spec_json, **values)


def test_operation_of_a_succeeded_job_packs_progress_and_report():
    report = convert.report_to_proto(_result(False), audit_id="aud-9")
    operation = operation_of(
        _job(SUCCEEDED, report=report.SerializeToString(), attempts=2, created_at=1e9)
    )
    assert operation.name == "operations/aud-9" and operation.done
    progress, unpacked = service_pb2.AuditProgress(), report_pb2.AuditReport()
    assert operation.metadata.Unpack(progress) and operation.response.Unpack(unpacked)
    assert progress.state == service_pb2.SUCCEEDED and progress.attempt == 2
    assert progress.create_time.seconds == 10**9 and not progress.HasField("end_time")
    assert unpacked == report
    assert not operation_of(_job(SUCCEEDED, report=b""), with_response=False).HasField("response")


def test_operation_of_a_failed_job_carries_its_status():
    operation = operation_of(
        _job(FAILED, error_code="INVALID_ARGUMENT", error_message="no such layer")
    )
    assert operation.done and operation.error.code == 3
    assert operation.error.message == "no such layer"
    assert convert.audit_id_of(operation.name) == "aud-9" == convert.audit_id_of("aud-9")
