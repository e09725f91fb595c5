"""The cnp CLI against a real cnp-server process on loopback.

The server runs the scripted engine of ``test_server_support`` (real references, real
reports and artifacts, jobs whose duration and outcome the test chooses), so these
tests exercise the CLI's whole path quickly: submit, progress, report, gates, files,
downloads and every exit code. ``test_cli_e2e.py`` runs the real pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_server_support import MODEL_BYTES, ServerProcess, make_references, wait_for

from cnp_client import AuditClient
from cnp_client.cli import main
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refs")
    make_references(root)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, refs):
    process = ServerProcess(tmp_path_factory.mktemp("data"), [refs], args=["--no-tracking"]).start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in ("CNP_TOKEN", "CNP_TOKEN_FILE", "CNP_DATA_DIR", "CNP_SERVER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .cnp/token is picked up


def audit_args(server, refs: Path, script: str = "layer", *extra: str) -> list[str]:
    """``cnp audit`` flags for the scripted engine; ``script`` is its first layer name."""
    return [
        "audit", "--server", server.address, "--token-file", str(server.data_dir / "token"),
        "--model", "scripted", "--weights", str(refs / "model.safetensors"),
        "--dataset", str(refs / "data"), "--input-size", "28", "--layer", script,
        "--attribute", "wm", "--bootstrap", "0", "--no-progress", *extra,
    ]  # fmt: skip


def junit_counts(path: Path) -> tuple[int, int]:
    suite = ET.parse(path).getroot().find("testsuite")
    return int(suite.get("tests")), int(suite.get("failures"))


def test_passing_gates_exit_0_and_write_every_file(server, refs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        audit_args(
            server, refs, "stage:fit:3", "--request-id", "ci-run-1",
            "--gate", "max_ap_attribute<=0.99", "--gate", "worst_group_accuracy>=0.3",
            "--json", str(out / "report.json"), "--junit", str(out / "junit.xml"),
            "--summary", str(out / "summary.md"),
        )
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["audit_id"].startswith("aud-")
    assert [(a["value"], a["flagged_subspace"]) for a in report["attributes"]] == [
        ("1", 1),
        ("0", -1),
    ]
    assert junit_counts(out / "junit.xml") == (3, 0)  # two attribute values + one accuracy rule
    summary = (out / "summary.md").read_text()
    assert f"## cnp audit `{report['audit_id']}`: PASSED (3 gates)" in summary
    assert "| **S2 ⚑** |" in summary and "| class 1, wm=0 | 26 |" in summary
    # Plain progress lines on stderr (not a TTY), tables on stdout.
    assert "fit:" in captured.err and f"audit {report['audit_id']} submitted" in captured.err
    assert "gates: 3/3 passed" in captured.out and "flagged: S2" in captured.out


def test_failing_gate_exits_1_through_the_console_script(server, refs, tmp_path):
    # The same request id is the same job: CI can re-run a step without a new audit.
    first = json.loads(_report_json(server, refs, tmp_path, "ci-run-1"))
    junit = tmp_path / "junit.xml"
    cnp = Path(sys.executable).parent / "cnp"
    args = audit_args(server, refs, "stage:fit:3", "--request-id", "ci-run-1")
    result = subprocess.run(
        [str(cnp), *args, "--gate", "flagged==none", "--junit", str(junit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"audit {first['audit_id']}" in result.stderr
    assert junit_counts(junit) == (2, 1)
    assert "FAIL  flagged==none [wm=1]" in result.stdout


def _report_json(server, refs: Path, tmp_path: Path, request_id: str) -> str:
    path = tmp_path / f"{request_id}.json"
    assert (
        main(
            [
                *audit_args(server, refs, "stage:fit:3", "--request-id", request_id, "--quiet"),
                "--json",
                str(path),
            ]
        )
        == 0
    )
    return path.read_text()


def test_prune_download_and_before_after_gates(server, refs, tmp_path, capsys):
    model, summary = tmp_path / "m" / "compact.safetensors", tmp_path / "summary.md"
    code = main(
        audit_args(
            server, refs, "layer", "--prune", "cnp", "--prune-rate", "0.3",
            "--gate", "after.worst_group_accuracy>=before", "--gate", "after.parameters<=before",
            "--download-model", str(model), "--summary", str(summary), "--quiet",
        )
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert model.stat().st_size > MODEL_BYTES  # chunked download, complete and verified
    markdown = summary.read_text()
    assert "| Group | n | Before | After | Change |" in markdown
    assert "Pruning: cnp at rate 0.30: 19 of 64 filters removed." in markdown


def test_report_command_with_a_baseline(server, refs, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(_report_json(server, refs, tmp_path, "ci-run-1"))
    audit_id = json.loads(baseline.read_text())["audit_id"]
    common = [
        "report",
        audit_id,
        "--server",
        server.address,
        "--token-file",
        str(server.data_dir / "token"),
    ]
    common += ["--baseline-report", str(baseline)]
    assert main([*common, "--gate", "balanced_accuracy>=baseline-0.01", "--quiet"]) == 0
    assert main([*common, "--gate", "balanced_accuracy>=baseline+0.1"]) == 1
    assert "needs >= 0.900 (baseline 0.800 + 0.1)" in capsys.readouterr().out
    junit = tmp_path / "j.xml"
    assert (
        main([*common, "--gate", "max_ap_attribute<=baseline", "--junit", str(junit), "--quiet"])
        == 0
    )
    assert junit_counts(junit) == (2, 0)


@pytest.mark.parametrize(
    "script, code, message",
    [
        ("fail:INVALID_ARGUMENT", 2, "FAILED (INVALID_ARGUMENT): scripted failure"),
        ("fail:FAILED_PRECONDITION", 2, "FAILED (FAILED_PRECONDITION)"),
        ("crash", 3, "FAILED (INTERNAL): internal error (correlation id"),
        ("fail:RESOURCE_EXHAUSTED", 3, "FAILED (RESOURCE_EXHAUSTED)"),
    ],
)
def test_failed_jobs_map_to_exit_codes(server, refs, capsys, script, code, message):
    assert main(audit_args(server, refs, script)) == code
    assert message in capsys.readouterr().err


def test_refused_submissions_exit_2(server, refs, tmp_path, capsys):
    no_labels = refs / "empty"
    no_labels.mkdir(exist_ok=True)
    args = audit_args(server, refs)
    args[args.index("--dataset") + 1] = str(no_labels)
    assert main(args) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err

    outside = tmp_path / "elsewhere"
    make_references(outside)
    args = audit_args(server, refs)
    args[args.index("--dataset") + 1] = str(outside / "data")
    assert main(args) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err

    wrong = tmp_path / "token"
    wrong.write_text("not-the-token\n")
    wrong.chmod(0o644)  # readable by others: refused before it is sent, as ssh does
    args = audit_args(server, refs)
    args[args.index("--token-file") + 1] = str(wrong)
    assert main(args) == 2
    assert "accessible by others (mode 0644)" in capsys.readouterr().err
    wrong.chmod(0o600)
    assert main(args) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_wait_timeout_cancels_the_job_and_exits_3(server, refs, capsys):
    assert main(audit_args(server, refs, "sleep:300", "--wait-timeout", "1.5")) == 3
    err = capsys.readouterr().err
    assert "did not finish within --wait-timeout 1.5 s; cancelled" in err
    audit_id = err.split("cnp: audit ", 1)[1].split()[0]
    with AuditClient(server.address, token=server.token) as client:
        wait_for(lambda: client.get(audit_id).state == "CANCELLED", timeout=30)


def test_jobs_watch_cancel_and_report_commands(server, refs, capsys):
    connection = ["--server", server.address, "--token-file", str(server.data_dir / "token")]
    spec = AuditSpec(
        model=ModelRef(architecture="scripted", weights=str(refs / "model.safetensors")),
        dataset=DatasetRef(root=str(refs / "data"), input_size=28),
        layers=["sleep:300"],
        attributes=["wm"],
    )
    with AuditClient(server.address, token=server.token) as client:
        audit_id = client.submit(spec).id
        wait_for(lambda: client.get(audit_id).state == "RUNNING", timeout=30)

    assert main(["jobs", *connection, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"id": audit_id, "state": "RUNNING"}.items() <= next(
        r for r in rows if r["id"] == audit_id
    ).items()
    assert main(["jobs", *connection]) == 0
    assert capsys.readouterr().out.startswith("ID ")

    assert main(["report", audit_id, *connection]) == 2  # FAILED_PRECONDITION: not finished
    assert "FAILED_PRECONDITION" in capsys.readouterr().err

    assert main(["cancel", audit_id, *connection]) == 0
    assert f"audit {audit_id}:" in capsys.readouterr().out
    assert main(["watch", audit_id, *connection, "--no-progress", "--wait-timeout", "30"]) == 3
    assert f"audit {audit_id} was cancelled" in capsys.readouterr().err

    assert main(["info", *connection]) == 0
    assert "scripted" in json.loads(capsys.readouterr().out)["architectures"]
