"""Client-side scoring (POPri step 3-4): how well each synthetic sample matches a client's data.

For client i with private embeddings P_i (unit rows) and synthetic embeddings E (unit rows),

    x_i[k] = mean_j cos(E_k, P_ij) = E_k . mean_j P_ij,

then the vector is z-scored over all K*J entries and clipped to L2 norm <= C, which bounds one
client's contribution to the server's sum (L2 sensitivity C under add/remove of a client).
"""

from __future__ import annotations

import logging

import numpy as np

from popri_flwr.privacy.clipping import clip_to_norm

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
