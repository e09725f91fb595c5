"""Group fairness (cnp_core.fairness): every number cross-checked against Fairlearn called
directly on the same predictions, with planted disparities, too-small groups, undefined
rates and the bootstrap intervals; then the way it reaches reports (proto round trip,
MLflow metric names, CSV, Markdown)."""

from __future__ import annotations

import csv
import math
import time

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score

from cnp_core.evaluation import evaluate_predictions
from cnp_core.fairness import DISPARITIES, RATES, group_fairness
from cnp_core.results import FairnessGroup, GroupFairness

EXACT = 1e-12


def planted(n: int, seed: int = 0, rates=(("a", 0.8), ("b", 0.2))):
    """Random labels; a predictor that selects each group at its planted rate."""
    rng = np.random.default_rng(seed)
    groups = rng.choice([g for g, _ in rates], size=n)
    labels = rng.integers(0, 2, size=n)
    chance = np.select([groups == g for g, _ in rates], [r for _, r in rates])
    return labels, (rng.random(n) < chance).astype(int), groups


def fairlearn_frame(labels, predictions, features) -> pd.DataFrame:
    """Fairlearn's own group metrics, for the cross-check."""
    return MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "selection_rate": selection_rate,
            "true_positive_rate": true_positive_rate,
            "false_positive_rate": false_positive_rate,
        },
        y_true=labels,
        y_pred=predictions,
        sensitive_features=features,
    ).by_group


def assert_matches_fairlearn(breakdown: GroupFairness, labels, predictions, features) -> None:
    expected = fairlearn_frame(labels, predictions, features).dropna(how="all")
    assert [tuple(g.values) for g in breakdown.groups] == [
        key if isinstance(key, tuple) else (key,) for key in expected.index
    ]
    for group, (_, row) in zip(breakdown.groups, expected.iterrows(), strict=True):
        for rate in RATES:
            assert getattr(group, rate).value == pytest.approx(row[rate], abs=EXACT)
    kwargs = {"sensitive_features": features}
    direct = {
        "demographic_parity_difference": demographic_parity_difference,
        "demographic_parity_ratio": demographic_parity_ratio,
        "equalized_odds_difference": equalized_odds_difference,
        "equalized_odds_ratio": equalized_odds_ratio,
    }
    for name, function in direct.items():
        expected_value = function(labels, predictions, **kwargs)
        assert getattr(breakdown, name).value == pytest.approx(expected_value, abs=EXACT)
    accuracy = expected["accuracy"]
    assert breakdown.accuracy_difference.value == pytest.approx(
        accuracy.max() - accuracy.min(), abs=EXACT
    )


def test_single_attribute_matches_fairlearn_with_the_planted_disparity():
    labels, predictions, sex = planted(4000)
    (breakdown,) = group_fairness(labels, predictions, {"sex": sex}, resamples=100, seed=3)
    assert breakdown.attributes == ["sex"] and breakdown.positive_class == 1
    assert_matches_fairlearn(breakdown, labels, predictions, sex)
    dp = breakdown.demographic_parity_difference
    assert dp.value == pytest.approx(0.6, abs=0.04)  # planted 0.8 vs 0.2
    assert dp.ci_low <= dp.value <= dp.ci_high and dp.ci_high - dp.ci_low < 0.08
    assert breakdown.demographic_parity_ratio.value == pytest.approx(0.25, abs=0.03)
    # Selection ignores the label: true and false positive rates follow the selection rate.
    assert breakdown.equalized_odds_difference.value == pytest.approx(0.6, abs=0.05)
    for group in breakdown.groups:
        assert not group.too_small and group.count == int((sex == group.values[0]).sum())
        for rate in RATES:
            m = getattr(group, rate)
            assert m.ci_low <= m.value <= m.ci_high


def test_multi_valued_attribute_and_intersection_match_fairlearn():
    rng = np.random.default_rng(1)
    n = 6000
    race = rng.choice(["w", "x", "y", "z"], size=n)
    sex = rng.choice(["f", "m"], size=n)
    labels = rng.integers(0, 2, size=n)
    chance = np.where(race == "z", 0.3, 0.6) + np.where(sex == "f", -0.1, 0.1)
    predictions = (rng.random(n) < chance).astype(int)
    by_race, by_sex, both = group_fairness(
        labels, predictions, {"race": race, "sex": sex}, resamples=0
    )
    assert_matches_fairlearn(by_race, labels, predictions, race)
    assert_matches_fairlearn(by_sex, labels, predictions, sex)
    features = pd.DataFrame({"race": race, "sex": sex})
    assert both.attributes == ["race", "sex"] and len(both.groups) == 8
    assert_matches_fairlearn(both, labels, predictions, features)
    # The intersection shows more disparity than either attribute alone (z & f vs !z & m).
    assert both.demographic_parity_difference.value == pytest.approx(0.5, abs=0.06)
    assert both.demographic_parity_difference.value > max(
        by_race.demographic_parity_difference.value, by_sex.demographic_parity_difference.value
    )


def test_at_most_three_attributes_intersect():
    labels, predictions, a = planted(200)
    four = {name: a for name in "abcd"}
    assert [b.attributes for b in group_fairness(labels, predictions, four, resamples=0)] == [
        ["a"],
        ["b"],
        ["c"],
        ["d"],
    ]
    three = group_fairness(labels, predictions, {n: a for n in "abc"}, resamples=0)
    assert three[-1].attributes == ["a", "b", "c"]


def test_multi_class_reduces_to_the_positive_class():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=3000)
    predictions = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, 4, size=3000))
    sex = rng.choice(["f", "m"], size=3000)
    (breakdown,) = group_fairness(labels, predictions, {"sex": sex}, positive_class=2, resamples=0)
    assert breakdown.positive_class == 2
    assert_matches_fairlearn(
        breakdown, (labels == 2).astype(int), (predictions == 2).astype(int), sex
    )


def test_too_small_groups_are_flagged_and_left_out_of_the_disparities():
    labels, predictions, groups = planted(2000, rates=(("a", 0.5), ("b", 0.4)))
    groups = groups.astype(object)  # room for a longer value
    groups[:6] = "tiny"
    predictions[:6] = 1  # would set the selection rate's maximum to 1.0 if counted
    (breakdown,) = group_fairness(labels, predictions, {"g": groups}, min_group_size=10)
    tiny = next(g for g in breakdown.groups if g.values == ["tiny"])
    assert tiny.too_small and tiny.count == 6 and tiny.selection_rate.value == 1.0
    assert not any(g.too_small for g in breakdown.groups if g.values != ["tiny"])
    kept = groups != "tiny"
    expected = demographic_parity_difference(
        labels[kept], predictions[kept], sensitive_features=groups[kept]
    )
    assert breakdown.demographic_parity_difference.value == pytest.approx(expected, abs=EXACT)
    assert breakdown.demographic_parity_difference.value < 0.3


def test_every_group_too_small_gives_undefined_disparities():
    labels, predictions, groups = planted(30)
    (breakdown,) = group_fairness(labels, predictions, {"g": groups}, min_group_size=100)
    assert all(g.too_small for g in breakdown.groups)
    assert all(math.isnan(getattr(breakdown, d).value) for d in DISPARITIES)


def test_undefined_rates_are_nan_and_disparities_ignore_them():
    labels, predictions, groups = planted(3000, rates=(("a", 0.7), ("b", 0.3), ("c", 0.5)))
    labels[groups == "c"] = 0  # group c has no positives: no true positive rate
    (breakdown,) = group_fairness(labels, predictions, {"g": groups}, resamples=50)
    c = next(g for g in breakdown.groups if g.values == ["c"])
    assert math.isnan(c.true_positive_rate.value) and math.isnan(c.true_positive_rate.ci_low)
    assert math.isfinite(c.false_positive_rate.value)
    defined = groups != "c"
    tpr = MetricFrame(
        metrics=true_positive_rate,
        y_true=labels[defined],
        y_pred=predictions[defined],
        sensitive_features=groups[defined],
    ).difference()
    fpr = MetricFrame(
        metrics=false_positive_rate, y_true=labels, y_pred=predictions, sensitive_features=groups
    ).difference()
    eo = breakdown.equalized_odds_difference
    assert eo.value == pytest.approx(max(tpr, fpr), abs=EXACT)
    assert math.isfinite(eo.ci_low) and math.isfinite(eo.ci_high)


def test_intervals_narrow_with_n_are_seeded_and_disabled_by_zero_resamples():
    def width(n: int) -> float:
        labels, predictions, sex = planted(n, seed=n)
        (b,) = group_fairness(labels, predictions, {"sex": sex}, resamples=200, seed=0)
        return b.groups[0].selection_rate.ci_high - b.groups[0].selection_rate.ci_low

    assert width(8000) < width(500) / 2  # ~ 1/sqrt(n): 4x narrower expected
    labels, predictions, sex = planted(500)
    first = group_fairness(labels, predictions, {"sex": sex}, resamples=50, seed=7)
    assert group_fairness(labels, predictions, {"sex": sex}, resamples=50, seed=7) == first
    assert group_fairness(labels, predictions, {"sex": sex}, resamples=50, seed=8) != first
    (plain,) = group_fairness(labels, predictions, {"sex": sex}, resamples=0)
    metrics = [getattr(plain, d) for d in DISPARITIES]
    metrics += [getattr(g, r) for g in plain.groups for r in RATES]
    assert all(m.ci_low == m.value == m.ci_high for m in metrics)


def test_ten_thousand_samples_with_200_resamples_take_well_under_a_second():
    labels, predictions, sex = planted(10_000)
    group_fairness(labels[:100], predictions[:100], {"sex": sex[:100]}, resamples=10)  # warm
    began = time.perf_counter()
    group_fairness(labels, predictions, {"sex": sex}, resamples=200, seed=0)
    assert time.perf_counter() - began < 1.0  # ~0.1 s alone; room for a busy CI machine


def test_evaluation_carries_fairness_for_the_positive_class():
    labels, predictions, sex = planted(400)
    evaluation = evaluate_predictions(labels, predictions, {"sex": sex}, resamples=0)
    (breakdown,) = evaluation.fairness
    assert breakdown == group_fairness(labels, predictions, {"sex": sex}, resamples=0)[0]
    flipped = evaluate_predictions(labels, predictions, {"sex": sex}, resamples=0, positive_class=0)
    assert flipped.fairness[0].positive_class == 0
    assert flipped.fairness[0].groups[0].selection_rate.value == pytest.approx(
        1 - breakdown.groups[0].selection_rate.value
    )
    assert evaluate_predictions(labels, predictions, {}, resamples=0).fairness == []


def test_the_result_types_and_the_module_name_the_same_metrics():
    def metric_fields(cls) -> tuple[str, ...]:
        return tuple(name for name, kind in cls.__annotations__.items() if kind == "Metric")

    assert metric_fields(FairnessGroup) == RATES
    assert metric_fields(GroupFairness) == DISPARITIES


# --- in the reports ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fairness_report():
    """An AuditResult with fairness before and after, and its proto."""
    from cnp_core.convert import report_to_proto
    from cnp_core.results import AuditResult
    from cnp_core.spec import AuditSpec, ModelRef

    labels, predictions, sex = planted(600)
    race = np.random.default_rng(5).choice(["=cmd|' /C calc'!A0", "w"], size=600)
    attributes = {"sex": sex, "race": race}
    before = evaluate_predictions(labels, predictions, attributes, resamples=20)
    after = evaluate_predictions(labels, 1 - predictions, attributes, resamples=20)
    spec = AuditSpec(model=ModelRef(architecture="resnet18", num_classes=2))
    spec.attributes = ["sex", "race"]
    result = AuditResult(spec, "m" * 64, "d" * 64, [], before=before, after=after)
    return result, report_to_proto(result, audit_id="fair-1")


def test_fairness_survives_the_proto_round_trip(fairness_report):
    from cnp_core.convert import report_from_json, report_to_json, result_from_proto

    result, proto = fairness_report
    back = result_from_proto(report_from_json(report_to_json(proto)))
    assert back.before.fairness == result.before.fairness
    assert back.after.fairness == result.after.fairness
    assert [b.attributes for b in back.after.fairness] == [["sex"], ["race"], ["sex", "race"]]


def test_mlflow_metrics_name_every_breakdown(fairness_report):
    from cnp_server.tracking import model_steps, report_metrics

    result, proto = fairness_report
    metrics = report_metrics(proto)
    eo = result.after.fairness[2].equalized_odds_difference
    assert metrics["after/fairness/sex x race/equalized_odds_difference"] == eo.value
    assert metrics["after/fairness/sex x race/equalized_odds_difference.ci_high"] == eo.ci_high
    assert metrics["before/fairness/sex/group/a/selection_rate"] == pytest.approx(
        result.before.fairness[0].groups[0].selection_rate.value
    )
    assert metrics["before/fairness/sex/group/a/count"] == result.before.fairness[0].groups[0].count
    # A value MLflow refuses is made safe, as for group accuracies.
    assert not any("=cmd" in key or "'" in key for key in metrics)
    steps = [(k, s) for k, _, s in model_steps(proto) if k.startswith("fairness/")]
    assert ("fairness/sex/demographic_parity_difference", 0) in steps
    assert ("fairness/sex/demographic_parity_difference", 1) in steps


def test_fairness_csv_and_summaries(fairness_report, tmp_path):
    from cnp_client.reports import markdown_summary, text_summary
    from cnp_core.convert import report_to_dict
    from cnp_core.report import summary, write_fairness_csv

    result, proto = fairness_report
    path = write_fairness_csv(result, tmp_path / "fairness.csv")
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    # 2 scopes x ((2 + 2 + 4) groups x 4 rates + 3 breakdowns x 5 disparities)
    assert len(rows) == 2 * (8 * 4 + 3 * 5)
    disparity = next(
        r for r in rows if r["scope"] == "after" and r["metric"] == "equalized_odds_ratio"
    )
    assert float(disparity["value"]) == pytest.approx(
        result.after.fairness[0].equalized_odds_ratio.value
    )
    assert all(not r["group"].startswith("=") for r in rows)  # no formula for a spreadsheet
    assert any(r["group"] == "'=cmd|' /C calc'!A0" for r in rows)

    report = report_to_dict(proto)
    markdown = markdown_summary(report)
    assert "### Fairness: sex × race" in markdown
    assert "| Equalized odds difference |" in markdown
    text = text_summary(report)
    assert "fairness by sex x race" in text and "demographic parity difference" in text
    assert "fairness by sex (positive class 1)" in summary(result)
