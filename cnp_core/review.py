"""The review of an audit a person reads: ``review.html``, one self-contained page.

Inline CSS, plots as inline PNGs (matplotlib, Agg), no script and no external URL, so it
opens offline and is safe to serve; a Content-Security-Policy says the same to the
browser. Every string that comes from a dataset or a request (attribute names and
values, class and layer names) is escaped, as :func:`cnp_core.safe_text.visible` text.

Sections: the header and verdict, the concept audit (AP heatmap and tables), accuracy per
group, the fairness breakdowns (when the result has them), the subspace heatmaps (image
models) and the pruning summary, each plot with a caption that says how to read it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .heatmaps import FLAG_COLOUR, plot_text
from .results import (
    AP_COLUMNS,
    AttributeAudit,
    AttributeSummary,
    AuditResult,
    Evaluation,
    FairnessGroup,
    GroupFairness,
    GroupMetric,
    Metric,
    SubspaceValues,
    class_label,
    class_name,
)
from .safe_text import visible

REVIEW_NAME = "review.html"
BEFORE_COLOUR = "#7f7f7f"
AFTER_COLOUR = "#1f77b4"
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: #1d1d1f; max-width: 1180px; margin: 2em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.flagged td { background: #fdecea; }
.badge { display: inline-block; font-size: 0.78em; padding: 0 0.45em; border-radius: 0.6em;
  margin-left: 0.4em; }
.flag { background: #d62728; color: white; }
.small { background: #ffe9a8; color: #5a4500; }
.ok { background: #d7f0d9; color: #1b5e20; }
.verdict { border-left: 5px solid #d62728; background: #fdf3f2; padding: 0.5em 1em; }
.verdict.clear { border-color: #2e7d32; background: #f1f8f1; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: 0.88em; color: #444; max-width: 60em; margin-top: 0.3em; }
.meta td:first-child { font-weight: 600; white-space: nowrap; }
.muted { color: #666; font-size: 0.88em; }
.wide { overflow-x: auto; }
code { font-size: 0.92em; background: #f5f5f5; padding: 0 0.2em; }
"""


def write_review(result: AuditResult, directory: Path | str) -> Path:
    """Write ``review.html`` into ``directory`` and return its path."""
    path = Path(directory) / REVIEW_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_review(result), encoding="utf-8")
    return path


def render_review(result: AuditResult) -> str:
    """The review as one HTML document."""
    title = f"cnp review: {_model_name(result)}"
    body = [
        f"<h1>{_esc(title)}</h1>",
        _header(result),
        _verdict(result),
        _audit_section(result),
        _groups_section(result),
        _fairness_section(result),
        _heatmap_section(result),
        _pruning_section(result),
        _footer(result),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


# --- text --------------------------------------------------------------------------------


def _esc(value: object) -> str:
    """Untrusted text as HTML text: hidden characters spelled out, markup escaped."""
    return html.escape(visible(value), quote=True)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _num(value: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def _metric(m: Metric | None, *, base: bool = False, stacked: bool = False) -> str:
    """``0.951 [0.930, 0.970]``, with `` (0.50)``, the base rate, for APs; the interval
    only where bootstrapping gave one. ``stacked``: the interval on a second line."""
    if m is None:
        return ""
    extra = ""
    if _finite(m.value) and (m.ci_low != m.value or m.ci_high != m.value):
        extra += f"[{_num(m.ci_low)}, {_num(m.ci_high)}]"
    if base:
        extra += f" ({_num(m.base_rate, 2)})"
    if not extra:
        return _num(m.value)
    return f"{_num(m.value)}{'<br>' if stacked else ' '}<span class='muted'>{extra.strip()}</span>"


def _table(
    header: Sequence[str], rows: Iterable[Sequence[str]], classes: Sequence[str] = ()
) -> str:
    """An HTML table from cells that are already HTML; ``classes`` per row (optional)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    lines = [f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>"]
    for n, row in enumerate(rows):
        css = f" class='{classes[n]}'" if n < len(classes) and classes[n] else ""
        cells = "".join(
            f"<td class='num'>{cell}</td>" if n_col else f"<td>{cell}</td>"
            for n_col, cell in enumerate(row)
        )
        lines.append(f"<tr{css}>{cells}</tr>")
    lines.append("</tbody></table></div>")
    return "".join(lines)


def _figure(png: str, caption: str, alt: str) -> str:
    return (
        f"<figure><img src='data:image/png;base64,{png}' alt='{_esc(alt)}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _small(count: int) -> str:
    return f"<span class='badge small' title='fewer samples than min_group_size'>small n={count}</span>"


def _model_name(result: AuditResult) -> str:
    return result.spec.model.architecture or result.spec.model.factory or "model"


def _class_text(result: AuditResult, label: int) -> str:
    if label < 0:
        return "every other class"
    return class_label(label, class_name(result.class_names, label))


# --- figures -----------------------------------------------------------------------------


def _png(fig: Figure) -> str:
    """The figure as base64 PNG (Figure objects, not pyplot: no global state in a worker)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _ap_heatmap(audits: Sequence[AttributeAudit], threshold: float) -> Figure:
    """Subspaces x values of one attribute at one layer and K: AP_attribute (base rate)."""
    values = [a.value for a in audits]
    k = max(len(a.subspaces) for a in audits)
    grid = np.full((k, len(values)), np.nan)
    for col, audit in enumerate(audits):
        for row in audit.subspaces:
            grid[row.index, col] = row.ap_attribute.value
    fig = Figure(figsize=(1.8 + 1.1 * len(values), 0.9 + 0.48 * k))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for col, audit in enumerate(audits):
        for row in audit.subspaces:
            value = row.ap_attribute.value
            dark = _finite(value) and value > 0.6
            ax.text(
                col,
                row.index,
                f"{_num(value, 2)}\n({_num(row.ap_attribute.base_rate, 2)})",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
        if audit.flagged_subspace >= 0:
            box = Rectangle(
                (col - 0.5, audit.flagged_subspace - 0.5),
                1,
                1,
                fill=False,
                edgecolor=FLAG_COLOUR,
                linewidth=3,
            )
            ax.add_patch(box)
    ax.set_xticks(range(len(values)), [plot_text(v, 16) for v in values], fontsize=8)
    if len(values) > 4:
        ax.tick_params(axis="x", labelrotation=30)
    ax.set_yticks(range(k), [f"S{j + 1}" for j in range(k)], fontsize=8)
    ax.set_xlabel(f"value of {plot_text(audits[0].attribute)}", fontsize=9)
    ax.set_title(
        f"AP_attribute at {plot_text(audits[0].layer)}, K={audits[0].n_subspaces} "
        f"(flag at {threshold:g} for base rate 0.5)",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, label="AP")
    return fig


def _dot_plot(
    ax,
    labels: Sequence[str],
    before: Sequence[Metric | None],
    after: Sequence[Metric | None],
    small: Sequence[bool],
    title: str,
) -> None:
    """Horizontal dots with interval bars, one row per group: before (grey circles) and
    after (blue diamonds). Small groups are drawn hollow."""
    rows = np.arange(len(labels))
    shift = 0.17 if any(m is not None for m in after) else 0.0
    for metrics, offset, colour, marker, name in (
        (before, -shift, BEFORE_COLOUR, "o", "before"),
        (after, shift, AFTER_COLOUR, "D", "after pruning"),
    ):
        label: str | None = name  # on the first dot of the series only: one legend entry
        for row, (m, tiny) in enumerate(zip(metrics, small, strict=True)):
            if m is None or not _finite(m.value):
                continue
            low = m.value - m.ci_low if _finite(m.ci_low) else 0.0
            high = m.ci_high - m.value if _finite(m.ci_high) else 0.0
            ax.errorbar(
                m.value,
                row + offset,
                xerr=[[max(low, 0.0)], [max(high, 0.0)]],
                fmt=marker,
                color=colour,
                markerfacecolor="white" if tiny else colour,
                markersize=6,
                capsize=3,
                label=label,
            )
            label = None
    ax.set_yticks(rows, labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(axis="x", color="#e5e5e5")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)


def _legend(fig: Figure, ax) -> None:
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    if unique:
        fig.legend(
            unique.values(), unique.keys(), loc="upper right", fontsize=8, frameon=False, ncols=2
        )


def _group_key(g: GroupMetric) -> tuple[int, str, str]:
    return g.label, g.attribute, g.value


def _group_text(g: GroupMetric) -> str:
    return f"{class_label(g.label, g.label_name)}, {g.attribute}={g.value}"


def _group_accuracy_plot(before: Evaluation, after: Evaluation | None) -> Figure:
    later = {_group_key(g): g for g in after.groups} if after else {}
    groups = before.groups
    labels = [
        plot_text(_group_text(g), 44) + (" (small)" if g.too_small else "") + f"  n={g.count}"
        for g in groups
    ]
    fig = Figure(figsize=(8.5, 1.0 + 0.36 * len(groups)))
    ax = fig.add_subplot()
    _dot_plot(
        ax,
        labels,
        [g.accuracy for g in groups],
        [later[_group_key(g)].accuracy if _group_key(g) in later else None for g in groups],
        [g.too_small for g in groups],
        "accuracy per group (test split), 95 % bootstrap intervals",
    )
    _legend(fig, ax)
    return fig


_RATES = (
    ("accuracy", "accuracy"),
    ("selection_rate", "selection rate"),
    ("true_positive_rate", "true positive rate"),
    ("false_positive_rate", "false positive rate"),
)


def _fairness_group_text(breakdown: GroupFairness, group: FairnessGroup, limit: int = 0) -> str:
    """``race=Black × sex=Female``; each name and value cut to ``limit`` for a plot."""
    named = zip(breakdown.attributes, group.values, strict=False)
    if limit:
        return " × ".join(f"{plot_text(a, limit)}={plot_text(v, limit)}" for a, v in named)
    return " × ".join(f"{a}={v}" for a, v in named)


def _fairness_plot(before: GroupFairness, after: GroupFairness | None) -> Figure:
    later = {tuple(g.values): g for g in after.groups} if after else {}
    groups = before.groups
    labels = [
        _fairness_group_text(before, g, 16) + (" (small)" if g.too_small else "") + f"  n={g.count}"
        for g in groups
    ]
    fig = Figure(figsize=(11, 1.3 + 0.34 * len(groups) * 2))
    axes = fig.subplots(2, 2, sharey=True)
    for ax, (field, name) in zip(axes.flat, _RATES, strict=True):
        _dot_plot(
            ax,
            labels,
            [getattr(g, field) for g in groups],
            [
                getattr(later[tuple(g.values)], field) if tuple(g.values) in later else None
                for g in groups
            ],
            [g.too_small for g in groups],
            name,
        )
    _legend(fig, axes.flat[0])
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


# --- sections ----------------------------------------------------------------------------


def _header(result: AuditResult) -> str:
    spec = result.spec
    rows = [
        ("model", f"<code>{_esc(_model_name(result))}</code>, {spec.model.num_classes} classes"),
        ("weights sha256", f"<code>{_esc(result.model_sha256 or 'n/a')}</code>"),
        ("dataset digest", f"<code>{_esc(result.dataset_digest or 'n/a')}</code>"),
        (
            "classes audited",
            f"{_esc(_class_text(result, spec.positive_class))} vs "
            f"{_esc(_class_text(result, spec.negative_class))}",
        ),
        ("attributes", ", ".join(f"<code>{_esc(a)}</code>" for a in spec.attributes)),
        (
            "concepts",
            f"{_esc(spec.method)} at {', '.join(_esc(layer) for layer in _layers(result))}; "
            f"K from {_esc(spec.n_subspaces)}; flag threshold {spec.flag_threshold:g}",
        ),
        (
            "statistics",
            f"{spec.bootstrap} bootstrap resamples; groups under {spec.min_group_size} "
            "samples marked small; seed " + _esc(spec.seed),
        ),
        (
            "pruning",
            f"{_esc(spec.prune.method)} at rate {spec.prune.rate:g}" if spec.prune else "none",
        ),
        (
            "computed with",
            ", ".join(f"{_esc(k)} {_esc(v)}" for k, v in sorted(result.versions.items())),
        ),
    ]
    cells = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='meta'>{cells}</table>"


def _layers(result: AuditResult) -> list[str]:
    layers = list(dict.fromkeys(a.layer for a in result.attributes))
    return layers or list(result.spec.layers) or ["default layer"]


def _attributes(result: AuditResult) -> list[str]:
    return list(dict.fromkeys([*result.spec.attributes, *(a.attribute for a in result.attributes)]))


def _verdict(result: AuditResult) -> str:
    """Per attribute: which values have a flagged subspace (with its AP), else the best AP."""
    lines, any_flag = [], False
    for attribute in _attributes(result):
        audits = [a for a in result.attributes if a.attribute == attribute]
        flagged = [a for a in audits if a.flagged_subspace >= 0]
        name = f"<code>{_esc(attribute)}</code>"
        if flagged:
            any_flag = True
            found = "; ".join(
                f"value <code>{_esc(a.value)}</code>: S{a.flagged_subspace + 1} at "
                f"{_esc(a.layer)}, AP {_metric(a.subspaces[a.flagged_subspace].ap_attribute, base=True)}"
                for a in flagged
            )
            lines.append(
                f"<li>{name} <span class='badge flag'>flagged</span> a subspace of the model "
                f"carries it: {found}</li>"
            )
        elif audits:
            best = max(
                (
                    (s.ap_attribute.value, a)
                    for a in audits
                    for s in a.subspaces
                    if _finite(s.ap_attribute.value)
                ),
                default=(float("nan"), audits[0]),
                key=lambda pair: pair[0],
            )
            lines.append(
                f"<li>{name} <span class='badge ok'>not flagged</span> no subspace reaches the "
                f"flag level ({result.spec.flag_threshold:g} at base rate 0.5; best "
                f"{_num(best[0])}, value "
                f"<code>{_esc(best[1].value)}</code>)</li>"
            )
        else:
            lines.append(f"<li>{name}: not audited</li>")
    evaluation = result.before
    if evaluation is not None:
        after = result.after
        change = (
            f" → {_num(after.worst_group_accuracy.value)} after pruning ({_esc(after.worst_group)})"
            if after
            else ""
        )
        lines.append(
            f"<li>worst group before: {_esc(evaluation.worst_group)} at accuracy "
            f"{_num(evaluation.worst_group_accuracy.value)}{change}</li>"
        )
    css = "verdict" if any_flag else "verdict clear"
    return f"<h2>Verdict</h2><div class='{css}'><ul>{''.join(lines)}</ul></div>"


def _audit_section(result: AuditResult) -> str:
    if not result.attributes:
        return "<h2>Concept audit</h2><p>No audit tables.</p>"
    parts = [
        "<h2>Concept audit</h2>",
        "<p>Each subspace of the audited layer is scored by how well its relevance ranks "
        "the test images that carry an attribute value above those that do not (average "
        "precision, AP). An AP far above its base rate (the positive fraction, what a random "
        "score achieves) means the model's explanation uses that subspace for the value.</p>",
    ]
    # Multi-valued attributes as a whole, above their one-vs-rest tables.
    parts += [_summary_table(s) for s in result.attribute_summaries if len(s.values) > 1]
    blocks: dict[tuple[str, str, int], list[AttributeAudit]] = {}
    for audit in result.attributes:
        blocks.setdefault((audit.attribute, audit.layer, audit.n_subspaces), []).append(audit)
    threshold = result.spec.flag_threshold
    for (attribute, layer, k), audits in blocks.items():
        parts.append(f"<h3>{_esc(attribute)} at {_esc(layer)}, K={k}</h3>")
        fig = _ap_heatmap(audits, threshold)
        parts.append(
            _figure(
                _png(fig),
                "Rows: subspaces S1..SK; columns: the attribute's values, each audited "
                "one-vs-rest. Each cell: AP_attribute on the test split, with its base rate in "
                f"parentheses; darker is higher. Red frame: the flagged subspace (AP ≥ {threshold:g} "
                "at base rate 0.5, and the same lift over chance at other base rates).",
                f"AP heatmap of {attribute} at {layer}",
            )
        )
        for audit in audits:
            parts.append(_audit_table(audit))
    return "\n".join(parts)


def _summary_table(summary: AttributeSummary) -> str:
    """A multi-valued attribute as a whole: per value its best subspace and flag, then the
    subspaces several values share and those CNP removes (:class:`AttributeSummary`)."""

    def name(k: int, n_subspaces: int) -> str:
        return f"S{k + 1} (K={n_subspaces})" if k >= 0 else "none"

    def listed(items: Sequence[SubspaceValues]) -> str:
        return "; ".join(
            f"{name(u.index, u.n_subspaces)} for {', '.join(_esc(v) for v in u.values)}"
            for u in items
        )

    rows = [
        [
            f"<code>{_esc(v.value)}</code>",
            name(v.best_subspace, v.n_subspaces),
            _metric(v.ap_attribute, base=True),
            name(v.flagged_subspace, v.n_subspaces),
        ]
        for v in summary.values
    ]
    return (
        f"<h3>{_esc(summary.attribute)} as a whole, at {_esc(summary.layer)}</h3>"
        + _table(["value", "best subspace", "its AP attribute", "flagged"], rows)
        + f"<p>One subspace for several values: {listed(summary.shared) or 'none'}. "
        f"CNP removes: {listed(summary.removed) or 'nothing at this layer'}.</p>"
    )


def _audit_table(audit: AttributeAudit) -> str:
    flagged = (
        f"flagged: S{audit.flagged_subspace + 1}"
        if audit.flagged_subspace >= 0
        else "nothing flagged"
    )
    caption = (
        f"<p><b>{_esc(audit.attribute)} = <code>{_esc(audit.value)}</code></b> at "
        f"{_esc(audit.layer)}: {flagged} <span class='muted'>(validation AP of the chosen "
        f"subspace {_num(audit.selection_ap)}; cells: value [95 % interval] (base rate))</span></p>"
    )
    header = ["subspace", "mean relevance"] + [html.escape(name) for _, name, _ in AP_COLUMNS]
    rows, classes = [], []
    for s in audit.subspaces:
        is_flagged = s.index == audit.flagged_subspace
        label = f"S{s.index + 1}" + (
            " <span class='badge flag'>flagged</span>" if is_flagged else ""
        )
        rows.append(
            [label, _num(s.mean_relevance)]
            + [_metric(getattr(s, field), base=True, stacked=True) for field, _, _ in AP_COLUMNS]
        )
        classes.append("flagged" if is_flagged else "")
    return caption + _table(header, rows, classes)


def _groups_section(result: AuditResult) -> str:
    before, after = result.before, result.after
    if before is None or not before.groups:
        return ""
    later = {_group_key(g): g for g in after.groups} if after else {}
    header = ["group", "n", "accuracy before"] + (["after pruning", "change"] if after else [])
    rows = []
    for g in before.groups:
        cells = [
            _esc(_group_text(g)) + (_small(g.count) if g.too_small else ""),
            str(g.count),
            _metric(g.accuracy),
        ]
        if after:
            other = later.get(_group_key(g))
            cells += [
                _metric(other.accuracy) if other else "n/a",
                f"{other.accuracy.value - g.accuracy.value:+.3f}" if other else "",
            ]
        rows.append(cells)
    summary = [
        ["balanced accuracy", "", _metric(before.balanced_accuracy)]
        + (
            [
                _metric(after.balanced_accuracy),
                _change(before.balanced_accuracy, after.balanced_accuracy),
            ]
            if after
            else []
        ),
        [f"worst group ({_esc(before.worst_group)})", "", _metric(before.worst_group_accuracy)]
        + (
            [
                _metric(after.worst_group_accuracy) + f" ({_esc(after.worst_group)})",
                _change(before.worst_group_accuracy, after.worst_group_accuracy),
            ]
            if after
            else []
        ),
    ]
    caption = (
        "One row per class × attribute value. Grey circles: before pruning; blue diamonds: "
        "after; bars: 95 % bootstrap intervals. Hollow markers and “(small)”: fewer than "
        f"{result.spec.min_group_size} samples, read with care. A shortcut shows as a low "
        "accuracy for the class whose images carry the other class's attribute value."
    )
    return "\n".join(
        [
            "<h2>Accuracy per group</h2>",
            _figure(_png(_group_accuracy_plot(before, after)), caption, "accuracy per group"),
            _table(header, rows + summary),
        ]
    )


def _change(before: Metric, after: Metric) -> str:
    return (
        f"{after.value - before.value:+.3f}"
        if _finite(before.value) and _finite(after.value)
        else ""
    )


_DISPARITIES = (
    ("demographic_parity_difference", "demographic parity difference", "lower is fairer"),
    ("demographic_parity_ratio", "demographic parity ratio", "higher is fairer (1 = equal)"),
    ("equalized_odds_difference", "equalized odds difference", "lower is fairer"),
    ("equalized_odds_ratio", "equalized odds ratio", "higher is fairer (1 = equal)"),
    ("accuracy_difference", "accuracy difference", "lower is fairer"),
)


def _fairness_section(result: AuditResult) -> str:
    before = result.before.fairness if result.before else []
    if not before:
        return ""
    after = {tuple(f.attributes): f for f in result.after.fairness} if result.after else {}
    parts = [
        "<h2>Fairness</h2>",
        "<p>Fairlearn's group metrics of the decision “predicted the positive class” "
        "on the test split, per attribute and for the intersection of the attributes. "
        "Differences are the largest minus the smallest group value, ratios the smallest over "
        "the largest, over the groups that are not too small.</p>",
    ]
    for breakdown in before:
        later = after.get(tuple(breakdown.attributes))
        name = " × ".join(breakdown.attributes)
        positive = _class_text(result, breakdown.positive_class)
        parts.append(
            f"<h3>{_esc(name)} <span class='muted'>(positive class: {_esc(positive)})</span></h3>"
        )
        parts.append(_disparity_table(breakdown, later))
        caption = (
            "Per group: accuracy, selection rate P(predicted positive), true positive rate "
            "P(predicted positive | positive) and false positive rate P(predicted positive | "
            "negative). Grey circles: before pruning; blue diamonds: after; bars: 95 % "
            "bootstrap intervals; hollow: a small group, left out of the disparities. "
            "Equal opportunity means equal true positive rates; equalized odds also equal "
            "false positive rates."
        )
        parts.append(
            _figure(_png(_fairness_plot(breakdown, later)), caption, f"group rates by {name}")
        )
        parts.append(_fairness_groups_table(breakdown, later))
    return "\n".join(parts)


def _disparity_table(before: GroupFairness, after: GroupFairness | None) -> str:
    header = ["measure", "before"] + (["after pruning", "change"] if after else []) + ["reading"]
    rows = []
    for field, name, reading in _DISPARITIES:
        cells = [name, _metric(getattr(before, field))]
        if after:
            cells += [
                _metric(getattr(after, field)),
                _change(getattr(before, field), getattr(after, field)),
            ]
        rows.append(cells + [f"<span class='muted'>{reading}</span>"])
    return _table(header, rows)


def _fairness_groups_table(before: GroupFairness, after: GroupFairness | None) -> str:
    """One row per group, one column per rate: the value before and, below it, after."""
    later = {tuple(g.values): g for g in after.groups} if after else {}
    header = ["group", "n"] + [name for _, name in _RATES]
    rows = []
    for g in before.groups:
        cells = [
            _esc(_fairness_group_text(before, g)) + (_small(g.count) if g.too_small else ""),
            str(g.count),
        ]
        other: FairnessGroup | None = later.get(tuple(g.values))
        for field, _ in _RATES:
            cell = _metric(getattr(g, field))
            if after:
                cell += "<br>→ " + (_metric(getattr(other, field)) if other else "n/a")
            cells.append(cell)
        rows.append(cells)
    note = "<p class='muted'>Each cell: before pruning, and after it (→).</p>" if after else ""
    return note + _table(header, rows)


def _heatmap_section(result: AuditResult) -> str:
    figures = []
    for audit in result.attributes:
        path = result.artifacts.get(f"heatmap:{audit.attribute}={audit.value}:{audit.layer}")
        if not path or not Path(path).is_file():
            continue
        png = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        flagged = (
            f"the flagged subspace S{audit.flagged_subspace + 1} is framed in red"
            if audit.flagged_subspace >= 0
            else "no subspace is flagged"
        )
        caption = (
            f"<b>{_esc(audit.attribute)} = <code>{_esc(audit.value)}</code></b> at "
            f"{_esc(audit.layer)}. Rows: test images that carry the value; columns: the image, "
            "the ordinary LRP heatmap, one map per subspace and the residue (they add up to "
            "the LRP map). Each map lies over the greyed image and is scaled to itself, so a "
            "subspace with little relevance still shows where it looks; the percentage is its "
            f"share of the image's total |relevance|. Red: for the explained class, blue: against; {flagged}."
        )
        figures.append(
            _figure(png, caption, f"subspace heatmaps of {audit.attribute}={audit.value}")
        )
    if not figures:
        return (
            "<h2>Subspace heatmaps</h2><p class='muted'>None: the job rendered no heatmaps "
            "(heatmap_samples 0, or a model without images).</p>"
        )
    return "<h2>Subspace heatmaps</h2>\n" + "\n".join(figures)


def _pruning_section(result: AuditResult) -> str:
    pruning = result.pruning
    if pruning is None:
        return ""
    lines = [
        f"<p>{_esc(pruning.method)} pruning at rate {pruning.rate:g}: "
        f"{pruning.filters_removed} of {pruning.filters_total} filters removed"
        + (
            f", {pruning.neurons_removed} of {pruning.neurons_total} hidden neurons"
            if pruning.neurons_total
            else ""
        )
        + ".</p>"
    ]
    before, after = result.before, result.after
    if before and after:
        rows = [
            [
                "balanced accuracy",
                _num(before.balanced_accuracy.value),
                _num(after.balanced_accuracy.value),
            ],
            [
                "worst group accuracy",
                _num(before.worst_group_accuracy.value),
                _num(after.worst_group_accuracy.value),
            ],
            ["parameters", f"{before.parameters:,}", f"{after.parameters:,}"],
            ["FLOPs", f"{before.flops:,}", f"{after.flops:,}"],
            ["CPU latency, batch 1 (ms)", _num(before.latency_ms, 2), _num(after.latency_ms, 2)],
        ]
        lines.append(_table(["", "before", "after pruning"], rows))
    return "<h2>Pruning</h2>\n" + "\n".join(lines)


def _footer(result: AuditResult) -> str:
    timings = ", ".join(f"{_esc(k)} {v:.1f} s" for k, v in result.timings.items())
    return f"<p class='muted'>Stage timings: {timings or 'n/a'}. Written by cnp.</p>"
