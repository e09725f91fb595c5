"""The contract's one translation between cnp's dataclasses and the ``cnp.v1`` messages.

Spec: ``cnp_core.spec`` <-> ``cnp.v1.AuditSpec``, field for field by name; a scalar left
unset in the message (and an empty list) takes the dataclass default. Results:
``cnp_core.results.AuditResult`` <-> ``cnp.v1.AuditReport`` and its canonical JSON.
Operations: the name of an audit's long-running operation.

Torch-free on purpose (protobuf, googleapis-common-protos, ``cnp.v1`` and cnp_core's
spec, results and errors only): the client and the server both use it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from cnp.v1 import report_pb2, spec_pb2
from cnp_core.errors import InvalidSpec
from cnp_core.results import (
    AP_COLUMNS,
    AttributeAudit,
    AttributeSummary,
    AuditResult,
    Evaluation,
    FairnessGroup,
    GroupFairness,
    GroupMetric,
    Metric,
    PruningSummary,
    SubspaceScore,
    SubspaceValues,
    ValueSummary,
)
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef, PruneSpec

OPERATION_PREFIX = "operations/"

# Nested spec dataclasses by field name (the proto field names are the same).
_NESTED: dict[str, type] = {"model": ModelRef, "dataset": DatasetRef, "prune": PruneSpec}


# --- spec -----------------------------------------------------------------------------


def _fill(message: Message, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            _fill(getattr(message, f.name), value)
        elif isinstance(value, (list, tuple)):
            getattr(message, f.name).extend(value)
        else:
            setattr(message, f.name, value)


def _read(message: Message, cls: type) -> Any:
    kwargs: dict[str, Any] = {}
    by_name = message.DESCRIPTOR.fields_by_name
    for f in dataclasses.fields(cls):
        descriptor = by_name[f.name]
        value = getattr(message, f.name)
        if descriptor.message_type is not None:
            if message.HasField(f.name):
                kwargs[f.name] = _read(value, _NESTED[f.name])
        elif descriptor.is_repeated:
            if len(value):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                kwargs[f.name] = tuple(value) if isinstance(default, tuple) else list(value)
        elif message.HasField(f.name):
            kwargs[f.name] = value
    return cls(**kwargs)


def spec_to_proto(spec: AuditSpec) -> spec_pb2.AuditSpec:
    """Every field set explicitly, so the receiver needs no defaults of its own."""
    message = spec_pb2.AuditSpec()
    _fill(message, spec)
    return message


def spec_from_proto(message: spec_pb2.AuditSpec) -> AuditSpec:
    """The dataclass; unset fields take the library defaults. Not validated here."""
    try:
        return _read(message, AuditSpec)
    except (TypeError, ValueError) as err:
        raise InvalidSpec(f"spec: {err}") from None


def spec_to_json(spec: AuditSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)


def spec_from_json(text: str) -> AuditSpec:
    return AuditSpec.from_dict(json.loads(text))


# --- results --------------------------------------------------------------------------


def _metric(m: Metric) -> report_pb2.Metric:
    return report_pb2.Metric(
        value=m.value, ci_low=m.ci_low, ci_high=m.ci_high, base_rate=m.base_rate
    )


def _metric_back(m: report_pb2.Metric) -> Metric:
    return Metric(value=m.value, ci_low=m.ci_low, ci_high=m.ci_high, base_rate=m.base_rate)


def _attribute(a: AttributeAudit) -> report_pb2.AttributeAudit:
    subspaces = [
        report_pb2.SubspaceScore(
            index=s.index,
            mean_relevance=s.mean_relevance,
            **{name: _metric(getattr(s, name)) for name, _, _ in AP_COLUMNS},
        )
        for s in a.subspaces
    ]
    return report_pb2.AttributeAudit(
        attribute=a.attribute,
        value=a.value,
        layer=a.layer,
        n_subspaces=a.n_subspaces,
        subspaces=subspaces,
        flagged_subspace=a.flagged_subspace,
        selection_ap=a.selection_ap,
    )


def _attribute_back(a: report_pb2.AttributeAudit) -> AttributeAudit:
    subspaces = [
        SubspaceScore(
            index=s.index,
            mean_relevance=s.mean_relevance,
            **{name: _metric_back(getattr(s, name)) for name, _, _ in AP_COLUMNS},
        )
        for s in a.subspaces
    ]
    return AttributeAudit(
        attribute=a.attribute,
        value=a.value,
        layer=a.layer,
        n_subspaces=a.n_subspaces,
        subspaces=subspaces,
        flagged_subspace=a.flagged_subspace,
        selection_ap=a.selection_ap,
    )


def _summary(s: AttributeSummary) -> report_pb2.AttributeSummary:
    values = [
        report_pb2.ValueSummary(
            value=v.value,
            n_subspaces=v.n_subspaces,
            best_subspace=v.best_subspace,
            ap_attribute=_metric(v.ap_attribute),
            flagged_subspace=v.flagged_subspace,
        )
        for v in s.values
    ]

    def subspaces(items: list[SubspaceValues]) -> list[report_pb2.SubspaceValues]:
        return [
            report_pb2.SubspaceValues(n_subspaces=u.n_subspaces, index=u.index, values=u.values)
            for u in items
        ]

    return report_pb2.AttributeSummary(
        attribute=s.attribute,
        layer=s.layer,
        values=values,
        shared=subspaces(s.shared),
        removed=subspaces(s.removed),
    )


def _summary_back(s: report_pb2.AttributeSummary) -> AttributeSummary:
    values = [
        ValueSummary(
            value=v.value,
            n_subspaces=v.n_subspaces,
            best_subspace=v.best_subspace,
            ap_attribute=_metric_back(v.ap_attribute),
            flagged_subspace=v.flagged_subspace,
        )
        for v in s.values
    ]

    def subspaces(items) -> list[SubspaceValues]:
        return [SubspaceValues(u.n_subspaces, u.index, list(u.values)) for u in items]

    return AttributeSummary(
        attribute=s.attribute,
        layer=s.layer,
        values=values,
        shared=subspaces(s.shared),
        removed=subspaces(s.removed),
    )


def _metric_fields(cls: type) -> tuple[str, ...]:
    """The fields of ``cls`` that hold a Metric (its proto message has the same names)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.type in (Metric, "Metric"))


_RATES = _metric_fields(FairnessGroup)  # accuracy, selection and true/false positive rates
_DISPARITIES = _metric_fields(GroupFairness)  # demographic parity, equalized odds, ...


def _fairness(f: GroupFairness) -> report_pb2.GroupFairness:
    groups = [
        report_pb2.FairnessGroup(
            values=g.values,
            count=g.count,
            too_small=g.too_small,
            **{name: _metric(getattr(g, name)) for name in _RATES},
        )
        for g in f.groups
    ]
    return report_pb2.GroupFairness(
        attributes=f.attributes,
        positive_class=f.positive_class,
        groups=groups,
        **{name: _metric(getattr(f, name)) for name in _DISPARITIES},
    )


def _fairness_back(f: report_pb2.GroupFairness) -> GroupFairness:
    groups = [
        FairnessGroup(
            values=list(g.values),
            count=g.count,
            too_small=g.too_small,
            **{name: _metric_back(getattr(g, name)) for name in _RATES},
        )
        for g in f.groups
    ]
    return GroupFairness(
        attributes=list(f.attributes),
        positive_class=f.positive_class,
        groups=groups,
        **{name: _metric_back(getattr(f, name)) for name in _DISPARITIES},
    )


def _evaluation(e: Evaluation) -> report_pb2.Evaluation:
    groups = [
        report_pb2.GroupMetric(
            label=g.label,
            attribute=g.attribute,
            value=g.value,
            count=g.count,
            accuracy=_metric(g.accuracy),
            too_small=g.too_small,
            label_name=g.label_name,
        )
        for g in e.groups
    ]
    return report_pb2.Evaluation(
        balanced_accuracy=_metric(e.balanced_accuracy),
        worst_group_accuracy=_metric(e.worst_group_accuracy),
        worst_group=e.worst_group,
        groups=groups,
        parameters=e.parameters,
        flops=e.flops,
        latency_ms=e.latency_ms,
        fairness=[_fairness(f) for f in e.fairness],
    )


def _evaluation_back(e: report_pb2.Evaluation) -> Evaluation:
    groups = [
        GroupMetric(
            label=g.label,
            attribute=g.attribute,
            value=g.value,
            count=g.count,
            accuracy=_metric_back(g.accuracy),
            too_small=g.too_small,
            label_name=g.label_name,
        )
        for g in e.groups
    ]
    return Evaluation(
        balanced_accuracy=_metric_back(e.balanced_accuracy),
        worst_group_accuracy=_metric_back(e.worst_group_accuracy),
        worst_group=e.worst_group,
        groups=groups,
        parameters=e.parameters,
        flops=e.flops,
        latency_ms=e.latency_ms,
        fairness=[_fairness_back(f) for f in e.fairness],
    )


def report_to_proto(
    result: AuditResult,
    *,
    audit_id: str = "",
    artifacts: dict[str, dict[str, Any]] | None = None,
    service_version: str = "",
) -> report_pb2.AuditReport:
    """The report of one job. ``artifacts``: name -> {"size", "sha256", "content_type"}.

    Local artifact paths stay on the server: the report names artifacts only.
    """
    report = report_pb2.AuditReport(
        audit_id=audit_id,
        spec=spec_to_proto(result.spec),
        model_sha256=result.model_sha256,
        dataset_digest=result.dataset_digest,
        attributes=[_attribute(a) for a in result.attributes],
        timings=result.timings,
        versions=result.versions,
        service_version=service_version,
        class_names=result.class_names,
        attribute_summaries=[_summary(s) for s in result.attribute_summaries],
    )
    if result.before is not None:
        report.before.CopyFrom(_evaluation(result.before))
    if result.after is not None:
        report.after.CopyFrom(_evaluation(result.after))
    if result.pruning is not None:
        p = result.pruning
        report.pruning.CopyFrom(
            report_pb2.PruningSummary(
                method=p.method,
                rate=p.rate,
                filters_total=p.filters_total,
                filters_removed=p.filters_removed,
                removed={k: report_pb2.ChannelList(indices=v) for k, v in p.removed.items()},
                neurons_total=p.neurons_total,
                neurons_removed=p.neurons_removed,
            )
        )
    for name, info in sorted((artifacts or {}).items()):
        report.artifacts.add(
            name=name,
            size=int(info.get("size", 0)),
            sha256=info.get("sha256", ""),
            content_type=info.get("content_type", ""),
        )
    return report


def result_from_proto(report: report_pb2.AuditReport) -> AuditResult:
    """The typed result; ``artifacts`` maps each name to itself (paths stay on the server)."""
    pruning = None
    if report.HasField("pruning"):
        p = report.pruning
        pruning = PruningSummary(
            method=p.method,
            rate=p.rate,
            filters_total=p.filters_total,
            filters_removed=p.filters_removed,
            removed={k: list(v.indices) for k, v in p.removed.items()},
            neurons_total=p.neurons_total,
            neurons_removed=p.neurons_removed,
        )
    return AuditResult(
        spec=spec_from_proto(report.spec),
        model_sha256=report.model_sha256,
        dataset_digest=report.dataset_digest,
        attributes=[_attribute_back(a) for a in report.attributes],
        before=_evaluation_back(report.before) if report.HasField("before") else None,
        after=_evaluation_back(report.after) if report.HasField("after") else None,
        pruning=pruning,
        timings=dict(report.timings),
        versions=dict(report.versions),
        artifacts={a.name: a.name for a in report.artifacts},
        class_names=list(report.class_names),
        attribute_summaries=[_summary_back(s) for s in report.attribute_summaries],
    )


def report_to_dict(report: report_pb2.AuditReport) -> dict[str, Any]:
    """The canonical report as a dict (see :func:`report_to_json`)."""
    return json.loads(report_to_json(report))


def report_to_json(report: report_pb2.AuditReport, indent: int | None = 2) -> str:
    """The canonical machine-readable report: proto JSON, field names preserved.

    Default values are printed (``flagged_subspace: -1`` and ``0`` both appear) and
    64-bit integers are numbers, not strings.
    """
    return json_format.MessageToJson(
        report,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=indent,
        unquote_int64_if_possible=True,
    )


def report_from_json(text: str) -> report_pb2.AuditReport:
    return json_format.Parse(text, report_pb2.AuditReport())


# --- operations -----------------------------------------------------------------------


def operation_name(audit_id: str) -> str:
    """The long-running operation name of an audit (``operations/<id>``)."""
    return OPERATION_PREFIX + audit_id


def audit_id_of(name: str) -> str:
    """The audit id in an operation name (``operations/<id>``); a bare id is accepted too."""
    return name[len(OPERATION_PREFIX) :] if name.startswith(OPERATION_PREFIX) else name
