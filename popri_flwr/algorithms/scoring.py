"""Client-side scoring (POPri step 3-4): how well each synthetic sample matches a client's data.

For client i with private embeddings P_i (unit rows) and synthetic embeddings E (unit rows),

    x_i[k] = mean_j cos(E_k, P_ij) = E_k . mean_j P_ij,

then the vector is z-scored over all K*J entries and clipped to L2 norm <= C, which bounds one
client's contribution to the server's sum (L2 sensitivity C under add/remove of a client).
"""

from __future__ import annotations

import logging

import numpy as np

from popri_flwr.privacy.clipping import CLIP_MARGIN, clip_to_norm

logger = logging.getLogger(__name__)


def similarity_scores(sample_emb: np.ndarray, private_emb: np.ndarray) -> np.ndarray:
    """Mean cosine similarity of every synthetic sample to a client's private texts.

    Parameters
    ----------
    sample_emb
        ``(n, d)`` unit-norm embeddings of the synthetic samples.
    private_emb
        ``(m, d)`` unit-norm embeddings of the client's private texts; ``m`` may be 0.

    Returns
    -------
    np.ndarray
        ``(n,)`` float64 scores; all zeros for a client without texts.
    """
    if sample_emb.ndim != 2 or private_emb.ndim != 2:
        raise ValueError("scoring: embeddings must be 2-d arrays")
    if len(private_emb) == 0:
        return np.zeros(len(sample_emb))
    if sample_emb.shape[1] != private_emb.shape[1]:
        raise ValueError(
            f"scoring: embedding dims differ ({sample_emb.shape[1]} vs {private_emb.shape[1]});"
            " server and client must use the same embedder"
        )
    # mean_j <E_k, P_j> = <E_k, mean_j P_j>: one matrix-vector product instead of n x m.
    centroid = private_emb.astype(np.float64).mean(axis=0)
    return sample_emb.astype(np.float64) @ centroid


def standardize(scores: np.ndarray) -> np.ndarray:
    """Z-score a vector; a constant (or empty) vector maps to zeros instead of dividing by 0."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    std = scores.std()
    if not np.isfinite(std) or std < 1e-12:
        return np.zeros_like(scores)
    return (scores - scores.mean()) / std


def client_score_vector(
    sample_emb: np.ndarray, private_emb: np.ndarray, clip_norm: float = 1.0
) -> np.ndarray:
    """The only thing a POPri client sends: ``clip(zscore(similarity_scores))``.

    Returns
    -------
    np.ndarray
        ``(n,)`` float32 vector with L2 norm <= ``clip_norm``; zeros for an empty client.
    """
    return clip_to_norm(standardize(similarity_scores(sample_emb, private_emb)), clip_norm)


def centroid(private_emb: np.ndarray) -> np.ndarray:
    """``mean_j P_j`` in float64 (zeros of the right width for a client without texts)."""
    if private_emb.ndim != 2:
        raise ValueError("scoring: embeddings must be 2-d arrays")
    if len(private_emb) == 0:
        return np.zeros(private_emb.shape[1])
    return private_emb.astype(np.float64).mean(axis=0)


#: Temporary memory of one chunk of :func:`score_matrix` (float32 scores), in bytes.
CHUNK_BYTES = 64 * 2**20

#: A client whose scores have a smaller standard deviation gets a zero vector (as if constant).
MIN_STD = 1e-7


def score_matrix(
    sample_emb: np.ndarray,
    centroids: np.ndarray,
    clip_norm: float = 1.0,
    *,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """:func:`client_score_vector` of many clients at once, in bounded memory.

    Row i is ``clip_C(zscore(E c_i))`` for client centroid ``c_i``. The per-client mean and
    standard deviation need no pass over the scores: with ``m = mean_k E_k`` and
    ``G = E^T E / n`` (both d x d or smaller, float64),

        mean_k s_ik = c_i . m,     var_k s_ik = c_i^T G c_i - (c_i . m)^2,

    and a z-scored vector has norm exactly sqrt(n), so the clip factor is known in advance.
    Each chunk is then one float32 matrix product and one fused scale; rows are re-checked
    (float64 norm) and any row the float32 arithmetic put over ``C (1 - 1e-6)`` goes through
    :func:`~popri_flwr.privacy.clipping.clip_to_norm`, so every row has norm <= C as the
    server measures it.

    Parameters
    ----------
    sample_emb
        ``(n, d)`` unit-norm embeddings of the synthetic samples.
    centroids
        ``(m, d)`` client centroids (:func:`centroid`); a zero row is a client without texts.
    clip_norm
        C.
    chunk_rows
        Rows per chunk (default: about :data:`CHUNK_BYTES` of scores per chunk).

    Returns
    -------
    np.ndarray
        ``(m, n)`` float32; equal to :func:`client_score_vector` row by row up to float32
        rounding (about 1e-5 relative).
    """
    if sample_emb.ndim != 2 or centroids.ndim != 2:
        raise ValueError("scoring: embeddings must be 2-d arrays")
    n, m = len(sample_emb), len(centroids)
    out = np.zeros((m, n), dtype=np.float32)
    if n == 0 or m == 0:
        return out
    if sample_emb.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"scoring: embedding dims differ ({sample_emb.shape[1]} vs {centroids.shape[1]});"
            " server and client must use the same embedder"
        )
    e32 = np.ascontiguousarray(sample_emb, dtype=np.float32)
    e64 = e32.astype(np.float64)
    mean_e = e64.mean(axis=0)
    gram = e64.T @ e64 / n
    shrink = min(1.0, clip_norm / np.sqrt(n)) * (1.0 - CLIP_MARGIN)
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * n))
    for start in range(0, m, rows):
        c64 = np.asarray(centroids[start : start + rows], dtype=np.float64)
        mu = c64 @ mean_e
        std = np.sqrt(np.maximum(np.einsum("id,id->i", c64 @ gram, c64) - mu * mu, 0.0))
        scale = np.where(std >= MIN_STD, shrink / np.maximum(std, MIN_STD), 0.0)
        block = c64.astype(np.float32) @ e32.T
        block -= mu.astype(np.float32)[:, None]
        block *= scale.astype(np.float32)[:, None]
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        for i in np.flatnonzero(norms > clip_norm * (1.0 - 1e-6)):  # float32 rounding, rare
            block[i] = clip_to_norm(block[i], clip_norm * (1.0 - 2e-6))
        out[start : start + len(block)] = block
    return out
