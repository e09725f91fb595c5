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
from .audit import format_table
from .results import AP_COLUMNS, AttributeAudit, AuditResult, class_label, class_name
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


def write_report(result: AuditResult, workdir: Path) -> None:
    """report.json (the whole result) and audit_table.csv (one row per subspace)."""
    report = workdir / "report.json"
    result.artifacts["report"] = str(report)
    table = workdir / "audit_table.csv"
    result.artifacts["audit_table"] = str(table)
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
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _printable(audit: AttributeAudit) -> AttributeAudit:
    """The audit with its names as :func:`visible` text, for a terminal."""
    return replace(
        audit,
        attribute=visible(audit.attribute),
        value=visible(audit.value),
        layer=visible(audit.layer),
    )
