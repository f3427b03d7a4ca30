"""Weighted maximum likelihood on completions: the step that fits a tilt (``update=tilt``).

One round takes ``steps`` optimizer steps over one pass of the records; step ``s`` minimizes the
weighted mean token negative log-likelihood of its share of them,

    L = sum_i w_i * nll_i / sum_i w_i * n_i,

where ``nll_i`` is the summed NLL of completion ``i``'s ``n_i`` tokens given its prompt (prompt
tokens are context only). With weights from :func:`popri_flwr.algorithms.tilt.tilt_weights`
this is reward-weighted regression toward the tilted policy. A plain PyTorch loop: the model,
optimizer and schedule are the caller's (the DPO step's adapter, so checkpoints, resume and
generation are shared).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


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


def _batch(encoded: list[tuple[list[int], int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for r, (seq, n_prompt) in enumerate(encoded):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:], dtype=torch.long)
    return ids, mask, labels


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
) -> dict[str, float]:
    """One round of weighted likelihood training on ``records``.

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
        Optimizer steps; the records are shuffled (``seed``) and split evenly over them.
    micro_batch
        Sequences per forward pass (gradients accumulate within a step).
    max_length
        Token budget of prompt + completion; records whose prompt fills it are dropped.
    bf16
        Autocast the forward to bfloat16 (weights stay float32).
    seed
        Public randomness of the shuffle.

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
    order = np.random.default_rng(seed).permutation(keep)
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
            tokens = sum(weights[i] * (len(encoded[i][0]) - encoded[i][1]) for i in chunk)
            optimizer.zero_grad(set_to_none=True)
            for start in range(0, len(chunk), micro_batch):
                part = chunk[start : start + micro_batch]
                ids, mask, labels = (t.to(device) for t in _batch([encoded[i] for i in part], pad))
                with autocast:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none"
                ).sum(dim=1)  # summed over each completion's tokens (-100 contributes 0)
                w = torch.tensor(weights[part], dtype=torch.float32, device=device)
                loss = (w * nll).sum() / tokens
                loss.backward()
                total_nll += float((w * nll).sum().detach())
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
