"""Streaming passes over a dataset: instances to fit subspaces, and per-image subspace relevance.

Memory is bounded by the instance budget (positions per image x fit images), never by
the dataset size: the second pass keeps only K numbers per image and basis. On a GPU each
loader batch runs in chunks sized to the free memory, halved once if it runs out
(:class:`~cnp_core.devices.BatchRunner`); rows depend on the image, not on the chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .audit import subspace_relevance
from .devices import BatchRunner
from .errors import Cancelled
from .lrp import Explainer
from .stages import StepCallback


@dataclass
class Instances:
    """Matrices A, C in R^{N x d} of sampled positions, and the image each row came from."""

    activations: np.ndarray
    contexts: np.ndarray
    image_ids: np.ndarray


def sample_positions(
    activation: torch.Tensor,
    context: torch.Tensor,
    image_ids: Iterable[int],
    per_image: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``per_image`` random spatial positions of every image, seeded by (seed, image id), so
    the sample does not depend on batching or order. N x d x H x W in, rows out.

    A dense layer's N x d output has one position per sample: its rows are taken once
    each (``per_image`` copies of one row would add nothing to a fit but weight).
    """
    n, d = activation.shape[:2]
    if activation.dim() == 2:
        return activation.double().cpu().numpy(), context.double().cpu().numpy()
    a = activation.reshape(n, d, -1)
    c = context.reshape(n, d, -1)
    positions = a.shape[-1]
    picks = [
        np.random.default_rng([seed, int(i)]).choice(
            positions, size=per_image, replace=per_image > positions
        )
        for i in image_ids
    ]
    index = torch.as_tensor(np.stack(picks), device=a.device)  # n x per_image
    gather = index[:, None, :].expand(n, d, per_image)
    rows_a = a.gather(2, gather).permute(0, 2, 1).reshape(-1, d)
    rows_c = c.gather(2, gather).permute(0, 2, 1).reshape(-1, d)
    return rows_a.double().cpu().numpy(), rows_c.double().cpu().numpy()


def _batches(loader, cancelled: Callable[[], bool] | None, progress: StepCallback | None):
    total = max(len(loader), 1)
    for step, (images, ids) in enumerate(loader):
        if cancelled is not None and cancelled():
            raise Cancelled("the job was cancelled")
        yield images, ids
        if progress is not None:
            progress((step + 1) / total, "")


def collect_instances(
    explainer: Explainer,
    loader,
    target: int,
    *,
    per_image: int,
    seed: int,
    cancelled: Callable[[], bool] | None = None,
    progress: StepCallback | None = None,
) -> dict[str, Instances]:
    """Activations and contexts at every tapped layer, explaining class ``target``."""
    parts: dict[str, list] = {name: [] for name in explainer.taps}
    runner = BatchRunner(
        explainer.device, "collecting activations and LRP contexts", fit_memory=True
    )

    def sample(images: torch.Tensor, ids: torch.Tensor) -> dict[str, tuple]:
        out = explainer.explain(images, torch.full((len(ids),), target), input_relevance=False)
        sampled = {}
        for name in parts:
            rows = sample_positions(
                out.activations[name], out.contexts[name], ids.tolist(), per_image, seed
            )
            sampled[name] = (*rows, np.repeat(ids.numpy(), len(rows[0]) // len(ids)))
        return sampled

    for images, ids in _batches(loader, cancelled, progress):
        for sampled in runner.map(sample, images, ids):
            for name, rows in sampled.items():
                parts[name].append(rows)
    return {
        name: Instances(*(np.concatenate(column) for column in zip(*chunks, strict=True)))
        for name, chunks in parts.items()
    }


@dataclass
class ScoredImages:
    """Per-image results of the scoring pass."""

    image_ids: np.ndarray
    logits: np.ndarray  # N x classes
    relevance: dict[tuple[str, int], np.ndarray]  # (layer, basis position) -> N x K
    totals: dict[str, np.ndarray]  # layer -> N: sum_p a_p^T c_p, the whole layer relevance

    def residue(self, layer: str, j: int) -> np.ndarray:
        """Layer relevance outside basis j's subspaces: total - sum_k R_k (0 if square)."""
        return self.totals[layer] - self.relevance[(layer, j)].sum(axis=1)


def collect_relevance(
    explainer: Explainer,
    loader,
    target: int,
    bases: dict[str, list[np.ndarray]],
    *,
    cancelled: Callable[[], bool] | None = None,
    progress: StepCallback | None = None,
) -> ScoredImages:
    """R_k(x) over all positions for every basis of every layer, explaining ``target``."""
    runner = BatchRunner(explainer.device, "scoring images", fit_memory=True)

    def score(images: torch.Tensor, ids: torch.Tensor) -> ScoredImages:
        out = explainer.explain(images, torch.full((len(ids),), target), input_relevance=False)
        a, c = out.activations, out.contexts
        return ScoredImages(
            image_ids=ids.numpy(),
            logits=out.logits.cpu().numpy(),
            relevance={
                (layer, j): subspace_relevance(a[layer], c[layer], basis)
                for layer, items in bases.items()
                for j, basis in enumerate(items)
            },
            totals={
                layer: (a[layer] * c[layer]).reshape(len(ids), -1).sum(1).double().cpu().numpy()
                for layer in bases
            },
        )

    chunks = [
        scored
        for images, ids in _batches(loader, cancelled, progress)
        for scored in runner.map(score, images, ids)
    ]
    return ScoredImages(
        image_ids=np.concatenate([chunk.image_ids for chunk in chunks]),
        logits=np.concatenate([chunk.logits for chunk in chunks]),
        relevance={
            (layer, j): np.concatenate([chunk.relevance[(layer, j)] for chunk in chunks])
            for layer, items in bases.items()
            for j in range(len(items))
        },
        totals={
            layer: np.concatenate([chunk.totals[layer] for chunk in chunks]) for layer in bases
        },
    )
