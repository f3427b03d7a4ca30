"""The one clipping rule every client uses before anything leaves the device.

``clip_C(v) = v * min(1, C / ||v||_2)``, returned as float32 with ``||out||_2 <= C`` *exactly*
as the server measures it (the norm of the float32 vector, computed in float64). The server
accepts ``||v|| <= C`` with no slack, so the float32 cast must never round the norm above C:
a vector that is clipped is scaled to a hair inside C, and shrunk once more if the cast still
lands above the bound.
"""

from __future__ import annotations

import math

import numpy as np

#: Relative margin below C for vectors that are clipped (float32 has ~6e-8 relative precision).
CLIP_MARGIN = 1e-6


def l2_norm(vector: np.ndarray) -> float:
    """The L2 norm as the server computes it: in float64, whatever the dtype sent."""
    return float(np.linalg.norm(np.asarray(vector, dtype=np.float64)))


def clip_to_norm(vector: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale ``vector`` by ``min(1, C / ||vector||_2)``; float32 with ``||out||_2 <= C``.

    Parameters
    ----------
    vector
        Any 1-D array (a score vector, a vote histogram, a model update).
    clip_norm
        C > 0, the L2 sensitivity of one client's contribution.

    Returns
    -------
    numpy.ndarray
        float32 vector with :func:`l2_norm` ``<= C``; equal to ``vector`` if it was already
        inside the ball (a zero vector stays zero).

    Raises
    ------
    ValueError
        If ``clip_norm`` is not a finite number > 0, or ``vector`` holds NaN or inf.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"privacy.clip_norm: must be a finite number > 0, got {clip_norm!r}")
    v64 = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(v64)):
        raise ValueError("clip: non-finite values (NaN or inf) in the client's vector")
    norm = float(np.linalg.norm(v64))
    if norm > clip_norm:
        v64 = v64 * (clip_norm * (1.0 - CLIP_MARGIN) / norm)
    out = v64.astype(np.float32)
    while l2_norm(out) > clip_norm:  # float32 rounding of an unclipped vector right at C
        out = (out.astype(np.float64) * (1.0 - CLIP_MARGIN)).astype(np.float32)
    return out
