"""Poisson client sampling, the sampling that the accountant's amplification assumes.

Each client of the population takes part in a round independently with probability q, so
the number taken is Binomial(N, q) (mean Nq, variance Nq(1-q)), not a fixed round(qN). The
draws must come from :func:`popri_flwr.privacy.randomness.secret_rng`: amplification by subsampling
holds only while the sample is secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def poisson_sample(
    population: Sequence[T], sample_rate: float, rng: np.random.Generator
) -> list[T]:
    """Members of ``population`` kept independently with probability ``sample_rate``.

    Parameters
    ----------
    population
        The clients (ids) to sample from, in any fixed order.
    sample_rate
        q in (0, 1]; 1 keeps everybody (and draws nothing).
    rng
        Source of the draws (secret for a private run).

    Returns
    -------
    list
        The sampled members, in population order; may be empty.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"privacy.sample_rate: must be in (0, 1], got {sample_rate!r}")
    if sample_rate >= 1.0:
        return list(population)
    keep = rng.random(len(population)) < sample_rate
    return [member for member, k in zip(population, keep, strict=True) if k]
