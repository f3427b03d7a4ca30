"""Secret randomness (privacy) and seeded randomness (everything public), kept apart.

The DP guarantee assumes that nobody can reproduce the randomness that protects it: which
clients take part in a round (the Poisson sample that amplification relies on) and the
Gaussian noise. :func:`secret_rng` therefore draws a fresh 256-bit seed from the operating
system's CSPRNG (:mod:`secrets`) for every use; it is never derived from the config, never
stored, never logged. Everything else (prompts, generation, DPO shuffling, downstream training)
is public post-processing and uses :func:`seeded_rng` so runs can be reproduced.

:func:`seeded_rng` is also what an explicit, non-default debugging switch
(``privacy.debug_noise_seed``) uses for the private draws; a run made that way is marked
NOT differentially private everywhere it writes.
"""

from __future__ import annotations

import secrets

import numpy as np


def secret_rng() -> np.random.Generator:
    """A generator seeded with 256 fresh bits of OS entropy; nothing about it is kept."""
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(secrets.randbits(256))))


def purpose_key(purpose: str) -> int:
    """A stable integer for a short purpose label (``"noise"``, ``"sample"``, ``"prompts"``)."""
    return int.from_bytes(purpose.encode()[:8].ljust(8, b"\0"), "little")


def seeded_rng(seed: int, server_round: int, purpose: str) -> np.random.Generator:
    """A reproducible generator per (seed, round, purpose), for public randomness only."""
    return np.random.default_rng([int(seed), int(server_round), purpose_key(purpose)])
