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


# ------------------------------------------------------------------------------ cohorts
@pytest.mark.parametrize("clip", [0.5, 1.0, 1e3])
def test_score_matrix_rows_are_the_per_client_vectors(clip):
    from popri_flwr.algorithms.scoring import centroid, score_matrix
    from popri_flwr.privacy.clipping import l2_norm

    rng = np.random.default_rng(3)
    e = _unit(rng, 300, 16).astype(np.float32)
    clients = [_unit(rng, int(k), 16).astype(np.float32) for k in rng.integers(1, 12, size=9)]
    clients.insert(4, np.zeros((0, 16), np.float32))  # a client without texts
    cents = np.stack([centroid(p) for p in clients])
    matrix = score_matrix(e, cents, clip, chunk_rows=4)  # chunks of 4 rows: 3 chunks
    assert matrix.shape == (10, 300) and matrix.dtype == np.float32
    for p, row in zip(clients, matrix, strict=True):
        ref = client_score_vector(e, p, clip)
        np.testing.assert_allclose(row, ref, rtol=0, atol=1e-5 * max(np.abs(ref).max(), 1e-9))
        assert l2_norm(row) <= clip  # exactly as the server measures it
    np.testing.assert_array_equal(matrix[4], 0)
    np.testing.assert_array_equal(score_matrix(e, cents, clip), matrix)  # chunking changes nothing


def test_score_matrix_gives_zeros_when_all_samples_score_alike():
    from popri_flwr.algorithms.scoring import score_matrix

    rng = np.random.default_rng(4)
    e = np.repeat(_unit(rng, 1, 8), 20, axis=0).astype(np.float32)  # one sample, 20 times
    out = score_matrix(e, _unit(rng, 3, 8), 1.0)
    np.testing.assert_array_equal(out, 0)
    for c in _unit(rng, 3, 8):  # the per-client rule agrees
        np.testing.assert_array_equal(client_score_vector(e, c[None, :], 1.0), 0)


def test_score_matrix_refuses_mismatched_embedders():
    from popri_flwr.algorithms.scoring import score_matrix

    with pytest.raises(ValueError, match="embedding dims differ"):
        score_matrix(np.zeros((3, 8), np.float32), np.zeros((2, 4)), 1.0)
