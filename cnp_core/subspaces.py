"""Concept subspaces at a layer: DRSA and its baselines (ALGORITHMS.md section 2).

Every method fits activations A and LRP contexts C (N x d, rows are instances) into a
:class:`ConceptBasis`: K orthonormal column blocks U_k of width d_k. The relevance of
instance n in subspace k is R_nk = (U_k^T a_n)^T (U_k^T c_n).

DRSA [Chormai et al., TPAMI 2024] maximises, on the globally normalised data
Â = A / (rms(A) d^{1/4}) (same for C, no centering),

    J(U) = [ (1/K) sum_k ( (1/N) sum_n max(0, R_nk)^2 )^{1/4} ]^2,

a soft-max pooling over instances (p = 2) inside a soft-min over subspaces (q = 1/2),
subject to U^T U = I. Two optimisers share the closed-form gradient:

- ``published``: the published schedule, U <- polar(U + grad J) with step 1 for a fixed
  number of epochs, 3 restarts from column permutations of one Haar-random matrix.
- ``adaptive`` (default): the same restarts batched into one tensor, an adaptive step
  U <- polar(U + alpha grad J) accepted only when J increases (so J is monotone), alpha
  grown after every accepted step and halved after a rejected one, and a stop once the
  relative gain of J over a window of epochs falls below ``tol``.

Baselines with the same return type: PRCA, PCA, random orthogonal subspaces, and a
supervised CAV-style direction (a linear probe for a binary attribute).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import ortho_group

from .errors import InvalidSpec

ArrayLike = np.ndarray | torch.Tensor

# Rows per chunk when scoring or evaluating large inputs (bounded memory for N ~ 1e6).
_CHUNK_ROWS = 65_536
# Keep the projections A U, C U between evaluation and gradient while they fit this many
# float32 elements (per tensor); beyond it they are recomputed chunk by chunk.
_CACHE_ELEMENTS = 1 << 27


# --------------------------------------------------------------------------- the basis


@dataclass
class ConceptBasis:
    """K orthonormal subspaces of R^d: ``basis[:, k, :]`` is U_k (d x d_k).

    ``objective`` is the DRSA objective J on the normalised fit data (NaN where it does
    not apply); ``info`` records how the fit went (epochs, restarts, timings).
    """

    basis: np.ndarray
    objective: float
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.basis = np.asarray(self.basis, dtype=np.float64)
        if self.basis.ndim != 3:
            raise InvalidSpec(f"a concept basis is d x K x d_k, got shape {self.basis.shape}")

    @property
    def dim(self) -> int:
        """d, the dimension of the activation space."""
        return self.basis.shape[0]

    @property
    def n_subspaces(self) -> int:
        """K."""
        return self.basis.shape[1]

    @property
    def subspace_dim(self) -> int:
        """d_k."""
        return self.basis.shape[2]

    @property
    def flat(self) -> np.ndarray:
        """U = [U_1 ... U_K] as one d x K*d_k matrix with orthonormal columns."""
        return self.basis.reshape(self.dim, -1)

    def subspace(self, k: int) -> np.ndarray:
        """U_k, d x d_k."""
        return self.basis[:, k, :]

    def projector(self, k: int) -> np.ndarray:
        """U_k U_k^T (d x d): the orthogonal projection onto subspace k."""
        u = self.subspace(k)
        return u @ u.T

    def complement_projector(self, ks: int | list[int] | tuple[int, ...]) -> np.ndarray:
        """I - sum_{k in ks} U_k U_k^T: what CNP inserts after the layer to remove concepts."""
        ks = [ks] if isinstance(ks, int) else list(ks)
        out = np.eye(self.dim)
        for k in ks:
            out -= self.projector(k)
        return out

    def relevance(
        self,
        act: ArrayLike,
        ctx: ArrayLike,
        *,
        chunk_rows: int = _CHUNK_ROWS,
        dtype: torch.dtype | None = None,
    ) -> np.ndarray:
        """R_nk = (U_k^T a_n)^T (U_k^T c_n) for raw (unnormalised) rows, as an N x K array.

        Computed with torch in chunks of rows on the device of ``act`` (so N ~ 1e6 rows
        stream through bounded memory), in ``dtype`` (default: float64 if both inputs
        are float64, else float32).
        """
        a, c = _as_tensor(act), _as_tensor(ctx)
        _check_pair(a, c, self.dim)
        if dtype is None:
            dtype = torch.float64 if a.dtype == c.dtype == torch.float64 else torch.float32
        u = torch.as_tensor(self.flat, dtype=dtype, device=a.device)
        out = np.empty((a.shape[0], self.n_subspaces), dtype=np.float64)
        for start in range(0, a.shape[0], chunk_rows):
            stop = start + chunk_rows
            pa = a[start:stop].to(dtype=dtype) @ u
            pc = c[start:stop].to(device=a.device, dtype=dtype) @ u
            r = (pa * pc).unflatten(-1, (self.n_subspaces, self.subspace_dim)).sum(-1)
            out[start:stop] = r.double().cpu().numpy()
        return out


# ------------------------------------------------------------------ shared helpers


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    """A torch view of ``x`` (no copy for numpy arrays or tensors), detached."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.from_numpy(np.ascontiguousarray(x))


def _check_pair(a: torch.Tensor, c: torch.Tensor | None, d: int | None = None) -> None:
    if a.ndim != 2:
        raise InvalidSpec(f"activations must be N x d, got shape {tuple(a.shape)}")
    if c is not None and tuple(c.shape) != tuple(a.shape):
        raise InvalidSpec(
            f"activations {tuple(a.shape)} and contexts {tuple(c.shape)} differ in shape"
        )
    if d is not None and a.shape[1] != d:
        raise InvalidSpec(f"inputs have {a.shape[1]} features, the basis has {d}")
    if a.shape[0] == 0:
        raise InvalidSpec("no instances to fit or score")


def _layout(d: int, n_subspaces: int, subspace_dim: int | None) -> tuple[int, int]:
    """(K, d_k) with K * d_k <= d; d_k defaults to d // K."""
    if n_subspaces < 1:
        raise InvalidSpec(f"n_subspaces must be >= 1, got {n_subspaces}")
    dk = d // n_subspaces if subspace_dim is None else int(subspace_dim)
    if dk < 1 or n_subspaces * dk > d:
        raise InvalidSpec(f"{n_subspaces} subspaces of dimension {dk} do not fit in {d} dimensions")
    return n_subspaces, dk


def _normaliser(x: torch.Tensor) -> float:
    """1 / (rms(x) d^{1/4}): the global DRSA normalisation (no centering)."""
    ms = 0.0
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        ms += float(x[start : start + _CHUNK_ROWS].double().pow(2).sum())
    rms = math.sqrt(ms / x.numel())
    if not math.isfinite(rms) or rms == 0.0:
        raise InvalidSpec("activations or contexts are all zero or not finite")
    return 1.0 / (rms * x.shape[1] ** 0.25)


def _to_basis(u: np.ndarray, n_subspaces: int, dk: int) -> np.ndarray:
    """d x K*d_k columns -> d x K x d_k blocks."""
    return np.ascontiguousarray(u[:, : n_subspaces * dk]).reshape(u.shape[0], n_subspaces, dk)


def objective(basis: ConceptBasis | np.ndarray, act: ArrayLike, ctx: ArrayLike) -> float:
    """J(U) of ALGORITHMS section 2 on the normalised data, in float64.

    J = [ (1/K) sum_k ( mean_n max(0, R_nk)^2 )^{1/4} ]^2 with R on Â, Ĉ.
    """
    b = basis if isinstance(basis, ConceptBasis) else ConceptBasis(basis, float("nan"), "")
    a, c = _as_tensor(act), _as_tensor(ctx)
    _check_pair(a, c, b.dim)
    scale = _normaliser(a) * _normaliser(c)
    r = b.relevance(a, c, dtype=torch.float64) * scale
    return _objective_from_relevance(torch.from_numpy(r)).item()


def _objective_from_relevance(r: torch.Tensor) -> torch.Tensor:
    """J from R (... x N x K): power means over instances (p=2), then subspaces (q=1/2)."""
    s = torch.relu(r).pow(2).mean(dim=-2).sqrt()  # soft-max pooling over n
    return s.sqrt().mean(dim=-1).pow(2)  # soft-min pooling over k


def _order_by_relevance(basis: np.ndarray, a: torch.Tensor, c: torch.Tensor) -> np.ndarray:
    """Permute the K blocks by mean relevance on (a, c), descending."""
    mean_r = ConceptBasis(basis, float("nan"), "").relevance(a, c).mean(axis=0)
    return basis[:, np.argsort(-mean_r, kind="stable"), :]


def _resolve_device(device: str | torch.device | None, a: torch.Tensor) -> torch.device:
    return torch.device(device) if device is not None else a.device


# ------------------------------------------------------------------------------ DRSA


def haar_restarts(d: int, width: int, restarts: int, seed: int) -> np.ndarray:
    """Initial bases (restarts x d x width): column subsets, in random order, of one
    Haar-random orthogonal d x d matrix, as in the published DRSA code."""
    rng = np.random.default_rng(seed)
    q = ortho_group.rvs(d, random_state=rng) if d > 1 else np.ones((1, 1))
    return np.stack([q[:, rng.permutation(d)[:width]] for _ in range(restarts)])


def polar(m: torch.Tensor) -> torch.Tensor:
    """polar(M) = M (M^T M)^{-1/2}, batched over leading dims, computed in float64.

    The nearest matrix with orthonormal columns to M (Hyvärinen et al., ICA, eq. 6.37).
    """
    m64 = m.double()
    evals, evecs = torch.linalg.eigh(m64.mT @ m64)
    inv_sqrt = (evecs * evals.clamp_min(1e-300).rsqrt().unsqueeze(-2)) @ evecs.mT
    return m64 @ inv_sqrt


class _DrsaProblem:
    """Â, Ĉ on the compute device, and J and its closed-form gradient for a batch of U.

    With s_k = (mean_n R+_nk^2)^{1/2} and M = (1/K) sum_j s_j^{1/2} (so J = M^2; note
    s_k is the *root* mean square, which is what makes w below the exact gradient):
        w_nk = (M/K) s_k^{-3/2} R+_nk / N,   dJ/dU_k = (S_k + S_k^T) U_k,
        S_k = Â^T diag(w_.k) Ĉ,
    evaluated as Â^T (w ⊙ Ĉ U_k) + Ĉ^T (w ⊙ Â U_k) without forming the d x d S_k.
    """

    def __init__(
        self,
        a: torch.Tensor,
        c: torch.Tensor,
        n_subspaces: int,
        dk: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # float32 matmuls (the bulk of the work); the retraction runs in float64.
        self.a = a.to(device=device, dtype=dtype) * _normaliser(a)
        self.c = c.to(device=device, dtype=dtype) * _normaliser(c)
        self.dtype = dtype
        self.n, self.d = self.a.shape
        self.k, self.dk = n_subspaces, dk
        self.device = device

    def _chunks(self, batch: int) -> list[slice]:
        rows = max(1, min(self.n, _CACHE_ELEMENTS // max(1, batch * self.k * self.dk)))
        return [slice(s, s + rows) for s in range(0, self.n, rows)]

    def evaluate(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        """J (B,), R (B x N x K) and the cached projections (or None when too large)."""
        chunks = self._chunks(u.shape[0])
        cache, rs = [], []
        for sl in chunks:
            pa, pc = self.a[sl] @ u, self.c[sl] @ u  # B x n x K*d_k
            rs.append((pa * pc).unflatten(-1, (self.k, self.dk)).sum(-1))
            if len(chunks) == 1:
                cache.append((pa, pc))
        r = torch.cat(rs, dim=1)
        return _objective_from_relevance(r.double()), r, (cache or None)

    def gradient(self, u: torch.Tensor, r: torch.Tensor, cache: list | None) -> torch.Tensor:
        """dJ/dU (B x d x K*d_k) at u, given R (and the projections) at u."""
        r64 = torch.relu(r.double())
        s = r64.pow(2).mean(dim=1).sqrt().clamp_min(1e-30)  # B x K
        m = s.sqrt().mean(dim=-1, keepdim=True)  # B x 1
        w = ((m / self.k) * s.pow(-1.5)).unsqueeze(1) * r64 / self.n  # B x N x K
        w = w.to(self.dtype)
        grad = torch.zeros_like(u)
        for i, sl in enumerate(self._chunks(u.shape[0])):
            pa, pc = cache[i] if cache is not None else (self.a[sl] @ u, self.c[sl] @ u)
            wk = w[:, sl, :].unsqueeze(-1)
            wpc = (pc.unflatten(-1, (self.k, self.dk)) * wk).flatten(-2)
            wpa = (pa.unflatten(-1, (self.k, self.dk)) * wk).flatten(-2)
            grad += self.a[sl].T @ wpc + self.c[sl].T @ wpa
        return grad


def _optimise_published(
    prob: _DrsaProblem, u0: torch.Tensor, max_epochs: int, **_: Any
) -> tuple[torch.Tensor, dict]:
    """The published rule, one restart after the other: U <- polar(U + grad J), step 1."""
    finals = []
    for b in range(u0.shape[0]):
        u = u0[b : b + 1].double()
        for _epoch in range(max_epochs):
            u32 = u.to(prob.dtype)
            _, r, cache = prob.evaluate(u32)
            u = polar(u + prob.gradient(u32, r, cache).double())
        finals.append(u)
    return torch.cat(finals), {"epochs": [max_epochs] * u0.shape[0]}


def _optimise_adaptive(
    prob: _DrsaProblem,
    u0: torch.Tensor,
    max_epochs: int,
    *,
    tol: float = 1e-7,
    window: int = 10,
    step: float = 1.0,
    grow: float = 2.0,
    max_step: float = 1e12,
    max_backtracks: int = 30,
) -> tuple[torch.Tensor, dict]:
    """All restarts at once: U <- polar(U + alpha grad J), accepted only if J increases.

    alpha (one per restart) starts at ``step``, is multiplied by ``grow`` after an
    accepted step (up to ``max_step``) and halved after a rejected one. Large alpha
    turns the update into U <- polar(grad J), the generalised power method for convex
    objectives on the Stiefel manifold (Journée et al., JMLR 2010), which is what makes
    it fast; the monotone test keeps it safe where J is not convex. A restart stops when
    J rose by less than ``tol`` (relative) over its last ``window`` accepted epochs, after
    ``max_epochs`` accepted epochs, or when ``max_backtracks`` halvings in a row fail.
    """
    u = u0.double().clone()
    batch = u.shape[0]
    alpha = torch.full((batch,), float(step), dtype=torch.float64, device=u.device)
    active = torch.ones(batch, dtype=torch.bool, device=u.device)
    epochs, fails = [0] * batch, [0] * batch
    j, r, cache = prob.evaluate(u.to(prob.dtype))
    grad = prob.gradient(u.to(prob.dtype), r, cache).double()
    history = [[float(x)] for x in j]
    evaluations = 1
    while bool(active.any()):
        idx = active.nonzero().squeeze(1)
        trial = polar(u[idx] + alpha[idx, None, None] * grad[idx])
        j_new, r_new, cache_new = prob.evaluate(trial.to(prob.dtype))
        evaluations += 1
        better = j_new > j[idx]  # False for NaN, so a degenerate trial is rejected
        alpha[idx] = torch.where(better, (alpha[idx] * grow).clamp(max=max_step), alpha[idx] / 2)
        if bool(better.any()):
            sub = better.nonzero().squeeze(1)
            acc = idx[sub]
            u[acc], j[acc] = trial[sub], j_new[sub]
            sub_cache = None if cache_new is None else [(pa[sub], pc[sub]) for pa, pc in cache_new]
            grad[acc] = prob.gradient(trial[sub].to(prob.dtype), r_new[sub], sub_cache).double()
        for pos, b in enumerate(idx.tolist()):
            if bool(better[pos]):
                epochs[b], fails[b] = epochs[b] + 1, 0
                history[b].append(float(j[b]))
            else:
                fails[b] += 1
            h = history[b]
            stalled = len(h) > window and h[-1] - h[-1 - window] <= tol * abs(h[-1])
            if stalled or epochs[b] >= max_epochs or fails[b] > max_backtracks:
                active[b] = False
    return u, {"epochs": epochs, "evaluations": evaluations}


# Options of the adaptive optimiser; the published rule has none and ignores them.
_ADAPTIVE_OPTIONS = {"tol", "window", "step", "grow", "max_step", "max_backtracks"}
_OPTIMISERS: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "adaptive": _optimise_adaptive,
    "published": _optimise_published,
}


def fit_drsa(
    act: ArrayLike,
    ctx: ArrayLike,
    n_subspaces: int = 4,
    restarts: int = 3,
    seed: int = 1,
    *,
    subspace_dim: int | None = None,
    optimizer: str = "adaptive",
    max_epochs: int = 2500,
    device: str | torch.device | None = None,
    **options: Any,
) -> ConceptBasis:
    """Disentangled relevant subspaces: argmax_U J(U) s.t. U^T U = I (ALGORITHMS section 2).

    A, C are N x d (numpy or torch); U has K blocks of d_k = ``subspace_dim`` (default
    d // K). ``optimizer``: "adaptive" (default; options ``tol``, ``window``, ``step``,
    ``grow``, ``max_step``, ``max_backtracks``, see :func:`_optimise_adaptive`) or
    "published" (the published rule for exactly ``max_epochs`` epochs). Both start from
    the same seeded restarts (:func:`haar_restarts`) and keep the restart with the best
    J; ``device`` defaults to that of ``act``. Subspaces are returned by mean relevance
    on the fit data, descending; ``objective`` is J of the returned basis.
    """
    if optimizer not in _OPTIMISERS:
        raise InvalidSpec(f"unknown DRSA optimizer {optimizer!r}; use one of {sorted(_OPTIMISERS)}")
    unknown = set(options) - _ADAPTIVE_OPTIONS
    if unknown:
        raise InvalidSpec(
            f"unknown DRSA options {sorted(unknown)}; known: {sorted(_ADAPTIVE_OPTIONS)}"
        )
    if restarts < 1 or max_epochs < 0:
        raise InvalidSpec("restarts must be >= 1 and max_epochs >= 0")
    a, c = _as_tensor(act), _as_tensor(ctx)
    _check_pair(a, c)
    k, dk = _layout(a.shape[1], n_subspaces, subspace_dim)
    dev = _resolve_device(device, a)
    prob = _DrsaProblem(a, c, k, dk, dev)
    u0 = torch.as_tensor(haar_restarts(prob.d, k * dk, restarts, seed), device=dev)
    started = time.perf_counter()
    u, info = _OPTIMISERS[optimizer](prob, u0, max_epochs, **options)
    info["seconds"] = time.perf_counter() - started
    # Select the best restart with the shared float64 objective, so that every method's
    # J is the same number for the same basis.
    cands = [_to_basis(u[b].cpu().numpy(), k, dk) for b in range(u.shape[0])]
    scores = [objective(x, a, c) for x in cands]
    best = int(np.argmax(scores))
    basis = _order_by_relevance(cands[best], a, c)
    info.update(optimizer=optimizer, restart_objectives=scores, best_restart=best)
    return ConceptBasis(basis, scores[best], "drsa", info)


def fit_drsa_published(
    act: ArrayLike,
    ctx: ArrayLike,
    n_subspaces: int = 4,
    restarts: int = 3,
    seed: int = 1,
    **options,
) -> ConceptBasis:
    """DRSA with the published update rule (see :func:`fit_drsa`, ``optimizer="published"``)."""
    return fit_drsa(act, ctx, n_subspaces, restarts, seed, optimizer="published", **options)


# ------------------------------------------------------------------------ baselines


def _gram(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """x^T y / N in float64, accumulated over chunks of rows."""
    out = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        sl = slice(start, start + _CHUNK_ROWS)
        out += x[sl].double().T @ y[sl].to(x.device).double()
    return (out / x.shape[0]).cpu().numpy()


def _top_eigenvectors(sym: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``width`` eigenvectors of a symmetric matrix with the largest algebraic
    eigenvalues, in descending order of eigenvalue."""
    evals, evecs = np.linalg.eigh(sym)
    order = np.argsort(-evals, kind="stable")[:width]
    return evecs[:, order], evals[order]


def _finish(
    u: np.ndarray,
    k: int,
    dk: int,
    method: str,
    a: torch.Tensor | None,
    c: torch.Tensor | None,
    info: dict[str, Any],
) -> ConceptBasis:
    """Blocks, ordered by mean relevance when contexts are given, with J where defined."""
    basis = _to_basis(u, k, dk)
    if a is None or c is None:
        return ConceptBasis(basis, float("nan"), method, info)
    _check_pair(a, c, basis.shape[0])
    basis = _order_by_relevance(basis, a, c)
    return ConceptBasis(basis, objective(basis, a, c), method, info)


def fit_prca(
    act: ArrayLike,
    ctx: ArrayLike,
    n_subspaces: int = 4,
    *,
    subspace_dim: int | None = None,
    **_: Any,
) -> ConceptBasis:
    """PRCA: the top K*d_k eigenvectors (largest algebraic eigenvalues) of the uncentered
    (A^T C + C^T A) / N, split into K blocks of d_k.

    The mean relevance of block k is the sum of its eigenvalues / 2, so eigenvalue order
    is also mean-relevance order.
    """
    a, c = _as_tensor(act), _as_tensor(ctx)
    _check_pair(a, c)
    k, dk = _layout(a.shape[1], n_subspaces, subspace_dim)
    cross = _gram(a, c)
    u, evals = _top_eigenvectors(cross + cross.T, k * dk)
    return _finish(u, k, dk, "prca", a, c, {"eigenvalues": evals.tolist()})


def fit_pca(
    act: ArrayLike,
    n_subspaces: int = 4,
    *,
    ctx: ArrayLike | None = None,
    subspace_dim: int | None = None,
    **_: Any,
) -> ConceptBasis:
    """PCA: the top K*d_k eigenvectors of the uncentered A^T A / N, in blocks of d_k.

    Blocks follow eigenvalue order, or mean relevance when contexts are given (which
    also gives J).
    """
    a = _as_tensor(act)
    _check_pair(a, None)
    c = None if ctx is None else _as_tensor(ctx)
    k, dk = _layout(a.shape[1], n_subspaces, subspace_dim)
    u, evals = _top_eigenvectors(_gram(a, a), k * dk)
    return _finish(u, k, dk, "pca", a, c, {"eigenvalues": evals.tolist()})


def fit_random(
    d: int,
    n_subspaces: int = 4,
    seed: int = 1,
    *,
    act: ArrayLike | None = None,
    ctx: ArrayLike | None = None,
    subspace_dim: int | None = None,
    **_: Any,
) -> ConceptBasis:
    """Random orthogonal subspaces: the first K*d_k columns of a Haar-random d x d
    orthogonal matrix (seeded). With data given, ordered by mean relevance, with J."""
    k, dk = _layout(int(d), n_subspaces, subspace_dim)
    u = haar_restarts(int(d), k * dk, 1, seed)[0]
    a = None if act is None else _as_tensor(act)
    c = None if ctx is None else _as_tensor(ctx)
    return _finish(u, k, dk, "random", a, c, {"seed": seed})


def fit_cav(
    act: ArrayLike,
    target: ArrayLike,
    seed: int = 1,
    *,
    standardize: bool = True,
    C: float = 1.0,  # noqa: N803 (scikit-learn's name for the inverse regularisation)
    max_iter: int = 1000,
    **_: Any,
) -> ConceptBasis:
    """A CAV-style concept direction: the normal of a logistic-regression probe that
    predicts the binary ``target`` from the activation vectors (Kim et al., ICML 2018).

    The probe is fitted on standardised features (channel scales differ by orders of
    magnitude after ReLU, and an L2 penalty on raw weights would mute low-variance
    channels and slow the solver), and its normal is mapped back to raw activation
    coordinates, w_raw = w_std / sigma, so that u^T a is the probe's own score: removing
    u (I - u u^T) makes the probe blind. Sign: u^T a grows with the attribute.
    Returns one subspace of dimension 1; J does not apply (NaN).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    a = _as_tensor(act)
    _check_pair(a, None)
    x = a.double().cpu().numpy()
    y = np.asarray(target.detach().cpu() if isinstance(target, torch.Tensor) else target)
    if y.shape != (x.shape[0],):
        raise InvalidSpec(f"target must have one label per row ({x.shape[0]}), got {y.shape}")
    classes = np.unique(y)
    if classes.size != 2:
        raise InvalidSpec(f"a CAV needs a binary attribute with both values present, got {classes}")
    y = y == classes[1]
    scaler = StandardScaler(with_mean=True, with_std=standardize).fit(x)
    probe = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    probe.fit(scaler.transform(x), y)
    w = probe.coef_[0] / scaler.scale_ if standardize else probe.coef_[0].copy()
    norm = np.linalg.norm(w)
    if not np.isfinite(norm) or norm == 0.0:
        raise InvalidSpec("the linear probe found no direction for this attribute")
    info = {"train_accuracy": float(probe.score(scaler.transform(x), y)), "C": C}
    return ConceptBasis((w / norm).reshape(-1, 1, 1), float("nan"), "cav", info)


# ------------------------------------------------------------------------ comparing


def principal_angles(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, largest first) between span(U) and span(V)."""
    from scipy.linalg import subspace_angles

    return np.degrees(subspace_angles(np.asarray(u, float), np.asarray(v, float)))


def _blocks(b: ConceptBasis | np.ndarray) -> np.ndarray:
    return b.basis if isinstance(b, ConceptBasis) else np.asarray(b, dtype=np.float64)


def match_subspaces(
    basis_a: ConceptBasis | np.ndarray, basis_b: ConceptBasis | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Match the subspaces of two bases (d x K x d_k) by content, never by index.

    The cost of pairing a_i with b_j is the squared chordal distance sum sin^2(theta)
    over their principal angles; the Hungarian algorithm minimises the total. Returns
    ``perm`` (perm[i] = the b subspace matched to a_i, -1 if unmatched) and, per a_i,
    the largest principal angle to its match in degrees (NaN if unmatched).
    """
    a, b = _blocks(basis_a), _blocks(basis_b)
    if a.shape[0] != b.shape[0]:
        raise InvalidSpec(f"bases live in different spaces ({a.shape[0]} vs {b.shape[0]})")
    cost = np.empty((a.shape[1], b.shape[1]))
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            cost[i, j] = np.sum(np.sin(np.radians(principal_angles(a[:, i], b[:, j]))) ** 2)
    rows, cols = linear_sum_assignment(cost)
    perm = np.full(a.shape[1], -1)
    perm[rows] = cols
    angles = np.full(a.shape[1], np.nan)
    for i, j in zip(rows, cols, strict=True):
        angles[i] = principal_angles(a[:, i], b[:, j]).max()
    return perm, angles


# ------------------------------------------------------------------- planted data


def planted_subspace_data(
    n: int,
    d: int,
    n_subspaces: int = 4,
    *,
    noise: float = 0.05,
    spread: float = 0.5,
    strengths: list[float] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations and contexts with K planted relevant subspaces (for tests and benches).

    A random rotation Q splits R^d into K blocks Q_k of d_k = d // K columns. Instance n
    belongs to block k(n) (uniform); its latent code is the block's concept pattern
    p_k (a positive unit vector) times |t_n| plus ``spread`` * isotropic noise:
    z_n = 2 |t_n| p_k + spread * g_n, and w_n = r_n z_n + 0.2 h_n with r_n in [0.5, 1.5],
    so a_n = sqrt(s_k) Q_k z_n + noise, c_n = sqrt(s_k) Q_k w_n + noise carry positive
    relevance in block k(n) only. ``strengths`` s_k (default descending 1 .. 0.7) set
    the blocks' mean relevance. Returns (act, ctx float32 N x d, planted basis d x K x d_k).
    """
    rng = np.random.default_rng(seed)
    k, dk = _layout(d, n_subspaces, None)
    q = ortho_group.rvs(d, random_state=rng)[:, : k * dk].reshape(d, k, dk)
    strengths = list(np.linspace(1.0, 0.7, k)) if strengths is None else strengths
    pattern = np.abs(rng.standard_normal((k, dk)))
    pattern /= np.linalg.norm(pattern, axis=1, keepdims=True)
    block = rng.integers(0, k, size=n)
    t = np.abs(rng.standard_normal((n, 1)))
    z = 2.0 * t * pattern[block] + spread * rng.standard_normal((n, dk))
    w = z * rng.uniform(0.5, 1.5, size=(n, 1)) + 0.2 * rng.standard_normal((n, dk))
    scale = np.sqrt(np.asarray(strengths, dtype=float))[block][:, None]
    # Latent codes: instance n is non-zero only in its own block of K * d_k coordinates.
    mask = np.zeros((n, k, 1))
    mask[np.arange(n), block] = 1.0
    qf = q.reshape(d, k * dk)
    act = (mask * (z * scale)[:, None, :]).reshape(n, -1) @ qf.T
    ctx = (mask * (w * scale)[:, None, :]).reshape(n, -1) @ qf.T
    act += noise * rng.standard_normal((n, d))
    ctx += noise * rng.standard_normal((n, d))
    return act.astype(np.float32), ctx.astype(np.float32), q
