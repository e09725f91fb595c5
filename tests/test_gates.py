"""Gate rules: grammar and evaluation on hand-written reports in the canonical JSON shape."""

from __future__ import annotations

import math
import re

import pytest

from cnp_client.gates import (
    GATE,
    GRAMMAR,
    WARN,
    GateError,
    Reference,
    all_passed,
    evaluate,
    parse_rule,
)


def metric(value, low=None, high=None, base=0.0) -> dict:
    low = value if low is None else low
    high = value if high is None else high
    return {"value": value, "ci_low": low, "ci_high": high, "base_rate": base}


def audit(attribute: str, value: str, aps: list, flagged: int, layer: str = "layer3") -> dict:
    """One audit table; ``aps`` are the AP_attribute values of the subspaces."""
    subspaces = [
        {
            "index": i,
            "mean_relevance": 0.25,
            "ap_attribute": metric(ap, base=0.5),
            "ap_attribute_pos": metric(ap, base=0.6),
            "ap_attribute_neg": metric(ap, base=0.4),
            "ap_class": metric(0.5, base=0.5),
            "ap_class_attr": metric(0.5, base=0.5),
            "ap_class_no_attr": metric(0.5, base=0.5),
        }
        for i, ap in enumerate(aps)
    ]
    return {
        "attribute": attribute,
        "value": value,
        "layer": layer,
        "n_subspaces": len(aps),
        "subspaces": subspaces,
        "flagged_subspace": flagged,
        "selection_ap": 0.0,
    }


def group(label: int, value: str, count: int, accuracy: float, too_small: bool = False) -> dict:
    return {
        "label": label,
        "attribute": "watermark",
        "value": value,
        "count": count,
        "accuracy": metric(accuracy, accuracy - 0.05, min(accuracy + 0.05, 1.0)),
        "too_small": too_small,
    }


def evaluation(balanced: float, groups: list[dict], parameters: int = 11_000_000) -> dict:
    worst = min(groups, key=lambda g: g["accuracy"]["value"])
    return {
        "balanced_accuracy": metric(balanced, balanced - 0.02, balanced + 0.02),
        "worst_group_accuracy": metric(worst["accuracy"]["value"]),
        "worst_group": f"class {worst['label']}, watermark={worst['value']}",
        "groups": groups,
        "parameters": str(parameters),  # int64: a string in the proto JSON mapping
        "flops": "500000000",
        "latency_ms": 2.5,
    }


def make_report(*, pruned: bool = True, attributes: list[dict] | None = None) -> dict:
    """A watermark audit with a flagged subspace S2, and a CNP pruning that fixed the group."""
    before = evaluation(
        0.80,
        [
            group(0, "0", 120, 0.97),
            group(0, "1", 40, 0.55),
            group(1, "0", 120, 0.90),
            group(1, "1", 8, 1.0, True),
        ],
    )
    after = evaluation(
        0.93,
        [
            group(0, "0", 120, 0.96),
            group(0, "1", 40, 0.99),
            group(1, "0", 120, 0.88),
            group(1, "1", 8, 1.0, True),
        ],
        parameters=7_700_000,
    )
    report = {
        "audit_id": "a-123",
        "model_sha256": "ab" * 32,
        "dataset_digest": "cd" * 32,
        "attributes": attributes
        if attributes is not None
        else [audit("watermark", "1", [0.52, 0.61, 0.91, 0.55], flagged=2)],
        "before": before,
        "timings": {"load": 1.5, "audit": 12.25, "prune": 4.0},
    }
    if pruned:
        report["after"] = after
        report["pruning"] = {
            "method": "cnp",
            "rate": 0.3,
            "filters_total": 960,
            "filters_removed": 288,
            "removed": {"layer1.0.conv1": {"indices": [3, 7]}},
        }
    return report


def two_attribute_report() -> dict:
    return make_report(
        attributes=[
            audit("watermark", "1", [0.52, 0.61, 0.91, 0.55], flagged=2),
            audit("sex", "f", [0.55, 0.62], flagged=-1),
        ]
    )


# --- grammar -------------------------------------------------------------------------------


def test_parse_absolute_and_relative_rules():
    rule = parse_rule("max_ap_attribute <= 0.8")
    assert (rule.metric, rule.op, rule.reference, rule.scope) == (
        "max_ap_attribute",
        "<=",
        Reference("number", 0.8),
        "",
    )
    assert rule.is_audit_rule and not rule.needs_baseline
    rule = parse_rule("worst_group_accuracy>=baseline-0.02")
    assert rule.reference == Reference("baseline", 0.02, "-") and rule.needs_baseline
    rule = parse_rule("after.parameters<=baseline*0.8")
    assert (rule.scope, rule.reference) == ("after", Reference("baseline", 0.8, "*"))
    assert rule.needs_after
    rule = parse_rule("after.balanced_accuracy>=before-0.02")
    assert rule.reference == Reference("before", 0.02, "-")
    assert parse_rule("flagged==none").reference == Reference("none")
    assert parse_rule("balanced_accuracy>1e-1").reference.amount == pytest.approx(0.1)


@pytest.mark.parametrize(
    "text, why",
    [
        ("max_ap_attribute", "malformed"),
        ("max_ap_attribute<=high", "cannot read the reference"),
        ("accuracy>=0.9", "unknown metric"),
        ("worst_group_accuracy=>0.7", "malformed"),
        ("balanced_accuracy==0.9", "takes one of"),
        ("flagged<=1", "flagged takes"),
        ("flagged==2", "flagged takes"),
        ("before.max_ap_attribute<=0.8", "audit metric"),
        ("during.balanced_accuracy>=0.9", "unknown scope"),
        ("balanced_accuracy>=before-0.02", "'before' is a reference only"),
        ("worst_group_accuracy>=", "nothing after '>='"),
        ("worst_group_accuracy>=baseline-", "cannot read the reference"),
    ],
)
def test_malformed_rules_say_what_is_accepted(text, why):
    with pytest.raises(GateError) as err:
        parse_rule(text)
    assert why in str(err.value)
    assert GRAMMAR in str(err.value)  # the message lists the accepted grammar


# --- audit rules: one check per attribute value --------------------------------------------


def test_audit_rules_apply_per_attribute_value():
    report = two_attribute_report()
    checks = evaluate(["max_ap_attribute<=0.8"], report)
    assert [c.name for c in checks] == [
        "max_ap_attribute<=0.8 [watermark=1]",
        "max_ap_attribute<=0.8 [sex=f]",
    ]
    assert [c.passed for c in checks] == [False, True]
    assert checks[0].observed == pytest.approx(0.91) and checks[0].threshold == pytest.approx(0.8)
    assert "needs <= 0.800" in checks[0].message
    assert checks[1].observed == pytest.approx(0.62)

    flagged = evaluate(["flagged==none"], report)
    assert [(c.passed, c.observed) for c in flagged] == [(False, "S3"), (True, "none")]
    assert "S3 flagged (AP_attribute 0.910)" in flagged[0].message
    assert [c.passed for c in evaluate(["flagged!=none"], report)] == [True, False]


def test_layer_is_named_when_several_layers_are_audited():
    report = make_report(
        attributes=[
            audit("watermark", "1", [0.5, 0.7], flagged=-1, layer="layer2"),
            audit("watermark", "1", [0.5, 0.95], flagged=1, layer="layer3"),
        ]
    )
    checks = evaluate(["max_ap_attribute_neg<0.9"], report)
    assert [c.name for c in checks] == [
        "max_ap_attribute_neg<0.9 [watermark=1, layer2]",
        "max_ap_attribute_neg<0.9 [watermark=1, layer3]",
    ]
    assert [c.passed for c in checks] == [True, False]


def test_unmeasured_values_fail_closed():
    report = make_report()
    for subspace in report["attributes"][0]["subspaces"]:
        subspace["ap_attribute"]["value"] = "NaN"  # proto JSON writes NaN as a string
    (check,) = evaluate(["max_ap_attribute<=0.8"], report)
    assert not check.passed and check.observed is None and "not measured" in check.message

    (check,) = evaluate(["max_ap_attribute<=0.8"], make_report(attributes=[]))
    assert not check.passed and "no audit table" in check.message

    report = make_report()
    report["before"]["worst_group_accuracy"]["value"] = float("nan")
    (check,) = evaluate(["before.worst_group_accuracy>=0.1"], report)
    assert not check.passed and math.isnan(check.observed)


def test_omitted_proto3_defaults_read_as_zero():
    report = make_report()
    del report["attributes"][0]["flagged_subspace"]  # 0 is not printed by default
    (check,) = evaluate(["flagged==none"], report)
    assert check.observed == "S1" and not check.passed
    report["after"]["worst_group_accuracy"] = {}  # an all-zero Metric message
    (check,) = evaluate(["worst_group_accuracy>=0.5"], report)
    assert check.observed == 0.0 and not check.passed


# --- evaluation rules ----------------------------------------------------------------------


def test_accuracy_rules_read_after_unless_scoped():
    report = make_report()
    checks = evaluate(
        ["worst_group_accuracy>=0.7", "before.worst_group_accuracy>=0.7", "balanced_accuracy>=0.9"],
        report,
    )
    assert [(c.passed, c.observed) for c in checks] == [(True, 0.88), (False, 0.55), (True, 0.93)]
    assert checks[0].message == "after.worst_group_accuracy = 0.880, >= 0.700"
    assert not all_passed(checks)

    unpruned = make_report(pruned=False)
    (check,) = evaluate(["worst_group_accuracy>=0.7"], unpruned)
    assert check.observed == 0.55 and not check.passed  # falls back to before
    (check,) = evaluate(["after.worst_group_accuracy>=0.7"], unpruned)
    assert not check.passed and "did not prune" in check.message


def test_after_compared_with_before():
    report = make_report()
    (check,) = evaluate(["after.balanced_accuracy>=before-0.02"], report)
    assert check.passed and check.threshold == pytest.approx(0.78)
    assert "(before 0.800 - 0.02)" in check.message
    (check,) = evaluate(["after.parameters<=before*0.5"], report)
    assert not check.passed and check.observed == 7_700_000 and check.threshold == 5_500_000


# --- baseline rules ------------------------------------------------------------------------


def test_baseline_rules():
    report, baseline = make_report(), make_report()
    baseline["after"]["worst_group_accuracy"]["value"] = 0.89
    (check,) = evaluate(["worst_group_accuracy>=baseline-0.02"], report, baseline)
    assert check.passed and check.threshold == pytest.approx(0.87)
    baseline["after"]["worst_group_accuracy"]["value"] = 0.95
    (check,) = evaluate(["worst_group_accuracy>=baseline-0.02"], report, baseline)
    assert not check.passed and "needs >= 0.930 (baseline 0.950 - 0.02)" in check.message

    # "No bigger than 80 % of the baseline's parameters", int64 read from strings.
    baseline["after"]["parameters"] = "10000000"
    (check,) = evaluate(["after.parameters<=baseline*0.8"], report, baseline)
    assert check.passed and check.threshold == pytest.approx(8_000_000)

    # A baseline without pruning is compared on its `before` evaluation.
    (check,) = evaluate(["balanced_accuracy>=baseline"], report, make_report(pruned=False))
    assert check.passed and check.threshold == pytest.approx(0.80)
    (check,) = evaluate(["after.balanced_accuracy>=baseline"], report, make_report(pruned=False))
    assert not check.passed and "baseline report has no 'after'" in check.message


def test_audit_baseline_matches_attribute_values():
    report = two_attribute_report()
    baseline = make_report(attributes=[audit("watermark", "1", [0.5, 0.88], flagged=1)])
    checks = evaluate(["max_ap_attribute<=baseline+0.01"], report, baseline)
    assert not checks[0].passed and checks[0].threshold == pytest.approx(0.89)
    assert not checks[1].passed and "baseline report has no audit" in checks[1].message


def test_baseline_rule_without_baseline_is_a_configuration_error():
    with pytest.raises(GateError, match="baseline"):
        evaluate(["worst_group_accuracy>=baseline"], make_report())


# --- interval bounds -----------------------------------------------------------------------


def interval_report() -> dict:
    """S3 has the highest AP (0.91, CI 0.85-0.95); S2 a lower AP with a wider interval."""
    report = make_report()
    subspaces = report["attributes"][0]["subspaces"]
    subspaces[1]["ap_attribute"] = metric(0.70, 0.40, 0.97, base=0.5)
    subspaces[2]["ap_attribute"] = metric(0.91, 0.85, 0.95, base=0.5)
    return report


def test_rules_read_interval_bounds():
    rule = parse_rule("max_ap_attribute.ci_low >= 0.9")
    assert (rule.metric, rule.bound, rule.scope, rule.text) == (
        "max_ap_attribute",
        "ci_low",
        "",
        "max_ap_attribute.ci_low>=0.9",
    )
    rule = parse_rule("after.worst_group_accuracy.ci_high<0.6")
    assert (rule.scope, rule.metric, rule.bound) == ("after", "worst_group_accuracy", "ci_high")
    assert parse_rule("balanced_accuracy>=0.9").bound == "value"
    assert parse_rule("before.balanced_accuracy.value>=0.9").bound == "value"

    report = interval_report()
    # The estimate passes where its interval's low end does not.
    value, low = evaluate(["max_ap_attribute>=0.9", "max_ap_attribute.ci_low>=0.9"], report)
    assert value.passed and value.observed == pytest.approx(0.91)
    assert not low.passed and low.observed == pytest.approx(0.85)
    assert low.message == "watermark=1: max_ap_attribute.ci_low = 0.850, needs >= 0.900"
    # The highest bound over the subspaces, not the bound of the highest AP: S2's
    # interval reaches 0.97, so "no subspace reaches 0.96" cannot be claimed.
    (high,) = evaluate(["max_ap_attribute.ci_high<=0.96"], report)
    assert not high.passed and high.observed == pytest.approx(0.97)

    # Evaluation metrics: after (pruned) balanced accuracy 0.93, CI 0.91-0.95.
    low, high = evaluate(
        ["balanced_accuracy.ci_low>=0.92", "balanced_accuracy.ci_high<0.96"], report
    )
    assert not low.passed and low.observed == pytest.approx(0.91)
    assert low.message == "after.balanced_accuracy.ci_low = 0.910, needs >= 0.920"
    assert high.passed and high.observed == pytest.approx(0.95)


def test_relative_references_read_the_same_bound():
    report, baseline = interval_report(), make_report()
    # before: balanced accuracy 0.80, CI 0.78-0.82; after: its low end 0.91.
    (check,) = evaluate(["after.balanced_accuracy.ci_low>=before+0.12"], report)
    assert check.passed and check.threshold == pytest.approx(0.90)
    assert "(before 0.780 + 0.12)" in check.message
    baseline["after"]["balanced_accuracy"] = metric(0.95, 0.94, 0.96)
    (check,) = evaluate(["balanced_accuracy.ci_low>=baseline"], report, baseline)
    assert not check.passed and check.threshold == pytest.approx(0.94)
    checks = evaluate(["max_ap_attribute.ci_high<=baseline"], report, interval_report())
    assert checks[0].passed and checks[0].threshold == pytest.approx(0.97)


def test_omitted_bounds_read_as_zero():
    report = make_report()
    del report["after"]["balanced_accuracy"]["ci_low"]  # proto3 JSON omits 0.0
    (check,) = evaluate(["balanced_accuracy.ci_low>=0.5"], report)
    assert check.observed == 0.0 and not check.passed


@pytest.mark.parametrize(
    "text, why",
    [
        (
            "ap_attribute.ci_low>=0.9",
            "unknown metric 'ap_attribute' (did you mean max_ap_attribute?)",
        ),
        ("worst_group_accuracy.ci_lo>=0.7", "unknown bound 'ci_lo'"),
        ("parameters.ci_high<=5", "parameters has no interval"),
        ("flagged.ci_low==none", "flagged has no interval"),
        ("after.worst_group_accuracy.ci_low.x>=0.7", "malformed"),
        ("warn:", "malformed"),
    ],
)
def test_malformed_bound_and_level_rules(text, why):
    with pytest.raises(GateError, match=re.escape(why)):
        parse_rule(text)


# --- warn rules ----------------------------------------------------------------------------


def test_warn_rules_are_reported_but_never_fail():
    report = make_report()  # after: worst group 0.88, balanced accuracy 0.93
    rule = parse_rule("warn: worst_group_accuracy >= 0.9")
    assert (rule.level, rule.text, rule.metric) == (
        WARN,
        "warn:worst_group_accuracy>=0.9",
        "worst_group_accuracy",
    )
    assert parse_rule("worst_group_accuracy>=0.9", WARN) == rule  # as --warn gives it

    warned, passed = evaluate([rule, "balanced_accuracy>=0.9"], report)
    assert (warned.passed, warned.warned, warned.failed, warned.level) == (False, True, False, WARN)
    assert warned.name == "warn:worst_group_accuracy>=0.9"
    assert "needs >= 0.900" in warned.message
    assert passed.passed and not passed.warned and passed.level == GATE
    assert all_passed([warned, passed])  # a warning alone never fails the gate

    # A warn rule that holds is a plain pass; a gate rule that fails still fails.
    checks = evaluate(["warn:flagged!=none", "flagged==none"], report)
    assert [(c.passed, c.warned, c.failed) for c in checks] == [
        (True, False, False),
        (False, False, True),
    ]
    assert not all_passed(checks)
    # Audit rules give one warning per attribute value.
    checks = evaluate(["warn:max_ap_attribute<=0.8"], two_attribute_report())
    assert [(c.name, c.warned) for c in checks] == [
        ("warn:max_ap_attribute<=0.8 [watermark=1]", True),
        ("warn:max_ap_attribute<=0.8 [sex=f]", False),
    ]


# --- fairness rules ------------------------------------------------------------------------


def breakdown(attributes: list[str], eo_difference: float, dp_difference: float) -> dict:
    """A fairness breakdown in the canonical JSON shape (groups are not read by gates)."""
    return {
        "attributes": attributes,
        "positive_class": 1,
        "groups": [],
        "demographic_parity_difference": metric(
            dp_difference, dp_difference - 0.05, dp_difference + 0.05
        ),
        "demographic_parity_ratio": metric(1 - dp_difference),
        "equalized_odds_difference": metric(
            eo_difference, eo_difference - 0.04, eo_difference + 0.04
        ),
        "equalized_odds_ratio": metric(1 - eo_difference),
        "accuracy_difference": metric(0.05),
    }


def fairness_report() -> dict:
    """Two attributes and their intersection; pruning narrowed the sex disparity only."""
    report = make_report()
    report["before"]["fairness"] = [
        breakdown(["sex"], 0.30, 0.25),
        breakdown(["race"], 0.08, 0.06),
        breakdown(["sex", "race"], 0.35, 0.30),
    ]
    report["after"]["fairness"] = [
        breakdown(["sex"], 0.09, 0.07),
        breakdown(["race"], 0.09, 0.06),
        breakdown(["sex", "race"], 0.12, 0.10),
    ]
    return report


def test_fairness_rules_are_checked_once_per_breakdown():
    report = fairness_report()
    checks = evaluate(["equalized_odds_difference<=0.1"], report)
    assert [c.name for c in checks] == [
        "equalized_odds_difference<=0.1 [sex]",
        "equalized_odds_difference<=0.1 [race]",
        "equalized_odds_difference<=0.1 [sex x race]",
    ]
    assert [c.passed for c in checks] == [True, True, False]  # read from after
    assert (
        checks[2].message == "sex x race: after.equalized_odds_difference = 0.120, needs <= 0.100"
    )
    before = evaluate(["before.equalized_odds_difference<=0.1"], report)
    assert [c.passed for c in before] == [False, True, False]
    bounds = evaluate(["demographic_parity_difference.ci_high<=0.125"], report)
    assert [c.observed for c in bounds] == pytest.approx([0.12, 0.11, 0.15])
    assert [c.passed for c in bounds] == [True, True, False]


def test_fairness_after_compared_with_before_and_warn_rules():
    report = fairness_report()
    checks = evaluate(["after.demographic_parity_difference<=before"], report)
    assert [c.passed for c in checks] == [True, True, True]
    checks = evaluate(["after.equalized_odds_difference<=before"], report)
    assert [c.passed for c in checks] == [True, False, True]  # race got worse: 0.08 -> 0.09
    assert "(before 0.080)" in checks[1].message
    warned = evaluate(["warn:equalized_odds_ratio>=0.9"], report)
    assert [c.warned for c in warned] == [False, False, True] and all_passed(warned)


def test_fairness_baseline_matches_breakdowns_by_attributes():
    report, baseline = fairness_report(), fairness_report()
    baseline["after"]["fairness"] = baseline["after"]["fairness"][:1]  # only sex
    checks = evaluate(["equalized_odds_difference<=baseline+0.01"], report, baseline)
    assert [c.passed for c in checks] == [True, False, False]
    assert checks[1].message == "race: no breakdown of it baseline"


def test_fairness_unmeasured_fails_closed_and_old_reports_are_configuration_errors():
    report = fairness_report()
    report["after"]["fairness"][0]["equalized_odds_difference"]["value"] = "NaN"
    checks = evaluate(["equalized_odds_difference<=0.1"], report)
    assert not checks[0].passed and "was not measured" in checks[0].message
    old = make_report()  # made before fairness reviews: no "fairness" key at all
    with pytest.raises(GateError, match="has no fairness metrics"):
        evaluate(["equalized_odds_difference<=0.1"], old)
    none_audited = make_report()
    none_audited["after"]["fairness"] = []
    with pytest.raises(GateError, match="no fairness breakdown"):
        evaluate(["demographic_parity_ratio>=0.8"], none_audited)
    unpruned = fairness_report()
    del unpruned["after"]
    (check,) = evaluate(["after.equalized_odds_difference<=0.1"], unpruned)
    assert not check.passed and "the audit did not prune" in check.message


def test_fairness_rule_grammar():
    rule = parse_rule("warn: after.equalized_odds_ratio.ci_low >= before * 0.9")
    assert (rule.scope, rule.metric, rule.bound, rule.level) == (
        "after",
        "equalized_odds_ratio",
        "ci_low",
        WARN,
    )
    assert rule.reference == Reference("before", 0.9, "*") and rule.is_fairness_rule
    for name in (
        "demographic_parity_difference",
        "demographic_parity_ratio",
        "equalized_odds_difference",
        "equalized_odds_ratio",
        "accuracy_difference",
    ):
        assert name in GRAMMAR and parse_rule(f"{name}<=1").is_fairness_rule
    with pytest.raises(GateError, match="did you mean equalized_odds_difference"):
        parse_rule("equalised_odds_difference<=0.1")
    with pytest.raises(GateError, match="only for after"):
        parse_rule("equalized_odds_difference<=before")
