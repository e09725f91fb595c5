"""What a job returns: typed results, mirrored by the proto ``cnp.v1.AuditReport``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .spec import AuditSpec


def class_label(label: int, name: str = "") -> str:
    """How reports show a class: ``ring (3)`` when it has a name, else ``class 3``."""
    return f"{name} ({label})" if name else f"class {label}"


def class_name(names: Sequence[str], label: int) -> str:
    """The name of class ``label`` in ``names`` (output order), or "" when it has none."""
    return names[label] if 0 <= label < len(names) else ""


@dataclass
class Metric:
    """A measured value with its bootstrap 95 % interval and, for APs, the base rate.

    The base rate is what a random score achieves (for AP: the positive fraction).
    ``ci_low``/``ci_high`` equal ``value`` when bootstrapping is disabled.
    """

    value: float
    ci_low: float
    ci_high: float
    base_rate: float = 0.0


# The audit table's AP columns (ALGORITHMS.md section 3), in table order: the field of
# :class:`SubspaceScore` (and of the proto), its Markdown header and its short header.
AP_COLUMNS = (
    ("ap_attribute", "AP attribute", "AP_A"),
    ("ap_attribute_pos", "AP attribute (pos. class)", "AP_A+"),
    ("ap_attribute_neg", "AP attribute (neg. class)", "AP_A-"),
    ("ap_class", "AP class", "AP_cls"),
    ("ap_class_attr", "AP class (with attribute)", "AP_cls|A"),
    ("ap_class_no_attr", "AP class (without attribute)", "AP_cls|~A"),
)


@dataclass
class SubspaceScore:
    """One row of the concept audit table (ALGORITHMS.md section 3), on the test split."""

    index: int
    mean_relevance: float
    ap_attribute: Metric
    ap_attribute_pos: Metric
    ap_attribute_neg: Metric
    ap_class: Metric
    ap_class_attr: Metric
    ap_class_no_attr: Metric


@dataclass
class AttributeAudit:
    """The audit table of one attribute value (one-vs-rest for multi-valued attributes)."""

    attribute: str
    value: str
    layer: str
    n_subspaces: int  # the K this table uses (chosen on the validation split)
    subspaces: list[SubspaceScore]
    flagged_subspace: int = -1  # index into subspaces, -1 when none clears the threshold
    selection_ap: float = 0.0  # best AP_attribute on the validation split (used to choose)


@dataclass
class GroupMetric:
    """Accuracy of one group: class x attribute value."""

    label: int
    attribute: str
    value: str
    count: int
    accuracy: Metric
    too_small: bool = False  # fewer samples than min_group_size: read with care
    label_name: str = ""  # the class's name when the model has class names


@dataclass
class FairnessGroup:
    """One group of a fairness breakdown: the samples with one value of an attribute, or
    one combination of values of several attributes (an intersectional group). Rates are
    of the decision "predicted the positive class" (NaN where a rate has no samples)."""

    values: list[str]  # one per attribute of the breakdown, in its order
    count: int
    accuracy: Metric
    selection_rate: Metric  # P(predicted positive)
    true_positive_rate: Metric  # P(predicted positive | positive class)
    false_positive_rate: Metric  # P(predicted positive | not the positive class)
    too_small: bool = False  # fewer samples than min_group_size: left out of the disparities


@dataclass
class GroupFairness:
    """Fairlearn's group metrics over the groups of one attribute or of an intersection of
    attributes, for the positive class. Differences are max - min over the groups that are
    not too small, ratios min / max (Fairlearn's ``between_groups`` method); equalized
    odds takes the worse of the true and false positive rates."""

    attributes: list[str]  # one attribute, or several for intersectional groups
    positive_class: int
    groups: list[FairnessGroup]
    demographic_parity_difference: Metric
    demographic_parity_ratio: Metric
    equalized_odds_difference: Metric
    equalized_odds_ratio: Metric
    accuracy_difference: Metric


@dataclass
class Evaluation:
    """Test-split accuracy of one model, overall and per group."""

    balanced_accuracy: Metric
    worst_group_accuracy: Metric
    worst_group: str
    groups: list[GroupMetric]
    parameters: int = 0
    flops: int = 0
    latency_ms: float = 0.0  # CPU, batch 1, median
    # One breakdown per audited attribute, then their intersection when there are several.
    fairness: list[GroupFairness] = field(default_factory=list)


@dataclass
class PruningSummary:
    method: str
    rate: float
    filters_total: int
    filters_removed: int
    removed: dict[str, list[int]] = field(default_factory=dict)  # conv name -> channel indices
    # Hidden neurons of the fully connected layers (every Linear but the output layer),
    # ranked apart from the filters at the same rate; 0 for models without any.
    neurons_total: int = 0
    neurons_removed: int = 0


@dataclass
class ValueSummary:
    """One value of an attribute in an :class:`AttributeSummary`: the subspace with the
    highest test AP_attribute in the value's table at the summary's layer."""

    value: str
    n_subspaces: int  # the K of the value's table (chosen per value on validation)
    best_subspace: int  # index into that table; -1 when every AP is undefined
    ap_attribute: Metric  # the best subspace's test AP_attribute, interval and base rate
    flagged_subspace: int = -1  # the table's flag (chosen on validation); -1: none

    @property
    def best_is_flagged(self) -> bool:
        return self.best_subspace >= 0 and self.best_subspace == self.flagged_subspace


@dataclass
class SubspaceValues:
    """Subspace ``index`` of the basis with ``n_subspaces`` subspaces fitted at the
    summary's layer, and the attribute values it stands for."""

    n_subspaces: int
    index: int
    values: list[str]


@dataclass
class AttributeSummary:
    """One audited attribute at one layer, over its values' one-vs-rest tables.

    ``shared``: the subspaces that are the best subspace (highest test AP_attribute) of two
    or more values, i.e. one concept that encodes the attribute as a whole (a skin-tone
    axis rather than one direction per group). Two values' best subspaces are the same
    subspace only when both tables read the same fitted basis (same layer, same K, and a
    basis fitted for every value: unsupervised methods) and the same index; tables of
    different K are different fits and never share, nor do the per-value directions of
    supervised methods.

    ``removed``: the subspaces CNP removes when pruned for this attribute (the union of
    every value's flagged subspace at the first layer that flagged one, as the audit
    found them before any relearning); empty at other layers and when none was flagged.
    """

    attribute: str
    layer: str
    values: list[ValueSummary]
    shared: list[SubspaceValues] = field(default_factory=list)
    removed: list[SubspaceValues] = field(default_factory=list)


@dataclass
class AuditResult:
    spec: AuditSpec
    model_sha256: str
    dataset_digest: str
    attributes: list[AttributeAudit]
    before: Evaluation | None = None
    after: Evaluation | None = None
    pruning: PruningSummary | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    versions: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> local path
    class_names: list[str] = field(default_factory=list)  # output order; empty: none given
    # One per audited attribute and layer, in the order of ``attributes``.
    attribute_summaries: list[AttributeSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
