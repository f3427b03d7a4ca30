import numpy as np
import pytest

from popri_flwr.algorithms.scoring import client_score_vector, similarity_scores, standardize


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_similarity_is_mean_cosine():
    rng = np.random.default_rng(0)
    e, p = _unit(rng, 7, 5), _unit(rng, 4, 5)
    expected = np.array([[ek @ pj for pj in p] for ek in e]).mean(axis=1)
    np.testing.assert_allclose(similarity_scores(e, p), expected, rtol=1e-12)


@pytest.mark.parametrize("clip", [0.5, 1.0, 3.0])
def test_clip_bound_holds_for_any_client(clip):
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(2, 300))
        vec = client_score_vector(_unit(rng, n, 8), _unit(rng, int(rng.integers(1, 20)), 8), clip)
        assert vec.dtype == np.float32 and vec.shape == (n,)
        assert np.linalg.norm(vec.astype(np.float64)) <= clip


def test_zscore_then_clip_direction_is_kept():
    rng = np.random.default_rng(2)
    e, p = _unit(rng, 30, 8), _unit(rng, 5, 8)
    raw = similarity_scores(e, p)
    vec = client_score_vector(e, p, 1.0)
    # clipping rescales the z-scores: same ranking, unit norm (30 z-scores have norm sqrt(30))
    assert np.array_equal(np.argsort(vec), np.argsort(raw))
    assert np.linalg.norm(vec) == pytest.approx(1.0, rel=1e-5)


def test_constant_scores_and_empty_client_give_zero_vector():
    e = np.tile(np.array([[1.0, 0.0]]), (5, 1))
    assert not np.any(client_score_vector(e, np.array([[0.0, 1.0]]), 1.0))
    assert not np.any(client_score_vector(e, np.zeros((0, 2)), 1.0))
    assert not np.any(standardize(np.full(4, 3.0)))


def test_dimension_mismatch_is_named():
    with pytest.raises(ValueError, match="same embedder"):
        similarity_scores(np.ones((2, 3)), np.ones((2, 4)))
