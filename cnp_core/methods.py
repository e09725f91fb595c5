"""Concept methods: how the activations (and LRP contexts) at a layer become a basis.

Every method is one registered function ``fit(act, ctx, n_subspaces, seed, target,
**options) -> ConceptBasis`` (see :mod:`cnp_core.subspaces`) with its properties; the
spec's choices, the CLI's and the server's capabilities are read from this table, and
:mod:`cnp_core.concepts` reads the properties to know what to collect. Add a method with
one decorated function here:

    @register("name", needs_contexts=True, description="...")
    def name(act, ctx, n_subspaces, seed, target, **options):
        ...

The module imports nothing heavy (the client reads the table without torch): each
function imports its implementation when it runs.

Options a method does not use are ignored, so the audit can pass one option set
(``device``, ``restarts``, ``max_epochs``, ``tol``) to every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidSpec


@dataclass(frozen=True)
class ConceptMethod:
    name: str
    fit: Callable[..., Any]  # (act, ctx, n_subspaces, seed, target, **options) -> ConceptBasis
    needs_contexts: bool  # fits on A and C (else on A alone)
    # Supervised: one direction per attribute value, fitted on one pooled activation per
    # training image of both audited classes with the value as the label. Unsupervised
    # methods fit K subspaces per K on positive-class instances, shared by every attribute.
    supervised: bool
    description: str
    # The LRP rules of the contexts when the spec names none: measured on the 64 px
    # benchmark, DRSA isolated the watermark on plain-gradient contexts (AP 0.95-1.00 over
    # five models) and a CAV on EpsilonPlusFlat ones (AP 0.95, gradient: 0.34).
    composite: str = "gradient"


CONCEPT_METHODS: dict[str, ConceptMethod] = {}


def register(
    name: str,
    *,
    needs_contexts: bool,
    supervised: bool = False,
    description: str = "",
    composite: str = "gradient",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add ``fit`` to :data:`CONCEPT_METHODS` under ``name``."""

    def add(fit: Callable[..., Any]) -> Callable[..., Any]:
        CONCEPT_METHODS[name] = ConceptMethod(
            name, fit, needs_contexts, supervised, description, composite
        )
        return fit

    return add


def concept_method(name: str) -> ConceptMethod:
    method = CONCEPT_METHODS.get(name)
    if method is None:
        raise InvalidSpec(
            f"unknown concept method {name!r}; use one of {', '.join(CONCEPT_METHODS)}"
        )
    return method


def fit_subspaces(
    method: str,
    act: Any,
    ctx: Any | None,
    n_subspaces: int = 4,
    seed: int = 1,
    target: Any | None = None,
    **options: Any,
) -> Any:
    """Fit concept subspaces with the registered ``method``: the one seam audits call.

    ``act``, ``ctx``: N x d (numpy or torch). ``target`` (binary, one per row) is read by
    supervised methods only, which return a single direction whatever ``n_subspaces`` is.
    """
    chosen = concept_method(method)
    if ctx is None and chosen.needs_contexts:
        raise InvalidSpec(f"method {method!r} needs LRP contexts")
    return chosen.fit(act, ctx, n_subspaces, seed, target, **options)


@register("drsa", needs_contexts=True, description="disentangled relevant subspaces (DRSA)")
def drsa(act, ctx, n_subspaces, seed, target=None, *, restarts=3, **options):
    from .subspaces import fit_drsa

    return fit_drsa(act, ctx, n_subspaces, restarts, seed, **options)


@register("prca", needs_contexts=True, description="principal relevant components (PRCA)")
def prca(act, ctx, n_subspaces, seed, target=None, **options):
    from .subspaces import fit_prca

    return fit_prca(act, ctx, n_subspaces, **_shape(options))


@register("pca", needs_contexts=False, description="principal components of the activations")
def pca(act, ctx, n_subspaces, seed, target=None, **options):
    from .subspaces import fit_pca

    return fit_pca(act, n_subspaces, ctx=ctx, **_shape(options))


@register("random", needs_contexts=False, description="random orthogonal subspaces (control)")
def random_orthogonal(act, ctx, n_subspaces, seed, target=None, **options):
    from .subspaces import fit_random

    return fit_random(act.shape[1], n_subspaces, seed, act=act, ctx=ctx, **_shape(options))


@register(
    "cav",
    needs_contexts=False,
    composite="epsilon_plus_flat",
    supervised=True,
    description="a linear probe's direction for the attribute (CAV)",
)
def cav(act, ctx, n_subspaces, seed, target=None, **options):
    from .subspaces import fit_cav

    if target is None:
        raise InvalidSpec("method 'cav' needs a binary target (the attribute) per row")
    return fit_cav(act, target, seed=seed)


def _shape(options: dict[str, Any]) -> dict[str, Any]:
    """The options the closed-form baselines take: only the subspace width."""
    return {k: v for k, v in options.items() if k == "subspace_dim"}
