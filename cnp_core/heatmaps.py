"""Subspace heatmaps: the LRP explanation with the context at L replaced by U_k U_k^T c.

The K subspace heatmaps plus the residue heatmap ((I - U U^T) c) add up to the ordinary
LRP heatmap, because LRP below L is linear in the relevance handed to it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the server has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .concepts import ConceptAudit, context_composite  # noqa: E402
from .data import ImageDataset, ImageTable, SplitRows  # noqa: E402
from .devices import BatchRunner, compute_device  # noqa: E402
from .lrp import Explainer  # noqa: E402
from .paths import file_stem, inside  # noqa: E402
from .results import class_label, class_name
from .spec import AuditSpec  # noqa: E402


def _projection(matrix: torch.Tensor):
    return lambda c: torch.einsum("de,ne...->nd...", matrix.to(c), c)


def subspace_heatmaps(
    explainer: Explainer, images: torch.Tensor, target: int, layer: str, basis: np.ndarray
) -> np.ndarray:
    """Heatmaps n x (K + 2) x H x W: the ordinary one, one per subspace, the residue."""
    d, k, dk = basis.shape
    u = torch.as_tensor(basis, dtype=torch.float64)
    targets = torch.full((len(images),), target)
    maps = [explainer.explain(images, targets).input_relevance]
    for j in range(k):
        projector = u[:, j, :] @ u[:, j, :].T
        maps.append(
            explainer.explain(images, targets, {layer: _projection(projector)}).input_relevance
        )
    flat = u.reshape(d, k * dk)
    residue = torch.eye(d, dtype=torch.float64) - flat @ flat.T
    maps.append(explainer.explain(images, targets, {layer: _projection(residue)}).input_relevance)
    return torch.stack([m.sum(1) for m in maps], 1).cpu().numpy()  # sum over colour channels


def save_heatmap_grid(
    images: np.ndarray, maps: np.ndarray, path: Path, captions: list[str] | None = None
) -> Path:
    """One row per image: the image, the ordinary heatmap, each subspace, the residue.

    ``images``: n x H x W x 3 in [0, 1]. Red is positive relevance, blue negative; each row
    shares one colour scale so subspaces are comparable.
    """
    n, columns = maps.shape[:2]
    titles = ["image", "LRP"] + [f"S{j + 1}" for j in range(columns - 2)] + ["residue"]
    fig, axes = plt.subplots(n, columns + 1, figsize=(1.6 * (columns + 1), 1.7 * n), squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(np.clip(images[row], 0, 1))
        if captions:
            axes[row, 0].set_ylabel(captions[row], fontsize=7)
        scale = np.abs(maps[row]).max() or 1.0
        for col in range(columns):
            axes[row, col + 1].imshow(maps[row, col], cmap="bwr", vmin=-scale, vmax=scale)
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def audit_heatmaps(
    model: torch.nn.Module,
    table: ImageTable,
    splits: SplitRows,
    spec: AuditSpec,
    concepts: ConceptAudit,
    directory: Path,
) -> dict[str, str]:
    """One grid per audit table, of up to ``spec.heatmap_samples`` test images that carry
    the attribute (from both classes: where shortcuts show). Returns artifact -> path."""
    artifacts: dict[str, str] = {}
    if spec.heatmap_samples == 0:
        return artifacts
    mean = torch.tensor(spec.dataset.mean)[:, None, None]
    std = torch.tensor(spec.dataset.std)[:, None, None]
    device = compute_device(spec.device)
    runner = BatchRunner(device, "rendering heatmaps")
    with Explainer(model, spec.layers, context_composite(spec), device=device) as explainer:
        for audit in concepts.audits:
            present = dict(table.audited_values(audit.attribute))[audit.value]
            chosen = [i for i in splits.test if present[i]][: spec.heatmap_samples]
            if not chosen:
                continue
            images = ImageDataset(table, np.array(chosen), spec.dataset).stack()
            basis = concepts.concept_of(audit).basis.basis
            draw = partial(
                subspace_heatmaps,
                explainer,
                target=spec.positive_class,
                layer=audit.layer,
                basis=basis,
            )
            maps = np.concatenate(list(runner.map(draw, images)))
            shown = (images * std + mean).permute(0, 2, 3, 1).numpy()
            captions = [
                class_label(
                    int(table.labels[i]), class_name(table.class_names, int(table.labels[i]))
                )
                for i in chosen
            ]
            # Attribute values come from labels.csv: they name the file only through file_stem.
            stem = file_stem(audit.attribute + "=" + audit.value, audit.layer)
            path = inside(directory, f"heatmaps/{stem}.png")
            save_heatmap_grid(shown, maps, path, captions)
            artifacts[f"heatmap:{audit.attribute}={audit.value}:{audit.layer}"] = str(path)
    return artifacts
