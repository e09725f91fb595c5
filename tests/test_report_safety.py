"""Reports cannot attack their reader: hostile attribute strings in every output format.

One audit result carries the hostile strings as attribute names, values, layer names,
group names and stage names; it goes through the same path as a served job (result ->
proto -> canonical JSON) to the CLI's Markdown, JUnit and text outputs.
"""

from __future__ import annotations

import csv
import re
import unicodedata
import xml.etree.ElementTree as ET

import pytest
from markdown_it import MarkdownIt  # a dependency of rich, which the client needs

from cnp_client.gates import evaluate
from cnp_client.reports import junit_xml, markdown_summary, text_summary
from cnp_core import convert
from cnp_core.experiment import ExperimentConfig, Row, read_rows, write_outputs
from cnp_core.report import summary, write_report
from cnp_core.results import (
    AttributeAudit,
    AuditResult,
    Evaluation,
    GroupMetric,
    Metric,
    PruningSummary,
    SubspaceScore,
)
from cnp_core.spec import AuditSpec

HOSTILE = [
    '=HYPERLINK("http://x","y")',
    "+1+1",
    "-cmd",
    "@SUM(A1)",
    "\tx",
    "\rx",
    "a|b",
    "<script>",
    "![x](http://e/i.png)",
    "x\x00y",
    "\x1b[31mred",
    "line\nbreak",
    "v" * 300,
    "Wasserzeichen-ü",
]
NUMBER = "-1"  # CelebA's attribute values are -1 and 1: a number stays a number
DANGEROUS = ("=", "+", "-", "@", "\t", "\r")
RULES = ["max_ap_attribute<=0.8", "flagged==none", "worst_group_accuracy>=0.7"]
AUDIT_ID = "=id`|<b>\x1b]0;"


def _metric(value: float) -> Metric:
    return Metric(value, value - 0.05, value + 0.05, 0.5)


def _audit(name: str) -> AttributeAudit:
    subspaces = [
        SubspaceScore(index, relevance, *[_metric(ap)] * 6)
        for index, (relevance, ap) in enumerate([(-0.5, 0.9), (0.25, 0.6)])
    ]
    return AttributeAudit(name, name, name, 2, subspaces, flagged_subspace=0)


@pytest.fixture
def result() -> AuditResult:
    names = [*HOSTILE, NUMBER]
    groups = [
        GroupMetric(label, name, name, 12, _metric(0.6)) for name in names for label in (0, 1)
    ]
    evaluation = Evaluation(_metric(0.8), _metric(0.55), HOSTILE[0], groups)
    return AuditResult(
        spec=AuditSpec(attributes=names),
        model_sha256="ab" * 32,
        dataset_digest="cd" * 32,
        attributes=[_audit(name) for name in names],
        before=evaluation,
        after=evaluation,
        pruning=PruningSummary("cnp", 0.3, 960, 288),
        timings={name: 1.0 for name in HOSTILE},
    )


@pytest.fixture
def report(result) -> dict:
    """The canonical JSON report the client reads, as a served job produces it."""
    return convert.report_to_dict(convert.report_to_proto(result, audit_id=AUDIT_ID))


def _hidden(text: str) -> list[str]:
    """Characters that act on a terminal or on text rather than show (newline aside)."""
    categories = {"Cc", "Cf", "Cs", "Zl", "Zp"}
    return [c for c in text.replace("\n", "") if unicodedata.category(c) in categories]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_audit_table_csv_neutralises_formulas_and_keeps_numbers(result, tmp_path):
    write_report(result, tmp_path)
    with open(tmp_path / "audit_table.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    assert len(rows) == 2 * len(result.attributes)
    for cell in (cell for row in rows for cell in row):
        assert not cell.startswith(DANGEROUS) or _is_number(cell), cell
    column = {name: header.index(name) for name in ("attribute", "value", "layer")}
    for row, audit in zip(rows[::2], result.attributes, strict=True):
        name = audit.attribute
        expected = "'" + name if name.startswith(DANGEROUS) and name != NUMBER else name
        assert [row[i] for i in column.values()] == [expected] * 3  # otherwise verbatim
    assert rows[-1][column["value"]] == NUMBER
    assert float(rows[0][header.index("mean_relevance")]) == -0.5
    assert int(rows[0][header.index("k")]) == 2


def test_experiment_csvs_keep_numbers_readable(tmp_path):
    rows = [
        Row(seed, method, rate, 0.8, 0.5, 0.9, 0.4, flagged_ap=-0.5)
        for seed in (0, 1)
        for method, rate in (("none", 0.0), ("lrp", 0.1), ("cnp", 0.1))
    ]
    paths = write_outputs(rows, ExperimentConfig(seeds=(0, 1)), "watermark", tmp_path)
    for name in ("rows", "summary_csv"):
        with open(paths[name], newline="") as handle:
            cells = [cell for row in csv.reader(handle) for cell in row]
        assert "-0.5" in cells or name == "summary_csv"
        assert all(not cell.startswith(DANGEROUS) or _is_number(cell) for cell in cells)
    assert read_rows(paths["rows"]) == rows  # the writer's own reader reads it back


def _tables(markdown: str) -> list[list[str]]:
    tables, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_markdown_tables_keep_their_columns_and_render_no_markup(report):
    markdown = markdown_summary(report, evaluate(RULES, report))
    tables = _tables(markdown)
    assert len(tables) == 1 + len(report["attributes"]) + 2  # gates, audits, groups, timings
    for table in tables:
        # GitHub's rule: a '|' right after a backslash is part of the cell.
        delimiters = {len(re.findall(r"(?<!\\)\|", row)) for row in table}
        assert len(delimiters) == 1, table
    html = MarkdownIt("commonmark").enable("table").render(markdown)
    assert "<script" not in html and "<img" not in html and "<a " not in html
    assert "<b>" not in html
    # The strings show as written (escaped, not dropped or doubly escaped).
    for shown in ("&lt;script&gt;", "![x](http://e/i.png)", "a|b", "Wasserzeichen-ü", "x\\x00y"):
        assert shown in html, shown
    assert not _hidden(markdown)


def test_junit_xml_is_well_formed_for_any_string(report):
    checks = evaluate(RULES, report)
    root = ET.fromstring(junit_xml(checks, audit_id=AUDIT_ID))
    cases = root.findall("testsuite/testcase")
    assert len(cases) == len(checks) == 2 * len(report["attributes"]) + 1
    names = [case.get("name") for case in cases]
    # "rule [attribute=value, layer]": every name is one of the hostile strings here.
    assert "max_ap_attribute<=0.8 [<script>=<script>, <script>]" in names  # markup as text
    assert "max_ap_attribute<=0.8 [x\\x00y=x\\x00y, x\\x00y]" in names  # NUL shown, not written
    umlaut = "Wasserzeichen-ü"
    assert f"max_ap_attribute<=0.8 [{umlaut}={umlaut}, {umlaut}]" in names
    assert root.find("testsuite/properties/property").get("value") == "=id`|<b>\\x1b]0;"
    failures = [case.find("failure") for case in cases if case.find("failure") is not None]
    assert failures  # the flagged subspaces fail max_ap_attribute<=0.8
    texts = [*names, *(f.get("message") for f in failures), *(f.text for f in failures)]
    assert not any(_hidden(text) for text in texts)


def test_text_summaries_show_control_characters_escaped(result, report):
    checks = evaluate(RULES, report)
    for text in (summary(result), text_summary(report, checks)):
        assert not _hidden(text)
        assert "\\x1b[31mred" in text and "line\\nbreak" in text and "\\rx" in text
        assert "Wasserzeichen-ü" in text
