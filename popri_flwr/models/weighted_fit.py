"""Weighted maximum likelihood on completions: the step that fits a tilt (``update=tilt``).

One round takes ``steps`` optimizer steps over one pass of the records; step ``s`` minimizes the
weighted mean token negative log-likelihood of its share of them,

    L = sum_i w_i * nll_i / sum_i w_i * n_i,

where ``nll_i`` is the summed NLL of completion ``i``'s ``n_i`` tokens given its prompt (prompt
tokens are context only). With weights from :func:`popri_flwr.algorithms.tilt.tilt_weights`
this is reward-weighted regression toward the tilted policy. A plain PyTorch loop: the model,
optimizer and schedule are the caller's (the DPO step's adapter, so checkpoints, resume and
generation are shared). A step's records are whole prompts: each prompt runs once and its J
completions attend to its cached keys and values (gradient included), the same loss and
gradient as one pass per completion at about half the cost (``popri_flwr.speed.tilt``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from popri_flwr.models.kv_cache import cache_kwargs, cache_of


def encode_completions(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], max_length: int
) -> list[tuple[list[int], int]]:
    """Token ids of ``prompt + completion`` (cut at ``max_length``) and the prompt's length."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        out.append(((p + c)[:max_length], len(p)))
    return out


def _group_by_prompt(encoded: list[tuple[list[int], int]], keep: Sequence[int]) -> list[list[int]]:
    """Indices of ``keep`` grouped by identical prompt tokens, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in keep:
        ids, n_prompt = encoded[i]
        groups.setdefault(tuple(ids[:n_prompt]), []).append(i)
    return list(groups.values())


def _shared_prefix_nll(
    model: Any, encoded: list[tuple[list[int], int]], groups: list[list[int]], pad_id: int
) -> Any:
    """Summed completion NLL of every record in ``groups`` (flattened order), each prompt run once.

    The prompts go through the model once, left-padded so they all end at the same column,
    keeping their keys and values (with their gradient); each prompt's cache is repeated for its
    completions, which then run as one right-padded batch with explicit position ids. The first
    completion token is predicted from the prompt's last position. Exact: the same NLL (and
    gradient) as running every ``prompt + completion`` alone, at the cost of one prompt pass
    per prompt instead of one per completion.
    """
    import torch

    device = next(model.parameters()).device
    prompts = [encoded[g[0]][0][: encoded[g[0]][1]] for g in groups]
    rows = [i for g in groups for i in g]
    width = max(len(p) for p in prompts)
    p_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    p_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        p_ids[r, width - len(p) :] = torch.tensor(p)
        p_mask[r, width - len(p) :] = 1
    p_pos = (p_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=p_ids.to(device),
        attention_mask=p_mask.to(device),
        position_ids=p_pos.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    counts = torch.tensor([len(g) for g in groups], device=device)
    cache = cache_of(out)
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(counts, dim=0)
        layer.values = layer.values.repeat_interleave(counts, dim=0)
    first = out.logits[:, -1].repeat_interleave(counts, dim=0)  # predicts completion token 0

    completions = [encoded[i][0][encoded[i][1] :] for i in rows]
    c_width = max(len(c) for c in completions)
    c_ids = torch.full((len(rows), c_width), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(rows), c_width), dtype=torch.long)
    labels = torch.full((len(rows), c_width), -100, dtype=torch.long)
    for r, c in enumerate(completions):
        c_ids[r, : len(c)] = torch.tensor(c)
        c_mask[r, : len(c)] = 1
        labels[r, : len(c)] = torch.tensor(c)
    prompt_len = torch.tensor([encoded[i][1] for i in rows])
    c_pos = prompt_len[:, None] + torch.arange(c_width)[None, :]
    mask = torch.cat([p_mask.repeat_interleave(counts.cpu(), dim=0), c_mask], dim=1)
    logits = model(
        input_ids=c_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=c_pos.to(device),
        use_cache=False,
        **cache_kwargs(cache),
    ).logits
    logits = torch.cat([first[:, None], logits[:, :-1]], dim=1)
    return torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels.to(device), reduction="none"
    ).sum(dim=1)  # summed over each completion's tokens (-100 contributes 0)


def weighted_nll_round(
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    records: Sequence[dict[str, Any]],
    *,
    steps: int,
    micro_batch: int,
    max_length: int,
    bf16: bool,
    seed: int,
    share_prompts: bool = True,
) -> dict[str, float]:
    """One round of weighted likelihood training on ``records``.

    Records that share a prompt are trained together, the prompt run once for all of them
    (POPri's J samples per prompt: ~3x fewer tokens through the model at J = 6 with one-shot
    prompts of ~100 tokens and completions of ~32).

    Parameters
    ----------
    model
        The policy (a PEFT model: only its trainable adapter moves).
    tokenizer
        Its tokenizer (a pad token set).
    optimizer, scheduler
        Stepped once per optimizer step.
    records
        ``[{"prompt": str, "completion": str, "weight": float}]``, weights > 0.
    steps
        Optimizer steps; the prompts (each with all its records) are shuffled (``seed``) and
        split evenly over them.
    micro_batch
        Completions per forward pass, rounded to whole prompts (at least one prompt);
        gradients accumulate within a step.
    max_length
        Token budget of prompt + completion; records whose prompt fills it are dropped.
    bf16
        Autocast the forward to bfloat16 (weights stay float32).
    seed
        Public randomness of the shuffle.
    share_prompts
        Run each prompt once for all its records (default). False runs every record's
        prompt again (the old path's cost, kept for ``popri_flwr.speed.tilt``).

    Returns
    -------
    dict
        ``loss`` (weighted mean token NLL over the round, before each step's update),
        ``steps``, ``sequences`` (records trained on).
    """
    import torch

    if steps < 1 or micro_batch < 1:
        raise ValueError(f"weighted_nll_round: steps and micro_batch must be >= 1, got {steps}")
    weights = np.array([float(r["weight"]) for r in records])
    if len(records) == 0 or not (np.isfinite(weights).all() and (weights > 0).all()):
        raise ValueError("weighted_nll_round: needs records with finite weights > 0")
    encoded = encode_completions(
        tokenizer, [r["prompt"] for r in records], [r["completion"] for r in records], max_length
    )
    keep = [i for i, (ids, n_prompt) in enumerate(encoded) if len(ids) > n_prompt]
    if not keep:
        raise ValueError(f"dpo.max_length: every prompt has >= {max_length} tokens")
    groups = _group_by_prompt(encoded, keep) if share_prompts else [[i] for i in keep]
    order = np.random.default_rng(seed).permutation(len(groups))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    model.train()
    total_nll = total_weight = 0.0
    taken = 0
    try:
        for chunk in np.array_split(order, min(steps, len(order))):
            step_groups = [groups[g] for g in chunk]
            rows = [i for g in step_groups for i in g]
            tokens = sum(weights[i] * (len(encoded[i][0]) - encoded[i][1]) for i in rows)
            optimizer.zero_grad(set_to_none=True)
            part: list[list[int]] = []
            for k, group in enumerate(step_groups):
                part.append(group)
                if sum(map(len, part)) < micro_batch and k + 1 < len(step_groups):
                    continue
                with autocast:
                    nll = _shared_prefix_nll(model, encoded, part, pad)
                w = torch.tensor(
                    weights[[i for g in part for i in g]], dtype=torch.float32, device=device
                )
                loss = (w * nll).sum() / tokens
                loss.backward()
                total_nll += float((w * nll).sum().detach())
                part = []
            total_weight += tokens
            optimizer.step()
            scheduler.step()
            taken += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return {
        "loss": total_nll / total_weight if total_weight else math.nan,
        "steps": taken,
        "sequences": len(keep),
    }


__all__ = ["encode_completions", "weighted_nll_round"]
