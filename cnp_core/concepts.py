"""The concept sequence: collect -> fit -> score -> audit -> flag (ALGORITHMS.md 1-3).

:func:`learn_concepts` runs it for one audit spec on a model and a dataset, and returns
a :class:`ConceptAudit`: the fitted concepts and the audit table of every attribute
value, with the flagged subspace. The pipeline, CNP's relearning loop and the experiment
runner all call it, so a concept is learned, scored and flagged one way.

1. collect: activations and LRP contexts at the audited layers, explaining the positive
   class, at ``positions_per_image`` seeded positions (a dense layer, such as an MLP's
   hidden layer over a table, has one per sample) of each training image (of the
   positive class for unsupervised methods, of both audited classes for supervised ones);
2. fit: one basis per K (unsupervised), or one direction per attribute value (supervised),
   with the method the spec names (:mod:`cnp_core.methods`);
3. score: R_k(x) over all positions of every validation and test image;
4. audit and flag: per attribute value and layer, K and the flagged subspace chosen on
   validation, the table and the flag read on test (:func:`cnp_core.audit.audit_attribute`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .audit import AuditSamples, Candidate, audit_attribute
from .collect import Instances, ScoredImages, collect_instances, collect_relevance
from .data import ImageTable, SplitRows, make_loader
from .devices import compute_device
from .errors import Cancelled, DatasetError
from .lrp import Explainer
from .methods import ConceptMethod, concept_method, fit_subspaces
from .pruning.projection import Projection, union_projection
from .results import AttributeAudit, class_label, class_name
from .spec import AuditSpec
from .stages import StepCallback
from .subspaces import ConceptBasis

# An audit needs the subspaces, not the last 1e-7 of J: DRSA stops once J gains less than
# this (relative) over its convergence window. Measured on the 64 px benchmark: layer3,
# K = 8 converges in about 160 epochs instead of running to the epoch cap.
DRSA_AUDIT_TOL = 1e-4


@dataclass
class FittedConcept:
    """A basis fitted at one layer. ``key`` is the (attribute, value) a supervised
    method's direction was fitted for; None for an unsupervised basis, which serves every
    attribute."""

    layer: str
    basis: ConceptBasis
    key: tuple[str, str] | None = None

    def serves(self, attribute: str, value: str) -> bool:
        return self.key in (None, (attribute, value))


@dataclass
class ConceptAudit:
    """Every fitted concept and the audit tables computed from them."""

    concepts: list[FittedConcept]
    audits: list[AttributeAudit]

    def concept_of(self, audit: AttributeAudit) -> FittedConcept:
        """The concept an audit table was computed from."""
        for concept in self.concepts:
            if (
                concept.layer == audit.layer
                and concept.basis.n_subspaces == audit.n_subspaces
                and concept.serves(audit.attribute, audit.value)
            ):
                return concept
        raise KeyError((audit.attribute, audit.value, audit.layer))

    def flagged(self, attribute: str) -> list[AttributeAudit]:
        """The tables of ``attribute`` that flagged a subspace, at the first layer that
        flagged one (one per value of a multi-valued attribute)."""
        flagged = [a for a in self.audits if a.attribute == attribute and a.flagged_subspace >= 0]
        return [a for a in flagged if a.layer == flagged[0].layer]

    def projection(self, attribute: str) -> Projection | None:
        """P removing the union of the subspaces flagged for ``attribute`` (see
        :meth:`flagged`), or None when the audit flagged none."""
        chosen = self.flagged(attribute)
        if not chosen:
            return None
        return union_projection(
            chosen[0].layer,
            [self.concept_of(a).basis.subspace(a.flagged_subspace) for a in chosen],
        )


def context_composite(spec: AuditSpec) -> str:
    """The LRP rules of the contexts: the spec's, else the concept method's own."""
    return spec.composite or concept_method(spec.method).composite


def class_pair(spec: AuditSpec, labels: np.ndarray) -> np.ndarray:
    """Rows of the audited classes: the positive and the negative class, or every class."""
    if spec.negative_class >= 0:
        return (labels == spec.positive_class) | (labels == spec.negative_class)
    return np.ones_like(labels, dtype=bool)


def subsample(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``rows``, drawn with ``seed``, in ascending order."""
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))


def learn_concepts(
    model: torch.nn.Module,
    table: ImageTable,
    splits: SplitRows,
    spec: AuditSpec,
    *,
    stage: Callable[[str, str], None] | None = None,
    within: StepCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> ConceptAudit:
    """Fit the concepts of ``spec`` at ``spec.layers`` and audit ``spec.attributes``.

    ``stage(name, message)`` is called as the sequence enters collect, fit, score and
    audit; ``within`` reports progress inside the collect and score passes.
    """
    method = concept_method(spec.method)
    stage = stage or (lambda name, message: None)
    pair = class_pair(spec, table.labels)
    positive = table.labels == spec.positive_class

    def loader(rows: np.ndarray):
        return make_loader(table.samples(rows, spec.dataset), spec.batch_size)

    stage("collect", "collecting activations and LRP contexts")
    fit_mask = pair if method.supervised else positive
    fit_rows = subsample(splits.train[fit_mask[splits.train]], spec.fit_images, spec.seed)
    if len(fit_rows) == 0:
        positive = class_label(
            spec.positive_class, class_name(table.class_names, spec.positive_class)
        )
        raise DatasetError(f"no training images of {positive} to fit subspaces on")
    composite = context_composite(spec)
    device = compute_device(spec.device)
    with Explainer(model, spec.layers, composite, device=device) as explainer:
        instances = collect_instances(
            explainer,
            loader(fit_rows),
            spec.positive_class,
            per_image=spec.positions_per_image,
            seed=spec.seed,
            cancelled=cancelled,
            progress=within,
        )

        stage("fit", f"fitting {spec.method} subspaces")
        concepts = [
            concept
            for layer, found in instances.items()
            for concept in _fit(spec, method, table, layer, found, device, cancelled)
        ]

        stage("score", "scoring validation and test images")
        audited = np.concatenate([splits.val, splits.test])
        scored = collect_relevance(
            explainer,
            loader(audited[pair[audited]]),
            spec.positive_class,
            {layer: [c.basis.basis for c in items] for layer, items in _by_layer(concepts).items()},
            cancelled=cancelled,
            progress=within,
        )

    stage("audit", "computing the audit tables")
    return ConceptAudit(concepts, _audit(spec, table, splits, scored, concepts))


def _fit(
    spec: AuditSpec,
    method: ConceptMethod,
    table: ImageTable,
    layer: str,
    found: Instances,
    device: torch.device,
    cancelled: Callable[[], bool] | None,
) -> list[FittedConcept]:
    """Unsupervised: one basis per K on the instances. Supervised: one direction per
    audited attribute value, on one pooled activation per image."""
    if method.supervised:
        pooled, image_ids = _pool_per_image(found)
        concepts = []
        for attribute in spec.attributes:
            for value, present in table.audited_values(attribute):
                target = present[image_ids]
                if target.all() or not target.any():
                    raise DatasetError(
                        f"{spec.method} for {attribute}={value} needs training images with and "
                        "without it in the audited classes"
                    )
                basis = fit_subspaces(spec.method, pooled, None, 1, spec.seed, target=target)
                concepts.append(FittedConcept(layer, basis, (attribute, value)))
        return concepts
    concepts = []
    for k in spec.n_subspaces:
        if cancelled is not None and cancelled():
            raise Cancelled("the job was cancelled")
        basis = fit_subspaces(
            spec.method,
            found.activations,
            found.contexts,
            k,
            spec.seed,
            device=device,
            restarts=spec.drsa_restarts,
            max_epochs=spec.drsa_max_epochs,
            tol=DRSA_AUDIT_TOL,
        )
        concepts.append(FittedConcept(layer, basis))
    return concepts


def _by_layer(concepts: list[FittedConcept]) -> dict[str, list[FittedConcept]]:
    """Concepts per layer, in fit order: position j there is the scoring pass's key."""
    grouped: dict[str, list[FittedConcept]] = {}
    for concept in concepts:
        grouped.setdefault(concept.layer, []).append(concept)
    return grouped


def _pool_per_image(found: Instances) -> tuple[np.ndarray, np.ndarray]:
    """Mean activation of each image's sampled positions: one training vector per image."""
    ids, inverse = np.unique(found.image_ids, return_inverse=True)
    pooled = np.zeros((len(ids), found.activations.shape[1]))
    np.add.at(pooled, inverse, found.activations)
    return pooled / np.bincount(inverse)[:, None], ids


def _audit(
    spec: AuditSpec,
    table: ImageTable,
    splits: SplitRows,
    scored: ScoredImages,
    concepts: list[FittedConcept],
) -> list[AttributeAudit]:
    position = {int(i): n for n, i in enumerate(scored.image_ids)}
    val_rows = np.array([position[i] for i in splits.val if int(i) in position], dtype=int)
    test_rows = np.array([position[i] for i in splits.test if int(i) in position], dtype=int)
    val_ids, test_ids = scored.image_ids[val_rows], scored.image_ids[test_rows]
    labels = table.labels
    audits = []
    for attribute in spec.attributes:
        for value, present in table.audited_values(attribute):
            candidates = [
                Candidate(
                    layer,
                    concept.basis.n_subspaces,
                    scored.relevance[(layer, j)][val_rows],
                    scored.relevance[(layer, j)][test_rows],
                    scored.residue(layer, j)[val_rows],
                    scored.residue(layer, j)[test_rows],
                )
                for layer, items in _by_layer(concepts).items()
                for j, concept in enumerate(items)
                if concept.serves(attribute, value)
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
