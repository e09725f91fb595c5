"""Group fairness of a classifier's decisions, as Fairlearn measures it, with intervals.

The decision is "predicted the positive class" and the truth "is the positive class", so a
multi-class model is reviewed for the one class the audit is about. For every audited
attribute, then for the intersection of all of them, the samples fall into groups (one
per value, or per observed combination of values). Per group, Fairlearn's
``MetricFrame`` gives the accuracy of the decision (scikit-learn's ``accuracy_score``),
the selection rate, the true and false positive rates and the size. The disparities are
Fairlearn's ``between_groups`` differences (max - min) and ratios (min / max) over the
groups with at least ``min_group_size`` samples: demographic parity (selection rate),
equalized odds (the worse of the true and false positive rates, as Fairlearn's
``equalized_odds_difference``/``ratio`` with ``agg="worst_case"``) and accuracy.

Undefined rates are NaN, not 0: a group without positive samples has no true positive
rate (scikit-learn's confusion matrix would report 0.0, which reads as "never selects"),
and one without negatives no false positive rate. Disparities ignore NaN groups, as
pandas' min and max do inside Fairlearn; a disparity is NaN only when no group defines it.

Intervals: percentile bootstrap 95 % from :func:`scipy.stats.bootstrap`, resampling the
samples (so group sizes vary between resamples), seeded. The resampled statistics are
counted with numpy in one pass per batch of resamples rather than through a MetricFrame
per resample; a resample in which a rate is undefined (no positive of the group drawn)
is left out of that rate's interval, as :mod:`cnp_core.metrics` leaves out undefined APs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from scipy.stats import DegenerateDataWarning, bootstrap
from sklearn.metrics import accuracy_score

from .results import FairnessGroup, GroupFairness, Metric

# The intersectional breakdown covers at most this many attributes: beyond three the
# groups multiply past what a reviewer reads and most would be too small to measure.
MAX_INTERSECTION_ATTRIBUTES = 3
RATES = ("accuracy", "selection_rate", "true_positive_rate", "false_positive_rate")
DISPARITIES = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
    "equalized_odds_ratio",
    "accuracy_difference",
)
_CHUNK = 4_000_000  # resampled sample indices per bootstrap batch (bounded memory)


def _tpr(y_true: np.ndarray, y_pred: np.ndarray, sample_weight: np.ndarray) -> float:
    """Fairlearn's true positive rate; NaN for a group without positives."""
    if not y_true.any():
        return np.nan
    return true_positive_rate(y_true, y_pred, pos_label=1, sample_weight=sample_weight)


def _fpr(y_true: np.ndarray, y_pred: np.ndarray, sample_weight: np.ndarray) -> float:
    """Fairlearn's false positive rate; NaN for a group without negatives."""
    if y_true.all():
        return np.nan
    return false_positive_rate(y_true, y_pred, pos_label=1, sample_weight=sample_weight)


def _count(y_true: np.ndarray, y_pred: np.ndarray, sample_weight: np.ndarray) -> float:
    """The group's size: Fairlearn's ``count`` counts rows, and here rows carry weights."""
    return float(np.sum(sample_weight))


_METRICS = {
    "accuracy": accuracy_score,
    "selection_rate": selection_rate,
    "true_positive_rate": _tpr,
    "false_positive_rate": _fpr,
    "count": _count,
}


def group_fairness(
    labels: Sequence[int],
    predictions: Sequence[int],
    attributes: Mapping[str, Sequence],
    *,
    positive_class: int = 1,
    resamples: int = 200,
    seed: int = 0,
    min_group_size: int = 10,
) -> list[GroupFairness]:
    """One breakdown per attribute (in the mapping's order), then one over the
    intersection of all of them when there are 2 to :data:`MAX_INTERSECTION_ATTRIBUTES`
    (none beyond: too many groups to read). Values are compared as strings.
    ``resamples=0`` disables the intervals (each bound equals its value)."""
    truth = (np.asarray(labels) == positive_class).astype(np.int64)
    decision = (np.asarray(predictions) == positive_class).astype(np.int64)
    columns = {name: np.asarray([str(v) for v in raw]) for name, raw in attributes.items()}
    breakdowns = [[name] for name in columns]
    if 2 <= len(columns) <= MAX_INTERSECTION_ATTRIBUTES:
        breakdowns.append(list(columns))
    return [
        _breakdown(
            truth,
            decision,
            pd.DataFrame({name: columns[name] for name in names}),
            positive_class=positive_class,
            resamples=resamples,
            seed=seed,
            min_group_size=min_group_size,
        )
        for names in breakdowns
    ]


@dataclass
class _Groups:
    """The observed groups of one breakdown, sorted by value, and who is in which."""

    values: list[tuple[str, ...]]
    index: pd.Index  # the groups as MetricFrame.by_group indexes them
    features: pd.DataFrame  # one row per group: its value of each attribute
    codes: np.ndarray  # per sample, the index of its group in ``values``
    usable: np.ndarray  # per group: at least min_group_size samples


def _group_codes(features: pd.DataFrame, min_group_size: int) -> _Groups:
    grouped = features.groupby(list(features.columns), sort=True, observed=True)
    keys = grouped.size()
    values = [key if isinstance(key, tuple) else (key,) for key in keys.index]
    return _Groups(
        values=values,
        index=keys.index,
        features=keys.index.to_frame(index=False),
        codes=grouped.ngroup().to_numpy(),
        usable=keys.to_numpy() >= min_group_size,
    )


def _frame(truth: np.ndarray, decision: np.ndarray, groups: _Groups, rows: np.ndarray):
    """Fairlearn's MetricFrame over the samples of the groups in ``rows`` (a mask).

    Fairlearn reads every sample through Python once per metric and group, so the samples
    are first compressed to one row per (group, truth, decision) weighted by how many
    samples share it: every metric is a weighted count, so the values are Fairlearn's on
    the samples themselves (tests/test_fairness.py checks it), at a cost that does not
    grow with the test split."""
    n_groups = len(groups.values)
    cells = np.bincount(groups.codes * 4 + truth * 2 + decision, minlength=4 * n_groups)
    cells[np.repeat(~rows, 4)] = 0
    kept = np.flatnonzero(cells)
    weights = cells[kept].astype(np.float64)
    return MetricFrame(
        metrics=_METRICS,
        y_true=(kept // 2) % 2,
        y_pred=kept % 2,
        sensitive_features=groups.features.iloc[kept // 4].reset_index(drop=True),
        sample_params={name: {"sample_weight": weights} for name in _METRICS},
    )


def _disparities(frame: MetricFrame) -> np.ndarray:
    """Fairlearn's between-groups differences and ratios, in :data:`DISPARITIES` order."""
    difference = frame.difference(method="between_groups")
    ratio = frame.ratio(method="between_groups")
    return np.array(
        [
            difference["selection_rate"],
            ratio["selection_rate"],
            np.fmax(difference["true_positive_rate"], difference["false_positive_rate"]),
            np.fmin(ratio["true_positive_rate"], ratio["false_positive_rate"]),
            difference["accuracy"],
        ],
        dtype=np.float64,
    )


def _breakdown(
    truth: np.ndarray,
    decision: np.ndarray,
    features: pd.DataFrame,
    *,
    positive_class: int,
    resamples: int,
    seed: int,
    min_group_size: int,
) -> GroupFairness:
    groups = _group_codes(features, min_group_size)
    every = np.ones(len(groups.values), dtype=bool)
    by_group = _frame(truth, decision, groups, every).by_group
    # Only observed groups (a MetricFrame over several attributes lists every
    # combination, NaN where nobody has it), in the order of groups.values.
    by_group = by_group.loc[groups.index]
    if groups.usable.any():
        disparities = _disparities(_frame(truth, decision, groups, groups.usable))
    else:
        disparities = np.full(len(DISPARITIES), np.nan)
    estimates = np.concatenate([by_group[list(RATES)].to_numpy().ravel(), disparities])
    if resamples > 0 and truth.size >= 2:  # scipy resamples two samples or more
        statistic = _resampled_statistic(truth, decision, groups)
        low, high = _intervals(statistic, truth.size, resamples, seed)
    else:
        low, high = estimates, estimates
    metrics = [
        Metric(float(v), float(lo), float(hi))
        for v, lo, hi in zip(estimates, low, high, strict=True)
    ]
    rates, disparity_metrics = metrics[: -len(DISPARITIES)], metrics[-len(DISPARITIES) :]
    fairness_groups = [
        FairnessGroup(
            values=list(value),
            count=int(by_group["count"].iloc[i]),
            **dict(zip(RATES, rates[i * len(RATES) : (i + 1) * len(RATES)], strict=True)),
            too_small=not groups.usable[i],
        )
        for i, value in enumerate(groups.values)
    ]
    return GroupFairness(
        attributes=list(features.columns),
        positive_class=positive_class,
        groups=fairness_groups,
        **dict(zip(DISPARITIES, disparity_metrics, strict=True)),
    )


def _resampled_statistic(truth: np.ndarray, decision: np.ndarray, groups: _Groups):
    """The statistic scipy's bootstrap calls on resampled sample indices, shape (B, n):
    every group rate then every disparity (rows, in ``estimates`` order) per resample."""
    n_groups = len(groups.values)
    correct = (truth == decision).astype(np.float64)
    selected_positive = (decision & truth).astype(np.float64)
    selected_negative = (decision & (1 - truth)).astype(np.float64)

    def statistic(indices: np.ndarray, axis: int = -1) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1, indices.shape[-1])
        batch = indices.shape[0]
        cells = (groups.codes[indices] + n_groups * np.arange(batch)[:, None]).ravel()

        def per_group(weights: np.ndarray | None = None) -> np.ndarray:
            flat = None if weights is None else weights[indices].ravel()
            return np.bincount(cells, weights=flat, minlength=batch * n_groups).reshape(
                batch, n_groups
            )

        size, positives = per_group(), per_group(truth.astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            rates = np.stack(
                [
                    per_group(correct) / size,
                    per_group(decision.astype(np.float64)) / size,
                    per_group(selected_positive) / positives,
                    per_group(selected_negative) / (size - positives),
                ],
                axis=-1,
            )  # (B, groups, RATES)
        rates[size == 0] = np.nan  # a group absent from the resample has no rates
        usable = rates[:, groups.usable]
        # initial NaN: fmax and fmin ignore it, and a breakdown without usable groups gets NaN.
        top = np.fmax.reduce(usable, axis=1, initial=np.nan)
        bottom = np.fmin.reduce(usable, axis=1, initial=np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            difference, ratio = top - bottom, bottom / top
        disparities = np.stack(
            [
                difference[:, 1],
                ratio[:, 1],
                np.fmax(difference[:, 2], difference[:, 3]),
                np.fmin(ratio[:, 2], ratio[:, 3]),
                difference[:, 0],
            ],
            axis=-1,
        )
        return np.concatenate([rates.reshape(batch, -1), disparities], axis=1).T

    return statistic


def _intervals(statistic, n: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile 95 % intervals of every output of ``statistic``; an output undefined in
    some resamples takes the percentiles of the resamples that define it."""
    with warnings.catch_warnings():
        # NaN rows (rates undefined in some resamples) are handled below.
        warnings.simplefilter("ignore", DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap(
            (np.arange(n),),
            statistic,
            n_resamples=resamples,
            batch=max(1, _CHUNK // max(n, 1)),
            vectorized=True,
            method="percentile",
            confidence_level=0.95,
            rng=np.random.default_rng(seed),
        )
    low = np.array(result.confidence_interval.low, dtype=np.float64)
    high = np.array(result.confidence_interval.high, dtype=np.float64)
    distribution = np.asarray(result.bootstrap_distribution)
    for row in np.flatnonzero(~(np.isfinite(low) & np.isfinite(high))):
        defined = distribution[row][np.isfinite(distribution[row])]
        if defined.size:
            low[row], high[row] = np.percentile(defined, [2.5, 97.5])
        else:
            low[row] = high[row] = np.nan
    return low, high
