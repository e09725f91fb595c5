"""The report of an audit: report.json (the whole result), audit_table.csv (one row per
subspace) and a plain-text summary for terminals and logs. Classes show by name where
the model has class names (``ring (3)``)."""

from __future__ import annotations

import csv
import json
import math
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .audit import format_summary, format_table
from .fairness import DISPARITIES
from .fairness import RATES as FAIRNESS_RATES
from .results import (
    AP_COLUMNS,
    AttributeAudit,
    AttributeSummary,
    AuditResult,
    class_label,
    class_name,
)
from .review import REVIEW_NAME, write_review
from .safe_text import csv_cell, visible


def versions() -> dict[str, str]:
    """The versions of what computed a result (every report carries them)."""
    import sklearn
    import torchvision
    import zennit

    return {
        "cnp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zennit": getattr(zennit, "__version__", "0.5"),
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def _finite(value):
    """JSON has no NaN: undefined values (e.g. AP with one class absent) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(result: AuditResult, workdir: Path, *, review: bool = True) -> None:
    """report.json (the whole result), audit_table.csv (one row per subspace),
    fairness.csv (group rates and disparities, when measured) and, with ``review``,
    review.html (:mod:`cnp_core.review`)."""
    report = workdir / "report.json"
    result.artifacts["report"] = str(report)
    table = workdir / "audit_table.csv"
    result.artifacts["audit_table"] = str(table)
    if any(e is not None and e.fairness for e in (result.before, result.after)):
        result.artifacts["fairness"] = str(write_fairness_csv(result, workdir / "fairness.csv"))
    # The HTML review a person reads (plots, heatmaps embedded), listed before report.json.
    if review:
        result.artifacts[REVIEW_NAME] = str(write_review(result, workdir))
    report.write_text(json.dumps(_finite(result.to_dict()), indent=2, default=_json_default))
    columns = [field for field, _, _ in AP_COLUMNS]
    # The class pair the ap_class columns predict, as the summaries show it.
    pair = [_class_text(result, result.spec.positive_class)]
    pair.append(_class_text(result, result.spec.negative_class))
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["attribute", "value", "layer", "k", "subspace", "flagged", "mean_relevance"]
            + [f"{c}{suffix}" for c in columns for suffix in ("", "_low", "_high", "_base")]
            + ["positive_class", "negative_class"]
        )
        for audit in result.attributes:
            for row in audit.subspaces:
                cells = []
                for c in columns:
                    m = getattr(row, c)
                    cells += [m.value, m.ci_low, m.ci_high, m.base_rate]
                row_cells = (
                    [audit.attribute, audit.value, audit.layer, audit.n_subspaces, row.index]
                    + [row.index == audit.flagged_subspace, row.mean_relevance]
                    + cells
                    + pair
                )
                writer.writerow(map(csv_cell, row_cells))  # names come from the dataset


def write_fairness_csv(result: AuditResult, path: Path) -> Path:
    """fairness.csv, one metric a row: every group rate and every disparity of every
    breakdown, before and after pruning. ``group`` is empty on disparity rows (they are
    over the groups that are not too small); an intersection's names join with " x "."""
    header = ["scope", "attributes", "group", "count", "too_small", "metric"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, "value", "ci_low", "ci_high", "positive_class"])
        for scope, evaluation in (("before", result.before), ("after", result.after)):
            for breakdown in evaluation.fairness if evaluation is not None else []:
                attributes = " x ".join(breakdown.attributes)
                rows = [
                    [g.values, g.count, g.too_small, name, getattr(g, name)]
                    for g in breakdown.groups
                    for name in FAIRNESS_RATES
                ]
                usable = sum(g.count for g in breakdown.groups if not g.too_small)
                rows += [
                    [[], usable, False, name, getattr(breakdown, name)] for name in DISPARITIES
                ]
                for values, count, too_small, name, m in rows:
                    cells = [scope, attributes, " x ".join(values), count, too_small, name]
                    cells += [m.value, m.ci_low, m.ci_high, breakdown.positive_class]
                    writer.writerow(map(csv_cell, cells))  # names come from the dataset
    return path


def _class_text(result: AuditResult, label: int) -> str:
    """``ring (3)``, ``class 3``, or ``every other class`` for the negative class -1."""
    if label < 0:
        return "every other class"
    return class_label(label, class_name(result.class_names, label))


def summary(result: AuditResult) -> str:
    """The audit tables and group accuracies as plain text, for terminals and logs."""
    parts = []
    if result.class_names:
        positive = _class_text(result, result.spec.positive_class)
        negative = _class_text(result, result.spec.negative_class)
        parts.append(f"classes: {visible(positive)} vs {visible(negative)}")
    # A multi-valued attribute as a whole first (a binary one's single table says it all).
    parts += [
        format_summary(_printable_summary(s))
        for s in result.attribute_summaries
        if len(s.values) >= 2
    ]
    parts += [format_table(_printable(audit)) for audit in result.attributes]
    for name, evaluation in (("before", result.before), ("after", result.after)):
        if evaluation is None:
            continue
        lines = [
            f"{name}: balanced accuracy {evaluation.balanced_accuracy.value:.3f}, "
            f"worst group {visible(evaluation.worst_group)} "
            f"{evaluation.worst_group_accuracy.value:.3f}"
        ]
        for g in evaluation.groups:
            flag = "  (small)" if g.too_small else ""
            lines.append(
                f"  {visible(class_label(g.label, g.label_name))} "
                f"{visible(g.attribute)}={visible(g.value)}: "
                f"{g.accuracy.value:.3f} "
                f"[{g.accuracy.ci_low:.3f}, {g.accuracy.ci_high:.3f}] n={g.count}{flag}"
            )
        lines += _fairness_lines(evaluation)
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _fairness_lines(evaluation) -> list[str]:
    """Per breakdown: its disparities, then each group's rates (value [95 % CI])."""

    def shown(m) -> str:
        return f"{m.value:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}]"

    lines = []
    for breakdown in evaluation.fairness:
        name = " x ".join(visible(a) for a in breakdown.attributes)
        lines.append(
            f"  fairness by {name} (positive class {breakdown.positive_class}): "
            + ", ".join(f"{d} {shown(getattr(breakdown, d))}" for d in DISPARITIES)
        )
        for g in breakdown.groups:
            flag = "  (small)" if g.too_small else ""
            rates = ", ".join(f"{r} {shown(getattr(g, r))}" for r in FAIRNESS_RATES)
            values = " x ".join(visible(v) for v in g.values)
            lines.append(f"    {values}: n={g.count}{flag}, {rates}")
    return lines


def _printable_summary(s: AttributeSummary) -> AttributeSummary:
    """The summary with its names as :func:`visible` text, for a terminal."""
    return replace(
        s,
        attribute=visible(s.attribute),
        layer=visible(s.layer),
        values=[replace(v, value=visible(v.value)) for v in s.values],
        shared=[replace(u, values=[visible(x) for x in u.values]) for u in s.shared],
        removed=[replace(u, values=[visible(x) for x in u.values]) for u in s.removed],
    )


def _printable(audit: AttributeAudit) -> AttributeAudit:
    """The audit with its names as :func:`visible` text, for a terminal."""
    return replace(
        audit,
        attribute=visible(audit.attribute),
        value=visible(audit.value),
        layer=visible(audit.layer),
    )
