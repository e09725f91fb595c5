"""Test-split evaluation as in the seed: balanced accuracy, accuracy per group, worst group.

A group is (class, attribute, value) for every audited attribute and each of its values
(one attribute at a time: class x attribute value). Groups with fewer than
``min_group_size`` samples are reported with ``too_small=True`` and left out of the
worst group, never averaged in silently. A named class shows as ``ring (3)``. Every
accuracy carries a bootstrap 95 % interval from :mod:`cnp_core.metrics`. The model's
cost comes with it: parameters, multiply-accumulates (the "FLOPs" of model papers) and
the median CPU latency at batch 1. The group fairness of the positive class's decisions
(Fairlearn's group metrics and disparities, :mod:`cnp_core.fairness`) comes with it too.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from .data import make_loader
from .devices import BatchRunner, compute_device
from .errors import GroupTooSmall, InvalidSpec
from .fairness import group_fairness
from .metrics import accuracy, balanced_accuracy
from .results import Evaluation, GroupMetric, Metric, class_label, class_name


def predict(
    model: nn.Module,
    data: torch.Tensor | Iterable,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Predicted class per sample, in order. ``data``: an image tensor, or batches whose
    first element is the images (a DataLoader over (image, label, ...) without shuffling).
    A batch that runs out of GPU memory is predicted in halves (:class:`BatchRunner`)."""
    if isinstance(data, torch.Tensor):
        data = torch.split(data, batch_size)
    model = model.to(device).eval()
    runner = BatchRunner(device, "evaluating the model")

    def classes(images: torch.Tensor) -> np.ndarray:
        return model(images.to(device)).argmax(1).cpu().numpy()

    out = []
    with torch.inference_mode():
        for batch in data:
            images = batch if isinstance(batch, torch.Tensor) else batch[0]
            out.extend(runner.map(classes, images))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def group_name(label: int, attribute: str, value: str, label_name: str = "") -> str:
    """``class 3 + wm=1``, or ``ring (3) + wm=1`` for a named class."""
    return f"{class_label(label, label_name)} + {attribute}={value}"


def find_group(evaluation: Evaluation, label: int, attribute: str, value: str) -> GroupMetric:
    """The group (label, attribute=value), e.g. the seed's "other class + watermark"."""
    for group in evaluation.groups:
        if (group.label, group.attribute, group.value) == (label, attribute, str(value)):
            return group
    raise KeyError(f"no group {group_name(label, attribute, str(value))!r} in the evaluation")


def evaluate_predictions(
    labels: Sequence[int],
    predictions: Sequence[int],
    attributes: Mapping[str, Sequence],
    *,
    resamples: int = 200,
    seed: int = 0,
    min_group_size: int = 10,
    class_names: Sequence[str] = (),
    positive_class: int = 1,
) -> Evaluation:
    """Balanced accuracy, accuracy of every group (label x attribute value) with its size,
    and the worst group among those with at least ``min_group_size`` samples.
    ``class_names``: the model's, in output order (empty: classes are shown by index).
    ``positive_class``: the class whose decisions the fairness breakdowns review (the
    spec's)."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.shape != predictions.shape or labels.size == 0:
        raise InvalidSpec("evaluation needs one prediction per label, and at least one sample")
    correct = predictions == labels
    groups: list[GroupMetric] = []
    for attribute, raw in attributes.items():
        values = np.asarray([str(v) for v in raw])
        if values.shape != labels.shape:
            raise InvalidSpec(
                f"attribute {attribute!r} has {values.size} values for {labels.size} samples"
            )
        for label in np.unique(labels):
            for value in np.unique(values):
                members = (labels == label) & (values == value)
                count = int(members.sum())
                if count == 0:
                    continue
                groups.append(
                    GroupMetric(
                        label=int(label),
                        attribute=attribute,
                        value=str(value),
                        count=count,
                        accuracy=accuracy(correct[members], resamples=resamples, seed=seed),
                        too_small=count < min_group_size,
                        label_name=class_name(class_names, int(label)),
                    )
                )
    usable = [g for g in groups if not g.too_small]
    if groups and not usable:
        raise GroupTooSmall(
            f"every group has fewer than min_group_size={min_group_size} samples "
            f"(largest: {max(g.count for g in groups)}); add test data or lower min_group_size"
        )
    if usable:
        worst = min(usable, key=lambda g: (g.accuracy.value, g.label, g.attribute, g.value))
        worst_metric, worst_name = (
            worst.accuracy,
            group_name(worst.label, worst.attribute, worst.value, worst.label_name),
        )
    else:  # no attributes: the worst class stands in for the worst group
        per_class = {
            int(c): accuracy(correct[labels == c], resamples=resamples, seed=seed)
            for c in np.unique(labels)
        }
        label = min(per_class, key=lambda c: per_class[c].value)
        worst_metric = per_class[label]
        worst_name = class_label(label, class_name(class_names, label))
    return Evaluation(
        balanced_accuracy=balanced_accuracy(labels, predictions, resamples=resamples, seed=seed),
        worst_group_accuracy=worst_metric,
        worst_group=worst_name,
        groups=groups,
        fairness=group_fairness(
            labels,
            predictions,
            attributes,
            positive_class=positive_class,
            resamples=resamples,
            seed=seed,
            min_group_size=min_group_size,
        ),
    )


def model_cost(
    model: nn.Module, example_input: torch.Tensor, *, repeats: int = 30, warmup: int = 3
) -> tuple[int, int, float]:
    """(parameters, multiply-accumulates, median CPU latency in ms at batch 1)."""
    cpu = copy.deepcopy(model).cpu().eval()
    x = example_input[:1].cpu()
    with torch.inference_mode():
        macs, params = tp.utils.count_ops_and_params(cpu, x)
        for _ in range(warmup):
            cpu(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cpu(x)
            times.append((time.perf_counter() - start) * 1e3)
    return int(params), int(macs), float(statistics.median(times))


def evaluate(
    model: nn.Module,
    data: torch.Tensor | Iterable,
    labels: Sequence[int],
    attributes: Mapping[str, Sequence],
    *,
    example_input: torch.Tensor | None = None,
    resamples: int = 200,
    seed: int = 0,
    min_group_size: int = 10,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    latency_repeats: int = 30,
    class_names: Sequence[str] = (),
    positive_class: int = 1,
) -> Evaluation:
    """:func:`evaluate_predictions` of the model's predictions on ``data`` (same order as
    ``labels`` and ``attributes``), plus its size and cost when ``example_input`` is given
    (``latency_repeats=0`` skips the latency measurement)."""
    predictions = predict(model, data, batch_size=batch_size, device=device)
    result = evaluate_predictions(
        labels,
        predictions,
        attributes,
        resamples=resamples,
        seed=seed,
        min_group_size=min_group_size,
        class_names=class_names,
        positive_class=positive_class,
    )
    if example_input is not None:
        params, macs, latency = model_cost(model, example_input, repeats=max(latency_repeats, 1))
        result.parameters, result.flops = params, macs
        result.latency_ms = latency if latency_repeats > 0 else 0.0
    return result


def metric_row(metric: Metric) -> str:
    """Format as 0.912 [0.880, 0.940] for tables."""
    return f"{metric.value:.3f} [{metric.ci_low:.3f}, {metric.ci_high:.3f}]"


def evaluate_table(model: nn.Module, table, indices, spec) -> Evaluation:
    """:func:`evaluate` on rows ``indices`` of an ImageTable (images or a table's feature
    rows), with the audit spec's groups (its attributes), bootstrap, seed, minimum group
    size and device (the pipeline's entry point)."""

    indices = np.asarray(indices)
    dataset = table.samples(indices, spec.dataset)  # images, or rows of a table
    return evaluate(
        model,
        make_loader(dataset, spec.batch_size),
        table.labels[indices],
        {name: table.attributes[name][indices] for name in spec.attributes},
        example_input=dataset[0][0][None],
        resamples=spec.bootstrap,
        seed=spec.seed,
        min_group_size=spec.min_group_size,
        batch_size=spec.batch_size,
        device=compute_device(spec.device),
        class_names=table.class_names,
        positive_class=spec.positive_class,
    )
