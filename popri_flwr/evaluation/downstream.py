"""Downstream evaluation: train a small causal LM on synthetic text, score it on private text.

The paper's headline metric: fine-tune a small LM on the synthetic set and report the best top-1
next-token accuracy over epochs on held-out *private* evaluation text. Every sequence is
``BOS + tokens + EOS``, cut to ``seq_len`` tokens and right-padded; pad positions are never
trained on or scored.

No GPT-2/distilgpt2 weights ship offline, so the default model is a tiny GPT-2 trained from
scratch with the generator's (SmolLM2) tokenizer; any Hub id or local checkpoint can be fine-tuned
instead (``model="distilgpt2"``, with its own tokenizer).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from popri_flwr.models.loading import (
    DEFAULT_GENERATOR,
    native_bf16,
    resolve_device,
    resolve_model_path,
)

logger = logging.getLogger(__name__)

#: ``DownstreamConfig.model`` value that builds a GPT-2 from the config instead of loading one.
SCRATCH = "gpt2-small-scratch"


@dataclass
class DownstreamConfig:
    """How the downstream model is built, trained and evaluated.

    Parameters
    ----------
    model
        ``"gpt2-small-scratch"``: a GPT-2 with ``n_layer``/``n_head``/``n_embd`` and the
        tokenizer's vocabulary, trained from scratch. Otherwise a Hub id or local path of a
        pre-trained causal LM to fine-tune (it always uses its own tokenizer; lower
        ``learning_rate`` to ~5e-5 then).
    n_layer, n_head, n_embd, dropout
        Size of the scratch model.
    tokenizer
        Tokenizer of the scratch model (``packaged:...``, Hub id or path). Use the same one for
        every method you compare: accuracies over different tokenizations are not comparable.
    seq_len
        Tokens per sequence, BOS and EOS included (the paper uses 64).
    epochs, batch_size, learning_rate, weight_decay
        AdamW training; ``batch_size`` is also the evaluation batch size.
    max_train_tokens
        Token budget (non-pad tokens, BOS/EOS included) of the training set, so that every
        method trains on the same amount of text; texts are kept in the given order and the last
        one is cut. ``None``: no limit.
    seed
        Seeds the initialization, dropout and the shuffling.
    bf16
        bf16 autocast for the forward passes (weights, optimizer and the loss stay float32).
        ``None``: on where it is native (CUDA, or a CPU with ``avx512_bf16``/``amx_bf16``; see
        :func:`popri_flwr.models.loading.native_bf16`), off elsewhere.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    cache_dir
        Cache for dequantized packaged models (see :mod:`popri_flwr.models.loading`).
    """

    model: str = SCRATCH
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    tokenizer: str = DEFAULT_GENERATOR
    seq_len: int = 64
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    max_train_tokens: int | None = None
    seed: int = 0
    bf16: bool | None = None
    device: str = "cpu"
    cache_dir: str | Path | None = None

    def __post_init__(self) -> None:
        positive = ("n_layer", "n_head", "n_embd", "epochs", "batch_size")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"downstream.{key}: must be a positive integer, got {value!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(
                f"downstream.seq_len: must be an integer >= 2 (BOS + EOS), got {self.seq_len!r}"
            )
        if self.n_embd % self.n_head:
            raise ValueError(
                f"downstream.n_embd: must be divisible by n_head={self.n_head}, got {self.n_embd}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"downstream.dropout: must be in [0, 1), got {self.dropout}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"downstream.learning_rate: must be > 0, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"downstream.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.max_train_tokens is not None and (
            not isinstance(self.max_train_tokens, int) or self.max_train_tokens < 1
        ):
            raise ValueError(
                "downstream.max_train_tokens: must be a positive integer or None, "
                f"got {self.max_train_tokens!r}"
            )
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"downstream.bf16: expected true, false or null, got {self.bf16!r}")
        if not self.model:
            raise ValueError("downstream.model: must be 'gpt2-small-scratch' or a model id/path")


@dataclass
class DownstreamResult:
    """Outcome of :func:`train_downstream`.

    ``best_top1`` is the best per-epoch top-1 accuracy (the paper's metric), ``best_epoch`` the
    (1-based) epoch that reached it and ``best_top5`` the best per-epoch top-5 accuracy.
    ``train_tokens`` counts non-pad training tokens (BOS/EOS included), ``eval_tokens`` the
    scored next-token predictions per evaluation.
    """

    best_top1: float
    best_top5: float
    best_epoch: int
    per_epoch: list[dict[str, float]] = field(default_factory=list)
    train_tokens: int = 0
    eval_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def encode_for_lm(texts: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode texts as ``BOS + tokens + EOS``, cut to ``seq_len`` and right-padded.

    The whole sequence is cut, so a text longer than ``seq_len - 1`` tokens has no EOS (its
    end is not seen). The mask comes from the lengths, not from token ids: SmolLM2 uses the same
    id for EOS and pad. A tokenizer without a BOS token (GPT-2 style) uses EOS as BOS, as GPT-2
    itself does for ``<|endoftext|>``.

    Parameters
    ----------
    texts
        Texts to encode.
    tokenizer
        A Hugging Face tokenizer (called with ``add_special_tokens=False``).
    seq_len
        Length of every row.

    Returns
    -------
    tuple
        ``(input_ids, attention_mask)``, both ``LongTensor`` of shape ``(len(texts), seq_len)``;
        the mask is 1 on real tokens, 0 on padding.
    """
    if seq_len < 2:
        raise ValueError(f"downstream.seq_len: must be >= 2 (BOS + EOS), got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("downstream.tokenizer: the tokenizer has no EOS token")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    if not texts:
        return input_ids, attention_mask
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for row, ids in enumerate(encoded):
        seq = ([bos] + list(ids) + [eos])[:seq_len]
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def next_token_accuracy(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of next-token predictions on real (non-pad) targets.

    Position ``t`` predicts token ``t + 1``; it is scored when ``attention_mask[:, t + 1] == 1``.
    A target counts as correct at ``k`` when it is among ``torch.topk(logits, k)`` (ties broken
    by ``topk``).

    Parameters
    ----------
    logits
        ``(batch, seq, vocab)`` model outputs.
    input_ids, attention_mask
        ``(batch, seq)`` as from :func:`encode_for_lm`.
    k
        Cut-offs; each is capped at the vocabulary size.

    Returns
    -------
    dict
        ``"top{k}"`` (accuracy, 0.0 when nothing is scored), ``"correct_top{k}"`` (count) for
        each k, and ``"total"`` (scored positions); counts add up over batches.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"next_token_accuracy: logits {tuple(logits.shape)} do not match input_ids "
            f"{tuple(input_ids.shape)}"
        )
    scored = attention_mask[:, 1:].bool()
    preds = logits[:, :-1][scored]  # (n, vocab)
    targets = input_ids[:, 1:][scored]  # (n,)
    total = int(targets.numel())
    out: dict[str, float] = {"total": total}
    max_k = min(max(k), logits.shape[-1])
    top = preds.topk(max_k, dim=-1).indices if total else None
    for kk in k:
        correct = 0
        if total:
            correct = int((top[:, : min(kk, max_k)] == targets[:, None]).any(dim=-1).sum())
        out[f"correct_top{kk}"] = correct
        out[f"top{kk}"] = correct / total if total else 0.0
    return out


@torch.no_grad()
def evaluate_lm(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int,
    bf16: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 next-token accuracy and mean cross-entropy over real targets.

    ``bf16`` runs the forward passes under bf16 autocast; the loss is taken in float32.

    Returns
    -------
    dict
        ``{"top1", "top5", "tokens" (scored predictions), "loss" (nats per token)}``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        mask = attention_mask[start : start + batch_size].to(device)
        with _autocast(device, bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        acc = next_token_accuracy(logits, ids, mask, k=(1, 5))
        correct1 += acc["correct_top1"]
        correct5 += acc["correct_top5"]
        total += acc["total"]
        loss_sum += float(_lm_loss(logits, ids, mask, reduction="sum"))
    model.train(was_training)
    if total == 0:
        return {"top1": 0.0, "top5": 0.0, "tokens": 0, "loss": float("nan")}
    return {
        "top1": correct1 / total,
        "top5": correct5 / total,
        "tokens": total,
        "loss": loss_sum / total,
    }


def bf16_for(config: DownstreamConfig, device: str) -> bool:
    """``config.bf16`` on ``device``: as set, or (``None``) where bf16 is native there."""
    return native_bf16(device) if config.bf16 is None else bool(config.bf16)


def _autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def _lm_loss(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy over real targets only."""
    scored = mask[:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][scored].float(), ids[:, 1:][scored], reduction=reduction)


def load_tokenizer(config: DownstreamConfig):
    """The tokenizer the downstream model uses (the model's own one for pre-trained models)."""
    from transformers import AutoTokenizer

    name = config.tokenizer if config.model == SCRATCH else config.model
    path = resolve_model_path(name, config.cache_dir)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # ValueError: a model dir without tokenizer files
        key = "tokenizer" if config.model == SCRATCH else "model"
        raise ValueError(f"downstream.{key}: cannot load a tokenizer from {name!r}: {err}") from err


def build_model(config: DownstreamConfig, tokenizer):
    """Build the scratch GPT-2 (initialized from the current torch RNG) or load a checkpoint."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if config.model == SCRATCH:
        gpt_config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=config.seq_len,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return GPT2LMHeadModel(gpt_config)
    path = resolve_model_path(config.model, config.cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        raise ValueError(f"downstream.model: cannot load {config.model!r}: {err}") from err
    max_pos = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if max_pos is not None and config.seq_len > max_pos:
        raise ValueError(
            f"downstream.seq_len: {config.seq_len} exceeds the model's {max_pos} positions"
        )
    return model


def _apply_token_budget(mask: torch.Tensor, budget: int | None) -> tuple[torch.Tensor, int]:
    """Keep the leading rows (and cut the last one) so at most ``budget`` tokens remain."""
    lengths = mask.sum(dim=1)
    total = int(lengths.sum())
    if budget is None or total <= budget:
        if budget is not None:
            logger.info("downstream: training set has %d tokens < budget %d", total, budget)
        return mask, len(mask)
    ends = lengths.cumsum(0)
    n_rows = int((ends - lengths < budget).sum())  # rows that start before the budget runs out
    mask = mask[:n_rows].clone()
    keep_last = budget - int(ends[n_rows - 1] - lengths[n_rows - 1])
    mask[-1, keep_last:] = 0
    return mask, n_rows


def train_downstream(
    train_texts: list[str],
    eval_texts: list[str],
    config: DownstreamConfig | None = None,
    progress: bool = True,
) -> DownstreamResult:
    """Train the downstream LM on ``train_texts``; report the best accuracy on ``eval_texts``.

    Blank texts are dropped from both sets. Training is seeded (``config.seed``) and leaves the
    caller's global torch RNG untouched; it uses the global torch thread count.

    Parameters
    ----------
    train_texts
        Synthetic texts (the method's output).
    eval_texts
        Held-out private evaluation texts.
    config
        See :class:`DownstreamConfig`.
    progress
        Show tqdm bars.

    Returns
    -------
    DownstreamResult
        Best-over-epochs accuracies and the per-epoch log.

    Raises
    ------
    ValueError
        ``"downstream: the synthetic set is empty"``,
        ``"downstream: the evaluation split has no tokens"``, or a bad config value.
    """
    config = config or DownstreamConfig()
    start_time = time.perf_counter()
    train_texts = [t for t in train_texts if t and t.strip()]
    eval_texts = [t for t in eval_texts if t and t.strip()]
    if not train_texts:
        raise ValueError("downstream: the synthetic set is empty (no non-blank training texts)")
    if not eval_texts:
        raise ValueError("downstream: the evaluation split has no tokens (no non-blank texts)")
    device = resolve_device(config.device)
    bf16 = bf16_for(config, device)
    tokenizer = load_tokenizer(config)
    train_ids, train_mask = encode_for_lm(train_texts, tokenizer, config.seq_len)
    train_mask, n_rows = _apply_token_budget(train_mask, config.max_train_tokens)
    train_ids = train_ids[:n_rows]
    eval_ids, eval_mask = encode_for_lm(eval_texts, tokenizer, config.seq_len)
    train_tokens = int(train_mask.sum())
    eval_tokens = int(eval_mask[:, 1:].sum())
    if eval_tokens == 0:
        raise ValueError("downstream: the evaluation split has no tokens")
    logger.info(
        "downstream: %d training texts (%d tokens), %d evaluation texts (%d scored tokens), "
        "bf16 %s",
        n_rows,
        train_tokens,
        len(eval_texts),
        eval_tokens,
        bf16,
    )

    fork_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        model = build_model(config, tokenizer).to(device)
        shuffle = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        per_epoch: list[dict[str, float]] = []
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            order = torch.randperm(n_rows, generator=shuffle)
            loss_sum = 0.0
            batches = range(0, n_rows, config.batch_size)
            bar = tqdm(batches, desc=f"downstream epoch {epoch}", disable=not progress)
            for start in bar:
                idx = order[start : start + config.batch_size]
                ids, mask = train_ids[idx].to(device), train_mask[idx].to(device)
                if mask[:, 1:].sum() == 0:  # only possible for a budget-cut row of 1 token
                    continue
                with _autocast(device, bf16):
                    logits = model(input_ids=ids, attention_mask=mask).logits
                loss = _lm_loss(logits, ids, mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                loss_sum += loss.item()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            metrics = evaluate_lm(model, eval_ids, eval_mask, config.batch_size, bf16)
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / max(len(batches), 1),
                "eval_loss": metrics["loss"],
                "top1": metrics["top1"],
                "top5": metrics["top5"],
                "seconds": time.perf_counter() - epoch_start,
            }
            per_epoch.append(record)
            logger.info(
                "downstream epoch %d: train loss %.3f, eval loss %.3f, top1 %.4f, top5 %.4f",
                epoch,
                record["train_loss"],
                record["eval_loss"],
                record["top1"],
                record["top5"],
            )
    best = max(per_epoch, key=lambda r: r["top1"])
    return DownstreamResult(
        best_top1=best["top1"],
        best_top5=max(r["top5"] for r in per_epoch),
        best_epoch=int(best["epoch"]),
        per_epoch=per_epoch,
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        seconds=time.perf_counter() - start_time,
    )


__all__ = [
    "SCRATCH",
    "DownstreamConfig",
    "DownstreamResult",
    "build_model",
    "encode_for_lm",
    "evaluate_lm",
    "load_tokenizer",
    "next_token_accuracy",
    "train_downstream",
]
