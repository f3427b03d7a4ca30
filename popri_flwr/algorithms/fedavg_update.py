"""DP-FedAvg maths (McMahan et al. 2018): local training, clipping and the server step.

Round t with global trainable parameters w_t (clip C, noise multiplier sigma, rate q, N clients)::

    client i: delta_i = local_train(w_t, private texts) - w_t          (a few local steps)
              v_i     = delta_i * min(1, C / ||delta_i||_2)            (only v_i leaves)
    server  : s       = sum_i v_i + N(0, (sigma C)^2 I)                (PrivateStrategy)
              w_{t+1} = w_t + server_lr * s / (q N)

The downstream LM (:mod:`popri_flwr.evaluation.downstream`) is the model being trained, either whole
(``train_mode="full"``) or through a LoRA adapter (``train_mode="lora"``: only the adapter is
sent, trained and noised, so the vector is small). Parameters are flattened in
``model.named_parameters()`` order (trainable ones only; tied weights once).

Plain torch / numpy: no Flower import (the strategy and the client app wrap these functions).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from popri_flwr.evaluation.downstream import (
    DownstreamConfig,
    _autocast,
    _lm_loss,
    build_model,
    encode_for_lm,
)

logger = logging.getLogger(__name__)

TRAIN_MODES = ("full", "lora")
OPTIMIZERS = ("sgd", "adamw")


# --------------------------------------------------------------------------- config
@dataclass
class FedAvgConfig:
    """DP-FedAvg settings (``strategy.fedavg`` in ``conf/strategy/dp_fedavg.yaml``).

    Parameters
    ----------
    local_steps
        Optimizer steps per client per round (batches cycle through the client's texts).
    local_epochs
        If set, passes over the client's texts per round instead of ``local_steps``
        (``ceil(local_epochs * texts / local_batch_size)`` steps, at least 1).
    local_lr
        Learning rate of the client optimizer.
    local_batch_size
        Texts per local step.
    local_optimizer
        ``"sgd"`` (plain SGD, as in McMahan et al.) or ``"adamw"`` (fresh state every round,
        no weight decay).
    server_lr
        Server learning rate on the noisy average update.
    train_mode
        ``"full"``: every parameter of the downstream LM; ``"lora"``: a LoRA adapter on all
        linear layers (base weights frozen and never sent).
    lora_r, lora_alpha
        Rank and scaling of the LoRA adapter (``train_mode="lora"`` only).
    """

    local_steps: int = 3
    local_epochs: float | None = None
    local_lr: float = 0.5
    local_batch_size: int = 8
    local_optimizer: str = "sgd"
    server_lr: float = 1.0
    train_mode: str = "full"
    lora_r: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        key = "strategy.fedavg"
        for name in ("local_steps", "local_batch_size", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{key}.{name}: must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("local_lr", "server_lr", "lora_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{key}.{name}: must be a finite number > 0, got {value!r}")
            setattr(self, name, float(value))
        if self.local_epochs is not None and not (
            isinstance(self.local_epochs, int | float)
            and self.local_epochs > 0
            and math.isfinite(self.local_epochs)
        ):
            raise ValueError(f"{key}.local_epochs: must be > 0 or null, got {self.local_epochs!r}")
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(
                f"{key}.train_mode: expected one of {list(TRAIN_MODES)}, got {self.train_mode!r}"
            )
        if self.local_optimizer not in OPTIMIZERS:
            raise ValueError(
                f"{key}.local_optimizer: expected one of {list(OPTIMIZERS)}, "
                f"got {self.local_optimizer!r}"
            )


# --------------------------------------------------------------------------- the model
def build_fedavg_model(
    downstream: DownstreamConfig, tokenizer: Any, fedavg: FedAvgConfig
) -> torch.nn.Module:
    """The downstream LM as DP-FedAvg trains it, on CPU, identical in every process.

    The scratch model is initialized from ``downstream.seed`` (the caller's torch RNG is left
    untouched), so server and clients build the same frozen base; a LoRA adapter (B = 0)
    wraps all linear layers when ``fedavg.train_mode == "lora"``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(downstream.seed)
        model = build_model(downstream, tokenizer)
        if fedavg.train_mode == "lora":
            import warnings

            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=fedavg.lora_r,
                lora_alpha=fedavg.lora_alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                fan_in_fan_out=_uses_conv1d(model),
            )
            with warnings.catch_warnings():  # PEFT's notes on GPT-2's Conv1D / deprecations
                warnings.simplefilter("ignore")
                model = get_peft_model(model, lora)
    return model


def _uses_conv1d(model: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the trainable parameters, in ``named_parameters()`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flatten_params(model: torch.nn.Module) -> np.ndarray:
    """All trainable parameters as one float32 vector (a copy), deterministic order."""
    params = trainable_parameters(model)
    if not params:
        return np.zeros(0, dtype=np.float32)
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).float().cpu() for _, p in params])
    return flat.numpy().copy()


def unflatten_params(model: torch.nn.Module, vector: np.ndarray) -> None:
    """Write ``vector`` (as from :func:`flatten_params`) into the trainable parameters.

    Raises
    ------
    ValueError
        If the length does not match the model's trainable parameters.
    """
    vector = np.asarray(vector)
    params = trainable_parameters(model)
    total = sum(p.numel() for _, p in params)
    if vector.ndim != 1 or vector.size != total:
        raise ValueError(
            f"parameters: vector of shape {vector.shape} does not match the model's {total} "
            "trainable parameters"
        )
    offset = 0
    with torch.no_grad():
        for _, p in params:
            chunk = torch.from_numpy(np.ascontiguousarray(vector[offset : offset + p.numel()]))
            p.copy_(chunk.reshape(p.shape).to(device=p.device, dtype=p.dtype))
            offset += p.numel()


def param_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Trainable parameters by name (float32 copies), in flattening order."""
    return {n: p.detach().float().cpu().numpy().copy() for n, p in trainable_parameters(model)}


def load_param_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named arrays (as from :func:`param_arrays`) into the trainable parameters.

    Raises
    ------
    ValueError
        If the names or shapes differ from the model's trainable parameters (a client whose
        model config differs from the server's).
    """
    params = trainable_parameters(model)
    names = [n for n, _ in params]
    if list(arrays) != names:
        missing = sorted(set(names) - set(arrays))
        extra = sorted(set(arrays) - set(names))
        raise ValueError(
            "downstream: the received parameters do not match this model "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); server and client must use the "
            "same downstream and strategy.fedavg settings"
        )
    with torch.no_grad():
        for name, p in params:
            value = np.asarray(arrays[name])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"downstream: parameter {name} has shape {tuple(value.shape)}, this model "
                    f"expects {tuple(p.shape)}"
                )
            p.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(p.device, p.dtype))


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen parameters (names and bytes): equal iff the frozen bases agree.

    LoRA clients rebuild the frozen base themselves; the fingerprint lets them check it is the
    server's. A fully trained model has no frozen parameters (fingerprint of nothing).
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                digest.update(name.encode())
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the client
def local_steps_for(num_texts: int, batch_size: int, steps: int, epochs: float | None) -> int:
    """Number of local steps: ``steps``, or ``ceil(epochs * texts / batch)`` if ``epochs``."""
    if epochs is None:
        return steps
    return max(1, math.ceil(epochs * num_texts / batch_size))


def local_train(
    model: torch.nn.Module,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    seed: int,
    epochs: float | None = None,
    optimizer: str = "sgd",
    bf16: bool = False,
) -> np.ndarray:
    """Train the model's trainable parameters on ``texts``; return ``new - old`` (float32).

    Texts are encoded as for the downstream evaluation (``BOS + tokens + EOS``, pad ignored);
    batches are drawn from seeded permutations, cycling when ``steps`` exceeds one pass.
    The model is left at the trained parameters; the caller's torch RNG is untouched.

    Parameters
    ----------
    model
        Holds the global parameters on entry.
    texts
        The client's private texts (blank ones are dropped; none at all: a zero update).
    tokenizer
        The downstream tokenizer.
    steps, epochs
        Number of optimizer steps, or (``epochs`` set) passes over the texts.
    lr, batch_size, seq_len, optimizer
        Local optimization settings (``optimizer``: ``"sgd"`` or ``"adamw"``).
    seed
        Seeds the batch order (and dropout, if any).
    bf16
        Forward passes under bf16 autocast (parameters, gradients, optimizer and the loss stay
        float32, so the update is a float32 vector either way).

    Returns
    -------
    numpy.ndarray
        The update, unclipped, in :func:`flatten_params` order.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"strategy.fedavg.local_optimizer: expected one of {OPTIMIZERS}")
    old = flatten_params(model)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        return np.zeros_like(old)
    ids, mask = encode_for_lm(texts, tokenizer, seq_len)
    device = next(model.parameters()).device
    params = [p for _, p in trainable_parameters(model)]
    n_steps = local_steps_for(len(texts), batch_size, steps, epochs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order_rng = torch.Generator().manual_seed(seed)
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        was_training = model.training
        model.train()
        order, pos, losses = torch.randperm(len(texts), generator=order_rng), 0, []
        for _ in range(n_steps):
            if pos >= len(order):
                order, pos = torch.randperm(len(texts), generator=order_rng), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            b_ids, b_mask = ids[idx].to(device), mask[idx].to(device)
            with _autocast(device, bf16):
                logits = model(input_ids=b_ids, attention_mask=b_mask).logits
            loss = _lm_loss(logits, b_ids, b_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.train(was_training)
    logger.debug("local training: %d steps, loss %.3f -> %.3f", n_steps, losses[0], losses[-1])
    return flatten_params(model) - old


# --------------------------------------------------------------------------- the server
def expected_clients(sample_rate: float, num_clients: int) -> float:
    """``q * N``, the expected number of Poisson-sampled clients (the fixed denominator)."""
    if not (0 < sample_rate <= 1) or num_clients < 1:
        raise ValueError(
            f"privacy.sample_rate / num_clients: need q in (0, 1] and N >= 1, got "
            f"{sample_rate}, {num_clients}"
        )
    return float(sample_rate) * int(num_clients)


#: :func:`noise_to_signal` above which DP-FedAvg warns that its rounds are mostly noise.
NOISE_TO_SIGNAL_WARN = 10.0


def noise_to_signal(noise_multiplier: float, num_params: int, num_expected: float) -> float:
    """Expected noise norm of one round's average over the largest possible signal norm.

    The average ``release / (q N)`` carries noise ``N(0, (sigma C / (q N))^2 I)`` over ``d``
    parameters, of expected norm ~ ``sigma C sqrt(d) / (q N)``, while its signal, a mean of
    clipped updates, has norm at most ``C``. So the ratio is ``sigma sqrt(d) / (q N)``,
    independent of C and of the server learning rate (which scales both). Far above 1, each
    round moves the model mostly at random: a larger federation (q N), fewer trainable
    parameters (LoRA, a smaller rank) or a higher epsilon are what lower it.

    Parameters
    ----------
    noise_multiplier
        sigma.
    num_params
        ``d``, the number of trainable parameters released each round.
    num_expected
        ``q * N`` (see :func:`expected_clients`).

    Returns
    -------
    float
        ``sigma * sqrt(d) / (q N)`` (0 without noise).
    """
    if not num_expected > 0:
        raise ValueError(f"num_expected: must be > 0, got {num_expected}")
    return float(noise_multiplier) * math.sqrt(int(num_params)) / float(num_expected)


def server_step(
    global_vector: np.ndarray, release: np.ndarray, server_lr: float, num_expected: float
) -> np.ndarray:
    """``w + server_lr * release / (q N)``: the fixed-denominator DP-FedAvg update.

    ``release`` is the noisy *sum* ``sum_i clip_C(delta_i) + N(0, (sigma C)^2 I)`` over the
    Poisson-sampled clients. Dividing by the fixed ``q N`` rather than by the realised number
    of replies is McMahan et al.'s (2018) fixed-denominator estimator: it is unbiased for the
    mean update over the population (each client is in the sum with probability q), and as a
    public constant it keeps the average pure post-processing of the sum the accountant
    composes (sensitivity C for the sum, C / (q N) for the average). The realised count
    depends on who took part, so dividing by it would be neither.

    Parameters
    ----------
    global_vector
        Current trainable parameters ``w`` (float32).
    release
        Noisy sum of clipped updates, same length.
    server_lr
        Server learning rate.
    num_expected
        ``q * N`` (see :func:`expected_clients`).

    Returns
    -------
    numpy.ndarray
        New parameters, float32.
    """
    global_vector = np.asarray(global_vector)
    release = np.asarray(release)
    if release.shape != global_vector.shape:
        raise ValueError(
            f"release: shape {release.shape} does not match the parameters {global_vector.shape}"
        )
    if not num_expected > 0:
        raise ValueError(f"num_expected: must be > 0, got {num_expected}")
    step = (server_lr / num_expected) * release.astype(np.float64)
    return (global_vector.astype(np.float64) + step).astype(np.float32)
