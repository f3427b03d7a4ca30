"""Preference pairs from noisy scores (POPri step 6).

Samples are laid out prompt-major: sample ``k`` belongs to prompt ``k // J``. For each prompt
its J samples are ranked by noisy score (descending). The paper's pairing (``rank``) takes one
pair per prompt: chosen = rank 0, rejected = rank r. ``all`` takes every pair of ranks
a < b with b - a >= r, chosen = rank a, rejected = rank b: up to ``(J - r)(J - r + 1) / 2``
pairs per prompt from the same samples and the same release (post-processing: no privacy
cost), so DPO sees more of the order the clients gave. Everything goes by index, never by
string, so duplicate texts keep their own scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAIRINGS = ("rank", "all")


@dataclass(frozen=True)
class PreferencePairs:
    """Pairs for DPO plus the indices they came from."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    chosen_index: np.ndarray
    rejected_index: np.ndarray
    score_gap: np.ndarray  # noisy score(chosen) - noisy score(rejected), per pair

    def as_records(self) -> list[dict[str, str]]:
        """``[{"prompt", "chosen", "rejected"}]`` as TRL's DPOTrainer expects."""
        return [
            {"prompt": p, "chosen": c, "rejected": r}
            for p, c, r in zip(self.prompts, self.chosen, self.rejected, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.prompts)


def build_pairs(
    prompts: list[str],
    samples: list[str],
    scores: np.ndarray,
    samples_per_prompt: int,
    reject_rank: int,
    skip_empty: bool = True,
    pairing: str = "rank",
) -> PreferencePairs:
    """Pick (best, rank-r) per prompt, or every pair at least r ranks apart.

    Parameters
    ----------
    prompts
        ``K`` prompts.
    samples
        ``K * J`` samples, prompt-major.
    scores
        ``K * J`` noisy scores aligned with ``samples``.
    samples_per_prompt
        ``J``.
    reject_rank
        Zero-based rank of the rejected sample, ``1 <= r < J`` (``all``: the least rank gap).
    skip_empty
        Skip a pair whose chosen or rejected sample is empty (nothing to learn from).
    pairing
        ``rank`` (the paper: one pair per prompt) or ``all`` (every rank pair ``(a, b)`` with
        ``b - a >= r``, prompt-major, then by ``a``, then ``b``).
    """
    k, j = len(prompts), samples_per_prompt
    scores = np.asarray(scores, dtype=np.float64)
    if len(samples) != k * j or scores.shape != (k * j,):
        raise ValueError(
            f"preference: expected {k}*{j}={k * j} samples and scores, "
            f"got {len(samples)} and {scores.shape}"
        )
    if not 1 <= reject_rank < j:
        raise ValueError(f"strategy.reject_rank: must be in [1, {j}), got {reject_rank}")
    if pairing not in PAIRINGS:
        raise ValueError(f"strategy.pairing: expected one of {PAIRINGS}, got {pairing!r}")
    ranks = [(0, reject_rank)]
    if pairing == "all":
        ranks = [(a, b) for a in range(j) for b in range(a + reject_rank, j)]
    a, b = np.array(ranks).T
    # Stable sort on -score: ties keep generation order, so results are deterministic.
    order = np.argsort(-scores.reshape(k, j), axis=1, kind="stable") + np.arange(k)[:, None] * j
    chosen, rejected = order[:, a].ravel(), order[:, b].ravel()  # prompt-major
    keep = [
        n
        for n in range(len(chosen))
        if not skip_empty or (samples[chosen[n]].strip() and samples[rejected[n]].strip())
    ]
    chosen, rejected = chosen[keep], rejected[keep]
    return PreferencePairs(
        prompts=[prompts[c // j] for c in chosen],
        chosen=[samples[c] for c in chosen],
        rejected=[samples[r] for r in rejected],
        chosen_index=chosen,
        rejected_index=rejected,
        score_gap=scores[chosen] - scores[rejected],
    )


def pairs_from_rows(
    rows: list[dict], samples_per_prompt: int, reject_rank: int, pairing: str = "rank"
) -> PreferencePairs:
    """Rebuild a finished round's pairs from its released sample rows.

    ``rows`` are the round's samples file, prompt-major, each with ``prompt_id``, ``prompt``,
    ``text`` and the released ``noisy_score``. Only released values go in, so reusing the
    pairs later (``strategy.replay_rounds``) is post-processing: it costs no privacy.

    Raises
    ------
    ValueError
        If a row has no ``noisy_score`` (the round was never scored) or the rows are not
        whole prompts of ``samples_per_prompt`` samples.
    """
    if any(row.get("noisy_score") is None for row in rows):
        raise ValueError("preference: a sample row has no noisy_score; its round was not scored")
    j = samples_per_prompt
    if not rows or len(rows) % j:
        raise ValueError(f"preference: expected whole prompts of {j} samples, got {len(rows)} rows")
    prompts = [rows[k * j]["prompt"] for k in range(len(rows) // j)]
    if any(int(row["prompt_id"]) != i // j for i, row in enumerate(rows)):
        raise ValueError("preference: sample rows are not prompt-major (prompt_id = index // J)")
    scores = np.array([row["noisy_score"] for row in rows], dtype=np.float64)
    texts = [row["text"] for row in rows]
    return build_pairs(prompts, texts, scores, j, reject_rank, pairing=pairing)
