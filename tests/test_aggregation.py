import numpy as np
import pytest

from popri_flwr.privacy.aggregation import GRID_BITS, check_vector, noisy_sum


@pytest.mark.parametrize(
    "vector, reason",
    [
        (np.zeros(4, dtype=np.float32), None),
        (np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32), None),  # exactly on the bound
        (np.array([0.6, 0.8, 0, 0], dtype=np.float32), "exceeds the clip bound"),  # 1 + 3e-8
        (np.zeros(5, dtype=np.float32), "wrong shape"),
        (np.zeros((2, 2), dtype=np.float32), "wrong shape"),
        (np.array([np.nan, 0, 0, 0], dtype=np.float32), "non-finite"),
        (np.array([np.inf, 0, 0, 0]), "non-finite"),
        (np.array([1.0, 1.0, 0, 0]), "exceeds the clip bound"),
        (np.zeros(4, dtype=np.int64), "wrong dtype"),
        ([0.0] * 4, "not an array"),
    ],
)
def test_check_vector(vector, reason):
    got = check_vector(vector, 4, 1.0)
    assert (got is None) if reason is None else (reason in got)


def test_noise_std_and_mean_match_the_mechanism():
    rng = np.random.default_rng(0)
    vecs = [np.full(50_000, 0.001), np.full(50_000, 0.002)]
    out = noisy_sum(vecs, 50_000, noise_std=2.5, rng=rng)
    assert out.mean() == pytest.approx(0.003, abs=3 * 2.5 / np.sqrt(50_000))
    assert out.std() == pytest.approx(2.5, rel=0.02)
    # Without noise the sum is exact; the same seed gives the same noise.
    assert np.array_equal(noisy_sum(vecs, 50_000, 0.0, rng), vecs[0] + vecs[1])
    a = noisy_sum([], 10, 1.0, np.random.default_rng(3))
    b = noisy_sum([], 10, 1.0, np.random.default_rng(3))
    assert np.array_equal(a, b) and np.any(a != 0)


def test_one_client_moves_the_sum_by_at_most_the_clip_norm():
    """Sensitivity: add/remove one accepted client changes the sum by <= C in L2."""
    rng = np.random.default_rng(1)
    c = 1.0
    others = [v / max(1.0, np.linalg.norm(v)) for v in rng.normal(size=(20, 30))]
    for _ in range(100):
        extra = rng.normal(size=30) * rng.uniform(0.1, 10)
        if check_vector(extra, 30, c) is not None:
            continue  # the server would drop it: it cannot contribute at all
        with_client = noisy_sum([*others, extra], 30, 0.0, rng)
        without = noisy_sum(others, 30, 0.0, rng)
        assert np.linalg.norm(with_client - without) <= c * (1 + 1e-12)


def test_the_release_is_rounded_to_the_noise_grid():
    """Post-processing against floating-point attacks: low-order bits are zeroed."""
    out = noisy_sum([np.full(1000, 0.1234567)], 1000, 1.5, np.random.default_rng(0))
    step = 2.0 ** (np.floor(np.log2(1.5)) - GRID_BITS)
    assert np.array_equal(out, np.round(out / step) * step)
    assert len(np.unique(out)) > 990  # still a continuous-looking release, not collapsed
