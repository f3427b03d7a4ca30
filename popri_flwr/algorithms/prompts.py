"""Prompt building for POPri (step 1) and the zero-shot / variation prompts.

A POPri prompt shows ``shots`` public texts in a few-shot list and lets the model continue::

    List of 6 diverse original text samples:
    Original Text Sample 1
    {a}
    ...
    Original Text Sample 4

The sample is the continuation up to the next "Orig" marker. That list continuation suits a
base model. An instruct model writes better text when asked in its own chat format, so
``style="chat"`` puts the same public examples in an instruction instead (:func:`chat_prompt`);
the caller wraps it in the tokenizer's chat template, and the sample is the reply::

    Examples of {description}:

    {a}

    Write one more, new and different from these examples. Reply with the text only: one
    paragraph of 60 to 120 words, no title, no preamble.
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


def chat_prompt(examples: Sequence[str], description: str) -> str:
    """The chat-style instruction over ``examples`` (a user message, not yet templated)."""
    if not description.strip():
        raise ValueError("public_set.description: the chat prompt style needs a description")
    shown = "\n\n".join(text.strip() for text in examples)
    return (
        f"Examples of {description}:\n\n{shown}\n\n"
        "Write one more, new and different from these examples. Reply with the text only: one "
        "paragraph of 60 to 120 words, no title, no preamble."
    )


#: Values of ``strategy.prompt_style``.
PROMPT_STYLES = ("list", "chat")


def build_prompts(
    public_texts: Sequence[str],
    num_prompts: int,
    rng: np.random.Generator,
    shots: int = 3,
    style: str = "list",
    description: str = "",
) -> list[str]:
    """``num_prompts`` prompts, each with ``shots`` distinct public texts drawn at random.

    ``style="list"``: the few-shot list to continue (:func:`few_shot_prompt`); ``"chat"``: the
    instruction of :func:`chat_prompt` over ``description``, which the caller still has to wrap
    in the generator's chat template. Both draw the same examples from the same ``rng``.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"strategy.prompt_style: expected one of {PROMPT_STYLES}, got {style!r}")
    if len(public_texts) < shots:
        raise ValueError(f"public_set: needs at least {shots} texts, got {len(public_texts)}")
    prompts = []
    for _ in range(num_prompts):
        examples = [public_texts[i] for i in rng.choice(len(public_texts), shots, False)]
        prompts.append(
            few_shot_prompt(examples) if style == "list" else chat_prompt(examples, description)
        )
    return prompts


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
