"""Scores with their uncertainty: average precision and accuracy, bootstrapped.

Small groups are noisy, so every number a reviewer reads carries a percentile bootstrap
95 % interval computed from the same seeded resamples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import average_precision_score

from .results import Metric


def _bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile 95 % interval of ``statistic(indices)`` over ``resamples`` resamples."""
    if resamples == 0 or n == 0:
        value = statistic(np.arange(n))
        return value, value
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(resamples)]
    values = np.asarray([v for v in values if np.isfinite(v)])
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def average_precision(
    target: np.ndarray, score: np.ndarray, *, resamples: int = 0, seed: int = 0
) -> Metric:
    """AP of ``score`` for predicting the binary ``target``; NaN when one class is absent.

    The base rate (AP of a random score) is the positive fraction.
    """
    target = np.asarray(target, dtype=bool)
    score = np.asarray(score, dtype=np.float64)

    def ap(idx: np.ndarray) -> float:
        t = target[idx]
        if t.all() or not t.any():
            return float("nan")
        return float(average_precision_score(t, score[idx]))

    value = ap(np.arange(target.size))
    low, high = (
        _bootstrap(ap, target.size, resamples, seed) if np.isfinite(value) else (value, value)
    )
    base = float(target.mean()) if target.size else float("nan")
    return Metric(value=value, ci_low=low, ci_high=high, base_rate=base)


def accuracy(correct: np.ndarray, *, resamples: int = 0, seed: int = 0) -> Metric:
    """Fraction correct with its bootstrap interval; NaN for an empty set."""
    correct = np.asarray(correct, dtype=np.float64)

    def acc(idx: np.ndarray) -> float:
        return float(correct[idx].mean()) if idx.size else float("nan")

    value = acc(np.arange(correct.size))
    low, high = _bootstrap(acc, correct.size, resamples, seed)
    return Metric(value=value, ci_low=low, ci_high=high)


def balanced_accuracy(
    labels: np.ndarray, predictions: np.ndarray, *, resamples: int = 0, seed: int = 0
) -> Metric:
    """Mean per-class recall over the classes present, with its bootstrap interval."""
    labels = np.asarray(labels)
    correct = np.asarray(predictions) == labels

    def bacc(idx: np.ndarray) -> float:
        lab, cor = labels[idx], correct[idx]
        return float(np.mean([cor[lab == c].mean() for c in np.unique(lab)]))

    value = bacc(np.arange(labels.size))
    low, high = _bootstrap(bacc, labels.size, resamples, seed)
    return Metric(value=value, ci_low=low, ci_high=high)
