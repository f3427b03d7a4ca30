"""Private Evolution (Aug-PE for text) with client-level DP: votes, selection, refill plan.

Round t with a population of M synthetic texts (unit-norm embeddings E, shape ``(M, d)``)::

    client i: h_i[m] = sum_j (1/k) [E_m is one of the k nearest members to P_ij]   (cosine)
              v_i    = C * h_i / ||h_i||_2          (zeros if client i has no texts)
    server  : s      = sum_i v_i + N(0, (sigma C)^2 I)        (the noisy vote histogram)
              keep the top ``round(keep_fraction * M)`` members by s, refill to M with
              variations of the kept ones (round-robin in rank order)

Why normalise each histogram to norm C (rather than only clip it): the privacy unit is the
client, so one client may move the sum by at most C in L2. Scaling every non-empty client to
exactly C uses the whole sensitivity budget (the best signal-to-noise for a given sigma) and
gives every client equal weight, however many texts it holds: a client's votes say *where* its
data lies, not how much data it has. L1 normalisation would also bound the sensitivity but
shrinks spread-out clients to norm C / sqrt(n), wasting budget. An empty client sends zeros.

Pure numpy; no Flower import (the strategy and the client app wrap these functions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from popri_flwr.privacy.clipping import clip_to_norm

logger = logging.getLogger(__name__)


@dataclass
class PEConfig:
    """Private Evolution settings (``strategy.pe`` in ``conf/strategy/pe.yaml``).

    Parameters
    ----------
    population_size
        M, synthetic texts per round (and the size of the final synthetic set); ``None``:
        ``num_prompts * samples_per_prompt``, the number of texts POPri generates per round.
    keep_fraction
        Share of the population kept each round by noisy votes, in (0, 1); the rest is replaced
        by variations of the kept texts.
    votes_k
        Each private text votes for its ``votes_k`` nearest members with weight ``1/votes_k``.
    """

    population_size: int | None = None
    keep_fraction: float = 0.5
    votes_k: int = 1

    def __post_init__(self) -> None:
        key = "strategy.pe"
        size = self.population_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int | np.integer)):
            raise ValueError(f"{key}.population_size: expected an integer, got {size!r}")
        if size is not None and size < 2:
            raise ValueError(f"{key}.population_size: must be >= 2, got {size}")
        if isinstance(self.keep_fraction, bool) or not isinstance(self.keep_fraction, int | float):
            raise ValueError(f"{key}.keep_fraction: expected a number, got {self.keep_fraction!r}")
        if not 0 < self.keep_fraction < 1:
            raise ValueError(f"{key}.keep_fraction: must be in (0, 1), got {self.keep_fraction!r}")
        if isinstance(self.votes_k, bool) or not isinstance(self.votes_k, int | np.integer):
            raise ValueError(f"{key}.votes_k: expected an integer, got {self.votes_k!r}")
        if self.votes_k < 1 or (size is not None and self.votes_k > size):
            raise ValueError(
                f"{key}.votes_k: must be in [1, population_size={size}], got {self.votes_k}"
            )
        self.population_size = None if size is None else int(size)
        self.votes_k, self.keep_fraction = int(self.votes_k), float(self.keep_fraction)

    def resolved(self, default_population: int) -> PEConfig:
        """A copy whose ``population_size`` is set (``default_population`` if it was None)."""
        size = self.population_size if self.population_size is not None else default_population
        return PEConfig(size, self.keep_fraction, self.votes_k)

    @property
    def num_kept(self) -> int:
        """Members kept per round: ``round(keep_fraction * M)``, at least 1 and at most M - 1."""
        if self.population_size is None:
            raise ValueError("strategy.pe.population_size: not resolved (call resolved())")
        return num_kept(self.population_size, self.keep_fraction)


def num_kept(population_size: int, keep_fraction: float) -> int:
    """``round(keep_fraction * M)`` clamped to ``[1, M - 1]`` (keep one, vary at least one)."""
    return min(population_size - 1, max(1, round(keep_fraction * population_size)))


def vote_counts(pop_emb: np.ndarray, private_emb: np.ndarray, k: int = 1) -> np.ndarray:
    """Raw (un-normalised) nearest-neighbour vote histogram of one client.

    Parameters
    ----------
    pop_emb
        ``(M, d)`` unit-norm embeddings of the population.
    private_emb
        ``(n, d)`` unit-norm embeddings of the client's private texts; ``n`` may be 0.
    k
        Each private text gives weight ``1/k`` to each of its ``k`` most similar members
        (cosine = dot product of unit vectors), so the histogram sums to ``n``.

    Returns
    -------
    np.ndarray
        ``(M,)`` float64 counts.
    """
    if pop_emb.ndim != 2 or private_emb.ndim != 2:
        raise ValueError("voting: embeddings must be 2-d arrays")
    m = len(pop_emb)
    if not 1 <= k <= m:
        raise ValueError(f"strategy.pe.votes_k: must be in [1, {m}], got {k}")
    counts = np.zeros(m, dtype=np.float64)
    if len(private_emb) == 0:
        return counts
    if pop_emb.shape[1] != private_emb.shape[1]:
        raise ValueError(
            f"voting: embedding dims differ ({pop_emb.shape[1]} vs {private_emb.shape[1]}); "
            "server and client must use the same embedder"
        )
    sims = private_emb.astype(np.float64) @ pop_emb.astype(np.float64).T  # (n, M)
    if k == 1:
        nearest = np.argmax(sims, axis=1)[:, None]
    else:
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    np.add.at(counts, nearest.ravel(), 1.0 / k)
    return counts


def client_vote_vector(
    pop_emb: np.ndarray, private_emb: np.ndarray, clip_norm: float = 1.0, k: int = 1
) -> np.ndarray:
    """The only thing a PE client sends: its vote histogram scaled to L2 norm C.

    Parameters
    ----------
    pop_emb, private_emb, k
        See :func:`vote_counts`.
    clip_norm
        C, the L2 sensitivity of one client.

    Returns
    -------
    np.ndarray
        ``(M,)`` float32 with ``||v||_2 <= C`` (a hair below C for non-empty clients, so the
        float32 cast cannot exceed the bound); zeros for a client without texts.
    """
    if clip_norm <= 0:
        raise ValueError(f"privacy.clip_norm: must be > 0, got {clip_norm}")
    counts = vote_counts(pop_emb, private_emb, k)
    norm = float(np.linalg.norm(counts))
    if norm < 1e-12:
        return np.zeros(len(counts), dtype=np.float32)
    return clip_to_norm(counts * (clip_norm / norm), clip_norm)


def select_top(votes: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` members with the most (noisy) votes, best first.

    Ties are broken by index (stable sort), so selection is reproducible.
    """
    votes = np.asarray(votes, dtype=np.float64)
    if not 1 <= keep <= len(votes):
        raise ValueError(f"voting: keep must be in [1, {len(votes)}], got {keep}")
    return np.argsort(-votes, kind="stable")[:keep]


def refill_parents(kept: np.ndarray, population_size: int) -> np.ndarray:
    """Parent of each new member: the kept ones round-robin in rank order.

    With ``keep_fraction = 0.5`` every kept text gets exactly one variation; otherwise the best
    voted get one more than the rest.
    """
    need = population_size - len(kept)
    if need < 0 or len(kept) == 0:
        raise ValueError(
            f"voting: cannot refill {len(kept)} kept members to a population of {population_size}"
        )
    return np.asarray([kept[i % len(kept)] for i in range(need)], dtype=np.int64)


def vote_summary(votes: np.ndarray, kept: np.ndarray) -> dict[str, float | None]:
    """Mean noisy votes of kept and dropped members (round-log metrics)."""
    votes = np.asarray(votes, dtype=np.float64)
    mask = np.zeros(len(votes), dtype=bool)
    mask[kept] = True

    def mean(x: np.ndarray) -> float | None:
        return float(x.mean()) if len(x) else None

    return {
        "votes_kept_mean": mean(votes[mask]),
        "votes_dropped_mean": mean(votes[~mask]),
        "votes_total": float(votes.sum()),
        "votes_max": float(votes.max()) if len(votes) else None,
    }
