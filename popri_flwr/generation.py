"""Text generation backends: transformers (CPU or CUDA) and vLLM (GPU, optional extra).

A generator maps prompts and sampling parameters to texts. The strategy swaps
``generator.model`` for the DPO policy, so generation always uses the current adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from popri_flwr.prompts import extract_sample

logger = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """Sampling settings (POPri reference: T = 1, top-p = 1, 85 new tokens, cut to 64)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 85
    truncate_tokens: int | None = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"generation.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.truncate_tokens is not None and self.truncate_tokens < 1:
            raise ValueError(
                f"generation.truncate_tokens: must be >= 1 or null, got {self.truncate_tokens}"
            )

    @classmethod
    def from_config(cls, g: Any, seed: int) -> SamplingParams:
        """The sampling settings of a ``generation:`` config (GenerationConfig), seeded."""
        return cls(
            temperature=g.temperature,
            top_p=g.top_p,
            max_new_tokens=g.max_new_tokens,
            truncate_tokens=g.truncate_tokens,
            seed=seed,
        )


class Generator(Protocol):
    """Anything that turns prompts into ``num_samples`` continuations each."""

    model: Any
    tokenizer: Any

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        num_samples: int = 1,
        chat: bool = False,
    ) -> list[list[str]]: ...


class TransformersGenerator:
    """Batched, seeded sampling with a transformers causal LM (a PeftModel works too).

    Parameters
    ----------
    model, tokenizer
        The model (any device) and its tokenizer.
    batch_size
        Sequences per forward batch (prompts x samples are flattened, then batched).
    progress
        Show a tqdm bar.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress

    def _format(self, prompt: str, chat: bool) -> str:
        if chat and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        num_samples: int = 1,
        chat: bool = False,
    ) -> list[list[str]]:
        """Raw continuations: ``out[i][j]`` is sample j of prompt i (order independent of batching).

        Each batch reseeds torch from ``(params.seed, batch index)`` so results do not depend on
        what ran before in the process.
        """
        import torch
        from tqdm.auto import tqdm

        flat = [self._format(p, chat) for p in prompts for _ in range(num_samples)]
        texts: list[str] = []
        device = next(self.model.parameters()).device
        tok = self.tokenizer
        tok.padding_side = "left"
        was_training = self.model.training
        self.model.eval()
        batches = range(0, len(flat), self.batch_size)
        bar = tqdm(batches, desc="generate", unit="batch", disable=not self.progress, leave=False)
        with torch.inference_mode():
            for b, start in enumerate(bar):
                chunk = flat[start : start + self.batch_size]
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                torch.manual_seed(params.seed * 100_003 + b)
                sample = params.temperature > 0
                out = self.model.generate(
                    **enc,
                    do_sample=sample,
                    temperature=params.temperature if sample else None,
                    top_p=params.top_p if sample else None,
                    top_k=0 if sample else None,
                    max_new_tokens=params.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                texts += tok.batch_decode(new, skip_special_tokens=True)
        if was_training:
            self.model.train()
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


class VLLMGenerator:
    """vLLM backend (``pip install 'popri-flwr[vllm]'``, CUDA GPU). LoRA via ``set_adapter``."""

    def __init__(self, model_path: str, tokenizer: Any = None, **engine_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError:
            raise ImportError(
                "generation.backend=vllm needs vLLM: pip install 'popri-flwr[vllm]' "
                "(a CUDA GPU is required)"
            ) from None
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("generation.backend=vllm needs a CUDA GPU; none is visible")
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_path, enable_lora=True, **engine_kwargs)
        self.tokenizer = tokenizer or self.llm.get_tokenizer()
        self.model = None  # the DPO policy lives in transformers; vLLM reads saved adapters
        self._lora: Any = None
        self._lora_id = 0

    def set_adapter(self, path: str | Path | None) -> None:
        """Generate with the LoRA adapter saved at ``path`` (None: the base model)."""
        from vllm.lora.request import LoRARequest

        if path is None:
            self._lora = None
            return
        self._lora_id += 1
        self._lora = LoRARequest(f"popri-{self._lora_id}", self._lora_id, str(path))

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        num_samples: int = 1,
        chat: bool = False,
    ) -> list[list[str]]:
        sp = self._vllm.SamplingParams(
            n=num_samples,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
        )
        if chat:
            msgs = [[{"role": "user", "content": p}] for p in prompts]
            outs = self.llm.chat(msgs, sp, lora_request=self._lora)
        else:
            outs = self.llm.generate(list(prompts), sp, lora_request=self._lora)
        return [[c.text for c in o.outputs] for o in outs]


_MODEL_CACHE: dict[tuple[str, str, str | None], tuple[Any, Any]] = {}


def load_model_cached(name_or_path: str, device: str, cache_dir: str | None = None):
    """(model, tokenizer) loaded once per process for (name, device)."""
    from popri_flwr.model_loading import load_causal_lm, resolve_device

    key = (name_or_path, resolve_device(device), cache_dir)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_causal_lm(name_or_path, device=key[1], cache_dir=cache_dir)
    return _MODEL_CACHE[key]


def make_generator(
    backend: str = "transformers",
    model_name_or_path: str = "packaged:smollm2-135m-instruct",
    device: str = "auto",
    batch_size: int = 16,
    cache_dir: str | None = None,
    progress: bool = True,
) -> Generator:
    """Build a generator for ``backend`` (``transformers`` or ``vllm``)."""
    if backend == "transformers":
        model, tok = load_model_cached(model_name_or_path, device, cache_dir)
        return TransformersGenerator(model, tok, batch_size=batch_size, progress=progress)
    if backend == "vllm":
        from popri_flwr.model_loading import resolve_model_path

        return VLLMGenerator(resolve_model_path(model_name_or_path, cache_dir))
    raise ValueError(f"generation.backend: expected transformers or vllm, got {backend!r}")


def generator_from_config(g: Any, progress: bool = True) -> Generator:
    """:func:`make_generator` for a ``generation:`` config (GenerationConfig)."""
    return make_generator(g.backend, g.model, g.device, g.batch_size, g.cache_dir, progress)


def truncate_to_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (no special tokens counted)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip()


def generate_samples(
    generator: Generator,
    prompts: Sequence[str],
    params: SamplingParams,
    num_samples: int,
    tokenizer: Any = None,
    chat: bool = False,
) -> list[list[str]]:
    """Generate, cut at the next "Original Text Sample", truncate to ``truncate_tokens``."""
    raw = generator.generate(prompts, params, num_samples, chat=chat)
    tok = tokenizer or generator.tokenizer
    out, empty = [], 0
    for group in raw:
        texts = []
        for text in group:
            text = extract_sample(text)
            if params.truncate_tokens and tok is not None:
                text = truncate_to_tokens(text, tok, params.truncate_tokens)
            empty += not text
            texts.append(text)
        out.append(texts)
    if empty:
        logger.info("%d of %d generated samples were empty", empty, len(prompts) * num_samples)
    return out
