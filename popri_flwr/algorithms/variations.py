"""Variations of texts (Private Evolution's mutation step): paraphrases from a generator.

Post-processing of public or released texts only: no private data is touched here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from popri_flwr.algorithms.prompts import variation_prompt
from popri_flwr.models.generation import Generator, SamplingParams, generate_samples

logger = logging.getLogger(__name__)


def with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    """``params`` with another seed."""
    return SamplingParams(**{**params.__dict__, "seed": int(seed)})


def generate_variations(
    generator: Generator,
    parents: Sequence[str],
    params: SamplingParams,
    tokenizer: Any = None,
    retries: int = 1,
) -> tuple[list[str], dict[str, int]]:
    """One paraphrase (``variation_prompt``, chat template) of each text in ``parents``.

    Empty outputs are generated again (``retries`` times, new seeds); a variation still empty
    after that becomes a copy of its parent, so the population never holds an empty text.

    Returns
    -------
    tuple
        ``(variations, stats)`` with ``variations[i]`` derived from ``parents[i]`` and
        ``stats = {"empty_variations": empties of the first pass, "variation_copies": copies}``.
    """
    out: list[str] = [""] * len(parents)
    todo = list(range(len(parents)))
    empty_first = 0
    for attempt in range(retries + 1):
        if not todo:
            break
        prompts = [variation_prompt(parents[i]) for i in todo]
        texts = generate_samples(
            generator,
            prompts,
            with_seed(params, params.seed + attempt),
            num_samples=1,
            tokenizer=tokenizer,
            chat=True,
        )
        for i, group in zip(todo, texts, strict=True):
            out[i] = group[0].strip()
        missing = [i for i in todo if not out[i]]
        if attempt == 0:
            empty_first = len(missing)
        todo = missing
    for i in todo:
        out[i] = parents[i]
    if todo:
        logger.warning("%d variations stayed empty; their parents were copied", len(todo))
    return out, {"empty_variations": empty_first, "variation_copies": len(todo)}


def expand_population(
    generator: Generator,
    texts: Sequence[str],
    n: int,
    params: SamplingParams,
    tokenizer: Any = None,
) -> list[str]:
    """Grow a (final) PE population to ``n`` texts by variations of its members.

    The population is returned first, then variations of its members round-robin in the
    population's order (kept members, best voted first, come first in PE's files). No private
    data is touched: this is post-processing of the released population.

    Parameters
    ----------
    generator, params, tokenizer
        Generator and sampling parameters of the variations.
    texts
        The population (e.g. the ``text`` fields of ``samples/round_{R+1:03d}.jsonl``).
    n
        Size wanted; ``n <= len(texts)`` returns the first ``n`` texts.
    """
    texts = list(texts)
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if n <= len(texts):
        return texts[:n]
    if not texts:
        raise ValueError("texts: cannot expand an empty population")
    parents = [texts[i % len(texts)] for i in range(n - len(texts))]
    variations, _ = generate_variations(generator, parents, params, tokenizer)
    return texts + variations
