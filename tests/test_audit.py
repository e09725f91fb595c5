"""The audit table reads planted score patterns correctly (ALGORITHMS.md section 3)."""

import numpy as np
import pytest
import torch

from cnp_core.audit import (
    AuditSamples,
    Candidate,
    audit_attribute,
    audit_table,
    concept_scores,
    format_table,
    subspace_relevance,
)


def _samples(n=400, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.random(n) < 0.5
    attr = rng.random(n) < 0.3
    return AuditSamples(is_positive_class=cls, has_attribute=attr), rng


def test_subspace_relevance_sums_positions_per_block():
    torch.manual_seed(0)
    a, c = torch.randn(3, 8, 2, 2), torch.randn(3, 8, 2, 2)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 6)))[0].reshape(8, 3, 2)
    got = subspace_relevance(a, c, basis)
    for n in range(3):
        for k in range(3):
            u = torch.as_tensor(basis[:, k, :], dtype=torch.float32)
            expected = sum(
                float((u.T @ a[n, :, i, j]) @ (u.T @ c[n, :, i, j]))
                for i in range(2)
                for j in range(2)
            )
            assert got[n, k] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    square = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))[0].reshape(8, 4, 2)
    total = subspace_relevance(a, c, square).sum(1)  # no residue for a square basis
    np.testing.assert_allclose(total, (a * c).sum((1, 2, 3)).numpy(), rtol=1e-5)


def test_share_divides_by_total_absolute_relevance():
    r = np.array([[2.0, -2.0, 4.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(concept_scores(r, "share"), [[0.25, -0.25, 0.5], [0, 0, 0]])
    assert concept_scores(r, "raw") is r


def test_share_counts_the_residue_outside_the_subspaces():
    r = np.array([[1.0], [-1.0], [0.5]])  # one direction (a CAV): alone, every share is +-1
    residue = np.array([3.0, 1.0, -0.5])
    np.testing.assert_allclose(concept_scores(r, "share", residue), [[0.25], [-0.5], [0.5]])


def test_planted_attribute_and_class_subspaces_are_read_correctly():
    samples, rng = _samples()
    cls, attr = samples.is_positive_class, samples.has_attribute
    noise = rng.normal(scale=0.1, size=(cls.size, 3))
    relevance = np.stack([attr.astype(float), cls.astype(float), np.zeros(cls.size)], 1) + noise
    table = audit_table(relevance, relevance, samples, resamples=50, seed=0)

    wm, klass, null = table
    assert wm.ap_attribute.value > 0.99 and wm.ap_attribute_neg.value > 0.99
    assert abs(wm.ap_class.value - wm.ap_class.base_rate) < 0.1  # isolates the attribute
    assert klass.ap_class.value > 0.99 and abs(klass.ap_attribute.value - attr.mean()) < 0.1
    assert abs(null.ap_attribute.value - attr.mean()) < 0.1
    assert wm.ap_attribute.base_rate == pytest.approx(attr.mean())
    assert wm.ap_attribute_pos.base_rate == pytest.approx(attr[cls].mean())
    assert klass.ap_class_attr.base_rate == pytest.approx(cls[attr].mean())
    ci = null.ap_attribute
    assert ci.ci_low <= ci.value <= ci.ci_high and ci.ci_high - ci.ci_low > 0.01


def test_selection_is_made_on_validation_and_reported_on_test():
    val, rng = _samples(seed=1)
    test, _ = _samples(seed=2)
    # On validation subspace 2 predicts the attribute; on test subspace 0 happens to.
    r_val = rng.normal(size=(val.has_attribute.size, 3))
    r_val[:, 2] += 3 * val.has_attribute
    r_test = rng.normal(size=(test.has_attribute.size, 3))
    r_test[:, 0] += 3 * test.has_attribute
    r_test[:, 2] += 1.0 * test.has_attribute
    cand = Candidate("layer3", 3, r_val, r_test)
    (audit,) = audit_attribute("wm", "1", [cand], val, test, score="raw", threshold=0.5)
    assert audit.flagged_subspace == 2  # chosen on validation, not on the reported split
    assert audit.selection_ap > 0.9
    (strict,) = audit_attribute("wm", "1", [cand], val, test, score="raw", threshold=0.99)
    assert strict.flagged_subspace == -1  # test AP below the threshold: nothing flagged
    text = format_table(audit)
    assert "flagged: S3" in text and "S3*" in text


def test_the_k_with_the_best_validation_ap_wins_per_layer():
    val, rng = _samples(seed=3)
    test, _ = _samples(seed=4)
    weak = Candidate("l", 2, rng.normal(size=(400, 2)), rng.normal(size=(400, 2)))
    strong_val = rng.normal(size=(400, 4))
    strong_val[:, 1] += 4 * val.has_attribute
    strong = Candidate("l", 4, strong_val, rng.normal(size=(400, 4)))
    (audit,) = audit_attribute("wm", "1", [weak, strong], val, test, score="raw")
    assert audit.n_subspaces == 4 and len(audit.subspaces) == 4


def test_vectorised_average_precision_equals_scikit_learn_row_by_row():
    from sklearn.metrics import average_precision_score

    from cnp_core.metrics import average_precision, average_precision_rows

    rng = np.random.default_rng(0)
    target = rng.random((50, 40)) < 0.3
    score = rng.integers(0, 6, size=(50, 40)).astype(float)  # many ties
    score[1] = 2.0  # one threshold for the whole row
    target[2], target[3] = True, False  # no negatives, no positives
    got = average_precision_rows(target, score)
    assert np.isnan(got[2]) and np.isnan(got[3])
    for row in (0, 1, *range(4, 50)):
        assert got[row] == pytest.approx(average_precision_score(target[row], score[row]))
    # The bootstrap interval brackets the value and narrows with more samples.
    wide = average_precision(target[0], score[0] + rng.random(40), resamples=200, seed=1)
    assert wide.ci_low < wide.value < wide.ci_high
    many = np.tile(target[0], 20), np.tile(score[0] + rng.random(40), 20)
    narrow = average_precision(*many, resamples=200, seed=1)
    assert narrow.ci_high - narrow.ci_low < (wide.ci_high - wide.ci_low) / 2


def test_the_flag_level_is_the_threshold_at_base_rate_half_and_the_same_lift_elsewhere():
    from cnp_core.audit import flag_level, is_flagged
    from cnp_core.results import Metric

    assert flag_level(0.8, 0.5) == pytest.approx(0.8)  # where every default was chosen
    assert flag_level(0.8, 0.25) == pytest.approx(0.70)
    assert flag_level(0.8, 6 / 7) == pytest.approx(0.943, abs=1e-3)
    assert flag_level(0.5, 0.3) == pytest.approx(0.3)  # 0.5: anything above chance
    # Adult: "Male" (base 0.667) at AP 0.82 is mostly its base rate; not flagged. A
    # quarter-valued tint at AP 0.72 is a strong signal; flagged.
    assert not is_flagged(Metric(0.822, 0.81, 0.83, 0.667), 0.8)
    assert is_flagged(Metric(0.72, 0.70, 0.74, 0.25), 0.8)
    assert not is_flagged(Metric(float("nan"), 0, 0, 0.5), 0.8)
