"""The public initial set that POPri's few-shot prompts draw on (never private data).

Default: texts generated zero-shot from a public task description (e.g. "a paragraph from a US
presidential State of the Union address"); alternatively a file of public texts.
"""

from __future__ import annotations

import logging

from popri_flwr.algorithms.prompts import zero_shot_prompt
from popri_flwr.data import load_public_texts
from popri_flwr.models.generation import Generator, SamplingParams, generate_samples

logger = logging.getLogger(__name__)


def build_public_set(
    generator: Generator,
    description: str,
    size: int,
    params: SamplingParams,
    path: str | None = None,
    tokenizer=None,
) -> list[str]:
    """Return ``size`` public texts: from ``path`` if given, else generated zero-shot.

    Empty generations are dropped and regenerated (up to three attempts), so the few-shot
    prompts never show an empty example.
    """
    if path:
        texts = load_public_texts(path)
        if len(texts) < size:
            logger.warning(
                "public_set.path: %s has %d texts (< size=%d); using all", path, len(texts), size
            )
        return texts[:size]
    prompt = zero_shot_prompt(description)
    texts: list[str] = []
    for attempt in range(3):
        need = size - len(texts)
        if need <= 0:
            break
        batch = generate_samples(
            generator,
            [prompt],
            SamplingParams(**{**params.__dict__, "seed": params.seed + attempt}),
            num_samples=need,
            tokenizer=tokenizer,
            chat=True,
        )[0]
        texts += [t for t in batch if len(t.split()) >= 5]
    if len(texts) < size:
        raise RuntimeError(
            f"public_set: the generator produced only {len(texts)} usable texts of {size}; "
            "check public_set.description or give public_set.path"
        )
    return texts[:size]
