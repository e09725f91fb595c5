"""The audit pipeline: spec in, typed result and artifacts out.

load model + dataset -> evaluate -> collect activations and contexts at the audited
layers -> fit concept subspaces -> score validation and test images -> audit table per
attribute value -> heatmaps -> [optional] CNP or LRP pruning, evaluated again -> report.

``progress(stage, fraction, message)`` is called as work advances; ``cancelled()`` is
polled between batches and raises :class:`~cnp_core.errors.Cancelled` when it returns
True. Nothing here knows about gRPC, job stores or MLflow.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .audit import AuditSamples, Candidate, audit_attribute, format_table
from .collect import collect_instances, collect_relevance
from .data import ImageDataset, ImageTable, load_dataset, make_loader, validate_images
from .errors import Cancelled, DatasetError
from .heatmaps import save_heatmap_grid, subspace_heatmaps
from .lrp import Explainer
from .models import load_model
from .paths import file_sha256
from .results import AttributeAudit, AuditResult
from .spec import AuditSpec
from .subspaces import ConceptBasis, fit_subspaces

ProgressFn = Callable[[str, float, str], None]

# Overall progress at the start of each stage (the server shows one bar).
STAGES = {
    "load": 0.0,
    "evaluate": 0.05,
    "collect": 0.12,
    "fit": 0.40,
    "score": 0.50,
    "audit": 0.78,
    "heatmaps": 0.82,
    "prune": 0.86,
    "report": 0.98,
}


def _noop_progress(stage: str, fraction: float, message: str) -> None:
    pass


class _Run:
    """Bookkeeping shared by the stages: timings, progress, cancellation."""

    def __init__(self, progress: ProgressFn | None, cancelled: Callable[[], bool] | None):
        self._progress = progress or _noop_progress
        self.cancelled = cancelled
        self.timings: dict[str, float] = {}
        self._stage = ""
        self._started = 0.0

    def stage(self, name: str, message: str = "") -> None:
        self._close()
        self.check()
        self._stage, self._started = name, time.perf_counter()
        self._progress(name, STAGES[name], message or name)

    def within(self, fraction: float, message: str = "") -> None:
        """Progress inside the current stage (0..1 of it)."""
        names = list(STAGES)
        start = STAGES[self._stage]
        nxt = names.index(self._stage) + 1
        end = STAGES[names[nxt]] if nxt < len(names) else 1.0
        self._progress(self._stage, start + (end - start) * fraction, message or self._stage)

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("the job was cancelled")

    def _close(self) -> None:
        if self._stage:
            self.timings[self._stage] = round(time.perf_counter() - self._started, 3)

    def finish(self) -> None:
        self._close()
        self._stage = ""
        self._progress("done", 1.0, "done")


@dataclass
class Splits:
    """Image indices of the three roles; ``fit`` is train minus a held-out validation part."""

    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_splits(table: ImageTable, seed: int, holdout: float = 0.3) -> Splits:
    """Validation comes from the dataset or, when it has none, is held out of train."""
    if not table.has_split("test"):
        raise DatasetError("labels.csv has no rows with split 'test': the audit reports on them")
    if not table.has_split("train"):
        raise DatasetError("labels.csv has no rows with split 'train': subspaces are fit on them")
    train = table.indices("train")
    if table.has_split("val"):
        return Splits(fit=train, val=table.indices("val"), test=table.indices("test"))
    shuffled = np.random.default_rng(seed).permutation(train)
    cut = int(round(holdout * len(train)))
    return Splits(
        fit=np.sort(shuffled[cut:]), val=np.sort(shuffled[:cut]), test=table.indices("test")
    )


def _check_labels(spec: AuditSpec, table: ImageTable) -> None:
    top = int(table.labels.max())
    if top >= spec.model.num_classes:
        raise DatasetError(
            f"labels.csv has label {top}, but the model has {spec.model.num_classes} classes"
        )
    for name, cls in (("positive", spec.positive_class), ("negative", spec.negative_class)):
        if cls >= 0 and not (table.labels == cls).any():
            raise DatasetError(f"the {name} class {cls} has no images in labels.csv")


def validate(spec: AuditSpec, allowed_roots: Sequence[Path] | None = None) -> ImageTable:
    """Fail fast: the checks that need files but no model run (the server calls it on submit)."""
    spec.validate()
    load_model(spec.model, allowed_roots=allowed_roots)
    table = load_dataset(spec.dataset, spec.attributes, allowed_roots=allowed_roots)
    _check_labels(spec, table)
    make_splits(table, spec.seed)
    return table


def _attribute_targets(table: ImageTable, attribute: str) -> list[tuple[str, np.ndarray]]:
    """(value, presence mask) per audited value: one table for a binary attribute, one per
    value (one-vs-rest) for a multi-valued one."""
    if table.is_binary(attribute):
        present = table.is_present(attribute)
        values = table.attributes[attribute]
        shown = str(values[present][0]) if present.any() else "1"
        return [(shown, present)]
    column = table.attributes[attribute]
    return [(str(v), column == v) for v in table.values(attribute)]


def _class_pair(spec: AuditSpec, labels: np.ndarray) -> np.ndarray:
    if spec.negative_class >= 0:
        return (labels == spec.positive_class) | (labels == spec.negative_class)
    return np.ones_like(labels, dtype=bool)


def _choose(indices: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(indices) <= limit:
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=limit, replace=False))


def run_audit(
    spec: AuditSpec,
    *,
    workdir: Path,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
    allowed_roots: Sequence[Path] | None = None,
) -> AuditResult:
    """Run one audit (and the optional pruning stage) and write its artifacts to ``workdir``."""
    spec.validate()
    run = _Run(progress, cancelled)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    device = spec.device

    run.stage("load", "loading model and dataset")
    model = load_model(spec.model, allowed_roots=allowed_roots)
    table = load_dataset(spec.dataset, spec.attributes, allowed_roots=allowed_roots)
    _check_labels(spec, table)
    splits = make_splits(table, spec.seed)
    validate_images(table)
    pair = _class_pair(spec, table.labels)
    positive = table.labels == spec.positive_class

    def loader(indices: np.ndarray):
        return make_loader(ImageDataset(table, indices, spec.dataset), spec.batch_size)

    run.stage("evaluate", "evaluating the model per group")
    before = _evaluate(model, table, splits.test, spec, device)

    run.stage("collect", "collecting activations and LRP contexts")
    fit_mask = positive if spec.method != "cav" else pair
    fit_ids = _choose(splits.fit[fit_mask[splits.fit]], spec.fit_images, spec.seed)
    if len(fit_ids) == 0:
        raise DatasetError(f"no training images of class {spec.positive_class} to fit subspaces on")
    with Explainer(model, spec.layers, spec.composite, device=device) as explainer:
        instances = collect_instances(
            explainer,
            loader(fit_ids),
            spec.positive_class,
            per_image=spec.positions_per_image,
            seed=spec.seed,
            cancelled=run.cancelled,
            progress=run.within,
        )

        run.stage("fit", f"fitting {spec.method} subspaces")
        bases, keys = _fit_bases(spec, table, instances, positive, run)

        run.stage("score", "scoring validation and test images")
        audited = np.concatenate([splits.val, splits.test])
        audited = audited[pair[audited]]
        scored = collect_relevance(
            explainer,
            loader(audited),
            spec.positive_class,
            {layer: [b.basis for b in items] for layer, items in bases.items()},
            cancelled=run.cancelled,
            progress=run.within,
        )

        run.stage("audit", "computing the audit tables")
        audits = _audit(spec, table, splits, scored, bases, keys)

        run.stage("heatmaps", "rendering subspace heatmaps")
        artifacts = _heatmaps(spec, table, splits, explainer, audits, bases, keys, workdir)

    result = AuditResult(
        spec=spec,
        model_sha256=file_sha256(spec.model.weights) if spec.model.weights else "",
        dataset_digest=table.digest,
        attributes=audits,
        before=before,
        versions=_versions(),
        artifacts=artifacts,
    )
    if spec.prune is not None:
        run.stage("prune", f"{spec.prune.method} pruning at rate {spec.prune.rate}")
        _prune(spec, model, table, splits, audits, bases, keys, result, workdir, run)

    run.stage("report", "writing the report")
    result.timings = run.timings
    write_report(result, workdir)
    run.finish()
    result.timings = run.timings
    write_report(result, workdir)  # again, with the report stage's own timing
    return result


def _fit_bases(spec, table, instances, positive, run):
    """Concept bases per layer; ``keys[layer][j]`` says which attribute value a CAV basis
    belongs to (None for the unsupervised methods, whose bases serve every attribute)."""
    bases: dict[str, list[ConceptBasis]] = {}
    keys: dict[str, list[tuple[str, str] | None]] = {}
    for layer, inst in instances.items():
        bases[layer], keys[layer] = [], []
        if spec.method == "cav":
            pooled, ids = _pool_per_image(inst)
            for attribute in spec.attributes:
                for value, present in _attribute_targets(table, attribute):
                    target = present[ids]
                    if target.all() or not target.any():
                        raise DatasetError(
                            f"CAV for {attribute}={value} needs training images with and without "
                            "it in the audited classes"
                        )
                    bases[layer].append(
                        fit_subspaces("cav", pooled, None, 1, spec.seed, target=target)
                    )
                    keys[layer].append((attribute, value))
        else:
            rows = positive[inst.image_ids]
            for k in spec.n_subspaces:
                run.check()
                options = {}
                if spec.method == "drsa":
                    options = {
                        "max_epochs": spec.drsa_max_epochs,
                        "restarts": spec.drsa_restarts,
                        "tol": DRSA_AUDIT_TOL,
                    }
                basis = fit_subspaces(
                    spec.method,
                    inst.activations[rows],
                    inst.contexts[rows],
                    k,
                    spec.seed,
                    device=spec.device,
                    **options,
                )
                bases[layer].append(basis)
                keys[layer].append(None)
    return bases, keys


# An audit needs the subspaces, not the last 1e-7 of J: stop once J gains less than
# this (relative) over the convergence window. Measured on the 64 px benchmark: layer3,
# K = 8 converges in about 160 epochs instead of running to the epoch cap.
DRSA_AUDIT_TOL = 1e-4


def _pool_per_image(inst) -> tuple[np.ndarray, np.ndarray]:
    """Mean activation of each image's sampled positions: one CAV training vector per image."""
    ids, inverse = np.unique(inst.image_ids, return_inverse=True)
    pooled = np.zeros((len(ids), inst.activations.shape[1]))
    np.add.at(pooled, inverse, inst.activations)
    return pooled / np.bincount(inverse)[:, None], ids


def _audit(spec, table, splits, scored, bases, keys) -> list[AttributeAudit]:
    position = {int(i): n for n, i in enumerate(scored.image_ids)}
    val_rows = np.array([position[i] for i in splits.val if int(i) in position], dtype=int)
    test_rows = np.array([position[i] for i in splits.test if int(i) in position], dtype=int)
    val_ids, test_ids = scored.image_ids[val_rows], scored.image_ids[test_rows]
    labels = table.labels
    audits = []
    for attribute in spec.attributes:
        for value, present in _attribute_targets(table, attribute):
            candidates = [
                Candidate(
                    layer,
                    bases[layer][j].n_subspaces,
                    scored.relevance[(layer, j)][val_rows],
                    scored.relevance[(layer, j)][test_rows],
                    scored.residue(layer, j)[val_rows],
                    scored.residue(layer, j)[test_rows],
                )
                for layer in bases
                for j in range(len(bases[layer]))
                if keys[layer][j] in (None, (attribute, value))
            ]
            audits += audit_attribute(
                attribute,
                value,
                candidates,
                AuditSamples(labels[val_ids] == spec.positive_class, present[val_ids]),
                AuditSamples(labels[test_ids] == spec.positive_class, present[test_ids]),
                score=spec.score,
                threshold=spec.flag_threshold,
                resamples=spec.bootstrap,
                seed=spec.seed,
            )
    return audits


def basis_of(audit: AttributeAudit, bases, keys) -> ConceptBasis:
    """The fitted basis an audit table was computed from."""
    for j, basis in enumerate(bases[audit.layer]):
        if basis.n_subspaces == audit.n_subspaces and keys[audit.layer][j] in (
            None,
            (audit.attribute, audit.value),
        ):
            return basis
    raise KeyError(audit.layer)


def _heatmaps(spec, table, splits, explainer, audits, bases, keys, workdir) -> dict[str, str]:
    artifacts: dict[str, str] = {}
    if spec.heatmap_samples == 0:
        return artifacts
    for audit in audits:
        present = dict(_attribute_targets(table, audit.attribute))[audit.value]
        # Images that carry the attribute, from both classes: where shortcuts show.
        chosen = [i for i in splits.test if present[i]][: spec.heatmap_samples]
        if not chosen:
            continue
        dataset = ImageDataset(table, np.array(chosen), spec.dataset)
        images = torch.stack([dataset[n][0] for n in range(len(chosen))])
        maps = subspace_heatmaps(
            explainer, images, spec.positive_class, audit.layer, basis_of(audit, bases, keys).basis
        )
        mean = torch.tensor(spec.dataset.mean)[:, None, None]
        std = torch.tensor(spec.dataset.std)[:, None, None]
        shown = (images * std + mean).permute(0, 2, 3, 1).numpy()
        captions = [f"class {table.labels[i]}" for i in chosen]
        name = f"heatmaps/{audit.attribute}={audit.value}_{audit.layer}.png"
        save_heatmap_grid(shown, maps, workdir / name, captions)
        artifacts[f"heatmap:{audit.attribute}={audit.value}:{audit.layer}"] = str(workdir / name)
    return artifacts


def _evaluate(model, table, indices, spec, device):
    from .evaluation import evaluate_table

    return evaluate_table(model, table, indices, spec, device=device)


def _prune(spec, model, table, splits, audits, bases, keys, result, workdir, run):
    from .pruning import prune_from_audit

    prune_from_audit(spec, model, table, splits, audits, bases, keys, result, workdir, run)


def _versions() -> dict[str, str]:
    import sklearn
    import torchvision
    import zennit

    return {
        "cnp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zennit": getattr(zennit, "__version__", "0.5"),
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def _finite(value):
    """JSON has no NaN: undefined values (e.g. AP with one class absent) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(result: AuditResult, workdir: Path) -> None:
    """report.json (the whole result) and audit_table.csv (one row per subspace)."""
    report = workdir / "report.json"
    result.artifacts["report"] = str(report)
    table = workdir / "audit_table.csv"
    result.artifacts["audit_table"] = str(table)
    report.write_text(json.dumps(_finite(result.to_dict()), indent=2, default=_json_default))
    columns = [
        "ap_attribute",
        "ap_attribute_pos",
        "ap_attribute_neg",
        "ap_class",
        "ap_class_attr",
        "ap_class_no_attr",
    ]
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["attribute", "value", "layer", "k", "subspace", "flagged", "mean_relevance"]
            + [f"{c}{suffix}" for c in columns for suffix in ("", "_low", "_high", "_base")]
        )
        for audit in result.attributes:
            for row in audit.subspaces:
                cells = []
                for c in columns:
                    m = getattr(row, c)
                    cells += [m.value, m.ci_low, m.ci_high, m.base_rate]
                writer.writerow(
                    [audit.attribute, audit.value, audit.layer, audit.n_subspaces, row.index]
                    + [row.index == audit.flagged_subspace, row.mean_relevance]
                    + cells
                )


def summary(result: AuditResult) -> str:
    """The audit tables and group accuracies as plain text, for terminals and logs."""
    parts = [format_table(audit) for audit in result.attributes]
    for name, evaluation in (("before", result.before), ("after", result.after)):
        if evaluation is None:
            continue
        lines = [
            f"{name}: balanced accuracy {evaluation.balanced_accuracy.value:.3f}, "
            f"worst group {evaluation.worst_group} {evaluation.worst_group_accuracy.value:.3f}"
        ]
        for g in evaluation.groups:
            flag = "  (small)" if g.too_small else ""
            lines.append(
                f"  class {g.label} {g.attribute}={g.value}: {g.accuracy.value:.3f} "
                f"[{g.accuracy.ci_low:.3f}, {g.accuracy.ci_high:.3f}] n={g.count}{flag}"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
