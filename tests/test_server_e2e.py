"""The real engine behind the real server: audits and pruning of the synthetic watermark
benchmark, its MLflow record, hostile attribute values and model factories. (Hostile
model files and datasets through this engine: tests/test_fault_injection.py.)

Slow: the benchmark is generated and trained once (cached in .cnp/cache) and every job
runs the real pipeline in a worker process.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_server_support import ServerProcess, wait_for

from cnp_client import AuditClient, ServiceError
from cnp_core.spec import AuditSpec, PruneSpec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("benchmarks")]

# Cheap but real: few DRSA epochs and resamples keep each job within seconds.
CHEAP = {"drsa_max_epochs": 200, "drsa_restarts": 1, "bootstrap": 20, "heatmap_samples": 2}


@pytest.fixture(scope="module")
def bench():
    from cnp_core.synthetic import ensure_benchmark

    return ensure_benchmark()


def _spec(bench, **overrides) -> AuditSpec:

    spec = bench.audit_spec(**CHEAP)
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """A directory for the bad inputs (an allowed root of the server)."""
    return tmp_path_factory.mktemp("crafted")


@pytest.fixture(scope="module")
def server(tmp_path_factory, bench, crafted):
    process = ServerProcess(
        tmp_path_factory.mktemp("data"),
        [bench.dataset.parent, crafted],
        engine="cnp_server.engine",
        settings={"tracking_retry_seconds": 5, "allow_factories": "hostile_factory:make"},
    )
    with pytest.MonkeyPatch.context() as patch:  # the environment the server starts with
        patch.setenv("CNP_HOSTILE_SENTINEL", str(crafted / "imported-by"))
        process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    with AuditClient(server.address, token=server.token, timeout=60) as c:
        yield c


def _copy_dataset(bench, target: Path, edit) -> Path:
    """A copy of the benchmark dataset whose labels.csv rows pass through ``edit``."""
    shutil.copytree(bench.dataset, target)
    with (target / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    rows = edit(rows, target)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (target / "labels.csv").write_text(out.getvalue())
    return target


def test_a_real_audit_reports_everything(client, bench):
    report = client.audit(_spec(bench), timeout=600)
    data = report.to_dict()
    assert data["dataset_digest"] and len(data["model_sha256"]) == 64
    audit = data["attributes"][0]
    assert audit["attribute"] == bench.attribute and len(audit["subspaces"]) >= 1
    best = max(s["ap_attribute"]["value"] for s in audit["subspaces"])
    flagged = audit["flagged_subspace"]
    threshold = report.spec.flag_threshold
    assert (flagged >= 0) == (best >= threshold)
    groups = data["before"]["groups"]
    assert {(g["label"], g["value"]) for g in groups} >= {(0, "0"), (0, "1"), (1, "0"), (1, "1")}
    assert all(g["count"] > 0 and 0 <= g["accuracy"]["value"] <= 1 for g in groups)
    assert "after" not in data and data["versions"]["torch"]
    assert set(data["timings"]) >= {"load", "collect", "fit", "audit"}
    names = [a.name for a in report.artifacts]
    assert any(n.startswith("heatmap") for n in names)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_hostile_attribute_values_name_no_file_outside_the_job(client, server, bench, crafted):
    """Values from labels.csv that look like paths, formulas, long or non-ASCII names are
    audited like any other value; every file the job writes lies in its own directory."""
    hostile = ["../../x/y", "/etc/cron.d/z", "=1+1", "Wasserzeichen-ü", "w" * 300]

    def relabel(rows, root):
        for n, row in enumerate(rows):
            row[bench.attribute] = hostile[n % len(hostile)] if row[bench.attribute] == "1" else "0"
        return rows

    spec = _spec(bench, heatmap_samples=1)
    spec.dataset.root = str(_copy_dataset(bench, crafted / "hostile-values", relabel))
    before = _files(server.data_dir) | _files(crafted)
    report = client.audit(spec, timeout=600)
    workdir = (server.data_dir / "jobs" / report.audit_id).resolve()
    audited = {a["value"] for a in report.to_dict()["attributes"]}
    assert audited == {*hostile, "0"}  # one-vs-rest, every value
    heatmaps = [a.name for a in report.artifacts if a.name.startswith("heatmap")]
    assert len(heatmaps) == len(hostile) + 1
    written = (_files(server.data_dir) | _files(crafted)) - before
    server_files = {"jobs.db", "mlflow.db", "server.log"}
    stray = [
        p
        for p in written
        if not p.resolve().is_relative_to(workdir)
        and not p.is_relative_to(server.data_dir / "mlartifacts")  # MLflow's copy of them
        and not p.name.startswith(tuple(server_files))
    ]
    assert not stray, stray
    assert not (server.data_dir / "x").exists() and not (crafted / "x").exists()


def test_factories_run_only_when_listed_and_only_in_a_worker(client, server, bench, crafted):
    imported_by = crafted / "imported-by"
    unlisted = _spec(bench)
    unlisted.model.architecture, unlisted.model.factory = "", "hostile_factory:other"
    unlisted.model.weights = ""
    with pytest.raises(ServiceError) as refused:
        client.submit(unlisted)
    assert refused.value.code == "PERMISSION_DENIED" and "allow_factories" in refused.value.message
    assert not imported_by.exists()  # refused by name, nothing imported

    # Listed by the operator: imported in a worker, whose SystemExit fails the job cleanly.
    listed = _spec(bench)
    listed.model.architecture, listed.model.factory = "", "hostile_factory:make"
    job = client.wait(client.submit(listed).id, timeout=300)
    assert (job.state, job.error_code) == ("FAILED", "INVALID_ARGUMENT")
    assert "SystemExit" in job.error_message and "Traceback" not in job.error_message
    importers = {int(line) for line in imported_by.read_text().split()}
    assert importers and server.process.pid not in importers


def test_pruning_through_the_service_and_the_model_in_mlflow(
    client, server, bench, tmp_path, monkeypatch
):
    """The MLflow run follows the job: visible while it runs, in the experiment the client
    named, with its tags; at the end the metrics, the dataset input, the audit table, the
    heatmaps as images and the pruned model as MLflow models, registered under the name
    the client gave; then a second audit reads that model back as models:/NAME/1."""
    import mlflow.pyfunc as mlflow_pyfunc
    import torch
    from mlflow.models import get_model_info
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{server.data_dir / 'mlflow.db'}"
    mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for MLflow's model loaders below
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    # The supervised concept (CAV) flags the watermark reliably on this small benchmark;
    # this test is about the service path, the science is tested in cnp_core's tests.
    spec = _spec(bench, method="cav", prune=PruneSpec(method="cnp", rate=0.3))
    tags = {"git.commit": "0123abc", "ci.pipeline": "42"}
    job = client.submit(spec, experiment="ci-audits", tags=tags, register_model="shapes-cnp")
    live = None
    stages = set()
    for progress in client.watch(job.id):
        stages.add(progress.stage)
        if live is None and progress.state == "RUNNING":
            run_id = client.get(job.id).mlflow_run_id
            live = mlflow.get_run(run_id) if run_id else None  # while the job runs
    assert live is not None and live.info.status == "RUNNING"
    assert mlflow.get_experiment(live.info.experiment_id).name == "ci-audits"
    assert live.data.tags["git.commit"] == "0123abc" and live.data.tags["cnp.audit_id"] == job.id
    assert "prune" in stages
    report = client.report(job.id)
    assert report.after is not None and report.proto.pruning.filters_removed > 0
    assert report.after.groups and report.after.parameters < report.before.parameters
    # Fairlearn's group metrics of the positive class's decisions, before and after.
    for evaluation in (report.before, report.after):
        (fairness,) = evaluation.fairness  # one attribute: no intersection
        assert list(fairness.attributes) == [spec.attributes[0]]
        assert fairness.positive_class == spec.positive_class
        assert sum(g.count for g in fairness.groups) == sum(
            g.count for g in evaluation.groups if g.attribute == spec.attributes[0]
        )
        rates = [g.selection_rate.value for g in fairness.groups if not g.too_small]
        dp = fairness.demographic_parity_difference
        assert dp.value == pytest.approx(max(rates) - min(rates))
        assert 0.0 <= dp.ci_low <= dp.ci_high <= 1.0  # bootstrapped (the spec's resamples)

    model_path = client.download_model(job.id, tmp_path / "model.pt2", format="pt2")
    program = torch.export.load(model_path).module()
    x = torch.zeros(2, 3, bench.input_size, bench.input_size)
    assert tuple(program(x).shape) == (2, bench.num_classes)

    wait_for(lambda: client.get(job.id).tracking_state == "done", timeout=120, interval=0.5)
    run_id = live.info.run_id
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ci.pipeline"] == "42"
    assert run.data.params["prune.method"] == "cnp"
    assert any(k.startswith("after/") for k in run.data.metrics)
    fairness_key = f"after/fairness/{spec.attributes[0]}/equalized_odds_difference"
    assert run.data.metrics[fairness_key] == pytest.approx(
        report.after.fairness[0].equalized_odds_difference.value
    )
    assert any(k.startswith("progress/") for k in run.data.metrics)  # logged as it ran
    flagged = report.proto.attributes[0].flagged_subspace
    assert any(f"/S{flagged + 1}/ap_attribute" in k for k in run.data.metrics)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == report.proto.dataset_digest[:36]
    stored = [a.path for a in _walk(mlflow, run_id)]
    assert {"audit_table.json", "model/MLmodel", "model_onnx/MLmodel"} <= set(stored)
    assert any(p.startswith("images/") for p in stored)  # heatmaps in MLflow's image view
    pt2 = next(p for p in stored if p.endswith("model.pt2"))
    again = torch.export.load(mlflow.download_artifacts(run_id, pt2, str(tmp_path))).module()
    assert torch.allclose(again(x), program(x))

    info = get_model_info(f"runs:/{run_id}/model")
    assert info.signature is not None and info.metadata["cnp"]["architecture"]
    version = mlflow.get_model_version("shapes-cnp", "1")
    assert version.run_id == run_id
    assert run.data.tags["cnp.registered_model"] == "models:/shapes-cnp/1"
    served = mlflow_pyfunc.load_model("models:/shapes-cnp/1").predict(x.numpy())
    served = torch.from_numpy(np.asarray(served))
    assert torch.allclose(served, program(x), atol=1e-4)

    # A second audit of the registered model: its weights, never its pickle.
    second = _spec(bench)
    second.model.weights = "models:/shapes-cnp/1"
    audited = client.audit(second, timeout=600)
    source = audited.proto.model_source
    assert (source.name, source.version, source.run_id) == ("shapes-cnp", "1", run_id)
    assert source.artifact_path.endswith("model.safetensors")
    assert audited.spec.model.weights == "models:/shapes-cnp/1"
    assert audited.proto.before.parameters == report.after.parameters  # the pruned model

    for missing in ("models:/shapes-cnp/7", "models:/no-such-model/1", "models:/shapes-cnp@gone"):
        second.model.weights = missing
        with pytest.raises(ServiceError) as err:
            client.submit(second)
        assert err.value.code == "NOT_FOUND" and missing in str(err.value)


def _walk(mlflow, run_id, path=None):
    for item in mlflow.list_artifacts(run_id, path):
        if item.is_dir:
            yield from _walk(mlflow, run_id, item.path)
        else:
            yield item


def test_unknown_job_and_report_before_success(client):
    with pytest.raises(ServiceError) as err:
        client.report("aud-doesnotexist")
    assert err.value.code == "NOT_FOUND"
