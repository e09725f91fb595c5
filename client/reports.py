"""What the CLI writes: the canonical JSON report, JUnit XML, a Markdown summary, a text table.

Every function reads the report as the dict of its canonical JSON (the proto JSON mapping,
field names preserved), so reports from a file and from the server render the same way.
Its strings (attribute names and values, layer names, class names, gate names) are
untrusted: each format escapes them with :mod:`cnp_core.safe_text`. A class with a name
shows as ``ring (3)``, one without as ``class 3``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cnp_core.results import AP_COLUMNS, class_label, class_name
from cnp_core.safe_text import md_code, md_text, visible

from .gates import Check, as_number, metric_value

Report = Mapping[str, Any]


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path``, creating parent directories; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path


# --- JUnit -------------------------------------------------------------------------------


def junit_xml(checks: Sequence[Check], *, audit_id: str = "", suite: str = "cnp.gates") -> str:
    """A JUnit XML document: one test case per gated check, failures carry the message; a
    warn rule that did not hold is a skipped case (CI shows it, and does not fail on it)."""
    failures = sum(check.failed for check in checks)
    counts = {"tests": str(len(checks)), "failures": str(failures), "errors": "0"}
    root = ET.Element("testsuites", {"name": "cnp", **counts})
    skipped = str(sum(check.warned for check in checks))
    suite_el = ET.SubElement(root, "testsuite", {"name": suite, **counts, "skipped": skipped})
    if audit_id:
        properties = ET.SubElement(suite_el, "properties")
        ET.SubElement(properties, "property", {"name": "audit_id", "value": visible(audit_id)})
    # ElementTree escapes markup but writes characters XML 1.0 forbids (NUL...) as they are.
    for check in checks:
        name, message = visible(check.name), visible(check.message)
        case = ET.SubElement(suite_el, "testcase", {"classname": suite, "name": name})
        observed, threshold = visible(_plain(check.observed)), visible(_plain(check.threshold))
        detail = f"observed: {observed}\nthreshold: {threshold}"
        if check.passed:
            ET.SubElement(case, "system-out").text = f"{message}\n{detail}"
        elif check.warned:
            warning = ET.SubElement(case, "skipped", {"message": f"warning: {message}"})
            warning.text = detail
        else:
            failure = ET.SubElement(case, "failure", {"message": message, "type": "GateFailed"})
            failure.text = detail
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# --- Markdown ----------------------------------------------------------------------------


def markdown_summary(report: Report, checks: Sequence[Check] | None = None) -> str:
    """A CI-page summary: gates, the audit table per attribute value, groups, timings."""
    lines = [f"## cnp audit {md_code(report.get('audit_id', '?'))}{_verdict(checks)}", ""]
    digests = (("model sha256", "model_sha256"), ("dataset digest", "dataset_digest"))
    identity = [f"{label} {md_code(report[key])}" for label, key in digests if report.get(key)]
    if identity:
        lines += [" · ".join(identity), ""]
    if _classes(report):
        lines += [f"Classes: {md_text(_classes(report))}.", ""]
    if _pruning(report):
        lines += [f"Pruning: {md_text(_pruning(report))}.", ""]
    if checks:
        lines += [
            "### Gates",
            "",
            "| | Gate | Observed | Threshold | Detail |",
            "|---|---|---|---|---|",
        ]
        for check in checks:
            mark = "✅" if check.passed else "⚠️" if check.warned else "❌"
            cells = [mark, md_code(check.name), md_text(_plain(check.observed))]
            cells += [md_text(_plain(check.threshold)), md_text(check.message)]
            lines.append(_md_row(cells))
        lines.append("")
    lines += _markdown_attribute_summaries(report)
    for audit in report.get("attributes") or []:
        lines += _markdown_audit(audit)
    lines += _markdown_groups(report)
    lines += _markdown_fairness(report)
    timings = report.get("timings") or {}
    if timings:
        lines += ["### Timings", "", "| Stage | Seconds |", "|---|---:|"]
        lines += [
            _md_row([md_text(stage), f"{as_number(s) or 0:.1f}"]) for stage, s in timings.items()
        ]
        total = sum(as_number(s) or 0 for s in timings.values())
        lines += [_md_row(["**total**", f"**{total:.1f}**"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def _multi_valued(report: Report) -> list[Report]:
    """The attribute summaries of attributes audited value by value (two or more values);
    a binary attribute's one table says it all."""
    return [s for s in report.get("attribute_summaries") or [] if len(s.get("values") or []) >= 2]


def _subspace_name(item: Report) -> str:
    """ "S2 (K=4)": the subspace and the basis it belongs to."""
    index = int(as_number(item.get("index", 0)) or 0)
    return f"S{index + 1} (K={int(as_number(item.get('n_subspaces', 0)) or 0)})"


def _summary_sentences(summary: Report, quote) -> list[str]:
    """Which subspace serves several values, and what CNP removes; names through ``quote``."""

    def listed(items: list[Report]) -> str:
        return "; ".join(
            f"{_subspace_name(item)} for {', '.join(quote(str(v)) for v in item.get('values') or [])}"
            for item in items
        )

    shared, removed = summary.get("shared") or [], summary.get("removed") or []
    return [
        f"One subspace serves several values: {listed(shared)}."
        if shared
        else "No subspace is the best of two or more values.",
        f"CNP removes the union: {listed(removed)}."
        if removed
        else "CNP removes nothing at this layer (no value flagged here).",
    ]


def _best_cells(value: Report) -> tuple[str, str]:
    """The best subspace of one value, and whether it is the table's flagged one."""
    best = int(as_number(value.get("best_subspace", 0)) or 0)
    flagged = int(as_number(value.get("flagged_subspace", 0)) or 0)
    k = int(as_number(value.get("n_subspaces", 0)) or 0)
    name = f"S{best + 1} (K={k})" if best >= 0 else "–"
    flag = (
        "yes" if best >= 0 and best == flagged else f"no (S{flagged + 1})" if flagged >= 0 else "no"
    )
    return name, flag


def _markdown_attribute_summaries(report: Report) -> list[str]:
    lines = []
    for summary in _multi_valued(report):
        values = summary.get("values") or []
        lines += [
            f"### Per attribute: {md_text(summary.get('attribute', '?'))}",
            "",
            f"layer {md_code(summary.get('layer', '?'))}; {len(values)} values, each audited "
            "one-vs-rest. Best subspace: highest test AP attribute [95 % CI] (base rate).",
            "",
            "| Value | Best subspace | AP attribute | Flagged |",
            "|---|---|---|---|",
        ]
        for value in values:
            name, flag = _best_cells(value)
            cells = [md_text(value.get("value", "?")), name]
            lines.append(
                _md_row([*cells, _metric(value.get("ap_attribute"), base_rate=True), flag])
            )
        lines += ["", *_summary_sentences(summary, md_text), ""]
    return lines


def _markdown_audit(audit: Report) -> list[str]:
    flagged = _flagged(audit)
    attribute, value = md_text(audit.get("attribute", "?")), md_text(audit.get("value", "?"))
    title = f"### Concept audit: {attribute} = {value}"
    context = (
        f"layer {md_code(audit.get('layer', '?'))}, K = {md_text(audit.get('n_subspaces', '?'))}"
    )
    flag_text = f"flagged subspace **S{flagged + 1}** ⚑" if flagged >= 0 else "no subspace flagged"
    header = ["Subspace", "Mean relevance", *(md for _, md, _ in AP_COLUMNS)]
    lines = [
        title,
        "",
        f"{context}; {flag_text}. Cells: AP [95 % CI] (base rate).",
        "",
        _md_row(header),
        "|" + "---|" * len(header),
    ]
    for position, subspace in enumerate(audit.get("subspaces") or []):
        index = _index(subspace, position)
        name = f"**S{index + 1} ⚑**" if index == flagged else f"S{index + 1}"
        cells = [name, _value(subspace.get("mean_relevance"))]
        cells += [_metric(subspace.get(key), base_rate=True) for key, _, _ in AP_COLUMNS]
        lines.append(_md_row(cells))
    return [*lines, ""]


def _markdown_groups(report: Report) -> list[str]:
    before, after = report.get("before") or {}, report.get("after") or {}
    if not before and not after:
        return []
    columns = ["Before", "After", "Change"] if after else ["Accuracy"]
    lines = ["### Accuracy per group", "", _md_row(["Group", "n", *columns])]
    lines.append("|---|---:|" + "---|" * len(columns))
    small = False
    for key, (group_before, group_after) in _paired_groups(before, after).items():
        group = group_before or group_after
        too_small = bool(group.get("too_small"))
        small |= too_small
        count = f"{int(as_number(group.get('count', 0)) or 0)}" + (" ⚠" if too_small else "")
        cells = [md_text(key), count, _metric((group_before or {}).get("accuracy"))]
        if after:
            accuracy_after = (group_after or {}).get("accuracy")
            cells += [_metric(accuracy_after), _change(group_before, group_after)]
        lines.append(_md_row(cells))
    for field, label in (
        ("balanced_accuracy", "Balanced accuracy"),
        ("worst_group_accuracy", "Worst group"),
    ):
        cells = [f"**{label}**", "", _metric(before.get(field))]
        if after:
            cells += [_metric(after.get(field)), _change(before, after, field)]
        lines.append(_md_row(cells))
    worst = [md_text(e.get("worst_group", "")) for e in (before, after) if e]
    if any(worst):
        lines.append(_md_row(["worst group is", "", *worst, *([""] if after else [])]))
    for field, label in (
        ("parameters", "Parameters"),
        ("flops", "FLOPs"),
        ("latency_ms", "Latency (ms)"),
    ):
        values = [as_number(e.get(field, 0)) or 0 for e in (before, after) if e]
        if any(values):
            lines.append(
                _md_row([label, "", *(_count(v) for v in values), *([""] if after else [])])
            )
    if small:
        lines += ["", "⚠ fewer samples than the minimum group size: read with care."]
    return [*lines, ""]


# The columns of a fairness group and the disparities of a breakdown: (field, header).
FAIRNESS_RATES = (
    ("accuracy", "Accuracy"),
    ("selection_rate", "Selection rate"),
    ("true_positive_rate", "TPR"),
    ("false_positive_rate", "FPR"),
)
DISPARITIES = (
    ("demographic_parity_difference", "Demographic parity difference"),
    ("demographic_parity_ratio", "Demographic parity ratio"),
    ("equalized_odds_difference", "Equalized odds difference"),
    ("equalized_odds_ratio", "Equalized odds ratio"),
    ("accuracy_difference", "Accuracy difference"),
)


def _markdown_fairness(report: Report) -> list[str]:
    """Per fairness breakdown: its groups' rates before (and after) pruning, then its
    disparities with the change."""
    lines: list[str] = []
    after_evaluation = report.get("after") or {}
    for key, (before, after) in _paired_breakdowns(report).items():
        breakdown = before or after
        title = " × ".join(md_text(a) for a in key)
        positive = _class_text(report, breakdown.get("positive_class", 0))
        lines += [
            f"### Fairness: {title}",
            "",
            f"Decision: predicted {md_text(positive)}. Cells: value [95 % CI]; differences "
            "are max − min and ratios min / max over the groups that are not too small.",
            "",
        ]
        header = ["Group", *(["Model"] if after_evaluation else []), "n"]
        names = len(header) - 1  # group (and model) columns, then the right-aligned n
        separator = "|" + "---|" * names + "---:|" + "---|" * len(FAIRNESS_RATES)
        lines += [_md_row([*header, *(label for _, label in FAIRNESS_RATES)]), separator]
        small = False
        for values, pair in _paired_fairness_groups(before, after).items():
            for slot, group in zip(("before", "after"), pair, strict=True):
                if group is None or (slot == "after" and not after_evaluation):
                    continue
                too_small = bool(group.get("too_small"))
                small |= too_small
                count = f"{int(as_number(group.get('count', 0)) or 0)}" + (
                    " ⚠" if too_small else ""
                )
                cells = [" × ".join(md_text(v) for v in values)]
                cells += [slot] if after_evaluation else []
                cells += [count, *(_metric(group.get(field)) for field, _ in FAIRNESS_RATES)]
                lines.append(_md_row(cells))
        columns = ["Before", "After", "Change"] if after_evaluation else ["Value"]
        lines += ["", _md_row(["Disparity", *columns]), "|---|" + "---|" * len(columns)]
        for field, label in DISPARITIES:
            cells = [label, _metric((before or {}).get(field))]
            if after_evaluation:
                cells += [_metric((after or {}).get(field)), _change(before, after, field)]
            lines.append(_md_row(cells))
        if small:
            lines += [
                "",
                "⚠ fewer samples than the minimum group size: left out of the disparities.",
            ]
        lines.append("")
    return lines


def _text_fairness(report: Report) -> list[str]:
    """The fairness breakdowns as aligned rows: group rates, then disparities."""
    lines: list[str] = []
    after_evaluation = report.get("after") or {}
    for key, (before, after) in _paired_breakdowns(report).items():
        breakdown = before or after
        positive = _class_text(report, breakdown.get("positive_class", 0))
        lines += ["", f"fairness by {' x '.join(key)}   (decision: predicted {positive})"]
        rows = [["  group", *(["model"] if after_evaluation else []), "n"]]
        rows[0] += [label.lower() for _, label in FAIRNESS_RATES]
        for values, pair in _paired_fairness_groups(before, after).items():
            for slot, group in zip(("before", "after"), pair, strict=True):
                if group is None or (slot == "after" and not after_evaluation):
                    continue
                count = f"{int(as_number(group.get('count', 0)) or 0)}"
                cells = [f"  {' x '.join(values)}", *([slot] if after_evaluation else [])]
                cells += [count + ("!" if group.get("too_small") else "")]
                cells += [_metric(group.get(field), ci=False) for field, _ in FAIRNESS_RATES]
                rows.append(cells)
        for field, label in DISPARITIES:
            cells = [f"  {label.lower()}", *([""] if after_evaluation else []), ""]
            cells += [_metric((before or {}).get(field), ci=False)]
            if after_evaluation:
                cells += [_metric((after or {}).get(field), ci=False)]
            rows.append(cells)
        lines += align(rows)
    return lines


def _paired(
    before: Report | None, after: Report | None, items: str, key: str
) -> dict[tuple[str, ...], list[Report | None]]:
    """The ``items`` lists of ``before`` and ``after`` matched by their ``key`` list (a
    breakdown's attributes, a group's values): key -> [before item, after item]."""
    paired: dict[tuple[str, ...], list[Report | None]] = {}
    for slot, owner in enumerate((before, after)):
        for item in (owner or {}).get(items) or []:
            paired.setdefault(tuple(str(v) for v in item.get(key) or []), [None, None])[slot] = item
    return paired


def _paired_breakdowns(report: Report) -> dict[tuple[str, ...], list[Report | None]]:
    """Fairness breakdowns keyed by their attributes, matching before and after."""
    return _paired(report.get("before"), report.get("after"), "fairness", "attributes")


def _paired_fairness_groups(
    before: Report | None, after: Report | None
) -> dict[tuple[str, ...], list[Report | None]]:
    """A breakdown's groups keyed by their values, matching before and after."""
    return _paired(before, after, "groups", "values")


def _class_text(report: Report, label: Any) -> str:
    """``ring (3)`` or ``class 3``, with the report's class names."""
    index = int(as_number(label) or 0)
    return class_label(index, class_name([str(n) for n in report.get("class_names") or []], index))


# --- plain text (stdout) -----------------------------------------------------------------


def text_summary(report: Report, checks: Sequence[Check] | None = None) -> str:
    """The same content as the Markdown summary, as aligned plain text for a terminal."""
    report = _printable(report)
    lines = [f"audit {report.get('audit_id', '?')}{_verdict(checks)}"]
    if _classes(report):
        lines.append(f"classes: {_classes(report)}")
    if _pruning(report):
        lines.append(f"pruning: {_pruning(report)}")
    for summary in _multi_valued(report):
        values = summary.get("values") or []
        lines += [
            "",
            f"{summary.get('attribute', '?')}  layer {summary.get('layer', '?')}  "
            f"{len(values)} values, one-vs-rest   (best subspace by test AP, base rate)",
        ]
        rows = [["  value", "best", "AP attribute", "flagged"]]
        for value in values:
            name, flag = _best_cells(value)
            metric = _metric(value.get("ap_attribute"), base_rate=True)
            rows.append([f"  {value.get('value', '?')}", name, metric, flag])
        lines += align(rows)
        lines += [f"  {line}" for line in _summary_sentences(summary, str)]
    for audit in report.get("attributes") or []:
        flagged = _flagged(audit)
        lines += [
            "",
            f"{audit.get('attribute', '?')}={audit.get('value', '?')}  layer {audit.get('layer', '?')}"
            f"  K={audit.get('n_subspaces', '?')}  flagged: {f'S{flagged + 1}' if flagged >= 0 else 'none'}"
            "   (AP with base rate)",
        ]
        rows = [["  subspace", "relevance", *(text for _, _, text in AP_COLUMNS)]]
        for position, subspace in enumerate(audit.get("subspaces") or []):
            index = _index(subspace, position)
            cells = [
                f"  S{index + 1}{' *' if index == flagged else ''}",
                _value(subspace.get("mean_relevance")),
            ]
            cells += [
                _metric(subspace.get(key), ci=False, base_rate=True) for key, _, _ in AP_COLUMNS
            ]
            rows.append(cells)
        lines += align(rows)
    before, after = report.get("before") or {}, report.get("after") or {}
    if before or after:
        rows = [["  group", "n", "before", *(["after"] if after else [])]]
        for key, (group_before, group_after) in _paired_groups(before, after).items():
            group = group_before or group_after
            count = f"{int(as_number(group.get('count', 0)) or 0)}{'!' if group.get('too_small') else ''}"
            cells = [f"  {key}", count, _metric((group_before or {}).get("accuracy"), ci=False)]
            if after:
                cells.append(_metric((group_after or {}).get("accuracy"), ci=False))
            rows.append(cells)
        for field, label in (
            ("balanced_accuracy", "balanced accuracy"),
            ("worst_group_accuracy", "worst group"),
        ):
            rows.append(
                [f"  {label}", "", *(_metric(e.get(field), ci=False) for e in (before, after) if e)]
            )
        lines += ["", *align(rows)]
        if any(g.get("too_small") for e in (before, after) for g in e.get("groups") or []):
            lines.append("  ! fewer samples than the minimum group size")
        lines += _text_fairness(report)
    if checks:
        passed = sum(check.passed for check in checks)
        lines += ["", f"gates: {passed}/{len(checks)} passed"]
        lines += align([[f"  {_outcome(c)}", visible(c.name), visible(c.message)] for c in checks])
    return "\n".join(lines) + "\n"


# --- helpers -----------------------------------------------------------------------------


def _verdict(checks: Sequence[Check] | None) -> str:
    if not checks:
        return ""
    failed, warned = sum(c.failed for c in checks), sum(c.warned for c in checks)
    warnings = f", {warned} warning{'s' if warned > 1 else ''}" if warned else ""
    return (
        f": FAILED ({failed} of {len(checks)} gates{warnings})"
        if failed
        else f": PASSED ({len(checks)} gates{warnings})"
    )


def _outcome(check: Check) -> str:
    return "PASS" if check.passed else "WARN" if check.warned else "FAIL"


def _pruning(report: Report) -> str:
    """ "cnp at rate 0.30: 120 of 400 filters removed", or "" when nothing was pruned."""
    pruning = report.get("pruning") or {}
    total = int(as_number(pruning.get("filters_total", 0)) or 0)
    if not pruning.get("method") or not total:
        return ""
    removed = int(as_number(pruning.get("filters_removed", 0)) or 0)
    rate = as_number(pruning.get("rate", 0)) or 0.0
    text = f"{pruning['method']} at rate {rate:.2f}: {removed} of {total} filters"
    neurons = int(as_number(pruning.get("neurons_total", 0)) or 0)
    if neurons:  # models with hidden fully connected layers (e.g. VGG's classifier)
        text += (
            f" and {int(as_number(pruning.get('neurons_removed', 0)) or 0)} of {neurons} neurons"
        )
    return text + " removed"


def _classes(report: Report) -> str:
    """ "ring (3) vs every other class" for a model with class names, else "" (reports of
    index-labelled models read as before)."""
    names = [str(name) for name in report.get("class_names") or []]
    if not names:
        return ""
    spec = report.get("spec") or {}

    def shown(key: str, default: int) -> str:  # an absent index is the library default
        label = int(as_number(spec.get(key, default)) or 0)
        return class_label(label, class_name(names, label)) if label >= 0 else "every other class"

    return f"{shown('positive_class', 1)} vs {shown('negative_class', -1)}"


def _flagged(audit: Report) -> int:
    # proto3 JSON omits a zero int32: a missing flagged_subspace is subspace 0.
    return int(as_number(audit.get("flagged_subspace", 0)) or 0)


def _index(subspace: Report, position: int) -> int:
    return int(as_number(subspace.get("index", position)) or 0)


def _paired_groups(before: Report, after: Report) -> dict[str, tuple[Report | None, Report | None]]:
    """Groups keyed by "class L, attribute=value" (or "name (L), ..."), matching before
    and after."""
    paired: dict[str, list[Report | None]] = {}
    for slot, evaluation in enumerate((before, after)):
        for group in evaluation.get("groups") or []:
            label = int(as_number(group.get("label", 0)) or 0)
            shown = class_label(label, str(group.get("label_name") or ""))
            key = f"{shown}, {group.get('attribute', '?')}={group.get('value', '?')}"
            paired.setdefault(key, [None, None])[slot] = group
    return {key: (pair[0], pair[1]) for key, pair in paired.items()}


def _metric(metric: Mapping[str, Any] | None, *, ci: bool = True, base_rate: bool = False) -> str:
    """``0.912 [0.880–0.940] (0.500)``: value, 95 % interval when bootstrapped, base rate."""
    if metric is None:
        return "–"
    value = metric_value(metric)
    text = _value(value)
    low = as_number(metric.get("ci_low", 0)) or 0.0
    high = as_number(metric.get("ci_high", 0)) or 0.0
    # No interval when bootstrapping was off (bounds == value) or not sent (bounds == 0).
    interval = (
        math.isfinite(low) and math.isfinite(high) and (low, high) not in ((value, value), (0, 0))
    )
    if ci and interval:
        text += f" [{low:.3f}–{high:.3f}]"
    if base_rate:
        text += f" ({as_number(metric.get('base_rate', 0)) or 0:.2f})"
    return text


def _change(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, field: str = "accuracy"
) -> str:
    old = metric_value((before or {}).get(field))
    new = metric_value((after or {}).get(field))
    if old is None or new is None or not (math.isfinite(old) and math.isfinite(new)):
        return "–"
    return f"{new - old:+.3f}"


def _value(value: Any) -> str:
    number = as_number(value if value is not None else 0)
    if number is None:
        return "–"
    return "NaN" if math.isnan(number) else f"{number:.3f}"


def _count(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3 and value == int(value):
        return f"{value / 1e3:.1f} k"
    return f"{value:g}"


def _plain(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _md_row(cells: Iterable[str]) -> str:
    """A table row of Markdown cells (untrusted text already through md_text or md_code);
    an escaped ``|`` stays inside its cell, also within a code span."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _printable(value: Any) -> Any:
    """The report with every string as :func:`visible` text, for a terminal."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, Mapping):
        return {key: _printable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_printable(item) for item in value]
    return value


def align(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines with left-aligned columns."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
