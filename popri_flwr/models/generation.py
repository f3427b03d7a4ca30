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

from popri_flwr.algorithms.prompts import extract_sample
from popri_flwr.models.loading import cpu_supports_bf16

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


#: Accepted values of ``TransformersGenerator(dtype=...)`` (and ``generation.dtype``).
DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(dtype: str, device: Any, model_dtype: Any = None) -> Any:
    """The torch dtype to generate in.

    Parameters
    ----------
    dtype
        ``"float32"``, ``"bfloat16"``, or ``"auto"``: a float32 model runs in bf16 on a CUDA GPU
        that supports it and on a CPU with native bf16 (:func:`cpu_supports_bf16`), else in
        float32; a model already in a reduced precision is left as it is.
    device
        The model's device.
    model_dtype
        The model's parameter dtype (for ``"auto"``).
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"generation.dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if model_dtype is not None and model_dtype != torch.float32:
        return model_dtype
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = device.type == "cpu" and cpu_supports_bf16()
    return torch.bfloat16 if fast else torch.float32


def _param_version(model: Any) -> int:
    """Sum of the parameters' in-place version counters: changes whenever a weight is updated."""
    return sum(p._version for p in model.parameters())


class TransformersGenerator:
    """Batched, seeded sampling with a transformers causal LM (a PeftModel works too).

    By default each distinct prompt is prefilled once and its ``num_samples`` continuations
    are decoded together from its shared prefix (:mod:`popri_flwr.models.sampling`). Sample j of
    prompt i draws from its own stream seeded by ``(params.seed, i, j)``, so texts do not
    depend on anything run before in the process. They repeat exactly at the same
    ``batch_size``; at another one float32 kernels' rounding flips a rare near-boundary draw,
    bf16's diverges texts within tens of tokens (see :mod:`popri_flwr.models.sampling`).

    Parameters
    ----------
    model, tokenizer
        The model (any device) and its tokenizer. ``model`` may be replaced at any time (the
        POPri strategy swaps in the current policy every round).
    batch_size
        Rows (prompt x sample pairs) per decoding batch; bounds the KV cache's memory. A batch
        holds whole prompts when their samples fit (a prompt with more samples than
        ``batch_size`` is split over several batches, each prefilling it once).
    progress
        Show a tqdm bar.
    prefix_sharing
        False: the previous path, prompts x samples flattened into ``model.generate`` batches
        seeded per batch (texts then depend on ``batch_size``). Kept for benchmarking.
    dtype
        ``"auto"`` (bf16 where the hardware has native bf16, else float32), ``"float32"`` or
        ``"bfloat16"``; see :func:`resolve_dtype`. A model in another dtype is copied once in
        the target dtype and the copy is reused until ``model`` is replaced or its weights
        change; the model itself is never cast (the DPO step may still be training it).
    shared_attention
        With prefix sharing: keep each prompt's keys once and attend to them from all its
        samples (:class:`popri_flwr.models.sampling.SharedPrefix`), or (False) expand the prompt
        cache to one copy per sample. None: shared where the model supports it.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 16,
        progress: bool = True,
        *,
        prefix_sharing: bool = True,
        dtype: str = "auto",
        shared_attention: bool | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"generation.batch_size: must be >= 1, got {batch_size}")
        resolve_dtype(dtype, "cpu")  # validates the name
        self.tokenizer, self.batch_size, self.progress = tokenizer, batch_size, progress
        self.prefix_sharing, self.dtype = prefix_sharing, dtype
        self.shared_attention = shared_attention
        self.model = model

    @property
    def model(self) -> Any:
        """The model to sample from (the policy); generation may run on a cast copy of it."""
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        self._model = model
        self._cast: tuple[int, Any] | None = None  # (weights version, copy in the target dtype)

    def inference_model(self) -> Any:
        """``model`` in the generation dtype: the model itself, or a cached cast copy."""
        import copy

        import torch

        param = next(self.model.parameters())
        target = resolve_dtype(self.dtype, param.device, param.dtype)
        if param.dtype == target:
            return self.model
        version = _param_version(self.model)
        if self._cast is None or self._cast[0] != version:
            self._cast = None  # free the stale copy before building the next one
            with torch.no_grad():
                # Pre-filling deepcopy's memo with cast parameters copies every weight once,
                # straight into the target dtype (tied weights stay tied: one id, one copy).
                # Buffers keep their dtype: RoPE's inv_freq in bf16 would shift the rotary
                # phases of late positions (measured: slightly larger TV distance to float32).
                memo: dict[int, Any] = {
                    id(p): torch.nn.Parameter(p.detach().to(target), requires_grad=False)
                    for p in self.model.parameters()
                }
                cast = copy.deepcopy(self.model, memo).eval()
            self._cast = (version, cast)
            logger.debug("generation: %s copy of the model made", target)
        return self._cast[1]

    def _format(self, prompt: str, chat: bool) -> str:
        if chat and getattr(self.tokenizer, "chat_template", None):
            return format_chat(self.tokenizer, prompt)
        return prompt

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        num_samples: int = 1,
        chat: bool = False,
    ) -> list[list[str]]:
        """Raw continuations: ``out[i][j]`` is sample j of prompt i.

        Parameters
        ----------
        prompts
            Prompt texts (chat: user messages, formatted with the tokenizer's chat template).
        params
            Sampling settings and the seed.
        num_samples
            Continuations per prompt (J).
        chat
            Apply the chat template.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        texts = [self._format(p, chat) for p in prompts]
        model = self.inference_model()
        was_training = model.training
        model.eval()
        self.tokenizer.padding_side = "left"
        try:
            if self.prefix_sharing:
                return self._generate_shared(model, texts, params, num_samples)
            return self._generate_flat(model, texts, params, num_samples)
        finally:
            if was_training:
                model.train()

    def _generate_shared(
        self, model: Any, texts: list[str], params: SamplingParams, num_samples: int
    ) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm

        from popri_flwr.models.sampling import row_seed, row_uniforms, sample_shared_prefix

        tok = self.tokenizer
        device = next(model.parameters()).device
        eos = _eos_ids(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        out: list[list[str]] = [[""] * num_samples for _ in texts]
        batches = _row_batches(len(texts), num_samples, self.batch_size)
        bar = tqdm(batches, desc="generate", unit="batch", disable=not self.progress, leave=False)
        with torch.inference_mode():
            for batch in bar:
                # batch: (prompt index, first sample, sample count) groups, prompt by prompt
                enc = tok(
                    [texts[i] for i, _, _ in batch],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                rows = [(i, j) for i, first, n in batch for j in range(first, first + n)]
                seeds = [row_seed(params.seed, i, j) for i, j in rows]
                tokens, lengths = sample_shared_prefix(
                    model,
                    enc["input_ids"].to(device),
                    enc["attention_mask"].to(device),
                    [n for _, _, n in batch],
                    row_uniforms(seeds, params.max_new_tokens),
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_new_tokens=params.max_new_tokens,
                    eos_token_ids=eos,
                    pad_token_id=pad,
                    shared_attention=self.shared_attention,
                )
                decoded = tok.batch_decode(
                    [t[:n].tolist() for t, n in zip(tokens, lengths, strict=True)],
                    skip_special_tokens=True,
                )
                for (i, j), text in zip(rows, decoded, strict=True):
                    out[i][j] = text
        return out

    def _generate_flat(
        self, model: Any, texts: list[str], params: SamplingParams, num_samples: int
    ) -> list[list[str]]:
        """The previous path: prompts x samples flattened into ``model.generate`` batches.

        Each batch reseeds torch from ``(params.seed, batch index)``, so texts depend on
        ``batch_size`` (and the global torch RNG is left changed).
        """
        import torch
        from tqdm.auto import tqdm

        flat = [t for t in texts for _ in range(num_samples)]
        out: list[str] = []
        device = next(model.parameters()).device
        tok = self.tokenizer
        batches = range(0, len(flat), self.batch_size)
        bar = tqdm(batches, desc="generate", unit="batch", disable=not self.progress, leave=False)
        with torch.inference_mode():
            for b, start in enumerate(bar):
                chunk = flat[start : start + self.batch_size]
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                torch.manual_seed(params.seed * 100_003 + b)
                sample = params.temperature > 0
                gen = model.generate(
                    **enc,
                    do_sample=sample,
                    temperature=params.temperature if sample else None,
                    top_p=params.top_p if sample else None,
                    top_k=0 if sample else None,
                    max_new_tokens=params.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                out += tok.batch_decode(new, skip_special_tokens=True)
        return [out[i * num_samples : (i + 1) * num_samples] for i in range(len(texts))]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a sample: the model's generation config's, else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("generation.model: neither the model nor the tokenizer names an EOS token")
    return ids


def _row_batches(
    num_prompts: int, num_samples: int, batch_size: int
) -> list[list[tuple[int, int, int]]]:
    """Decoding batches of at most ``batch_size`` rows, as (prompt, first sample, count) groups.

    Whole prompts are packed greedily so each prompt is prefilled once; a prompt with more
    samples than ``batch_size`` is cut into chunks of ``batch_size`` (each its own batch).
    """
    batches: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    used = 0
    for i in range(num_prompts):
        for first in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - first)
            if used + n > batch_size:
                batches.append(current)
                current, used = [], 0
            current.append((i, first, n))
            used += n
    if current:
        batches.append(current)
    return batches


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
        # A request with n samples already prefills its prompt once; prefix caching also reuses
        # what prompts share across requests (the few-shot list header, a chat system prompt).
        engine_kwargs.setdefault("enable_prefix_caching", True)
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
        """Raw continuations: ``out[i][j]`` is sample j of prompt i.

        Each prompt gets its own seed derived from ``(params.seed, prompt index)``: with one
        shared seed, vLLM would draw sample j of every prompt from the same random stream.
        """
        from popri_flwr.models.sampling import prompt_seed

        sp = [
            self._vllm.SamplingParams(
                n=num_samples,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=prompt_seed(params.seed, i),
            )
            for i in range(len(prompts))
        ]
        if chat:
            msgs = [[{"role": "user", "content": p}] for p in prompts]
            outs = self.llm.chat(msgs, sp, lora_request=self._lora)
        else:
            outs = self.llm.generate(list(prompts), sp, lora_request=self._lora)
        return [[c.text for c in o.outputs] for o in outs]


_MODEL_CACHE: dict[tuple[str, str, str | None], tuple[Any, Any]] = {}


def load_model_cached(name_or_path: str, device: str, cache_dir: str | None = None):
    """(model, tokenizer) loaded once per process for (name, device)."""
    from popri_flwr.models.loading import load_causal_lm, resolve_device

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
    dtype: str = "auto",
    prefix_sharing: bool = True,
) -> Generator:
    """Build a generator for ``backend`` (``transformers`` or ``vllm``).

    ``dtype`` and ``prefix_sharing`` apply to the transformers backend (see
    :class:`TransformersGenerator`); the model is loaded once per process in its own dtype.
    """
    if backend == "transformers":
        model, tok = load_model_cached(model_name_or_path, device, cache_dir)
        return TransformersGenerator(
            model,
            tok,
            batch_size=batch_size,
            progress=progress,
            prefix_sharing=prefix_sharing,
            dtype=dtype,
        )
    if backend == "vllm":
        from popri_flwr.models.loading import resolve_model_path

        return VLLMGenerator(resolve_model_path(model_name_or_path, cache_dir))
    raise ValueError(f"generation.backend: expected transformers or vllm, got {backend!r}")


def generator_from_config(g: Any, progress: bool = True) -> Generator:
    """:func:`make_generator` for a ``generation:`` config (GenerationConfig).

    ``g.dtype`` is optional (``"auto"`` when the config has no such field).
    """
    return make_generator(
        g.backend,
        g.model,
        g.device,
        g.batch_size,
        g.cache_dir,
        progress,
        dtype=getattr(g, "dtype", "auto"),
    )


def truncate_to_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (no special tokens counted)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip()


def format_chat(tokenizer: Any, message: str) -> str:
    """``message`` as one user turn in ``tokenizer``'s chat template, ready for the reply.

    The result is plain prompt text: generating from it (``chat=False``) equals generating from
    ``message`` with ``chat=True``, and DPO can train on exactly the prompt that was sampled.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "strategy.prompt_style: 'chat' needs a generator whose tokenizer has a chat "
            "template (an instruct model); use 'list' for a base model"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def render_prompts(tokenizer: Any, prompts: Sequence[str], style: str) -> list[str]:
    """Prompts as the model reads them (``strategy.prompt_style``).

    ``"chat"`` prompts are user messages and get the chat template (:func:`format_chat`);
    ``"list"`` prompts are already the text to continue. The one place that decides it, for
    the per-round samples, the DPO pairs and the final synthetic set alike.
    """
    return [format_chat(tokenizer, p) for p in prompts] if style == "chat" else list(prompts)


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
