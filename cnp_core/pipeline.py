"""The audit pipeline: spec in, typed result and artifacts out. Orchestration only: the
one module that knows the order of the stages.

load model + dataset -> evaluate -> learn and audit the concepts (collect, fit, score,
audit: :mod:`cnp_core.concepts`) -> heatmaps -> [optional] prune (:mod:`cnp_core.debias`)
and evaluate again -> report (:mod:`cnp_core.report`).

``progress(stage, fraction, message)`` is called as work advances; ``cancelled()`` is
polled between batches and raises :class:`~cnp_core.errors.Cancelled` when it returns
True. Nothing here knows about gRPC, job stores or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .architectures import check_name, layer_of
from .audit import summarise_attributes
from .concepts import context_composite, learn_concepts
from .data import ImageTable, SplitRows, load_dataset, split_rows, validate_images
from .debias import check_prune, concept_to_remove, debias
from .devices import compute_device, describe_device, gpu_memory_errors
from .errors import DatasetError, ModelError
from .evaluation import evaluate_table
from .export import save_pruned
from .heatmaps import audit_heatmaps
from .models import check_weights_file, get_layer, load_model
from .paths import file_sha256, resolve_inside
from .report import summary, versions, write_report
from .results import AuditResult, class_label, class_name
from .spec import AuditSpec
from .stages import ProgressCallback, Stages
from .tables import check_model_inputs, check_model_runs, load_table

__all__ = ["run_audit", "summary", "validate"]


def _load(
    spec: AuditSpec, allowed_roots: Sequence[Path] | None
) -> tuple[nn.Module, ImageTable, SplitRows]:
    """The model, the dataset and its splits, checked against the spec's classes."""
    model = load_model(spec.model, allowed_roots=allowed_roots)
    # Defaults that depend on the model or the method, filled in so that the report's
    # spec records what ran.
    if not spec.layers:
        spec.layers = [layer_of(model, spec.dataset.input_size)]
    for layer in spec.layers:  # before any image is read: a wrong name fails at load
        get_layer(model, layer)
    spec.composite = context_composite(spec)
    table = _load_table(spec, allowed_roots, digest=True)
    check_model_runs(model, table)  # a table's row must be one input of the model
    return model, table, split_rows(table, spec.seed)


def _load_table(
    spec: AuditSpec, allowed_roots: Sequence[Path] | None, *, digest: bool
) -> ImageTable:
    """labels.csv read against the model's classes; the spec's class names resolved to
    indices (the spec then records both)."""
    load = load_table if spec.dataset.is_table else load_dataset
    table = load(
        spec.dataset,
        spec.attributes,
        classes=spec.model.classes,
        allowed_roots=allowed_roots,
        digest=digest,
    )
    check_model_inputs(spec.model, table)
    _check_classes(spec, table)
    return table


def _check_classes(spec: AuditSpec, table: ImageTable) -> None:
    """The class names and labels fit the model's classes, the classes the spec names
    exist, and the audited classes have images."""
    names = table.class_names
    if len(names) not in (0, spec.model.num_classes):
        raise DatasetError(
            f"classes.txt names {len(names)} classes, but the model has "
            f"{spec.model.num_classes} (model.num_classes): give one name per output",
            field="dataset.root",
        )
    spec.resolve_classes(names)
    top = int(table.labels.max())
    if top >= spec.model.num_classes:
        raise DatasetError(
            f"labels.csv has label {top}, but the model has {spec.model.num_classes} classes",
            field="dataset.root",
        )
    for which, cls in (("positive", spec.positive_class), ("negative", spec.negative_class)):
        if cls >= 0 and not (table.labels == cls).any():
            shown = class_label(cls, class_name(names, cls))
            field = (
                f"{which}_class_name" if getattr(spec, f"{which}_class_name") else f"{which}_class"
            )
            raise DatasetError(
                f"the {which} class {shown} has no images in labels.csv", field=field
            )


def validate(spec: AuditSpec, allowed_roots: Sequence[Path] | None = None) -> ImageTable:
    """Fail fast and cheaply (the server calls it on submit): the spec, the architecture's
    name, the weights file's size and header, labels.csv and its image paths. Nothing is
    built, imported, loaded or decoded: the model, its layers and the images are checked
    when the job runs."""
    spec.validate()
    if spec.model.architecture:
        check_name(spec.model.architecture)
    if spec.model.weights:
        path = resolve_inside(spec.model.weights, allowed_roots, "weights", ModelError)
        check_weights_file(path, spec.model.weights)
    return _load_table(spec, allowed_roots, digest=False)


def run_audit(
    spec: AuditSpec,
    *,
    workdir: Path,
    progress: ProgressCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    allowed_roots: Sequence[Path] | None = None,
) -> AuditResult:
    """Run one audit (and the optional pruning stage) and write its artifacts to ``workdir``.

    The report's spec keeps the device as asked ("auto"); its versions record the device
    the job computed on (``device``, and on a GPU its name ``gpu`` and ``cuda``).
    """
    spec.validate()
    run = Stages(progress, cancelled)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)

    run.stage("load", "loading model and dataset")
    device = compute_device(spec.device)  # a device this worker lacks fails the job here
    with gpu_memory_errors(device):
        result = _audit(spec, run, workdir, allowed_roots)
    result.versions |= describe_device(device)

    run.stage("report", "writing the report")
    result.timings = run.timings
    write_report(result, workdir, review=False)  # the review once, below
    run.finish()
    result.timings = run.timings
    write_report(result, workdir)  # again, with the report stage's own timing
    return result


def _audit(
    spec: AuditSpec, run: Stages, workdir: Path, allowed_roots: Sequence[Path] | None
) -> AuditResult:
    """The stages from loading to pruning; the stages compute on ``spec.device``."""
    model, table, splits = _load(spec, allowed_roots)
    check_prune(model, spec)  # before the audit: a pruning stage that cannot run fails now
    if not spec.dataset.is_table:
        validate_images(table)

    run.stage("evaluate", "evaluating the model per group")
    before = evaluate_table(model, table, splits.test, spec)

    concepts = learn_concepts(
        model, table, splits, spec, stage=run.stage, within=run.within, cancelled=run.cancelled
    )

    run.stage("heatmaps", "rendering subspace heatmaps")
    # Heatmaps are drawn over images; a table's rows have none to draw on.
    artifacts = (
        {}
        if spec.dataset.is_table
        else audit_heatmaps(model, table, splits, spec, concepts, workdir)
    )

    result = AuditResult(
        spec=spec,
        model_sha256=file_sha256(spec.model.weights) if spec.model.weights else "",
        dataset_digest=table.digest,
        attributes=concepts.audits,
        before=before,
        versions=versions(),
        artifacts=artifacts,
        class_names=table.class_names,
        attribute_summaries=summarise_attributes(
            spec.attributes, concepts.audits, removed=concepts.flagged, basis_of=concepts.concept_of
        ),
    )
    if spec.prune is not None:
        run.stage("prune", f"{spec.prune.method} pruning at rate {spec.prune.rate}")
        outcome = debias(
            model,
            table,
            splits,
            spec,
            concept_to_remove(concepts, spec),
            progress=lambda fraction, message: run.within(0.8 * fraction, message),
            cancelled=run.cancelled,
        )
        run.within(0.85, "evaluating the pruned model")
        result.after = evaluate_table(outcome.compact, table, splits.test, spec)
        result.pruning = outcome.summary
        result.artifacts |= save_pruned(outcome, workdir / "pruned", spec)
    return result
