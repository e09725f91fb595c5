"""Concept subspaces (cnp_core.subspaces): DRSA against planted structure and its
published rule, the closed-form gradient against autograd, and the baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from cnp_core import subspaces as S
from cnp_core.errors import InvalidSpec
from cnp_core.methods import CONCEPT_METHODS, fit_subspaces

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted():
    """N=2000, d=32, K=4 planted blocks, and DRSA's default fit of them."""
    act, ctx, truth = S.planted_subspace_data(2000, 32, 4, seed=0)
    return act, ctx, truth, S.fit_drsa(act, ctx, 4, seed=0)


def _orthonormal(basis: S.ConceptBasis) -> float:
    u = basis.flat
    return float(np.abs(u.T @ u - np.eye(u.shape[1])).max())


# ------------------------------------------------------------------------------ DRSA


def test_drsa_recovers_planted_subspaces(planted):
    act, ctx, truth, fit = planted
    perm, angles = S.match_subspaces(truth, fit)
    assert sorted(perm.tolist()) == [0, 1, 2, 3]
    assert angles.max() < 2.0, angles
    # The planted basis is (up to the noise) the optimum: J may only exceed it slightly.
    assert fit.objective >= S.objective(truth, act, ctx)
    assert fit.basis.shape == (32, 4, 8) and fit.method == "drsa"
    assert _orthonormal(fit) < 1e-10


def test_drsa_orders_by_mean_relevance(planted):
    act, ctx, truth, fit = planted
    mean_r = fit.relevance(act, ctx).mean(axis=0)
    assert np.all(np.diff(mean_r) < 0), mean_r
    # Same order as the planted blocks ranked by their own mean relevance on the data.
    planted_mean = S.ConceptBasis(truth, np.nan, "planted").relevance(act, ctx).mean(axis=0)
    perm, _ = S.match_subspaces(fit, truth)
    np.testing.assert_array_equal(perm, np.argsort(-planted_mean))


def test_objective_matches_the_formula(planted):
    act, ctx, _, fit = planted
    a = act.astype(np.float64)
    c = ctx.astype(np.float64)
    a /= np.sqrt(np.mean(a**2)) * 32**0.25
    c /= np.sqrt(np.mean(c**2)) * 32**0.25
    r = np.stack(
        [np.sum((a @ fit.subspace(k)) * (c @ fit.subspace(k)), axis=1) for k in range(4)], 1
    )
    j = np.mean(np.mean(np.maximum(r, 0) ** 2, axis=0) ** 0.25) ** 2
    assert S.objective(fit, act, ctx) == pytest.approx(j, rel=1e-10)
    assert fit.objective == pytest.approx(j, rel=1e-10)


def test_closed_form_gradient_matches_autograd():
    act, ctx, _ = S.planted_subspace_data(300, 12, 3, seed=3)
    prob = S._DrsaProblem(
        torch.from_numpy(act), torch.from_numpy(ctx), 3, 4, torch.device("cpu"), torch.float64
    )
    u = torch.as_tensor(S.haar_restarts(12, 12, 2, seed=5)).requires_grad_(True)
    r = ((prob.a @ u) * (prob.c @ u)).unflatten(-1, (3, 4)).sum(-1)
    j = S._objective_from_relevance(r)
    (auto,) = torch.autograd.grad(j.sum(), u)
    j2, r2, cache = prob.evaluate(u.detach())
    closed = prob.gradient(u.detach(), r2, cache)
    torch.testing.assert_close(j2, j.detach())
    torch.testing.assert_close(closed, auto, rtol=1e-9, atol=1e-12)


def test_default_reaches_the_published_objective_faster():
    """Same restarts, best of 3: the adaptive rule reaches the published rule's J
    (2,500 epochs, step 1) with a fraction of the epochs, and both find the planted blocks."""
    act, ctx, truth = S.planted_subspace_data(2000, 32, 4, seed=1)
    fast = S.fit_drsa(act, ctx, 4, seed=1)
    ref = S.fit_drsa_published(act, ctx, 4, seed=1, max_epochs=2500)
    assert ref.info["epochs"] == [2500, 2500, 2500]
    assert fast.objective >= ref.objective * (1 - 1e-9)
    assert sum(fast.info["epochs"]) < 2500 / 3
    assert S.match_subspaces(truth, ref)[1].max() < 2.0
    assert _orthonormal(ref) < 1e-10


def test_drsa_is_deterministic_and_input_type_agnostic(planted):
    act, ctx, _, fit = planted
    again = S.fit_drsa(torch.from_numpy(act), torch.from_numpy(ctx), 4, seed=0)
    np.testing.assert_allclose(again.basis, fit.basis, atol=1e-12)
    assert again.objective == pytest.approx(fit.objective, rel=1e-12)
    other = S.fit_drsa(act, ctx, 4, seed=7)
    assert not np.allclose(other.info["restart_objectives"], fit.info["restart_objectives"])


def test_drsa_options_and_layout():
    act, ctx, _ = S.planted_subspace_data(400, 16, 4, seed=2)
    narrow = S.fit_drsa(act, ctx, 4, subspace_dim=2, restarts=2, max_epochs=50)
    assert narrow.basis.shape == (16, 4, 2) and _orthonormal(narrow) < 1e-10
    assert len(narrow.info["restart_objectives"]) == 2
    assert max(narrow.info["epochs"]) <= 50
    with pytest.raises(InvalidSpec):
        S.fit_drsa(act, ctx, 4, step_size=3.0)
    with pytest.raises(InvalidSpec):
        S.fit_drsa(act, ctx, 4, optimizer="adam")
    with pytest.raises(InvalidSpec):
        S.fit_drsa(act, ctx, 5, subspace_dim=4)
    with pytest.raises(InvalidSpec):
        S.fit_drsa(act, ctx[:, :8], 4)


# ------------------------------------------------------------------- basis helpers


def test_relevance_projectors_and_complement(planted):
    act, ctx, _, fit = planted
    r = fit.relevance(act, ctx)
    # U is square here, so the subspace relevances add up to a^T c.
    np.testing.assert_allclose(r.sum(1), np.sum(act * ctx, 1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(fit.relevance(act, ctx, chunk_rows=333), r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        fit.relevance(torch.from_numpy(act).double(), torch.from_numpy(ctx).double()),
        r,
        rtol=1e-4,
        atol=1e-4,
    )
    p = fit.projector(1)
    np.testing.assert_allclose(p @ p, p, atol=1e-12)
    q = fit.complement_projector([1, 3])
    np.testing.assert_allclose(q @ q, q, atol=1e-12)
    np.testing.assert_allclose(q @ fit.subspace(1), 0, atol=1e-12)
    np.testing.assert_allclose(q @ fit.subspace(0), fit.subspace(0), atol=1e-12)
    # After projecting out subspace 1, its relevance is 0 and the others are unchanged.
    r_proj = fit.relevance(act @ q.T.astype(np.float32), ctx)
    np.testing.assert_allclose(r_proj[:, [1, 3]], 0, atol=1e-4)
    np.testing.assert_allclose(r_proj[:, [0, 2]], r[:, [0, 2]], rtol=1e-4, atol=1e-3)


def test_principal_angles_and_matching_find_a_planted_permutation():
    rng = np.random.default_rng(0)
    q = ortho_group.rvs(24, random_state=rng).reshape(24, 4, 6)
    perm = np.array([2, 0, 3, 1])
    # Permute the blocks and rotate inside each: same subspaces, other columns, other order.
    rotated = np.stack(
        [q[:, perm[i]] @ ortho_group.rvs(6, random_state=rng) for i in range(4)], axis=1
    )
    found, angles = S.match_subspaces(q, rotated)
    np.testing.assert_array_equal(found, np.argsort(perm))
    assert angles.max() < 1e-5
    assert S.principal_angles(q[:, 0], q[:, 1]).min() == pytest.approx(90.0)
    # Rectangular: more subspaces on one side leaves the extra ones unmatched.
    found, angles = S.match_subspaces(rotated, q[:, :2])
    assert (found >= 0).sum() == 2 and np.isnan(angles).sum() == 2


# -------------------------------------------------------------------------- baselines


def test_prca_recovers_the_top_of_a_planted_symmetric_matrix():
    rng = np.random.default_rng(1)
    n, d = 500, 12
    a = np.linalg.qr(rng.standard_normal((n, d)))[0] * np.sqrt(n)  # A^T A / N = I
    v = ortho_group.rvs(d, random_state=rng)
    lam = np.array([5, 4, 3, 2.5, 2, 1.5] + [0.1] * 4 + [-9, -8.0])  # largest |.| negative
    m = v @ np.diag(lam) @ v.T
    ctx = a @ m  # (A^T C + C^T A) / N = 2 M
    fit = S.fit_prca(a, ctx, 3, subspace_dim=2)
    assert fit.basis.shape == (12, 3, 2) and _orthonormal(fit) < 1e-10
    np.testing.assert_allclose(fit.info["eigenvalues"], 2 * lam[:6], rtol=1e-8)
    for k in range(3):
        assert S.principal_angles(fit.subspace(k), v[:, 2 * k : 2 * k + 2]).max() < 1e-4
    np.testing.assert_allclose(fit.relevance(a, ctx).mean(0), [9, 5.5, 3.5], rtol=1e-8)
    assert np.isfinite(fit.objective)


def test_pca_recovers_the_top_principal_subspaces():
    rng = np.random.default_rng(2)
    n, d = 400, 10
    v = ortho_group.rvs(d, random_state=rng)
    lam = np.array([9, 8, 4, 3, 1, 0.5, 0.2, 0.1, 0.05, 0.01])
    a = np.linalg.qr(rng.standard_normal((n, d)))[0] * np.sqrt(n) @ np.diag(np.sqrt(lam)) @ v.T
    fit = S.fit_pca(a, 2, subspace_dim=2)
    np.testing.assert_allclose(fit.info["eigenvalues"], lam[:4], rtol=1e-8)
    assert S.principal_angles(fit.subspace(0), v[:, :2]).max() < 1e-4
    assert S.principal_angles(fit.subspace(1), v[:, 2:4]).max() < 1e-4
    assert np.isnan(fit.objective)


def test_random_subspaces_are_orthonormal_and_seeded():
    one, same, other = S.fit_random(20, 4, 3), S.fit_random(20, 4, 3), S.fit_random(20, 4, 4)
    assert one.basis.shape == (20, 4, 5) and _orthonormal(one) < 1e-10
    np.testing.assert_array_equal(one.basis, same.basis)
    assert not np.allclose(one.basis, other.basis)


def test_cav_recovers_a_planted_direction():
    rng = np.random.default_rng(3)
    n, d = 2000, 20
    v = rng.standard_normal(d)
    v /= np.linalg.norm(v)
    y = rng.integers(0, 2, size=n)
    scales = np.exp(rng.uniform(-1, 1, size=d))  # channels on different scales
    act = rng.standard_normal((n, d)) + 2.0 * y[:, None] * v
    act = act * scales  # the attribute direction in raw coordinates is v / scales
    fit = S.fit_cav(act, y, seed=0)
    assert fit.basis.shape == (d, 1, 1) and np.isnan(fit.objective)
    target = (v / scales) / np.linalg.norm(v / scales)
    assert float(fit.flat[:, 0] @ target) > 0.95
    assert fit.info["train_accuracy"] > 0.7
    with pytest.raises(InvalidSpec):
        S.fit_cav(act, np.ones(n))


# ------------------------------------------------------------------------- dispatcher


def test_fit_subspaces_dispatches_every_method():
    act, ctx, _ = S.planted_subspace_data(300, 16, 4, seed=4)
    target = (act @ np.ones(16) > 0).astype(int)
    for method in CONCEPT_METHODS:
        fit = fit_subspaces(method, act, ctx, 4, seed=1, target=target, max_epochs=30)
        assert isinstance(fit, S.ConceptBasis) and fit.method == method
        assert _orthonormal(fit) < 1e-10
        if not CONCEPT_METHODS[method].supervised:
            assert fit.basis.shape == (16, 4, 4) and np.isfinite(fit.objective)
            assert np.all(np.diff(fit.relevance(act, ctx).mean(0)) <= 1e-9)
    with pytest.raises(InvalidSpec):
        fit_subspaces("ica", act, ctx, 4, seed=1)
    with pytest.raises(InvalidSpec):
        fit_subspaces("cav", act, ctx, 4, seed=1)
    with pytest.raises(InvalidSpec):
        fit_subspaces("drsa", act, None, 4, seed=1)
