"""Prefix-shared sampling: prefill each prompt once, then decode its J samples together.

POPri samples J continuations of each of K prompts. Flattening them into K x J sequences
recomputes every prompt's prefill J times, which for few-shot prompts is most of the work. Here
each distinct prompt is prefilled once (left-padded, position ids counting real tokens only)
and a short decoding loop samples its J continuations. While decoding, each prompt's keys and
values are kept once and attended to by all of its rows (:class:`SharedPrefix`); only the
generated suffix is cached per row. (The plain alternative, ``shared_attention=False``, copies
the prompt cache once per row.)

The sampler draws from the same distribution as transformers' ``generate`` at the same settings
(temperature, then top-p, then a draw from the softmax; temperature 0 is greedy). It draws by
inversion with one uniform per row and step from the row's own seeded stream, so a text depends
on its seed, never on the global torch RNG or on the other rows' draws. One caveat: at T = 1 a
draw that lands in the long tail of the vocabulary flips on a tiny change of the logits, and
kernels round a row slightly differently in batches of other shapes (another padded length,
another row count). In float32 the logits move by ~1e-5, so a draw flips only when its uniform
lies within ~1e-5 of a CDF boundary (measured: 1 of 54 test draws); in bf16 they move by ~1e-3
and texts diverge within tens of tokens. Runs repeat exactly at a fixed ``batch_size``; across
batch sizes float32 texts almost always agree (the distribution is the same either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from popri_flwr.models.kv_cache import cache_kwargs, cache_of

# Tags keep these streams apart from each other and from other (seed, index) users.
_ROW_TAG, _PROMPT_TAG = 0x5EED, 0x5EEE


def _derive(seed: int, *words: int) -> int:
    # SeedSequence hashes the words, so nearby seeds and indices give unrelated streams; it
    # wants non-negative words, so a negative seed enters as its 64-bit two's complement.
    return int(np.random.SeedSequence([seed & (2**64 - 1), *words]).generate_state(1)[0])


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The 32-bit seed of sample ``sample_index`` of prompt ``prompt_index``."""
    return _derive(seed, prompt_index, sample_index, _ROW_TAG)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The 32-bit seed of prompt ``prompt_index``, for backends that draw all of a prompt's
    samples from one stream (vLLM's per-request seed)."""
    return _derive(seed, prompt_index, _PROMPT_TAG)


def row_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """``(len(seeds), steps)`` float64 uniforms in [0, 1); row ``r`` is stream ``seeds[r]``.

    Drawn on the CPU so that CPU and CUDA runs consume identical random numbers.
    """
    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    for r, s in enumerate(seeds):
        gen = torch.Generator(device="cpu").manual_seed(int(s))
        out[r] = torch.rand(steps, generator=gen, dtype=torch.float64)
    return out


def warp_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Scores after temperature and top-p, as transformers' warpers compute them.

    ``TemperatureLogitsWarper`` then ``TopPLogitsWarper`` (``min_tokens_to_keep=1``): tokens are
    sorted by ascending score and those whose cumulative probability is at most ``1 - top_p``
    are removed, always keeping the most likely one. Both are skipped at 1.0, as in transformers.
    """
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def pick_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else an inverse-CDF draw.

    Parameters
    ----------
    logits
        ``(rows, vocab)`` next-token logits (any float dtype; warped in float32 like transformers).
    uniforms
        ``(rows,)`` uniforms in [0, 1), one per row (ignored when greedy).
    temperature, top_p
        Sampling settings (see :func:`warp_logits`).

    Returns
    -------
    torch.Tensor
        ``(rows,)`` token ids.
    """
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_p).softmax(dim=-1)
    return _invert_cdf(probs, uniforms.to(probs.device, torch.float64))


_BLOCK = 256


def _invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row ``r``'s smallest token k with ``cdf[k] > uniforms[r] * total``, found in two levels.

    A float32 cumulative sum over the whole vocabulary (49k terms) drifts, and a float64 one is
    ~10x slower on the CPU; so the CDF is cumulated in float32 within blocks of 256 tokens and
    in float64 across blocks (error <= ~1e-5 of a block's mass). ``right=True`` never lands on
    a zero-probability token: its CDF step is empty.
    """
    rows, vocab = probs.shape
    blocks = torch.nn.functional.pad(probs, (0, -vocab % _BLOCK)).view(rows, -1, _BLOCK)
    within = blocks.cumsum(dim=-1)  # (rows, blocks, 256), float32
    ends = within[..., -1].double().cumsum(dim=-1)  # (rows, blocks), float64
    target = uniforms * ends[:, -1]
    block = torch.searchsorted(ends, target[:, None], right=True).squeeze(1)
    block.clamp_(max=ends.shape[1] - 1)
    before = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inside = within[torch.arange(rows, device=probs.device), block].double()
    offset = torch.searchsorted(inside, (target - before)[:, None], right=True).squeeze(1)
    return (block * _BLOCK + offset.clamp_(max=_BLOCK - 1)).clamp_(max=vocab - 1)


def _accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


# ----------------------------------------------------------------- shared-prefix attention
_ATTENTION = "popri_shared_prefix"


class SharedPrefix:
    """Decode-time attention over a prompt's cached keys (stored once) and a row's own suffix.

    Expanding the prompt cache to one row per sample makes every decoding step copy and read
    rows x prompt length keys; here each prompt's keys stay single and its rows' queries are
    folded into one matrix product against them (as grouped-query attention folds heads), and
    only the generated suffix is cached per row. The softmax runs jointly over prefix and
    suffix scores, in float32.

    Parameters
    ----------
    keys, values
        Per layer, ``(prompts, kv_heads, length, head_dim)`` from the prompts' prefill.
    attention_mask
        ``(prompts, length)``; 0 marks left padding.
    samples_per_prompt
        Rows of each prompt, laid out prompt by prompt.
    """

    def __init__(
        self,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        attention_mask: torch.Tensor,
        samples_per_prompt: Sequence[int],
    ) -> None:
        self.keys = [k.float() for k in keys]
        self.values = [v.float() for v in values]
        self.padding = ~attention_mask.bool()[:, None, None, :]  # (P, 1, 1, L)
        self.width = max(samples_per_prompt)  # row slots per prompt
        # The slot of each live row in the (prompt, sample) grid.
        grid = torch.arange(len(samples_per_prompt) * self.width, device=attention_mask.device)
        grid = grid.view(-1, self.width)
        self.slots = torch.cat([grid[p, :n] for p, n in enumerate(samples_per_prompt)])
        self.calls = 0

    def keep(self, rows: torch.Tensor) -> None:
        """Only the rows at ``rows`` (positions among the live rows) go on decoding."""
        self.slots = self.slots[rows]

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        """Live rows ``(R, Hkv, g, n)`` -> per prompt ``(P, Hkv, width * g, n)``, gaps zero."""
        prompts, width = len(self.keys[0]), self.width
        grid = x.new_zeros(prompts * width, *x.shape[1:]).index_copy_(0, self.slots, x)
        grid = grid.view(prompts, width, *x.shape[1:]).transpose(1, 2)
        return grid.reshape(prompts, x.shape[1], width * x.shape[2], x.shape[3])

    def _unfold(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """Inverse of :meth:`_fold`: ``(P, Hkv, width * g, n)`` -> live rows ``(R, Hkv, g, n)``."""
        prompts, heads, _, n = x.shape
        grid = x.view(prompts, heads, self.width, group, n).transpose(1, 2)
        return grid.reshape(prompts * self.width, heads, group, n)[self.slots]

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """Attention output ``(R, 1, H, D)`` of one new token per row, at layer ``layer``.

        ``key`` and ``value`` are the row's cached suffix ``(R, Hkv, t, D)``, the new token's
        included (the model updates its cache before attending).
        """
        self.calls += 1
        rows, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        q = query.float().reshape(rows, kv_heads, group, dim)
        prefix = self._fold(q) @ self.keys[layer].transpose(-1, -2) * scaling
        prefix = self._unfold(prefix.masked_fill(self.padding, -float("inf")), group)
        suffix = q @ key.float().transpose(-1, -2) * scaling  # (R, Hkv, g, t)
        weights = torch.cat([prefix, suffix], dim=-1).softmax(dim=-1)
        length = prefix.shape[-1]
        out = self._unfold(self._fold(weights[..., :length]) @ self.values[layer], group)
        out = out + weights[..., length:] @ value.float()
        return out.reshape(rows, 1, heads, dim).to(query.dtype)


def _shared_prefix_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: SharedPrefix | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: :class:`SharedPrefix` when the call passes one."""
    if shared_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return shared_prefix.attend(module.layer_idx, query, key, value, scale), None


def supports_shared_prefix(model: Any) -> bool:
    """Whether :class:`SharedPrefix` attention can stand in for ``model``'s own.

    It needs a transformers model whose attention dispatches through ``AttentionInterface``
    (``sdpa`` or ``eager``) and is plain causal attention over the whole context: no sliding
    window, no logit soft-capping (Gemma-2/3 and Mistral-style windows fall back to the
    expanded cache).
    """
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.cache_utils import DynamicLayer  # noqa: F401
    except ImportError:
        return False
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    return (
        getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
        and getattr(config, "sliding_window", None) is None
        and getattr(config, "attn_logit_softcapping", None) is None
        and all(t == "full_attention" for t in layer_types)
    )


@contextmanager
def _attention_implementation(model: Any, name: str):
    """Route ``model``'s attention through the registered function ``name`` while inside."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, _shared_prefix_attention)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def sample_shared_prefix(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    samples_per_prompt: Sequence[int],
    uniforms: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    shared_attention: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill each prompt once, then decode ``samples_per_prompt[p]`` samples of prompt ``p``.

    Parameters
    ----------
    model
        A causal LM (plain or PEFT) whose forward returns ``logits`` and its key/value cache.
    input_ids, attention_mask
        ``(prompts, length)`` left-padded prompts on the model's device.
    samples_per_prompt
        Rows per prompt; rows are laid out prompt by prompt (all of prompt 0's first).
    uniforms
        ``(rows, max_new_tokens)`` uniforms, row ``r`` used at step ``t`` as ``uniforms[r, t]``.
    temperature, top_p, max_new_tokens
        Sampling settings (temperature 0: greedy).
    eos_token_ids
        A row stops after emitting any of these (the EOS token is kept, like transformers).
    pad_token_id
        Fills each row after it stopped.
    shared_attention
        Decode with :class:`SharedPrefix` attention (the prompt's keys stored once) rather than
        a cache expanded to one copy of the prompt per row. None: when the model supports it
        (:func:`supports_shared_prefix`). Both give the same distribution.

    Returns
    -------
    tuple of torch.Tensor
        ``tokens`` ``(rows, max_new_tokens)`` on the CPU and ``lengths`` ``(rows,)``: the number
        of tokens each row generated (its EOS included).
    """
    device = input_ids.device
    counts = torch.as_tensor(list(samples_per_prompt), device=device)
    rows = int(counts.sum())
    if uniforms.shape != (rows, max_new_tokens):
        want, got = (rows, max_new_tokens), tuple(uniforms.shape)
        raise ValueError(f"uniforms: expected shape {want}, got {got}")
    if shared_attention is None:
        shared_attention = supports_shared_prefix(model)
    # Position ids count real tokens only, so left padding does not shift the rotary phases.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        **extra,
    )
    expand = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    logits, next_pos = out.logits[expand, -1], positions[expand, -1] + 1
    cache, mask, step_kwargs = cache_of(out), None, {}
    if shared_attention:
        layers = cache.layers
        shared = SharedPrefix(
            [layer.keys for layer in layers],
            [layer.values for layer in layers],
            attention_mask,
            list(samples_per_prompt),
        )
        cache, step_kwargs = None, {"shared_prefix": shared}  # the model starts a suffix cache
        routing = _attention_implementation(model, _ATTENTION)
    else:  # one cache row per sample: prompt p's keys and values repeated counts[p] times
        cache.reorder_cache(expand)
        mask = attention_mask[expand]
        routing = nullcontext()
    del out

    eos = torch.as_tensor(list(eos_token_ids), device=device)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long)
    alive = torch.arange(rows)  # global row index of each row still in the batch (CPU)
    with routing:
        for step in range(max_new_tokens):
            picked = pick_tokens(logits, uniforms[alive, step], temperature, top_p)
            tokens[alive, step] = picked.cpu()
            if step == max_new_tokens - 1:
                break
            done = torch.isin(picked, eos)
            if bool(done.any()):
                lengths[alive[done.cpu()]] = step + 1
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                # Finished rows leave the batch, so later steps only pay for live ones.
                if cache is not None:
                    cache.reorder_cache(keep)
                if shared_attention:
                    shared.keep(keep)
                else:
                    mask = mask[keep]
                alive, picked, next_pos = alive[keep.cpu()], picked[keep], next_pos[keep]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1)
            out = model(
                input_ids=picked[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                **cache_kwargs(cache),
                **step_kwargs,
            )
            logits, cache = out.logits[:, -1], cache_of(out)
            next_pos = next_pos + 1
    if shared_attention and step > 0 and shared.calls == 0:
        raise RuntimeError(
            "generation: the model's attention bypassed the shared-prefix attention; "
            "use TransformersGenerator(..., shared_attention=False)"
        )
    return tokens, lengths


__all__ = [
    "SharedPrefix",
    "pick_tokens",
    "prompt_seed",
    "row_seed",
    "row_uniforms",
    "sample_shared_prefix",
    "supports_shared_prefix",
    "warp_logits",
]
