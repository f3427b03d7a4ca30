"""Prompt building for POPri (step 1) and the zero-shot / variation prompts.

A POPri prompt shows ``shots`` public texts in a few-shot list and lets the model continue::

    List of 6 diverse original text samples:
    Original Text Sample 1
    {a}
    ...
    Original Text Sample 4

The sample is the continuation up to the next "Orig" marker.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# The next list item starts a new line with "Orig..." (usually "Original Text Sample N"); a
# word like "original" inside a sentence must not cut the sample.
_MARKER = re.compile(r"(?:^|\n)\s*Orig|Original Text Sample")


def few_shot_prompt(examples: Sequence[str]) -> str:
    """The few-shot list prompt over ``examples`` (header count = 2 * len(examples))."""
    lines = [f"List of {2 * len(examples)} diverse original text samples:"]
    for i, text in enumerate(examples, start=1):
        lines += [f"Original Text Sample {i}", text.strip()]
    lines.append(f"Original Text Sample {len(examples) + 1}")
    return "\n".join(lines) + "\n"


def build_prompts(
    public_texts: Sequence[str], num_prompts: int, rng: np.random.Generator, shots: int = 3
) -> list[str]:
    """``num_prompts`` prompts, each with ``shots`` distinct public texts drawn at random."""
    if len(public_texts) < shots:
        raise ValueError(f"public_set: needs at least {shots} texts, got {len(public_texts)}")
    return [
        few_shot_prompt([public_texts[i] for i in rng.choice(len(public_texts), shots, False)])
        for _ in range(num_prompts)
    ]


def extract_sample(continuation: str) -> str:
    """The generated sample: the text before the model starts the next "Original ..." item."""
    match = _MARKER.search(continuation)
    text = continuation[: match.start()] if match else continuation
    return text.strip()


def zero_shot_prompt(description: str) -> str:
    """Instruction for one public text matching ``description`` (used with a chat template)."""
    return (
        f"Write {description}. Reply with the text only: one paragraph of 60 to 120 words, "
        "no title, no preamble."
    )


def variation_prompt(text: str) -> str:
    """Instruction to paraphrase ``text`` (Private Evolution's variation step)."""
    return (
        "Rewrite the following paragraph in different words, keeping its topic, style and "
        f"length. Reply with the rewritten paragraph only.\n\n{text.strip()}"
    )
