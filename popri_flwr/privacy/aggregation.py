"""Server-side checks and the noisy sum (POPri step 5), shared by every private strategy.

S = sum_i v_i + N(0, (z * C)^2 I) over the accepted client vectors v_i, each re-checked on the
server: right length, finite, ||v_i||_2 <= C exactly (clients clip a hair inside C, see
:mod:`popri_flwr.privacy.clipping`). A client that ignores the clip cannot raise the sensitivity;
its
reply is dropped (logged), and the round goes on.

Floating point: the release is rounded to a grid of ``noise_std * 2**-GRID_BITS`` (post-
processing, so the guarantee is unchanged). That removes the low-order bits through which
attacks on floating-point noise samplers (Mironov 2012; Jin et al. 2022) tell neighbouring
inputs apart. It is a mitigation, not a proof: numpy's Gaussian sampler is not an exact
discrete Gaussian.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from popri_flwr.privacy.clipping import l2_norm

logger = logging.getLogger(__name__)

#: The release is rounded to multiples of noise_std / 2**GRID_BITS (about 1e-6 of the noise).
GRID_BITS = 20


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
    norm = l2_norm(vector)
    if norm > clip_norm:  # no slack: honest clients clip a hair inside C
        return f"L2 norm {norm:.9g} exceeds the clip bound {clip_norm}"
    return None


def check_rows(
    array: object, rows: int, expected_len: int, clip_norm: float
) -> tuple[np.ndarray | None, list[str | None]]:
    """Check a node's reply for ``rows`` clients, row by row.

    Returns
    -------
    (matrix, reasons)
        ``matrix`` is the reply as ``(rows, expected_len)`` (None if its shape or dtype is
        wrong: then every row is rejected with the same reason); ``reasons[i]`` says why row
        ``i`` must be rejected, or is None if the row is acceptable (same rule as
        :func:`check_vector`).
    """
    if not isinstance(array, np.ndarray):
        return None, [f"not an array ({type(array).__name__})"] * rows
    if array.ndim == 1 and rows == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape != (rows, expected_len):
        return None, [f"wrong shape {array.shape}, expected ({rows}, {expected_len})"] * rows
    if not np.issubdtype(array.dtype, np.floating):
        return None, [f"wrong dtype {array.dtype}, expected float"] * rows
    finite = np.isfinite(array).all(axis=1)
    reasons: list[str | None] = [None] * rows
    for i in np.flatnonzero(~finite):
        reasons[i] = "non-finite values (NaN or inf)"
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows: rejected above
        norms = np.sqrt(np.einsum("ij,ij->i", array, array, dtype=np.float64))
    for i in np.flatnonzero(finite & (norms > clip_norm)):
        # Re-measured exactly as for a single vector (no slack), so both paths agree.
        norm = l2_norm(array[i])
        if norm > clip_norm:
            reasons[i] = f"L2 norm {norm:.9g} exceeds the clip bound {clip_norm}"
    return array, reasons


def add_noise(total: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """``total + N(0, noise_std^2 I)`` in float64, rounded to the noise grid (the release)."""
    total = np.asarray(total, dtype=np.float64)
    if noise_std > 0:
        total = total + rng.normal(0.0, noise_std, size=total.shape)
    return round_to_grid(total, noise_std)


def round_to_grid(values: np.ndarray, noise_std: float) -> np.ndarray:
    """``values`` rounded to multiples of a power of two near ``noise_std / 2**GRID_BITS``."""
    if noise_std <= 0:
        return values
    step = 2.0 ** (np.floor(np.log2(noise_std)) - GRID_BITS)
    return np.round(values / step) * step


def noisy_sum(
    vectors: Iterable[np.ndarray], dim: int, noise_std: float, rng: np.random.Generator
) -> np.ndarray:
    """``sum(vectors) + N(0, noise_std^2 I)`` in float64, rounded to the noise grid.

    ``rng`` must be secret (:func:`popri_flwr.privacy.randomness.secret_rng`) for the release to be
    private; the global ``np.random`` state is never used.
    """
    total = np.zeros(dim, dtype=np.float64)
    for vec in vectors:
        total += vec.astype(np.float64)
    return add_noise(total, noise_std, rng)
