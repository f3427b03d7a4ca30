"""Tilt weights from noisy scores: the target a weighted fine-tuning step fits (``update=tilt``).

DPO's optimum for a reward ``r`` is the reference policy tilted by it,
``pi(y|x) ~ pi_ref(y|x) exp(r(y) / beta)``. The round's samples are draws from the current
policy, so reweighting them prompt by prompt with ``softmax_j(z_kj / tau)`` of the standardized
noisy scores ``z`` is a sample of that tilt, and maximizing ``sum_kj w_kj log pi(y_kj | x_k)``
moves the policy toward it (reward-weighted regression). Its target is the tilt itself, not
DPO's gradient direction: at ``tau = inf`` the weights are uniform and the expected gradient on
the policy's own samples is zero. ``docs/learning.md`` (stop 22) measured such tilts of round-1
samples: FID 0.327 -> 0.287 at ``tau = 1``. Rounds compound, though: each tilts the last
round's policy, so three rounds at ``tau = 1`` overshoot like DPO did (stop 24), while a
per-round ``tau = 3`` over all samples, about one ``tau = 1`` tilt over three rounds, lowered
FID in the rounds after the first (stop 25).

Everything here is post-processing of the noisy release: no privacy cost.
"""

from __future__ import annotations

import numpy as np


def tilt_weights(
    scores: np.ndarray, samples_per_prompt: int, tau: float, keep: int | None = None
) -> np.ndarray:
    """Per-prompt weights ``softmax_j(z_kj / tau)``, each prompt's summing to 1.

    Parameters
    ----------
    scores
        ``K * J`` noisy scores, prompt-major (sample ``i`` belongs to prompt ``i // J``).
    samples_per_prompt
        J.
    tau
        Temperature of the tilt on scores standardized over the round (mean 0, std 1); smaller
        is a stronger pull, ``inf`` uniform.
    keep
        Only each prompt's ``keep`` highest-weighted samples get weight (renormalized), so a
        step trains on ``K * keep`` sequences instead of ``K * J``; ``None``: all J (the tilt
        itself; keeping fewer sharpens it further).

    Returns
    -------
    numpy.ndarray
        ``K * J`` weights (zeros for samples left out).
    """
    scores = np.asarray(scores, dtype=np.float64)
    j = int(samples_per_prompt)
    if scores.ndim != 1 or j < 1 or len(scores) % j:
        raise ValueError(f"tilt_weights: expected K * {j} scores, got shape {scores.shape}")
    if not tau > 0:
        raise ValueError(f"strategy.tilt_tau: must be > 0, got {tau}")
    keep = j if keep is None else keep
    if not 1 <= keep <= j:
        raise ValueError(f"strategy.tilt_keep: must be in [1, {j}], got {keep}")
    if not np.isfinite(scores).all():
        raise ValueError("tilt_weights: scores contain NaN or inf")
    spread = scores.std()
    z = (scores - scores.mean()) / (spread if spread > 0 else 1.0)
    logits = (np.zeros_like(z) if np.isinf(tau) else z / tau).reshape(-1, j)
    # Ties broken by position (stable), so equal scores keep the first samples.
    order = np.argsort(-logits, axis=1, kind="stable")[:, :keep]
    kept = np.take_along_axis(logits, order, axis=1)
    e = np.exp(kept - kept.max(axis=1, keepdims=True))
    w = np.zeros_like(logits)
    np.put_along_axis(w, order, e / e.sum(axis=1, keepdims=True), axis=1)
    return w.reshape(-1)


__all__ = ["tilt_weights"]
