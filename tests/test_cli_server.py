"""The cnp CLI against a real cnp-server process on loopback.

The server runs the scripted engine of ``test_server_support`` (real references, real
reports and artifacts, jobs whose duration and outcome the test chooses), so these
tests exercise the CLI's whole path quickly: submit, progress, report, gates, files,
downloads and every exit code. ``test_cli_e2e.py`` runs the real pipeline.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from test_server_support import MODEL_BYTES, ServerProcess, make_references, make_spec, wait_for

from cnp_client import AuditClient
from cnp_client.cli import main
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef


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


# --- spec files, CI outputs, MLflow options --------------------------------------------------


def test_spec_file_audit_appends_to_the_step_summary_and_streams_json(
    server, refs, tmp_path, monkeypatch, capsys
):
    spec_file = tmp_path / "audit.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "model": {"architecture": "scripted", "weights": str(refs / "model.safetensors")},
                "dataset": {"root": str(refs / "data"), "input_size": 28},
                "layers": ["fail:INVALID_ARGUMENT"],  # the script; --layer below overrides it
                "attributes": ["wm"],
                "bootstrap": 0,
            }
        )
    )
    step_summary = tmp_path / "step_summary.md"
    earlier = "### Build\n\nwritten by an earlier command of the step\n"
    step_summary.write_text(earlier)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    connection = ["--server", server.address, "--token-file", str(server.data_dir / "token")]
    junit = tmp_path / "junit.xml"
    code = main(
        [
            # A fit stage of 1 s: several WatchAudit polls (0.25 s) see it, so it is printed.
            "audit", "--spec", str(spec_file), "--layer", "stage:fit:10", *connection,
            "--no-progress", "--experiment", "cli-tests", "--tag", "git_commit=abc123",
            "--summary", "--json", "-", "--junit", str(junit),
            # The scripted audit: AP 0.95 with CI [0.90, 1.00]; worst group 0.40 [0.35, 0.45].
            "--gate", "max_ap_attribute.ci_low>=0.89", "--gate", "worst_group_accuracy.ci_high<0.5",
            "--warn", "worst_group_accuracy.ci_low>=0.7",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err  # the warning does not fail the gate
    report = json.loads(captured.out)  # stdout is the report and nothing else
    audit_id = report["audit_id"]
    assert report["spec"]["layers"] == ["stage:fit:10"]  # the flag over the file
    assert report["spec"]["model"]["architecture"] == "scripted"  # the file's
    # People's output on stderr: progress, the tables, and the warning.
    assert "gates: " in captured.err and "fit:" in captured.err, captured.err
    assert (
        "cnp: warning: warn:worst_group_accuracy.ci_low>=0.7: "
        "before.worst_group_accuracy.ci_low = 0.350, needs >= 0.700" in captured.err
    )
    names = [case.get("name") for case in ET.parse(junit).getroot().iter("testcase")]
    assert names == [
        "max_ap_attribute.ci_low>=0.89 [wm=1]",
        "max_ap_attribute.ci_low>=0.89 [wm=0]",
        "worst_group_accuracy.ci_high<0.5",
        "warn:worst_group_accuracy.ci_low>=0.7",
    ]
    # Appended after what the step wrote before; never truncated, also by `cnp report`
    # and by a --summary F that names the same file.
    summary = step_summary.read_text()
    assert summary.startswith(earlier + "\n## cnp audit `" + audit_id + "`")
    assert "max_ap_attribute.ci_low>=0.89" in summary
    report_args = ["report", audit_id, *connection, "--quiet"]
    assert main([*report_args, "--summary"]) == 0
    assert main([*report_args, "--summary", str(step_summary)]) == 0
    summary = step_summary.read_text()
    assert summary.startswith(earlier) and summary.count(f"## cnp audit `{audit_id}`") == 3
    # A --summary F elsewhere is written afresh.
    other = tmp_path / "other.md"
    other.write_text("stale\n")
    assert main([*report_args, "--summary", str(other)]) == 0
    assert other.read_text().startswith(f"## cnp audit `{audit_id}`")


def test_tracking_options_reach_the_server(server, refs, capsys):
    # This server keeps no MLflow record: what it refuses proves the request carried them.
    assert main(audit_args(server, refs, "layer", "--tag", "cnp.audit_id=x")) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "tracking.tags" in err and "cnp.audit_id" in err
    assert main(audit_args(server, refs, "layer", "--register-model", "shapes-pruned")) == 2
    err = capsys.readouterr().err  # an audit alone makes no model to register
    assert "INVALID_ARGUMENT" in err and "tracking.register_model" in err
    pruned = audit_args(server, refs, "layer", "--prune", "cnp", "--register-model", "shapes")
    assert main(pruned) == 2
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err and "no model registry" in err


# --- Ctrl-C and SIGTERM, sent to a real cnp process -----------------------------------------


class Cnp:
    """The ``cnp`` console script in a subprocess, its stderr collected line by line."""

    def __init__(self, *args: str) -> None:
        # As from a terminal: SIGINT at its default, even where the test runner ignores it
        # (a background job). Reset by a launcher, not preexec_fn: code run between fork
        # and exec in this threaded process can deadlock in gRPC's fork handlers.
        launcher = (
            "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        cnp = str(Path(sys.executable).parent / "cnp")
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, cnp, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str) -> re.Match:
        """The first stderr line matching ``pattern``, once the command has printed it."""
        try:
            return wait_for(
                lambda: next(filter(None, map(re.compile(pattern).search, self.lines)), None)
            )
        except TimeoutError:
            raise AssertionError(f"no line matching {pattern!r} in:\n{self.stderr}") from None

    def interrupt(self, signum: int) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(30)
        finally:
            self.process.kill()


def test_interrupts_cancel_an_audit_and_detach_a_watch(server, refs, capsys):
    connection = ["--server", server.address, "--token-file", str(server.data_dir / "token")]
    with AuditClient(server.address, token=server.token) as client:
        # cnp audit: Ctrl-C cancels the job it submitted, then exits 130.
        audit = Cnp(*audit_args(server, refs, "sleep:300"))
        audit_id = audit.wait_for(r"(aud-\S+) work:")[1]
        assert audit.interrupt(signal.SIGINT) == 130, audit.stderr
        assert f"interrupted; cancelling audit {audit_id}" in audit.stderr
        wait_for(lambda: client.get(audit_id).state == "CANCELLED")

        # cnp watch: Ctrl-C stops watching; the audit keeps running, as its help says.
        audit_id = client.submit(make_spec(refs, "sleep:300")).id
        watch = Cnp("watch", audit_id, *connection, "--no-progress")
        watch.wait_for(rf"{audit_id} work:")
        assert watch.interrupt(signal.SIGINT) == 130, watch.stderr
        assert f"interrupted; audit {audit_id} keeps running" in watch.stderr
        job = client.get(audit_id)
        assert job.state == "RUNNING" and not job.cancel_requested
        # Nor does a watch that runs out of --wait-timeout cancel it.
        timed = ["watch", audit_id, *connection, "--no-progress", "--wait-timeout", "0.5"]
        assert main(timed) == 3
        assert "did not finish within --wait-timeout 0.5 s; audit" in capsys.readouterr().err
        job = client.get(audit_id)
        assert job.state == "RUNNING" and not job.cancel_requested

        # --cancel-on-interrupt cancels it, on SIGTERM too (what CI runners send).
        watch = Cnp("watch", audit_id, *connection, "--no-progress", "--cancel-on-interrupt")
        watch.wait_for(rf"{audit_id} work:")
        assert watch.interrupt(signal.SIGTERM) == 130, watch.stderr
        assert f"interrupted; cancelling audit {audit_id}" in watch.stderr
        wait_for(lambda: client.get(audit_id).state == "CANCELLED")
