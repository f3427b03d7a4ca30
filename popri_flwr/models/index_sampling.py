"""Per-index seeded sampling: text ``i`` of a synthetic set depends only on ``(seed, i)``.

Every text has its own random stream, seeded by ``(seed, index)`` and used through the
Gumbel-max trick (``argmax(logits / T + Gumbel noise)`` over the top-p set samples exactly
``softmax(logits / T)`` restricted to top-p), so no draw depends on which other texts share
the batch, and a set written in pieces equals one written at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from popri_flwr.algorithms.prompts import build_prompts
from popri_flwr.models.generation import SamplingParams

#: Mixed into the per-index seeds so that prompts and sampling noise use different streams.
PROMPT_TAG, NOISE_TAG = 0x50524F4D, 0x4E4F4953


def index_seed(seed: int, index: int, tag: int) -> int:
    return int(np.random.SeedSequence([seed, index, tag]).generate_state(1)[0])


def prompt_for(
    public_texts: Sequence[str],
    prompt_index: int,
    seed: int,
    shots: int,
    style: str = "list",
    description: str = "",
) -> str:
    """Prompt number ``prompt_index`` (a function of the seed and index only).

    ``style``/``description`` as in :func:`~popri_flwr.algorithms.prompts.build_prompts`
    (a ``"chat"`` prompt still needs the chat template).
    """
    rng = np.random.default_rng(index_seed(seed, prompt_index, PROMPT_TAG))
    return build_prompts(public_texts, 1, rng, shots=shots, style=style, description=description)[0]


def _noise_processor(seeds: Sequence[int]):
    """A logits processor adding Gumbel noise, row ``r`` drawn from its own stream ``seeds[r]``.

    Each call draws one vector per row from that row's stream, so the noise a text sees at
    step ``t`` is the stream's ``t``-th draw whatever the batch. The streams live on the
    logits' device (created at the first call); CPU and CUDA streams differ.
    """
    import torch
    from transformers import LogitsProcessor

    class IndexGumbelNoise(LogitsProcessor):
        def __init__(self) -> None:
            self.streams: list[torch.Generator] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            device, vocab = scores.device, scores.shape[-1]
            if not self.streams:
                self.streams = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            u = torch.stack([torch.rand(vocab, generator=g, device=device) for g in self.streams])
            tiny = torch.finfo(torch.float32).tiny
            gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))
            return scores + gumbel.to(scores.dtype)

    return IndexGumbelNoise()


class IndexSeededGenerator:
    """Generator whose row ``r`` samples from the stream seeded by ``(seed, indices[r])``.

    Implements :class:`popri_flwr.models.generation.Generator` for ``num_samples=1`` and one batch,
    so :func:`popri_flwr.models.generation.generate_samples` does the cutting and truncation.
    """

    def __init__(self, model: Any, tokenizer: Any, indices: Sequence[int], seed: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.indices, self.seed = list(indices), seed

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        num_samples: int = 1,
        chat: bool = False,
    ) -> list[list[str]]:
        """Raw continuations, ``out[i] = [text]`` (one sample per prompt, one forward batch)."""
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        if num_samples != 1 or chat or len(prompts) != len(self.indices):
            raise ValueError("IndexSeededGenerator: one raw prompt per index, one sample each")
        tok = self.tokenizer
        tok.padding_side = "left"
        device = next(self.model.parameters()).device
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        processors = LogitsProcessorList()
        if params.temperature > 0:  # else greedy, as TransformersGenerator does
            # The order of transformers' own sampling: temperature, then top-p, then the draw.
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            seeds = [index_seed(self.seed, i, NOISE_TAG) for i in self.indices]
            processors.append(_noise_processor(seeds))
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                do_sample=False,  # argmax of the noisy logits is the sample
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=processors,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        return [[t] for t in tok.batch_decode(new, skip_special_tokens=True)]
