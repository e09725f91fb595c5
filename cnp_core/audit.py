"""The concept audit table (ALGORITHMS.md section 3).

Every sample x is scored per subspace k by its subspace relevance R_k(x) (or its share
R_k / sum_j |R_j|), and each score is read as a detector of the attribute and of the class:

| column          | predicts           | on which samples          |
| ap_attribute    | attribute present  | all                       |
| ap_attribute_pos| attribute present  | positive-class samples    |
| ap_attribute_neg| attribute present  | negative-class samples    |
| ap_class        | positive class     | all                       |
| ap_class_attr   | positive class     | samples with the attribute|
| ap_class_no_attr| positive class     | samples without it        |

A subspace that predicts the attribute but not the class isolates the attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .metrics import average_precision
from .results import (
    AP_COLUMNS,
    AttributeAudit,
    AttributeSummary,
    Metric,
    SubspaceScore,
    SubspaceValues,
    ValueSummary,
)


def subspace_relevance(
    activation: torch.Tensor, context: torch.Tensor, basis: np.ndarray
) -> np.ndarray:
    """R_k(x) = sum_p (U_k^T a_p)^T (U_k^T c_p) over all positions p, signed: N x K.

    ``activation``/``context``: N x d x H x W (or N x d); ``basis``: d x K x d_k.
    """
    d, k, dk = basis.shape
    u = torch.as_tensor(basis.reshape(d, k * dk), dtype=activation.dtype, device=activation.device)
    a = activation.reshape(activation.shape[0], d, -1)
    c = context.reshape(context.shape[0], d, -1)
    ua = torch.einsum("dm,ndp->nmp", u, a)
    uc = torch.einsum("dm,ndp->nmp", u, c)
    per_direction = (ua * uc).sum(-1)  # N x K*d_k
    return per_direction.reshape(-1, k, dk).sum(-1).double().cpu().numpy()


def concept_scores(
    relevance: np.ndarray, kind: str, residue: np.ndarray | None = None
) -> np.ndarray:
    """``raw``: R_k(x); ``share``: R_k(x) / (sum_j |R_j(x)| + |residue(x)|), which removes
    each image's overall class evidence (ALGORITHMS.md section 3, choices that matter).

    The residue is the layer relevance outside the subspaces (0 for a square basis); it
    must count, or a single CAV direction would score every image +-1.
    """
    if kind == "raw":
        return relevance
    total = np.abs(relevance).sum(axis=1, keepdims=True)
    if residue is not None:
        total = total + np.abs(residue).reshape(-1, 1)
    return relevance / np.where(total > 0, total, 1.0)


@dataclass
class AuditSamples:
    """The samples one table is computed on (the class pair of one split)."""

    is_positive_class: np.ndarray  # bool, N
    has_attribute: np.ndarray  # bool, N (one attribute value, one-vs-rest)


def audit_table(
    scores: np.ndarray,
    relevance: np.ndarray,
    samples: AuditSamples,
    *,
    resamples: int = 0,
    seed: int = 0,
) -> list[SubspaceScore]:
    """The six AP columns (with base rates and bootstrap CIs) for every subspace."""
    cls, attr = samples.is_positive_class, samples.has_attribute
    rows = []
    for k in range(scores.shape[1]):
        s = scores[:, k]

        def ap(target, mask, s=s):
            return average_precision(target[mask], s[mask], resamples=resamples, seed=seed)

        everything = np.ones_like(cls)
        rows.append(
            SubspaceScore(
                index=k,
                mean_relevance=float(relevance[:, k].mean()),
                ap_attribute=ap(attr, everything),
                ap_attribute_pos=ap(attr, cls),
                ap_attribute_neg=ap(attr, ~cls),
                ap_class=ap(cls, everything),
                ap_class_attr=ap(cls, attr),
                ap_class_no_attr=ap(cls, ~attr),
            )
        )
    return rows


def best_subspace(table: list[SubspaceScore]) -> tuple[int, float]:
    """The subspace with the highest AP for the attribute, and that AP (NaN-safe)."""
    values = np.array([row.ap_attribute.value for row in table], dtype=float)
    if np.isnan(values).all():
        return -1, float("nan")
    k = int(np.nanargmax(values))
    return k, float(values[k])


@dataclass
class Candidate:
    """One fitted basis and its per-sample relevance on the validation and test splits."""

    layer: str
    n_subspaces: int
    relevance_val: np.ndarray  # N_val x K
    relevance_test: np.ndarray  # N_test x K
    residue_val: np.ndarray | None = None  # N_val: layer relevance outside the subspaces
    residue_test: np.ndarray | None = None


def flag_level(threshold: float, base_rate: float) -> float:
    """The test AP_attribute a subspace must reach to be flagged: ``threshold`` where the
    attribute's base rate is 0.5 (balanced test splits, where every default was chosen),
    and the same lift over chance elsewhere, base + (1 - base)(2 threshold - 1). An
    absolute AP would flag a value most samples carry by its base rate alone (Adult's
    "White", base 0.86) and miss a strong signal for a value a quarter of them carry."""
    return base_rate + (1.0 - base_rate) * (2.0 * threshold - 1.0)


def is_flagged(ap: Metric, threshold: float) -> bool:
    """Whether an AP_attribute clears :func:`flag_level` at its own base rate."""
    return bool(ap.value >= flag_level(threshold, ap.base_rate))


def audit_attribute(
    attribute: str,
    value: str,
    candidates: list[Candidate],
    val: AuditSamples,
    test: AuditSamples,
    *,
    score: str = "share",
    threshold: float = 0.8,
    resamples: int = 0,
    seed: int = 0,
) -> list[AttributeAudit]:
    """One table per layer for one attribute value.

    Per layer, K and the flagged subspace are chosen on the validation split; the table
    and the flag decision use the test split, so the reported AP is not inflated by the
    choice. A subspace is flagged when its test AP_attribute clears ``threshold`` as
    :func:`flag_level` adjusts it to the base rate (exactly ``threshold`` at base 0.5)."""
    by_layer: dict[str, tuple[float, Candidate, int]] = {}
    for cand in candidates:
        val_scores = concept_scores(cand.relevance_val, score, cand.residue_val)
        val_table = audit_table(val_scores, cand.relevance_val, val)
        k, ap = best_subspace(val_table)
        best = by_layer.get(cand.layer)
        if best is None or np.nan_to_num(ap, nan=-1.0) > np.nan_to_num(best[0], nan=-1.0):
            by_layer[cand.layer] = (ap, cand, k)
    audits = []
    for layer, (val_ap, cand, k) in by_layer.items():
        table = audit_table(
            concept_scores(cand.relevance_test, score, cand.residue_test),
            cand.relevance_test,
            test,
            resamples=resamples,
            seed=seed,
        )
        flagged = k if k >= 0 and is_flagged(table[k].ap_attribute, threshold) else -1
        audits.append(
            AttributeAudit(
                attribute=attribute,
                value=value,
                layer=layer,
                n_subspaces=cand.n_subspaces,
                subspaces=table,
                flagged_subspace=flagged,
                selection_ap=val_ap,
            )
        )
    return audits


def summarise_attributes(
    attributes: Sequence[str],
    audits: Sequence[AttributeAudit],
    *,
    removed: Callable[[str], list[AttributeAudit]],
    basis_of: Callable[[AttributeAudit], object],
) -> list[AttributeSummary]:
    """One :class:`~cnp_core.results.AttributeSummary` per attribute and layer, from the
    value tables in ``audits``.

    ``removed(attribute)``: the tables whose flagged subspaces CNP removes together
    (:meth:`cnp_core.concepts.ConceptAudit.flagged`); ``basis_of(table)``: the fitted basis
    a table reads (:meth:`~cnp_core.concepts.ConceptAudit.concept_of`), compared by
    identity: two values share a subspace only when they read the same basis object.
    """
    summaries = []
    for attribute in attributes:
        tables = [a for a in audits if a.attribute == attribute]
        cut = removed(attribute)
        for layer in dict.fromkeys(a.layer for a in tables):  # layers in audit order
            at_layer = [a for a in tables if a.layer == layer]
            summaries.append(
                AttributeSummary(
                    attribute=attribute,
                    layer=layer,
                    values=[_value_summary(a) for a in at_layer],
                    shared=[
                        s for s in _group(at_layer, _best_index, basis_of) if len(s.values) >= 2
                    ],
                    removed=_group(
                        [a for a in cut if a.layer == layer],
                        lambda a: a.flagged_subspace,
                        basis_of,
                    ),
                )
            )
    return summaries


def _best_index(audit: AttributeAudit) -> int:
    return best_subspace(audit.subspaces)[0]


def _value_summary(audit: AttributeAudit) -> ValueSummary:
    k = _best_index(audit)
    nan = float("nan")
    return ValueSummary(
        value=audit.value,
        n_subspaces=audit.n_subspaces,
        best_subspace=k,
        ap_attribute=audit.subspaces[k].ap_attribute if k >= 0 else Metric(nan, nan, nan),
        flagged_subspace=audit.flagged_subspace,
    )


def _group(
    tables: list[AttributeAudit],
    index_of: Callable[[AttributeAudit], int],
    basis_of: Callable[[AttributeAudit], object],
) -> list[SubspaceValues]:
    """The distinct (basis, index) the tables point at, each with its values, in order."""
    grouped: dict[tuple[int, int], SubspaceValues] = {}
    for table in tables:
        k = index_of(table)
        if k < 0:
            continue
        key = (id(basis_of(table)), k)
        if key not in grouped:
            grouped[key] = SubspaceValues(table.n_subspaces, k, [])
        grouped[key].values.append(table.value)
    return list(grouped.values())


def format_table(audit: AttributeAudit) -> str:
    """A plain-text rendering of one audit table (base rates in parentheses)."""
    title = (
        f"{audit.attribute}={audit.value} at {audit.layer}, K={audit.n_subspaces}; "
        f"flagged: {'S' + str(audit.flagged_subspace + 1) if audit.flagged_subspace >= 0 else 'none'}"
    )
    header = f"{'':4}{'mean R':>9}" + "".join(f"{short:>15}" for _, _, short in AP_COLUMNS)
    lines = [title, header]
    for row in audit.subspaces:
        mark = "*" if row.index == audit.flagged_subspace else " "
        cells = "".join(
            f"{getattr(row, field).value:>8.3f} ({getattr(row, field).base_rate:.2f})"
            for field, _, _ in AP_COLUMNS
        )
        lines.append(f"S{row.index + 1}{mark} {row.mean_relevance:>9.3g}{cells}")
    return "\n".join(lines)


def format_summary(summary: AttributeSummary) -> str:
    """A plain-text rendering of one attribute summary: per value its best subspace (test
    AP_attribute [95 % CI]) and flag, then the shared and the removed subspaces."""

    def name(k: int, n_subspaces: int) -> str:
        return f"S{k + 1} of K={n_subspaces}" if k >= 0 else "none"

    def listed(items: list[SubspaceValues]) -> str:
        return "; ".join(f"{name(u.index, u.n_subspaces)} for {', '.join(u.values)}" for u in items)

    lines = [f"{summary.attribute} at {summary.layer}: {len(summary.values)} values, one-vs-rest"]
    for v in summary.values:
        ap = v.ap_attribute
        flag = (
            "flagged"
            if v.best_is_flagged
            else f"flagged: {name(v.flagged_subspace, v.n_subspaces)}"
        )
        lines.append(
            f"  {v.value}: best {name(v.best_subspace, v.n_subspaces)}, AP_A {ap.value:.3f} "
            f"[{ap.ci_low:.3f}, {ap.ci_high:.3f}] (base {ap.base_rate:.2f}), {flag}"
        )
    lines.append(f"  one subspace for several values: {listed(summary.shared) or 'none'}")
    lines.append(f"  CNP removes: {listed(summary.removed) or 'nothing at this layer'}")
    return "\n".join(lines)
