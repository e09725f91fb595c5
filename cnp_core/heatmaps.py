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
from .results import class_label, class_name  # noqa: E402
from .safe_text import visible  # noqa: E402
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


def plot_text(value: object, limit: int = 40) -> str:
    """A dataset's string as matplotlib draws it literally: hidden characters escaped,
    '$' kept from starting mathtext (a malformed formula fails the drawing), long names
    cut."""
    text = visible(value)
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")


# Each map is scaled to this percentile of its own |relevance|: one hot pixel does not
# wash the rest of the map out, and a subspace with little relevance still shows its shape.
SCALE_PERCENTILE = 99.0
# ... but never to less than this fraction of the ordinary map's scale: a residue of
# rounding errors (a basis that spans the layer leaves none) must not light up as noise.
MIN_SCALE_FRACTION = 0.01
FLAG_COLOUR = "#d62728"


def relevance_shares(maps: np.ndarray) -> np.ndarray:
    """n x (K + 1): each subspace's and the residue's share of the image's total absolute
    relevance over the decomposition (columns 1: of ``maps``); rows sum to 1 (0 if empty)."""
    parts = np.abs(maps[:, 1:]).sum(axis=(2, 3))
    total = parts.sum(axis=1, keepdims=True)
    return np.divide(parts, total, out=np.zeros_like(parts), where=total > 0)


def map_scale(relevance: np.ndarray) -> float:
    """The SCALE_PERCENTILE of |relevance| (its maximum when that is 0; 0 for an empty map)."""
    magnitude = np.abs(relevance)
    scale = float(np.percentile(magnitude, SCALE_PERCENTILE))
    return scale if scale > 0 else float(magnitude.max())


def overlay(image: np.ndarray, relevance: np.ndarray, scale: float) -> np.ndarray:
    """``relevance`` (H x W) over a lightened grey copy of ``image`` (H x W x 3 in [0, 1]),
    saturating at ``scale``: red for, blue against, transparent where the relevance is
    near zero. Returns H x W x 3 in [0, 1]."""
    grey = np.clip(image, 0, 1).mean(axis=2, keepdims=True)
    base = np.repeat(0.55 + 0.4 * grey, 3, axis=2)
    if not np.isfinite(scale) or scale <= 0:
        return base
    signed = np.clip(relevance / scale, -1, 1)
    colour = matplotlib.colormaps["bwr"](0.5 + 0.5 * signed)[..., :3]
    alpha = np.sqrt(np.abs(signed))[..., None]  # sqrt: weak relevance stays visible
    return (1 - alpha) * base + alpha * colour


def save_heatmap_grid(
    images: np.ndarray,
    maps: np.ndarray,
    path: Path,
    captions: list[str] | None = None,
    *,
    flagged: int = -1,
    target: str = "",
) -> Path:
    """One row per image: the image, the ordinary heatmap, each subspace, the residue.

    ``images``: n x H x W x 3 in [0, 1]; ``maps``: n x (K + 2) x H x W. Each map lies over
    the greyed image and is scaled to itself (a subspace with little relevance still
    shows where it lies; at least MIN_SCALE_FRACTION of the ordinary map's scale); the
    percentage on each is its share of the image's total |relevance|
    over subspaces and residue, so sizes stay comparable. ``flagged`` (an index into the
    subspaces, -1: none) frames that subspace's column. ``target`` names the explained
    class in the footnote.
    """
    n, columns = maps.shape[:2]
    shares = relevance_shares(maps)
    titles = ["image", "LRP"] + [f"S{j + 1}" for j in range(columns - 2)] + ["residue"]
    if 0 <= flagged < columns - 2:
        titles[flagged + 2] += " (flagged)"
    fig, axes = plt.subplots(
        n, columns + 1, figsize=(1.7 * (columns + 1), 1.75 * n + 0.6), squeeze=False
    )
    for row in range(n):
        axes[row, 0].imshow(np.clip(images[row], 0, 1))
        if captions:
            axes[row, 0].set_ylabel(plot_text(captions[row]), fontsize=8)
        floor = MIN_SCALE_FRACTION * map_scale(maps[row, 0])
        for col in range(columns):
            ax = axes[row, col + 1]
            scale = max(map_scale(maps[row, col]), floor)
            ax.imshow(overlay(images[row], maps[row, col], scale), interpolation="nearest")
            if col >= 1:
                ax.text(
                    0.03,
                    0.04,
                    f"{shares[row, col - 1]:.0%}",
                    transform=ax.transAxes,
                    fontsize=8,
                    color="black",
                    bbox={"facecolor": "white", "alpha": 0.8, "pad": 1, "linewidth": 0},
                )
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=9)
    if 0 <= flagged < columns - 2:
        for ax in axes[:, flagged + 2]:
            for spine in ax.spines.values():
                spine.set(color=FLAG_COLOUR, linewidth=3)
        axes[0, flagged + 2].title.set(color=FLAG_COLOUR, fontweight="bold")
    explained = f"relevance for {plot_text(target)}" if target else "relevance"
    fig.text(
        0.01,
        0.005,
        f"{explained}: red for, blue against; each map scaled to itself; "
        "% = share of the image's total |relevance| over subspaces and residue",
        fontsize=8,
        va="bottom",
    )
    fig.tight_layout(rect=(0, 0.35 / (1.75 * n + 0.6), 1, 1))
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
            target = class_label(
                spec.positive_class, class_name(table.class_names, spec.positive_class)
            )
            save_heatmap_grid(
                shown, maps, path, captions, flagged=audit.flagged_subspace, target=target
            )
            artifacts[f"heatmap:{audit.attribute}={audit.value}:{audit.layer}"] = str(path)
    return artifacts
