"""The concept projection of CNP: P = I - U_s U_s^T after the audited layer.

In an attribution copy P sits right after the layer as a bias-free 1x1 convolution with
the Epsilon rule (ALGORITHMS.md section 4), so the relevance that reached the decision
through the removed subspace is zero; in a deployed model it is folded exactly into the
layers that read the audited layer (W' = W P over input channels, section 5).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from zennit.core import collect_leaves

from ..errors import InvalidSpec, LayerError

# Stabiliser of the Epsilon rule on the projection: small, because P x can be ~0 where
# the relevance above is ~0 too.
PROJECTION_EPSILON = 1e-6


@dataclass
class Projection:
    """P = I - sum_{k in flagged} U_k U_k^T, applied to the output of ``layer`` (d x d).

    A union of flagged subspaces (several attribute values) is one projection: pass
    ``ConceptBasis.complement_projector(ks)`` of all of them.
    """

    layer: str
    matrix: np.ndarray

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        if self.matrix.ndim != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
            raise InvalidSpec(f"a projection is a square d x d matrix, got {self.matrix.shape}")

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]


class ConceptProjection(nn.Conv2d):
    """Bias-free 1x1 convolution x -> P x over channels (also accepts N x d inputs).

    A type of its own so that the composite can give it the Epsilon rule: P has negative
    entries, so the z+ rule of the surrounding convolutions would be wrong for it.
    """

    def __init__(self, matrix: np.ndarray):
        d = matrix.shape[0]
        super().__init__(d, d, kernel_size=1, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.as_tensor(matrix, dtype=torch.float32)[:, :, None, None])
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return nn.functional.linear(x, self.weight.flatten(1))
        return super().forward(x)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise LayerError(f"unknown layer {name!r} for the concept projection")
    parent, _, attr = name.rpartition(".")
    return modules[parent], attr


def insert_projection(model: nn.Module, projection: Projection) -> nn.Module:
    """Put P right after ``projection.layer`` (module replaced by Sequential(layer, P)), in place.

    Only for attribution copies: names below the layer change. Refuses a layer followed
    directly by a BatchNorm, which zennit would merge into P instead of the layer.
    """
    parent, attr = _parent(model, projection.layer)
    layer = getattr(parent, attr)
    # P on the model's device: it is a new module, built on the CPU
    device = next(model.parameters(), torch.empty(0)).device
    projected = ConceptProjection(projection.matrix).to(device)
    setattr(parent, attr, nn.Sequential(layer, projected))
    leaves = list(collect_leaves(model))
    for before, after in zip(leaves, leaves[1:], strict=False):
        if isinstance(before, ConceptProjection) and isinstance(after, _BatchNorm):
            raise LayerError(
                f"layer {projection.layer!r} is followed by a BatchNorm: project after the "
                "BatchNorm or the activation instead"
            )
    return model


def projection_readers(model: nn.Module, layer: str, dim: int | None = None) -> list[nn.Module]:
    """The layers that read ``layer``'s output, into which a projection after it folds
    exactly: convolutions, or linear layers behind average pooling and flattening.
    Raises LayerError where that is not exact (e.g. a max pool reads it). ``dim``: the
    projection's width, which a linear reader must take (None: any)."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname == layer or super().is_leaf_module(m, qualname)

    _parent(model, layer)
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx refuses dynamic control flow
        raise LayerError(f"cannot trace the model to fold the projection: {err}") from None
    modules = dict(model.named_modules())
    start = next(n for n in graph.nodes if n.op == "call_module" and n.target == layer)
    passthrough = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)
    readers, todo = {}, list(start.users)
    while todo:
        node = todo.pop()
        module = modules.get(node.target) if node.op == "call_module" else None
        if (isinstance(module, nn.Conv2d) and module.groups == 1) or (
            isinstance(module, nn.Linear) and module.in_features == (dim or module.in_features)
        ):
            readers[id(module)] = module
        elif isinstance(module, passthrough) or node.target is torch.flatten:
            todo.extend(node.users)
        else:
            raise LayerError(
                f"the projection after {layer!r} cannot be folded exactly: "
                f"its output reaches {node.op} {node.target}"
            )
    return list(readers.values())


def fold_projection(model: nn.Module, projection: Projection) -> nn.Module:
    """A copy in which P is folded exactly into the layers that read ``projection.layer``:
    W' = W P over input channels, for every reader (:func:`projection_readers`)."""
    folded = copy.deepcopy(model)
    p = torch.as_tensor(projection.matrix, dtype=torch.float32)
    with torch.no_grad():
        for module in projection_readers(folded, projection.layer, projection.dim):
            w = module.weight
            module.weight.copy_(torch.einsum("oi...,ij->oj...", w, p.to(w.device, w.dtype)))
    return folded


def union_projection(layer: str, subspaces: list[np.ndarray]) -> Projection:
    """P = I - Q Q^T with Q an orthonormal basis of span(U_1, ..., U_m): removes the union
    of several flagged subspaces (e.g. one per value of a multi-valued attribute), also
    when they come from different fits and are not orthogonal to each other."""
    stacked = np.concatenate(
        [np.asarray(u, dtype=np.float64).reshape(u.shape[0], -1) for u in subspaces], 1
    )
    left, singular, _ = np.linalg.svd(stacked, full_matrices=False)
    q = left[:, singular > 1e-8 * singular.max()]
    return Projection(layer, np.eye(stacked.shape[0]) - q @ q.T)
