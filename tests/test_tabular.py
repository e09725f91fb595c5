"""Tabular models end to end: an MLP over a CSV of features, audited, pruned and served.

The table is generated here with a planted proxy: the label depends on a binary
attribute ``group`` only through the feature ``proxy``, which encodes it; ``group``
itself is no feature. A second binary attribute ``control`` is drawn independently of
everything the model sees, so no subspace can carry it. The MLP is trained here in about
a second on the CPU and written as real files (labels.csv, features.txt, safetensors).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_server_support import ServerProcess
from torch import nn

from cnp_core.architectures import MLP
from cnp_core.errors import DatasetError, InvalidSpec
from cnp_core.export import load_compact
from cnp_core.lrp import Explainer
from cnp_core.models import load_model, save_weights
from cnp_core.pipeline import run_audit, validate
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef, PruneSpec

FEATURES = ["income", "tenure", "noise", "proxy"]
LAYER_SIZES = [len(FEATURES), 24, 12]
# Cheap but real: one DRSA start, few resamples.
CHEAP = {"drsa_max_epochs": 150, "bootstrap": 20, "n_subspaces": [4]}


def _table(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, rows)
    control = rng.integers(0, 2, rows)
    income, tenure, noise = rng.normal(size=(3, rows))
    proxy = group + 0.15 * rng.normal(size=rows)  # the feature that encodes the attribute
    score = income + 0.5 * tenure + 2.0 * (group - 0.5) + 0.3 * rng.normal(size=rows)
    split = rng.choice(["train", "val", "test"], rows, p=[0.6, 0.2, 0.2])
    return {
        "label": (score > 0).astype(int),
        "split": split,
        "group": group,
        "control": control,
        "income": income,
        "tenure": tenure,
        "noise": noise,
        "proxy": proxy,
    }


def write_table(root: Path, columns: dict[str, np.ndarray], features=FEATURES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for i in range(len(columns["label"])):
            writer.writerow(
                [
                    f"{columns[n][i]:.6g}" if columns[n].dtype.kind == "f" else columns[n][i]
                    for n in names
                ]
            )
    (root / "features.txt").write_text("\n".join(features) + "\n")
    return root


def train_mlp(columns: dict[str, np.ndarray], seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(LAYER_SIZES, 2)
    train = columns["split"] == "train"
    x = torch.tensor(np.stack([columns[f][train] for f in FEATURES], 1), dtype=torch.float32)
    y = torch.tensor(columns["label"][train])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """(dataset root, weights file, trained model, columns) of the planted-proxy table;
    the module runs on one torch thread (on shared cores OpenMP threads wait on each other,
    and these tensors are small)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tabular")
    columns = _table(3000, seed=3)
    dataset = write_table(root / "table", columns)
    model = train_mlp(columns)
    weights = save_weights(model, root / "mlp.safetensors")
    yield dataset, weights, model, columns
    torch.set_num_threads(threads)


def table_spec(dataset: Path, weights: Path, **overrides) -> AuditSpec:
    spec = AuditSpec(
        model=ModelRef(architecture="mlp", layer_sizes=list(LAYER_SIZES), weights=str(weights)),
        dataset=DatasetRef(root=str(dataset), format="table"),
        attributes=["group", "control"],
        **CHEAP,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


@pytest.mark.slow
def test_audit_flags_the_proxy_not_the_control_and_cnp_prunes_hidden_neurons(tabular, tmp_path):
    dataset, weights, model, _ = tabular
    spec = table_spec(dataset, weights, prune=PruneSpec(method="cnp", rate=0.25))
    result = run_audit(spec, workdir=tmp_path)

    assert spec.layers == ["relu2"]  # the MLP's default: its last hidden ReLU
    assert result.before.balanced_accuracy.value > 0.85
    audits = {a.attribute: a for a in result.attributes}
    planted, control = audits["group"], audits["control"]
    best = max(s.ap_attribute.value for s in planted.subspaces)
    assert planted.flagged_subspace >= 0 and best >= 0.8
    assert control.flagged_subspace == -1
    assert max(s.ap_attribute.value for s in control.subspaces) < 0.65
    assert not any(name.startswith("heatmap") for name in result.artifacts)

    summary = result.pruning
    assert summary.filters_total == 0 and summary.neurons_total == sum(LAYER_SIZES[1:])
    assert summary.neurons_removed == round(0.25 * summary.neurons_total)
    assert result.after.parameters < result.before.parameters
    # The compact model loads back as an ordinary MLP spec, from architecture.json's shapes.
    compact = Path(result.artifacts["model_compact.safetensors"])
    described = json.loads((compact.parent / "architecture.json").read_text())
    assert described["input_shape"] == [1, len(FEATURES)]
    assert described["layer_sizes"][0] == len(FEATURES)
    assert sum(described["layer_sizes"][1:]) == summary.neurons_total - summary.neurons_removed
    ref = ModelRef(architecture="mlp", layer_sizes=list(LAYER_SIZES), weights=str(compact))
    loaded, rebuilt = load_model(ref), load_compact(compact.parent)
    assert isinstance(loaded, MLP) and loaded.layer_sizes == described["layer_sizes"]
    x = torch.randn(8, len(FEATURES))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), rebuilt(x))
    assert Path(result.artifacts["model_compact.onnx"]).stat().st_size > 0


def test_vanilla_lrp_pruning_removes_hidden_neurons(tabular):
    from cnp_core.pruning.schedule import prune

    _, _, model, columns = tabular
    rows = np.flatnonzero(columns["split"] == "train")[:128]
    x = torch.tensor(np.stack([columns[f][rows] for f in FEATURES], 1), dtype=torch.float32)
    y = torch.as_tensor(columns["label"][rows])
    outcome = prune(model, PruneSpec(method="lrp", rate=0.5), (x, y), layer="relu2")
    removed = outcome.summary.neurons_removed
    assert removed == round(0.5 * sum(LAYER_SIZES[1:]))
    assert outcome.compact.layer_sizes[0] == len(FEATURES)  # inputs are never pruned
    assert sum(outcome.compact.layer_sizes[1:]) == sum(LAYER_SIZES[1:]) - removed
    with torch.no_grad():  # masked and compact compute the same function
        torch.testing.assert_close(outcome.compact(x), outcome.masked(x), atol=1e-5, rtol=1e-5)


def _bias_free(model: nn.Module) -> nn.Module:
    clone = MLP(LAYER_SIZES, 2)
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, nn.Linear):
                module.bias.zero_()
    return clone.eval()


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_plus_flat", "gradient"])
def test_relevance_is_conserved_through_the_mlp(tabular, composite):
    """Bias-free, the relevance at each hidden layer and at the features sums to the
    explained logit; with biases, the output layer's Epsilon rule keeps exactly the share
    (z - b) / z of it for the hidden layer below (the bias absorbs the rest)."""
    _, _, model, columns = tabular
    x = torch.tensor(np.stack([columns[f][:64] for f in FEATURES], 1), dtype=torch.float32)
    target = torch.ones(64, dtype=torch.long)
    with Explainer(_bias_free(model), ["relu1", "relu2"], composite) as explainer:
        out = explainer.explain(x, target)
    logit = out.logits[:, 1]
    scale = float(logit.abs().max())
    for layer in ("relu1", "relu2"):
        relevance = (out.activations[layer] * out.contexts[layer]).sum(1)
        torch.testing.assert_close(relevance, logit, atol=1e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(out.input_relevance.sum(1), logit, atol=1e-5 * scale, rtol=1e-5)

    with Explainer(model, ["relu2"], composite) as explainer:
        out = explainer.explain(x, target)
    z, bias = out.logits[:, 1], model.out.bias[1].detach()
    kept = z - bias if composite == "gradient" else z * (z - bias) / z
    relevance = (out.activations["relu2"] * out.contexts["relu2"]).sum(1)
    torch.testing.assert_close(relevance, kept, atol=1e-6 * scale, rtol=1e-5)


def test_the_first_layer_rule_changes_no_context_or_neuron_score(tabular):
    """Flat (epsilon_plus_flat) or Epsilon (epsilon_plus) on fc1 shapes only the features'
    relevance: the audited contexts and the pruning scores are the same."""
    from cnp_core.pruning.relevance import filter_scores

    _, _, model, columns = tabular
    x = torch.tensor(np.stack([columns[f][:32] for f in FEATURES], 1), dtype=torch.float32)
    target = torch.ones(32, dtype=torch.long)
    outs, scores = [], []
    for composite in ("epsilon_plus", "epsilon_plus_flat"):
        with Explainer(model, ["relu1", "relu2"], composite) as explainer:
            outs.append(explainer.explain(x, target))
        scores.append(filter_scores(model, x, target, composite=composite))
    for layer in ("relu1", "relu2"):
        torch.testing.assert_close(outs[0].contexts[layer], outs[1].contexts[layer])
    assert set(scores[0]) == {"fc1", "fc2"}
    for name in scores[0]:
        torch.testing.assert_close(scores[0][name], scores[1][name])
    assert not torch.allclose(outs[0].input_relevance, outs[1].input_relevance)


# --- bad tables and specs --------------------------------------------------------------


def _small(root: Path, edit=None, features=FEATURES) -> Path:
    columns = _table(40, seed=1)
    if edit is not None:
        edit(columns)
    return write_table(root, columns, features)


def _check(dataset: Path, weights: Path, **overrides) -> None:
    validate(table_spec(dataset, weights, **overrides))


def test_a_missing_feature_column_is_named(tabular, tmp_path):
    dataset = _small(tmp_path / "t", features=[*FEATURES, "salary"])
    with pytest.raises(DatasetError, match=r"feature column 'salary' \(features.txt line 5\)"):
        _check(dataset, tabular[1])


def test_a_repeated_feature_is_named(tabular, tmp_path):
    dataset = _small(tmp_path / "t", features=[*FEATURES, "income"])
    with pytest.raises(DatasetError, match="features.txt line 5 repeats the feature 'income'"):
        _check(dataset, tabular[1])


def test_a_missing_features_file_is_explained(tabular, tmp_path):
    dataset = _small(tmp_path / "t")
    (dataset / "features.txt").unlink()
    with pytest.raises(DatasetError, match="needs a features.txt beside labels.csv"):
        _check(dataset, tabular[1])


@pytest.mark.parametrize(
    ("cell", "problem"), [("abc", "is not a number"), ("nan", "is not a finite number")]
)
def test_a_bad_feature_value_is_named_by_line_and_column(tabular, tmp_path, cell, problem):
    def spoil(columns):
        columns["tenure"] = columns["tenure"].astype(object)
        columns["tenure"][6] = cell

    dataset = _small(tmp_path / "t", spoil)
    with pytest.raises(DatasetError) as err:
        _check(dataset, tabular[1])
    assert str(err.value) == f"labels.csv line 8, feature 'tenure': '{cell}' {problem}"
    assert err.value.field == "dataset.root"


def test_in_features_must_match_the_features(tabular, tmp_path):
    dataset = _small(tmp_path / "t")
    with pytest.raises(DatasetError) as err:
        _check(dataset, tabular[1], model=ModelRef(architecture="mlp", layer_sizes=[5, 8]))
    assert "in_features) is 5, but features.txt names 4 features" in str(err.value)
    assert err.value.field == "model.layer_sizes"


@pytest.mark.parametrize(
    ("model", "dataset_format", "message", "field"),
    [
        (
            ModelRef(architecture="resnet18", layer_sizes=[4, 8]),
            "images",
            "model.layer_sizes shape an architecture 'mlp' only",
            "model.layer_sizes",
        ),
        (ModelRef(architecture="mlp"), "table", "needs [in_features", "model.layer_sizes"),
        (ModelRef(architecture="mlp", layer_sizes=[4, 8]), "images", "set dataset.format", ""),
        (ModelRef(architecture="resnet18"), "table", "reads images", "model.architecture"),
        (ModelRef(architecture="mlp", layer_sizes=[4, 8]), "csv", "must be one of", ""),
    ],
)
def test_specs_that_do_not_fit_a_table_are_refused(model, dataset_format, message, field):
    spec = AuditSpec(
        model=model, dataset=DatasetRef(root="/data", format=dataset_format), attributes=["a"]
    )
    with pytest.raises(InvalidSpec) as err:
        spec.validate()
    assert message in str(err.value)
    assert err.value.field == (field or "dataset.format")


# --- through the service ---------------------------------------------------------------


@pytest.mark.slow
def test_cnp_audit_of_a_table_through_a_real_server(tabular, tmp_path, monkeypatch, capsys):
    """`cnp audit` with the table flags, against cnp-server running the real engine."""
    from cnp_client.cli import main

    dataset, weights, _, _ = tabular
    for name in ("CNP_TOKEN", "CNP_TOKEN_FILE", "CNP_DATA_DIR", "CNP_SERVER"):
        monkeypatch.delenv(name, raising=False)
    server = ServerProcess(
        tmp_path / "data", [weights.parent], engine="cnp_server.engine", args=["--no-tracking"]
    ).start()
    try:
        report = tmp_path / "report.json"
        args = [
            "audit", "--server", server.address, "--token-file", str(server.data_dir / "token"),
            "--model", "mlp", "--layer-sizes", ",".join(map(str, LAYER_SIZES)),
            "--weights", str(weights), "--dataset", str(dataset), "--dataset-format", "table",
            "--attribute", "group", "--subspaces", "4", "--bootstrap", "20",
            "--gate", "max_ap_attribute>=0.8", "--json", str(report), "--no-progress", "--quiet",
        ]  # fmt: skip
        assert main(args) == 0
        data = json.loads(report.read_text())
        assert data["spec"]["dataset"]["format"] == "table"
        assert data["spec"]["model"]["layer_sizes"] == LAYER_SIZES
        assert data["spec"]["layers"] == ["relu2"]
        (audit,) = data["attributes"]
        assert audit["attribute"] == "group" and audit["flagged_subspace"] >= 0

        # A table the model cannot read is refused at submission, the numbers named.
        wrong = list(args)
        wrong[wrong.index("--layer-sizes") + 1] = "5,8"
        assert main(wrong) == 2
        assert "in_features) is 5, but features.txt names 4 features" in capsys.readouterr().err
    finally:
        server.stop()


def test_the_spec_and_the_architectures_agree_on_the_mlp_name():
    from cnp_core.architectures import MLP_NAME
    from cnp_core.spec import MLP_ARCHITECTURE

    assert MLP_NAME == MLP_ARCHITECTURE
