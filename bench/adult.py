"""Adult census income: does an MLP carry sex through proxy features, and does CNP narrow the
disparity more than vanilla LRP pruning at equal accuracy?

Per seed: the Adult table is written as a table dataset (sex and race are attributes, never
features; cnp_core.demographic), an MLP is trained on it with plain torch (early stopping
on the val split), audited for sex and race at its default layer with the default audit
settings, then pruned twice at each rate, by CNP (removing the subspaces flagged for sex)
and by vanilla LRP pruning, with the default fine-tuning. Every figure is on Adult's own
test file. ``--dataset compas`` runs the same on COMPAS (two-year recidivism).

    python -m bench.adult                 # 5 seeds, default rate
    python -m bench.adult --rates 0.1 0.3 # a small sweep
    python -m bench.adult --quick         # a smoke run: one seed, few epochs
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import common
from cnp_core.architectures import MLP
from cnp_core.demographic import DemographicTable, write_table_dataset
from cnp_core.errors import NoFlaggedSubspace
from cnp_core.models import save_weights
from cnp_core.pipeline import run_audit
from cnp_core.results import AuditResult, Evaluation, GroupFairness, Metric
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef, PruneSpec

HIDDEN = (64, 32)
METHODS = ("cnp", "lrp")
REMOVED = "sex"  # the attribute CNP removes


# ------------------------------------------------------------------------------ training


@dataclass
class Training:
    """How the MLP was trained and how well it does on the test split."""

    epochs: int
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    test_balanced_accuracy: float
    seconds: float


def _tensors(table: DemographicTable, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = table.frame[table.frame["split"] == split]
    x = torch.tensor(rows[table.features].to_numpy(dtype=np.float32))
    return x, torch.tensor(rows["label"].to_numpy(dtype=np.int64))


def _accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of ``model`` on (x, y)."""
    with torch.no_grad():
        predicted = model(x).argmax(1)
    correct = (predicted == y).float()
    per_class = [float(correct[y == c].mean()) for c in torch.unique(y)]
    return float(correct.mean()), float(np.mean(per_class))


def train_mlp(
    table: DemographicTable, seed: int, max_epochs: int = 60, patience: int = 5
) -> tuple[MLP, Training]:
    """An MLP trained by Adam on the train split (no class weights: the plain model a
    reviewer would be handed), the epoch with the best val loss kept."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = MLP([len(table.features), *HIDDEN], 2)
    x, y = _tensors(table, "train")
    x_val, y_val = _tensors(table, "val")
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    best = (float("inf"), 0, {k: v.clone() for k, v in model.state_dict().items()})
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(256):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(model(x_val), y_val))
        if loss < best[0]:
            best = (loss, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    val_accuracy, _ = _accuracies(model, x_val, y_val)
    test_accuracy, test_balanced = _accuracies(model, *_tensors(table, "test"))
    seconds = time.perf_counter() - started
    return model, Training(epoch, best[1], val_accuracy, test_accuracy, test_balanced, seconds)


# ------------------------------------------------------------------------------ audits


def audit_spec(dataset: Path, weights: Path, table: DemographicTable, seed: int) -> AuditSpec:
    """The default audit of ``table``'s protected attributes; sex first, so that CNP's
    default (the first attribute) removes sex."""
    return AuditSpec(
        model=ModelRef(
            architecture="mlp",
            layer_sizes=[len(table.features), *HIDDEN],
            num_classes=2,
            weights=str(weights),
            classes=list(table.classes),
        ),
        dataset=DatasetRef(root=str(dataset), format="table"),
        attributes=list(table.attributes),
        seed=seed,
        device="cpu",
    )


def _metric(m: Metric) -> dict[str, float]:
    return {"value": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high}


def _breakdown(evaluation: Evaluation, attributes: list[str]) -> GroupFairness | None:
    for fairness in evaluation.fairness:
        if fairness.attributes == attributes:
            return fairness
    return None


def summarise_evaluation(evaluation: Evaluation, attributes: list[str]) -> dict[str, Any]:
    """Accuracy and, per attribute (and their intersection), the disparities."""
    out: dict[str, Any] = {
        "balanced_accuracy": _metric(evaluation.balanced_accuracy),
        "worst_group_accuracy": _metric(evaluation.worst_group_accuracy),
        "worst_group": evaluation.worst_group,
        "parameters": evaluation.parameters,
    }
    for names in [[a] for a in attributes] + [attributes]:
        fairness = _breakdown(evaluation, names)
        if fairness is None:
            continue
        out["x".join(names)] = {
            "demographic_parity_difference": _metric(fairness.demographic_parity_difference),
            "equalized_odds_difference": _metric(fairness.equalized_odds_difference),
            "accuracy_difference": _metric(fairness.accuracy_difference),
            "groups": {
                "/".join(g.values): {
                    "count": g.count,
                    "too_small": g.too_small,
                    "selection_rate": g.selection_rate.value,
                    "true_positive_rate": g.true_positive_rate.value,
                    "false_positive_rate": g.false_positive_rate.value,
                    "accuracy": g.accuracy.value,
                }
                for g in fairness.groups
            },
        }
    return out


def summarise_audit(result: AuditResult) -> dict[str, Any]:
    """Per attribute value: the best subspace's AP_attribute (interval, base rate) and
    whether it was flagged."""
    out: dict[str, Any] = {}
    for audit in result.attributes:
        best = max(audit.subspaces, key=lambda s: s.ap_attribute.value)
        flagged = audit.flagged_subspace >= 0
        out.setdefault(audit.attribute, {})[audit.value] = {
            "layer": audit.layer,
            "n_subspaces": audit.n_subspaces,
            "best_subspace": best.index,
            "ap": {**_metric(best.ap_attribute), "base_rate": best.ap_attribute.base_rate},
            "flagged": flagged,
            "flagged_subspace": audit.flagged_subspace,
        }
    return out


def audit_and_prune(
    dataset: Path, weights: Path, table: DemographicTable, seed: int, rates: list[float], work: Path
) -> dict[str, Any]:
    """The audit, then each method at each rate (run_audit per pruning run: each run is the
    whole job a user would submit)."""
    base = audit_spec(dataset, weights, table, seed)
    started = time.perf_counter()
    audit = run_audit(base, workdir=work / "audit")
    record: dict[str, Any] = {
        "audit": summarise_audit(audit),
        "audit_seconds": round(time.perf_counter() - started, 1),
        "audit_timings": audit.timings,
        "before": summarise_evaluation(audit.before, table.attributes),
        "pruned": {},
    }
    for rate in rates:
        for method in METHODS:
            spec = audit_spec(dataset, weights, table, seed)
            spec.prune = PruneSpec(method=method, rate=rate, attribute=REMOVED)
            key = f"{method}@{rate:g}"
            started = time.perf_counter()
            try:
                pruned = run_audit(spec, workdir=work / key)
            except NoFlaggedSubspace as err:
                record["pruned"][key] = {"skipped": str(err)}
                continue
            record["pruned"][key] = {
                "after": summarise_evaluation(pruned.after, table.attributes),
                "neurons_removed": pruned.pruning.neurons_removed,
                "neurons_total": pruned.pruning.neurons_total,
                "seconds": round(time.perf_counter() - started, 1),
            }
    return record


# ------------------------------------------------------------------------------ one seed


def run_seed(name: str, seed: int, rates: list[float], quick: bool, scratch: Path) -> dict:
    work = scratch / f"seed{seed}"
    dataset = work / "dataset"
    table = write_table_dataset(name, dataset, seed)
    model, training = train_mlp(table, seed, max_epochs=3 if quick else 60)
    weights = save_weights(model, work / "mlp.safetensors")
    record = {"seed": seed, "features": len(table.features), "training": training.__dict__}
    record |= audit_and_prune(dataset, weights, table, seed, rates, work)
    shutil.rmtree(work, ignore_errors=True)  # datasets and pruned models: megabytes each
    return record


# ------------------------------------------------------------------------------ summary


def _values(records: list[dict], path: tuple[str, ...]) -> list[float]:
    out = []
    for record in records:
        node: Any = record
        for key in path:
            if not isinstance(node, dict) or key not in node:
                node = None
                break
            node = node[key]
        if isinstance(node, (int, float)) and not np.isnan(node):
            out.append(float(node))
    return out


def mean_std(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def fmt(stat: dict[str, float]) -> str:
    if not stat["n"]:
        return "-"
    return f"{stat['mean']:.3f} +- {stat['std']:.3f}"


MEASURES = (
    ("balanced acc.", ("balanced_accuracy", "value")),
    ("worst-group acc.", ("worst_group_accuracy", "value")),
    ("DP diff. sex", ("sex", "demographic_parity_difference", "value")),
    ("EO diff. sex", ("sex", "equalized_odds_difference", "value")),
    ("DP diff. race", ("race", "demographic_parity_difference", "value")),
    ("EO diff. race", ("race", "equalized_odds_difference", "value")),
)


def _cell(node: dict | None, path: tuple[str, ...]) -> str:
    """``value [low, high]`` of one measure of one evaluation."""
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return "-"
    return f"{node['value']:.3f} [{node['ci_low']:.3f}, {node['ci_high']:.3f}]"


def _aps(values: dict[str, Any]) -> str:
    """``value: AP [low, high] / base`` per attribute value, * when flagged."""
    return (
        "; ".join(
            f"{value}: {a['ap']['value']:.3f} [{a['ap']['ci_low']:.3f}, {a['ap']['ci_high']:.3f}]"
            f" / {a['ap']['base_rate']:.3f}{' *' if a['flagged'] else ''}"
            for value, a in values.items()
        )
        or "-"
    )


def markdown(name: str, records: list[dict], rates: list[float]) -> str:
    """The per-seed tables and the mean +- std table."""
    lines = [f"# {name}: CNP vs vanilla LRP pruning on a demographic table", ""]
    lines += ["## Models and audits (test split)", ""]
    lines += [
        "| seed | test acc. | test bal. acc. | AP sex (best subspace per value) | "
        "AP race (best subspace per value) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['seed']} | {r['training']['test_accuracy']:.3f} | "
            f"{r['training']['test_balanced_accuracy']:.3f} | "
            f"{_aps(r['audit'].get('sex', {}))} | {_aps(r['audit'].get('race', {}))} |"
        )
    lines += [
        "",
        "AP: value [95 % interval] / base rate; * flagged (AP at or above the flag level: "
        "flag_threshold at base rate 0.5, the same lift over chance elsewhere).",
    ]
    lines += ["", "## Before and after pruning, per seed (value [95 % interval])", ""]
    runs = ["before"] + [f"{m}@{rate:g}" for rate in rates for m in METHODS]
    lines += ["| seed | model | " + " | ".join(label for label, _ in MEASURES) + " |"]
    lines += ["|---|---|" + "---|" * len(MEASURES)]
    for r in records:
        for run in runs:
            node = r["before"] if run == "before" else r["pruned"][run].get("after")
            if node is None:
                lines.append(f"| {r['seed']} | {run} | skipped: no subspace flagged |")
                continue
            cells = " | ".join(_cell(node, path) for _, path in MEASURES)
            lines.append(f"| {r['seed']} | {run} | {cells} |")
    lines += ["", f"## Mean +- std over {len(records)} seeds", ""]
    lines += ["| model | " + " | ".join(label for label, _ in MEASURES) + " |"]
    lines += ["|---|" + "---|" * len(MEASURES)]
    for run, stats in summary(records, rates)["runs"].items():
        lines.append(f"| {run} | " + " | ".join(fmt(stats[label]) for label, _ in MEASURES) + " |")
    return "\n".join(lines) + "\n"


def summary(records: list[dict], rates: list[float]) -> dict[str, Any]:
    """Mean +- std over seeds of every measure, per model (before, each method x rate)."""
    runs: dict[str, Any] = {}
    for run in ["before"] + [f"{m}@{rate:g}" for rate in rates for m in METHODS]:
        prefix = ("before",) if run == "before" else ("pruned", run, "after")
        runs[run] = {label: mean_std(_values(records, prefix + path)) for label, path in MEASURES}
    audits: dict[str, Any] = {}
    for attribute in ("sex", "race"):
        values = sorted({v for r in records for v in r["audit"].get(attribute, {})})
        for value in values:
            path = ("audit", attribute, value)
            audits[f"{attribute}={value}"] = {
                "ap": mean_std(_values(records, path + ("ap", "value"))),
                "base_rate": mean_std(_values(records, path + ("ap", "base_rate"))),
                "flagged_seeds": sum(
                    bool(r["audit"].get(attribute, {}).get(value, {}).get("flagged"))
                    for r in records
                ),
            }
    accuracy = mean_std([r["training"]["test_accuracy"] for r in records])
    return {"runs": runs, "audits": audits, "test_accuracy": accuracy}


# ------------------------------------------------------------------------------ command


def run(name: str, seeds: int, rates: list[float], quick: bool, write: bool) -> dict[str, Any]:
    started = time.perf_counter()
    records: list[dict] = []
    path = common.result_path(name, quick)
    scratch = Path(tempfile.mkdtemp(prefix=f"cnp-{name}-"))
    try:
        for seed in range(1 if quick else seeds):
            print(f"seed {seed}: training, auditing, pruning", flush=True)
            records.append(run_seed(name, seed, rates, quick, scratch))
            payload = {
                "name": name,
                "rates": rates,
                "hidden": list(HIDDEN),
                "seeds": records,
                "summary": summary(records, rates),
                "seconds": round(time.perf_counter() - started, 1),
                "machine": common.machine_info("cpu"),
                "quick": quick,
            }
            if write:  # after every seed: a long run that stops keeps what it measured
                common.write_json(path, payload)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = markdown(name, records, rates)
    print(text, flush=True)
    if write:
        path.with_suffix(".md").write_text(text)
        print(f"written: {path} and {path.with_suffix('.md').name}", flush=True)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("adult", "compas"), default="adult")
    p.add_argument("--seeds", type=int, default=5, help="models: seeds 0..n-1")
    p.add_argument("--rates", type=float, nargs="+", default=[PruneSpec.rate], help="pruning rates")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    run(args.dataset, args.seeds, args.rates, args.quick, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
