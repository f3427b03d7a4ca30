"""Tests for popri_flwr.evaluation.distribution_metrics against closed forms and hand-computed
cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from popri_flwr.evaluation.distribution_metrics import (
    fid,
    fid_bootstrap,
    fid_change_bootstrap,
    precision_recall,
)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigendecomposition (independent of sqrtm)."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def closed_form_fid(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).

    Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): the two matrices are similar.
    """
    r1 = _psd_sqrt(s1)
    cross = _psd_sqrt(r1 @ s2 @ r1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def exact_moments(rng: np.random.Generator, n: int, mu: np.ndarray, cov: np.ndarray):
    """n samples whose *sample* mean and covariance are exactly ``mu`` and ``cov``."""
    x = rng.standard_normal((n, len(mu)))
    x -= x.mean(axis=0)
    whiten = np.linalg.cholesky(np.cov(x, rowvar=False))
    x = np.linalg.solve(whiten, x.T).T  # sample covariance now I
    return x @ np.linalg.cholesky(cov).T + mu


def random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.5 * np.eye(d)


# ------------------------------------------------------------------ FID
def test_fid_diagonal_gaussians_by_hand():
    # Diagonal: Tr term = sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = (1 + 0 + 4) + (1 + 1 + 0)  # = 7
    assert closed_form_fid(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    a = exact_moments(rng, 500, mu1, np.diag(v1))
    b = exact_moments(rng, 700, mu2, np.diag(v2))
    assert fid(a, b) == pytest.approx(expected, rel=1e-9)


def test_fid_general_covariances_exact_moments():
    rng = np.random.default_rng(1)
    d = 5
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    a, b = exact_moments(rng, 300, mu1, s1), exact_moments(rng, 400, mu2, s2)
    expected = closed_form_fid(mu1, s1, mu2, s2)
    assert expected > 1.0
    assert fid(a, b) == pytest.approx(expected, rel=1e-8)
    assert fid(b, a) == pytest.approx(expected, rel=1e-8)


def test_fid_large_samples_from_two_gaussians():
    # Plain i.i.d. samples: the estimate converges to the population value (error ~ 1/sqrt(n)).
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    a = rng.multivariate_normal(mu1, s1, size=n)
    b = rng.multivariate_normal(mu2, s2, size=n)
    expected = closed_form_fid(mu1, s1, mu2, s2)
    assert fid(a, b) == pytest.approx(expected, rel=0.03)


def test_fid_of_a_set_with_itself_and_a_translate():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((200, 8))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([3.0, 0, 0, 0, 0, 0, 4.0, 0])
    # Same covariance: only the means differ, FID = ||shift||^2 = 25.
    assert fid(a, a + shift) == pytest.approx(25.0, rel=1e-8)


def test_fid_one_dimension_and_singular_covariances():
    a = np.array([[0.0], [2.0], [4.0]])  # mean 2, var 4
    b = np.array([[1.0], [2.0]])  # mean 1.5, var 0.5
    expected = 0.5**2 + (2.0 - math.sqrt(0.5)) ** 2
    assert fid(a, b) == pytest.approx(expected, rel=1e-9)
    # Fewer samples than dimensions: singular covariances, still finite and >= 0.
    rng = np.random.default_rng(4)
    value = fid(rng.standard_normal((5, 20)), rng.standard_normal((6, 20)) + 1.0)
    assert math.isfinite(value) and value >= 20.0 * 0.5  # ||mu diff||^2 ~ 20 dominates


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros(5), np.zeros((5, 2)), "a must be a 2-d array"),
        (np.zeros((5, 2)), np.zeros((5, 2, 1)), "b must be a 2-d array"),
        (np.zeros((5, 2)), np.zeros((5, 3)), "same dimension, got 2 and 3"),
        (np.zeros((1, 2)), np.zeros((5, 2)), "at least 2 samples in each set, got 1 and 5"),
        (np.full((3, 2), np.nan), np.zeros((5, 2)), "a contains NaN or inf"),
    ],
)
def test_fid_errors(a, b, message):
    with pytest.raises(ValueError, match=f"^fid: .*{message}"):
        fid(a, b)


# ------------------------------------------------------------------ precision / recall
def test_fid_change_bootstrap_change_is_the_fid_difference():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 6))
    before = rng.normal(size=(240, 6))
    after = before * 1.2 + 0.3
    groups = np.repeat(np.arange(40), 6)
    out = fid_change_bootstrap(before, after, ref, groups, draws=50, rng=rng)
    assert out["change"] == pytest.approx(fid(after, ref) - fid(before, ref), rel=1e-9)
    assert out["se"] > 0
    same = fid_change_bootstrap(before, before.copy(), ref, groups, draws=20, rng=rng)
    assert same == {"change": 0.0, "se": 0.0}  # a paired draw of one set against itself
    with pytest.raises(ValueError, match="same rows"):
        fid_change_bootstrap(before, after[:-1], ref, groups)
    with pytest.raises(ValueError, match="same rows"):
        fid_change_bootstrap(before, after, ref, groups[:-1])


def test_fid_bootstrap_draws_the_same_prompts_from_every_set():
    """Each draw's FID is ``fid`` of the rows of the resampled prompts, in every set, even when
    the sets hold different numbers of samples per prompt (the generator's 6, the base's 3)."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(200, 5))
    a, ga = rng.normal(size=(60, 5)), np.repeat(np.arange(10), 6)
    b, gb = rng.normal(size=(30, 5)) + 0.2, np.repeat(np.arange(10), 3)[::-1].copy()
    out = fid_bootstrap([a, b], [ga, gb], ref, draws=4, rng=np.random.default_rng(7))
    replay = np.random.default_rng(7)
    for row in out:
        pick = replay.integers(10, size=10)
        for value, e, g in ((row[0], a, ga), (row[1], b, gb)):
            idx = np.concatenate([np.flatnonzero(g == k) for k in pick])
            assert value == pytest.approx(fid(e[idx], ref), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="other prompts"):
        fid_bootstrap([a, b], [ga, gb % 5], ref, draws=2)
    with pytest.raises(ValueError, match="same rows"):
        fid_bootstrap([a, b], [ga, gb[:-1]], ref, draws=2)


def test_fid_change_bootstrap_se_matches_the_spread_over_fresh_prompts():
    """Calibration: each replicate draws new prompts (a strong prompt effect, shared by both
    sets) and new samples; the bootstrap SE of one replicate should match the spread of the
    change across replicates. An unpaired resampling would count the prompt effect twice.
    (Measured away from FID 0, as in the runs; near 0 the square roots make it conservative.)"""
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(2000, 3)) + 0.5
    k, j, d = 60, 4, 3
    groups = np.repeat(np.arange(k), j)
    changes, ses = [], []
    for _ in range(120):
        prompt = np.repeat(rng.normal(scale=1.0, size=(k, d)), j, axis=0)
        before = prompt + rng.normal(scale=0.5, size=(k * j, d))
        after = prompt * 0.9 + 0.1 + rng.normal(scale=0.5, size=(k * j, d))
        out = fid_change_bootstrap(before, after, ref, groups, draws=60, rng=rng)
        changes.append(out["change"])
        ses.append(out["se"])
    assert np.mean(changes) < -3 * np.std(changes)  # after is closer to the reference
    assert 0.8 < np.mean(ses) / np.std(changes) < 1.25


def test_precision_recall_identical_sets():
    x = np.random.default_rng(5).standard_normal((60, 6))
    out = precision_recall(x, x.copy())
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["k_real"] == out["k_synthetic"] == 3.0


def test_precision_recall_disjoint_far_apart():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((50, 4))
    synthetic = rng.standard_normal((40, 4)) + 1000.0
    out = precision_recall(real, synthetic)
    assert out["precision"] == 0.0 and out["recall"] == 0.0


def test_precision_recall_half_the_synthetic_set_is_off_manifold():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((50, 4))
    synthetic = np.vstack([real, rng.standard_normal((50, 4)) + 1000.0])
    out = precision_recall(real, synthetic)
    assert out["precision"] == 0.5  # the copies are inside, the far cluster is not
    assert out["recall"] == 1.0  # every real point has a synthetic twin


def test_precision_recall_hand_computed_one_dimension():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: all 1
    synthetic = np.array([[0.5], [1.0], [1.25]])  # k=1 radii: 0.5, 0.25, 0.25
    out = precision_recall(real, synthetic, k=1)
    assert out["precision"] == 1.0  # all within 1 of a real point
    # real 0 (|0-0.5| = 0.5 <= 0.5) and real 1 (a twin) are covered; 2 and 3 are not.
    assert out["recall"] == 0.5


def test_precision_recall_lowers_k_for_small_sets():
    out = precision_recall(np.eye(3), np.eye(3) * 2, k=5)
    assert out["k_real"] == 2.0 and out["k_synthetic"] == 2.0


@pytest.mark.parametrize(
    ("real", "synthetic", "k", "message"),
    [
        (np.zeros((5, 2)), np.zeros((5, 2)), 0, "k must be >= 1"),
        (np.zeros(5), np.zeros((5, 2)), 3, "real must be a 2-d array"),
        (np.zeros((5, 2)), np.zeros((5, 3)), 3, "same dimension"),
        (np.zeros((5, 2)), np.zeros((1, 2)), 3, "at least 2 samples"),
        (np.zeros((5, 2)), np.full((5, 2), np.inf), 3, "synthetic contains NaN or inf"),
    ],
)
def test_precision_recall_errors(real, synthetic, k, message):
    with pytest.raises(ValueError, match=f"^precision_recall: .*{message}"):
        precision_recall(real, synthetic, k=k)


# ------------------------------------------------------------------ cosine to nearest
