"""The exact clip bound: clients clip so the server's check ``||v|| <= C`` needs no slack."""

from __future__ import annotations

import numpy as np
import pytest

from popri_flwr.privacy.aggregation import check_vector
from popri_flwr.privacy.clipping import clip_to_norm, l2_norm


@pytest.mark.parametrize("c", [1e-3, 0.37, 1.0, 5.0, 123.456])
def test_clipped_vectors_pass_the_servers_exact_check(c):
    rng = np.random.default_rng(0)
    for dim in (1, 7, 1000, 18_000):
        for scale in (1e-3, 1.0, 1e4):
            v = rng.normal(0, scale, dim)
            out = clip_to_norm(v, c)
            assert out.dtype == np.float32
            assert l2_norm(out) <= c
            assert check_vector(out, dim, c) is None
            if np.linalg.norm(v) > c:  # clipped: direction kept, norm within 1e-5 of C
                assert l2_norm(out) == pytest.approx(c, rel=1e-5)
                np.testing.assert_allclose(out / l2_norm(out), v / np.linalg.norm(v), atol=1e-6)


def test_a_float32_vector_right_at_c_is_brought_inside():
    # Hunt for float32 vectors whose float64 norm lies just above C although the float64 input
    # was at or below C: the cast alone would break the bound.
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(2000):
        v = rng.normal(0, 1, 50)
        v = v / np.linalg.norm(v)  # norm 1 (to float64 precision)
        if l2_norm(v.astype(np.float32)) > 1.0:
            found += 1
            assert l2_norm(clip_to_norm(v, 1.0)) <= 1.0
    assert found > 10  # the case exists and was exercised


def test_small_and_zero_vectors_are_left_alone_and_bad_input_is_named():
    small = np.array([0.3, 0.4], dtype=np.float32)
    np.testing.assert_array_equal(clip_to_norm(small, 1.0), small)
    assert not clip_to_norm(np.zeros(7), 1.0).any()
    with pytest.raises(ValueError, match="privacy.clip_norm"):
        clip_to_norm(small, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_to_norm(np.array([np.nan, 1.0]), 1.0)


def test_server_accepts_norm_exactly_c_and_rejects_anything_above():
    c = 1.0
    at = np.zeros(4, dtype=np.float32)
    at[0] = 1.0  # norm exactly C
    assert check_vector(at, 4, c) is None
    above = at.copy()
    above[0] = np.nextafter(np.float32(1.0), np.float32(2.0))  # one float32 ulp above C
    assert "exceeds the clip bound" in check_vector(above, 4, c)
    slightly = np.full(4, 0.5 * (1 + 1e-7), dtype=np.float64)  # 1e-7 relative above C
    assert "exceeds the clip bound" in check_vector(slightly, 4, c)
