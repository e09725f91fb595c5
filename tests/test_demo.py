"""``make demo`` (``python -m cnp_client.demo``): its helpers, and the real thing end to end.

The slow tests run the demo module as a user would (a subprocess that starts
``cnp-server`` and calls the ``cnp`` CLI) with reduced audit settings passed through to
``cnp audit``, and check that the server is gone afterwards in every case.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnp_client import demo
from cnp_client.cli import build_parser, spec_from_args
from cnp_core.spec import AuditSpec, PruneSpec

REPO = Path(__file__).resolve().parents[1]
# Reduced settings: a cheap supervised basis, few positions, no heatmaps, few resamples;
# a low flag threshold so CNP has a subspace to remove whatever the science says today.
FAST = ["--method", "cav", "--flag-threshold", "0.05", "--fit-images", "64"]
FAST += ["--positions-per-image", "5", "--bootstrap", "20", "--heatmap-samples", "0"]


def bench(root: Path) -> SimpleNamespace:
    """The fields of ``cnp_core.synthetic.Benchmark`` the demo reads (without torch)."""
    return SimpleNamespace(
        dataset=root / "bench" / "dataset",
        weights=root / "bench" / "weights.safetensors",
        architecture="resnet18",
        num_classes=2,
        input_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.5, 0.75),
        layer="layer2",
        positive_class=1,
        attribute="watermark",
    )


def options(method=None, gate=None, extra=()) -> argparse.Namespace:
    return argparse.Namespace(method=method, gate=gate, extra=list(extra))


def test_audit_args_are_a_valid_cnp_audit_with_cnp_pruning_and_the_default_gates(tmp_path):
    b = bench(tmp_path)
    argv = demo.audit_args(b, "127.0.0.1:5", tmp_path / "token", tmp_path / "out", options())
    args = build_parser().parse_args(argv)
    spec = spec_from_args(args).validate()
    assert (args.server, args.gate) == ("127.0.0.1:5", list(demo.GATES))
    assert spec.model.weights == str(b.weights) and spec.dataset.root == str(b.dataset)
    assert spec.dataset.std == (0.25, 0.5, 0.75) and spec.attributes == ["watermark"]
    # Every audit and pruning setting is the library's default, the layer included.
    defaults = AuditSpec(model=spec.model, dataset=spec.dataset, attributes=spec.attributes)
    defaults.prune = PruneSpec(method="cnp")
    assert spec == defaults
    assert Path(args.download_model).name == demo.MODEL_FILE
    assert {Path(args.json).name, Path(args.junit).name, Path(args.summary).name} == {
        "report.json",
        "junit.xml",
        "summary.md",
    }


def test_audit_args_take_the_method_gates_and_pass_other_flags_through(tmp_path):
    chosen = options(method="cav", gate=["flagged==none"], extra=["--bootstrap", "7"])
    argv = demo.audit_args(bench(tmp_path), "h:1", tmp_path / "t", tmp_path / "o", chosen)
    args = build_parser().parse_args(argv)
    spec = spec_from_args(args)
    assert (spec.method, spec.bootstrap, args.gate) == ("cav", 7, ["flagged==none"])


def test_command_lines_is_one_flag_per_line_and_pastes_back_into_the_same_argv():
    argv = ["audit", "--server", "h:1", "--gate", "max_ap_attribute<=0.8", "--mean", "0.5,0.5"]
    text = demo.command_lines(argv)
    assert text.splitlines()[1].strip() == "--server h:1 \\"
    assert "'max_ap_attribute<=0.8'" in text  # quoted: < would be a shell redirection
    assert shlex.split(text.replace("\\\n", " ")) == argv


def report(flagged: int | None = 1, after: bool = True) -> dict:
    """A report in the proto JSON mapping (zero ints omitted, int64 as strings)."""

    def metric(value: float, base: float = 0.5) -> dict:
        return {"value": value, "base_rate": base}

    subspaces = [{"ap_attribute": metric(0.55)}, {"index": 1, "ap_attribute": metric(0.97, 0.4)}]
    audit = {"attribute": "watermark", "value": "1", "layer": "layer2", "subspaces": subspaces}
    if flagged is not None:  # omitted means subspace 0
        audit["flagged_subspace"] = flagged
    result = {
        "audit_id": "aud-1",
        "attributes": [audit],
        "before": {
            "worst_group_accuracy": metric(0.43),
            "worst_group": "class 0 + watermark=1",
            "parameters": "11000000",
        },
    }
    if after:
        result["after"] = {
            "worst_group_accuracy": metric(0.81),
            "worst_group": "class 1 + watermark=0",
        }
    return result


def test_explain_names_the_failed_gates_and_the_evidence_in_one_line():
    line = demo.explain(report(), demo.GATES)
    assert "\n" not in line and line.startswith("Gate failed, as expected")
    assert "subspace S2 of layer2 detects watermark=1 with AP 0.97 vs. base rate 0.40" in line
    assert "before pruning: class 0 + watermark=1 at 0.43" in line
    assert "after: class 1 + watermark=0 at 0.81" in line
    assert line.endswith("Failed: max_ap_attribute<=0.8 [watermark=1].")  # 0.81 passes >= 0.7


def test_explain_reads_an_omitted_flag_as_subspace_0_and_minus_1_as_none():
    assert "subspace S1 of layer2 detects watermark=1 with AP 0.55" in demo.explain(
        report(flagged=None), ["flagged==none"]
    )
    line = demo.explain(report(flagged=-1, after=False), ["worst_group_accuracy>=0.7"])
    assert "subspace" not in line and "after:" not in line
    assert "worst group before pruning: class 0 + watermark=1 at 0.43" in line
    assert line.endswith("Failed: worst_group_accuracy>=0.7.")


def test_explain_says_so_when_every_gate_passes():
    assert demo.explain(report(), ["worst_group_accuracy>=0.7"]) == "Every gate passed."


def test_shown_is_relative_inside_the_working_directory_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.shown(tmp_path / "a" / "b.json") == "a/b.json"
    assert demo.shown("/elsewhere/x") == "/elsewhere/x"


def test_stop_server_terminates_and_kills_what_ignores_sigterm():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert demo.stop_server(polite) == -signal.SIGTERM
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout.readline() == b"ready\n"  # the handler is installed
    assert demo.stop_server(stubborn, timeout=0.5) == -signal.SIGKILL
    stubborn.stdout.close()


def test_wait_serving_reports_a_server_that_exits_with_its_log(tmp_path):
    (tmp_path / "server.log").write_text("cnp-server: listen must be HOST:PORT\n")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    dead.wait()
    with pytest.raises(RuntimeError, match=r"exit 2\):\ncnp-server: listen must be HOST:PORT"):
        demo.wait_serving(dead, tmp_path, timeout=5)


# --- the real demo ------------------------------------------------------------------------


def run_demo(tmp_path: Path, *args: str, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "cnp_client.demo", "--data-dir", str(tmp_path / "server")]
    command += ["--out", str(tmp_path / "out"), *args]
    # cwd=REPO: the benchmark cache (.cnp/cache) is shared with the other tests.
    return subprocess.Popen(command, cwd=REPO, text=True, **kwargs)


def assert_server_gone(stdout: str, data_dir: Path) -> None:
    pid = int(re.search(r"pid (\d+) SERVING on 127\.0\.0\.1:\d+", stdout)[1])
    assert f"Stopping cnp-server (pid {pid}, SIGTERM)... stopped (exit 0)." in stdout
    with pytest.raises(ProcessLookupError):  # exited and reaped, not a zombie
        os.kill(pid, 0)
    assert not (data_dir / "server.json").exists()  # removed by the graceful shutdown


@pytest.mark.slow
def test_demo_runs_the_cli_against_a_real_server_and_explains_the_failed_gate(tmp_path):
    gates = ["--gate", "flagged==none", "--gate", "before.balanced_accuracy>=0.5"]
    process = run_demo(tmp_path, *FAST, *gates, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stdout + stderr
    assert "$ cnp audit \\\n      --server 127.0.0.1:" in stdout
    # The CLI's progress lines: WatchAudit streams the latest progress per poll of the
    # store, so a stage shorter than a poll may not show.
    stages = set(re.findall(r"^\[ *[\d.]+s\] aud-\S+ (\w+):", stderr, re.M))
    assert len(stages) >= 3 and "prune" in stages, stderr
    assert "| Group | n | Before | After |" in (tmp_path / "out" / "summary.md").read_text()
    assert "gates: 1/2 passed" in stdout and "group" in stdout  # the CLI's tables
    assert re.search(
        r"\[4/4\] Gate failed, as expected: .*Failed: flagged==none \[watermark=1\]\.", stdout
    )

    out = tmp_path / "out"
    saved = json.loads((out / "report.json").read_text())
    assert saved["after"]["parameters"] and saved["attributes"][0]["attribute"] == "watermark"
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    assert "(artifact model_compact.pt2 of the audit)" in stdout
    assert (out / demo.MODEL_FILE).stat().st_size > 0

    uri = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    run_id = re.search(r"MLflow run ([0-9a-f]{32}) \(name (aud-\w+)\) in (\S+)", stdout)
    assert run_id and run_id[2] == saved["audit_id"] and run_id[3] == uri
    assert f"MLflow: run {run_id[1]} in experiment " in stdout  # the CLI's own line
    assert f"ui --backend-store-uri {uri}" in stdout and f"/runs/{run_id[1]}" in stdout
    assert_server_gone(stdout, tmp_path / "server")


@pytest.mark.slow
def test_demo_stops_the_server_on_ctrl_c_and_on_a_cli_error(tmp_path):
    process = run_demo(tmp_path, *FAST, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    for line in process.stderr:  # the CLI shares the demo's stderr
        if "submitted to 127.0.0.1:" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the demo
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert "interrupted; cancelling audit" in stderr  # the CLI cancelled the job first
    assert_server_gone(stdout, tmp_path / "server")

    bad = run_demo(tmp_path, "--gate", "flagged", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = bad.communicate(timeout=300)
    assert bad.returncode == 2, stdout + stderr
    assert "cnp: error: malformed gate rule 'flagged'" in stderr
    assert "demo: cnp audit exited with 2" in stderr
    assert_server_gone(stdout, tmp_path / "server")
