"""End to end: the ``cnp`` console script -> cnp-server -> worker -> the real pipeline.

The watermark benchmark (real MNIST digits, a ResNet-18 trained to rely on the
watermark; built once and cached by ``ensure_benchmark``) is audited and pruned with
CNP through the CLI, as a CI job would: the fairness gate must fail on this model
(exit 1) and a gate the audit satisfies must pass (exit 0), with every file written.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from safetensors import safe_open
from test_server_support import ServerProcess

from cnp_core.synthetic import ensure_benchmark

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("benchmarks")]
CNP = Path(sys.executable).parent / "cnp"


@pytest.fixture(scope="module")
def benchmark():
    return ensure_benchmark()


@pytest.fixture(scope="module")
def server(tmp_path_factory, benchmark):
    process = ServerProcess(
        tmp_path_factory.mktemp("data"),
        [benchmark.dataset.parent],
        engine="cnp_server.engine",
        args=["--no-tracking"],
    ).start()
    yield process
    process.stop()


def cnp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CNP), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def audit_args(server, b) -> list[str]:
    mean, std = ",".join(map(str, b.mean)), ",".join(map(str, b.std))
    return [
        "audit", "--server", server.address, "--token-file", str(server.data_dir / "token"),
        "--model", b.architecture, "--weights", str(b.weights), "--num-classes", str(b.num_classes),
        "--dataset", str(b.dataset), "--input-size", str(b.input_size), "--mean", mean, "--std", std,
        "--layer", b.layer, "--attribute", b.attribute, "--positive-class", str(b.positive_class),
        "--method", "cav", "--bootstrap", "50", "--heatmap-samples", "0",
        "--prune", "cnp", "--prune-rate", "0.2", "--request-id", "e2e-watermark", "--no-progress",
    ]  # fmt: skip


def test_cli_audit_and_prune_on_the_watermark_benchmark(server, benchmark, tmp_path):
    out = tmp_path / "out"
    files = ["--json", str(out / "report.json"), "--junit", str(out / "junit.xml")]
    files += [
        "--summary",
        str(out / "summary.md"),
        "--download-model",
        str(out / "model.safetensors"),
    ]
    passing = cnp(
        *audit_args(server, benchmark), *files,
        "--gate", "flagged!=none", "--gate", "before.balanced_accuracy>=0.5",
        cwd=tmp_path,
    )  # fmt: skip
    assert passing.returncode == 0, passing.stderr
    report = json.loads((out / "report.json").read_text())
    (audit,) = report["attributes"]
    assert (audit["attribute"], audit["value"], audit["layer"]) == (
        "watermark",
        "1",
        benchmark.layer,
    )
    flagged = audit["subspaces"][audit["flagged_subspace"]]
    assert flagged["ap_attribute"]["value"] > flagged["ap_attribute"]["base_rate"] + 0.2
    assert report["after"]["parameters"] < report["before"]["parameters"]
    with safe_open(str(out / "model.safetensors"), "numpy") as model:
        assert len(list(model.keys())) > 0
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "0")
    summary = (out / "summary.md").read_text()
    assert (
        f"**S{audit['flagged_subspace'] + 1} ⚑**" in summary  # numbered from S1
        and "| Group | n | Before | After |" in summary
    )
    # Plain progress lines (no terminal). WatchAudit streams the job's latest progress
    # per poll of the store, so a stage shorter than a poll (e.g. "load") may not show.
    stages = set(re.findall(r"^\[ *[\d.]+s\] aud-\S+ (\w+):", passing.stderr, re.M))
    assert len(stages) >= 3 and "prune" in stages, passing.stderr
    assert "gates: 2/2 passed" in passing.stdout

    # The same request id is the same job: the fairness gate fails on this model.
    failing = cnp(
        *audit_args(server, benchmark), "--junit", str(out / "fairness.xml"),
        "--gate", "flagged==none", "--gate", "max_ap_attribute<=0.6",
        cwd=tmp_path,
    )  # fmt: skip
    assert failing.returncode == 1, failing.stderr
    assert f"audit {report['audit_id']}" in failing.stderr
    suite = ET.parse(out / "fairness.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "2")

    # The job's HTML review, downloaded as the server wrote it.
    review = out / "review.html"
    fetched = cnp(
        "report", report["audit_id"], "--server", server.address,
        "--token-file", str(server.data_dir / "token"), "--format", "html", "-o", str(review),
        cwd=tmp_path,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    job_dir = server.data_dir / "jobs" / report["audit_id"]
    assert review.read_bytes() == (job_dir / "review.html").read_bytes()
