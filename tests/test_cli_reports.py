"""The CLI's outputs: JUnit XML, Markdown summary and the terminal table."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from test_gates import make_report, two_attribute_report

from cnp_client.gates import evaluate
from cnp_client.reports import junit_xml, markdown_summary, text_summary, write_text

RULES = ["max_ap_attribute<=0.8", "flagged==none", "worst_group_accuracy>=0.7"]


def test_junit_has_one_case_per_check_and_failures_with_messages():
    checks = evaluate(RULES, two_attribute_report())
    assert len(checks) == 5  # two attribute values x two audit rules + one accuracy rule
    root = ET.fromstring(junit_xml(checks, audit_id="a-123"))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "2", "0")
    assert root.get("tests") == "5" and root.get("failures") == "2"
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == [check.name for check in checks]
    failed = [case for case in cases if case.find("failure") is not None]
    assert [case.get("name") for case in failed] == [
        "max_ap_attribute<=0.8 [watermark=1]",
        "flagged==none [watermark=1]",
    ]
    failure = failed[0].find("failure")
    assert failure.get("message") == checks[0].message
    assert "observed: 0.91" in failure.text and "threshold: 0.8" in failure.text
    assert suite.find("properties/property").get("value") == "a-123"


def test_junit_without_gates_is_valid_and_empty():
    root = ET.fromstring(junit_xml([]))
    assert root.find("testsuite").get("tests") == "0"
    assert root.find("testsuite/testcase") is None


def _table(markdown: str, header_start: str) -> list[list[str]]:
    """Header and data rows of the Markdown table whose header starts with ``header_start``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    assert set(lines[start + 1]) <= set("|-:")  # the separator row
    return [rows[0], *rows[2:]]


def test_markdown_summary_content():
    report = two_attribute_report()
    checks = evaluate(RULES, report)
    markdown = markdown_summary(report, checks)
    assert markdown.startswith("## cnp audit `a-123`: FAILED (2 of 5 gates)")

    assert "Pruning: cnp at rate 0.30: 288 of 960 filters removed." in markdown

    gates = _table(markdown, "| | Gate")
    assert len(gates) == 1 + 5 and [row[0] for row in gates[1:]] == ["❌", "✅", "❌", "✅", "✅"]

    assert "### Concept audit: watermark = 1" in markdown
    assert "flagged subspace **S3** ⚑" in markdown and "no subspace flagged" in markdown
    audit = _table(markdown, "| Subspace")
    assert len(audit) == 1 + 4 and all(len(row) == 8 for row in audit)
    flagged_row = next(row for row in audit if row[0].startswith("**S3"))
    assert flagged_row[2] == "0.910 (0.50)"  # AP_attribute with its base rate
    assert flagged_row[3] == "0.910 (0.60)"  # AP_attribute on the positive class

    groups = _table(markdown, "| Group")
    assert groups[0] == ["Group", "n", "Before", "After", "Change"]
    rows = {row[0]: row for row in groups[1:]}
    assert rows["class 0, watermark=1"] == [
        "class 0, watermark=1",
        "40",
        "0.550 [0.500–0.600]",
        "0.990 [0.940–1.000]",
        "+0.440",
    ]
    assert rows["class 1, watermark=1"][1] == "8 ⚠"  # small group flagged
    assert rows["**Worst group**"][2:] == ["0.550", "0.880", "+0.330"]
    assert rows["Parameters"][2:4] == ["11.00 M", "7.70 M"]
    assert "fewer samples than the minimum group size" in markdown

    timings = _table(markdown, "| Stage")
    assert ["load", "1.5"] in timings and ["**total**", "**17.8**"] in timings


def test_markdown_without_pruning_or_gates():
    markdown = markdown_summary(make_report(pruned=False))
    assert markdown.startswith("## cnp audit `a-123`\n")
    assert "### Gates" not in markdown
    assert _table(markdown, "| Group")[0] == ["Group", "n", "Accuracy"]


def test_markdown_escapes_pipes_in_values():
    report = make_report()
    report["attributes"][0]["value"] = "a|b"
    markdown = markdown_summary(report, evaluate(["max_ap_attribute<=0.8"], report))
    assert "[watermark=a\\|b]" in markdown


def test_text_summary_is_aligned():
    report = two_attribute_report()
    text = text_summary(report, evaluate(RULES, report))
    lines = text.splitlines()
    assert lines[0] == "audit a-123: FAILED (2 of 5 gates)"
    assert any("flagged: S3" in line for line in lines)
    header = next(line for line in lines if line.startswith("  subspace"))
    flagged = next(line for line in lines if line.startswith("  S3 *"))
    # Columns line up: AP_A of S3 starts where its header does.
    assert flagged.index("0.910 (0.50)") == header.index("AP_A ")
    assert lines[1] == "pruning: cnp at rate 0.30: 288 of 960 filters removed"
    report["pruning"].update(neurons_total="8192", neurons_removed=2458)  # proto3 JSON int64
    pruning = text_summary(report, []).splitlines()[1]
    assert (
        pruning == "pruning: cnp at rate 0.30: 288 of 960 filters and 2458 of 8192 neurons removed"
    )
    assert "  ! fewer samples than the minimum group size" in lines
    assert "gates: 3/5 passed" in text
    assert any(line.startswith("  FAIL  flagged==none [watermark=1]") for line in lines)


def test_write_text_creates_parents(tmp_path):
    path = write_text(tmp_path / "out" / "deep" / "summary.md", "# hi")
    assert path.read_text() == "# hi\n"
