"""Server-side checks and the noisy sum (POPri step 5), shared by every private strategy.

S = sum_i v_i + N(0, (z * C)^2 I) over the accepted client vectors v_i, each re-checked on the
server: right length, finite, ||v_i||_2 <= C. A client that ignores the clip cannot raise the
sensitivity; its reply is dropped (logged), and the round goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

logger = logging.getLogger(__name__)

#: Relative slack on the norm check, for float32 round-off of a vector clipped to exactly C.
NORM_TOLERANCE = 1e-5


def check_vector(vector: object, expected_len: int, clip_norm: float) -> str | None:
    """Return why a client vector must be rejected, or ``None`` if it is acceptable."""
    if not isinstance(vector, np.ndarray):
        return f"not an array ({type(vector).__name__})"
    if vector.ndim != 1 or vector.shape[0] != expected_len:
        return f"wrong shape {vector.shape}, expected ({expected_len},)"
    if not np.issubdtype(vector.dtype, np.floating):
        return f"wrong dtype {vector.dtype}, expected float"
    if not np.all(np.isfinite(vector)):
        return "non-finite values (NaN or inf)"
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm > clip_norm * (1 + NORM_TOLERANCE):
        return f"L2 norm {norm:.6g} exceeds the clip bound {clip_norm}"
    return None


def noisy_sum(
    vectors: Iterable[np.ndarray], dim: int, noise_std: float, rng: np.random.Generator
) -> np.ndarray:
    """``sum(vectors) + N(0, noise_std^2 I)`` in float64, drawn from the strategy's own RNG."""
    total = np.zeros(dim, dtype=np.float64)
    for vec in vectors:
        total += vec.astype(np.float64)
    if noise_std > 0:
        total += rng.normal(0.0, noise_std, size=dim)
    return total
