"""The server's DPO step (POPri step 7): TRL's DPOTrainer on a LoRA adapter, run once per round.

One :class:`DPOStep` lives for a whole run. It wraps the base causal LM once with a PEFT LoRA
adapter; the reference model of DPO is the *base* model (adapter disabled), never last round's
policy. The adapter weights, the AdamW state and the LR schedule (linear warmup, then constant)
carry over rounds (``warm_start``, the paper's way): a fresh ``DPOTrainer`` is built every round
around the same model, optimizer and scheduler. With ``warm_start=False`` every round starts
again from the initial adapter with a fresh optimizer: the round's policy is DPO from the base
model on that round's pairs alone (with the strategy's ``replay_rounds``: on every pair
released so far).

Behaviours of TRL 1.16 this module relies on (read from ``trl/trainer/dpo_trainer.py``):

* Given a ``PeftModel`` and ``ref_model=None`` (and no ``peft_config``), DPOTrainer adds a second
  adapter named ``"ref"``, a copy of the current ``"default"`` adapter, and uses it as the
  reference whenever it exists. Built each round, that would make the reference last round's
  policy, so :meth:`DPOStep.train_round` deletes ``"ref"`` right after constructing the trainer;
  the loss then falls back to ``use_adapter(model, None)``, i.e. ``disable_adapter()`` = base.
* A non-conversational dataset gets the EOS token appended to ``chosen``/``rejected``; sequences
  are ``prompt + completion`` truncated to ``max_length`` (keep the start); examples whose prompt
  alone has ``>= max_length`` tokens are dropped. The collator pads on the right by itself, so
  the tokenizer's padding side does not matter here.
* ``optimizers=(optimizer, scheduler)`` are used as given: ``Trainer`` only creates its own when
  they are ``None`` and wraps (not copies) the optimizer with Accelerate, so AdamW moments, its
  ``step`` counters and the scheduler's ``last_epoch`` keep counting across trainers.
* Logged per optimizer step (``logging_steps=1``): ``loss``, ``rewards/chosen``,
  ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen`` ...
  (averaged over the gradient-accumulation micro-batches of that step).
* With ``precompute_ref_log_probs`` (our config field) the base model's log-probabilities of
  every pair are computed once per round, before training, by TRL's own
  ``DPOTrainer.compute_ref_log_probs`` (adapter disabled, no grad, batches from TRL's collator)
  and stored as the ``ref_chosen_logps``/``ref_rejected_logps`` columns that TRL's collator and
  ``_compute_loss`` read when ``trainer.precompute_ref_logps`` is set. TRL's
  ``DPOConfig(precompute_ref_log_probs=True)`` is *not* used: it runs inside the trainer's
  constructor while TRL's ``"ref"`` adapter copy exists, so from round 2 on the precomputed
  reference would be last round's policy; it also hashes the whole model and writes a
  ``datasets`` cache file every round.
* TRL patches the base model's ``forward`` (fused LM head) and Accelerate may patch the PEFT
  model's ``forward`` (mixed-precision autocast) on every new trainer; both patches are undone
  after each round so they do not nest round after round.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popri_flwr.models.loading import native_bf16, resolve_device

logger = logging.getLogger(__name__)

_ADAPTER = "default"
# TRL's loss terms that need no extra model outputs or settings (the pairwise family and SFT).
LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "sft")
# Optimizers by transformers' ``TrainingArguments.optim`` names.
OPTIMIZERS = ("adamw_torch", "sgd")
_STATE_FILE = "dpo_state.json"


@dataclass
class DPOStepConfig:
    """Hyper-parameters of the server's DPO step (reference POPri defaults).

    Attributes
    ----------
    beta
        DPO temperature.
    learning_rate
        Peak learning rate (after warmup).
    optim
        ``"adamw_torch"`` (transformers' default: AdamW, no weight decay) or ``"sgd"`` (plain
        SGD, no momentum). AdamW's first steps move every adapter weight by ~``learning_rate``
        whatever the size of its gradient (the update is ~ sign(g)); SGD's step is
        ``learning_rate * g``, so weights the pairs say little about stay put. SGD needs a much
        larger ``learning_rate``.
    warmup_steps
        Linear warmup over this many optimizer steps, counted across rounds (not per round).
    per_device_batch_size, gradient_accumulation_steps
        Pairs per micro-batch and micro-batches per optimizer step (effective batch 24).
    epochs_per_round
        Passes over a round's pairs (may be fractional).
    max_steps_per_round
        Cap on optimizer steps per round (``None``: no cap).
    steps_per_round
        ``None``: ``epochs_per_round`` passes at the batch above. An integer: every round takes
        exactly this many optimizer steps and one pass over its pairs fills them, i.e. the
        gradient accumulation is ``ceil(pairs / (per_device_batch_size * steps_per_round))``
        (replacing ``gradient_accumulation_steps``, ``epochs_per_round`` and
        ``max_steps_per_round``; with fewer pairs than that, smaller micro-batches, see
        :meth:`round_schedule`). More pairs then make each step's direction cleaner instead
        of adding steps: the held-out loss pays its curvature on the adapter's displacement,
        which grows with the steps (docs/learning.md, stop 19).
    warm_start
        ``True`` (the paper): the adapter, AdamW's moments and the warmup carry over rounds.
        ``False``: each round restarts from the initial adapter (``B = 0`` and the same ``A``,
        drawn once from ``seed``) with a fresh optimizer and warmup, so the policy after round
        ``t`` is DPO from the base model on round ``t``'s pairs only.
    lora_r, lora_alpha, lora_dropout, lora_target_modules
        The LoRA adapter.
    max_length
        Token budget of ``prompt + completion``; longer sequences are truncated at the end.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    seed
        Round ``t`` (0-based) trains with seed ``seed + t``.
    bf16
        bf16 mixed precision (autocast; weights and optimizer stay float32). ``None`` = on CUDA,
        and on a CPU with native bf16 (``avx512_bf16``/``amx_bf16``, see
        :func:`popri_flwr.models.loading.native_bf16`): there a demo round runs ~2-2.4x
        faster than float32 and its loss moves by < 0.001 (``popri_flwr.speed.dpo``,
        ``tests/test_dpo_reference.py``). ``false`` for float32-exact runs.
    gradient_checkpointing
        Trade compute for memory (off: the default model is small).
    loss_type, loss_weights
        TRL's loss terms and their weights (``None``: 1 each), summed. ``["sigmoid"]`` is DPO.
        ``["sigmoid", "sft"]`` adds the mean negative log-likelihood of the chosen completion
        (RPO, Pang et al. 2024; TRL's ``rpo_alpha`` of old): DPO alone can lower the likelihood
        of both sides of a pair, and the SFT term holds the chosen side up. On samples drawn at
        temperature 1 its expected gradient on random pairs is zero, so what it learns comes
        from which sample the clients chose.
    precompute_ref_log_probs
        Compute the reference (base model) log-probabilities of a round's pairs once, in one
        no-grad pass before training, instead of a reference forward at every step. The
        reference is fixed, so the loss is the same up to float rounding; ``false`` restores
        TRL's per-step reference forward.
    """

    beta: float = 0.01
    learning_rate: float = 8e-7
    optim: str = "adamw_torch"
    warmup_steps: int = 10
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 3
    epochs_per_round: float = 1.0
    max_steps_per_round: int | None = None
    steps_per_round: int | None = None
    warm_start: bool = True
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    max_length: int = 512
    device: str = "auto"
    seed: int = 0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    precompute_ref_log_probs: bool = True
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_target_modules, str):  # a bare string is an error, below
            self.lora_target_modules = tuple(self.lora_target_modules)
        if not isinstance(self.loss_type, str):
            self.loss_type = tuple(self.loss_type)
        if self.loss_weights is not None and not isinstance(self.loss_weights, str):
            self.loss_weights = tuple(self.loss_weights)
        self.validate()

    def round_schedule(self, num_pairs: int) -> tuple[int, int, int]:
        """Micro-batch, gradient accumulation and ``max_steps`` (-1: by epochs) of a round.

        With ``steps_per_round = n``, one pass over the ``P`` pairs fills exactly n steps: the
        micro-batch is ``b = min(per_device_batch_size, ceil(P / n))`` and the accumulation
        ``ceil(P / (b n))``. The smaller micro-batch keeps pairs from repeating when
        ``P < per_device_batch_size * n`` (they repeat only when ``P < n``).
        """
        if self.steps_per_round is None:
            steps = self.max_steps_per_round or -1
            return self.per_device_batch_size, self.gradient_accumulation_steps, steps
        n = self.steps_per_round
        batch = max(1, min(self.per_device_batch_size, math.ceil(num_pairs / n)))
        return batch, math.ceil(num_pairs / (batch * n)), n

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first bad key (``dpo.<key>: ...``)."""
        pos_int, steps = "must be an integer >= 1", self.max_steps_per_round
        targets, bf16, dropout = self.lora_target_modules, self.bf16, self.lora_dropout
        checks: list[tuple[str, bool, str]] = [
            ("beta", _positive(self.beta), "must be > 0"),
            ("learning_rate", _positive(self.learning_rate), "must be > 0"),
            ("optim", self.optim in OPTIMIZERS, f"expected one of {', '.join(OPTIMIZERS)}"),
            ("warmup_steps", _int(self.warmup_steps, 0), "must be an integer >= 0"),
            ("per_device_batch_size", _int(self.per_device_batch_size, 1), pos_int),
            ("gradient_accumulation_steps", _int(self.gradient_accumulation_steps, 1), pos_int),
            ("epochs_per_round", _positive(self.epochs_per_round), "must be > 0"),
            ("max_steps_per_round", steps is None or _int(steps, 1), "must be null or >= 1"),
            (
                "steps_per_round",
                self.steps_per_round is None or _int(self.steps_per_round, 1),
                "must be null or an integer >= 1",
            ),
            ("warm_start", isinstance(self.warm_start, bool), "expected true or false"),
            ("lora_r", _int(self.lora_r, 1), pos_int),
            ("lora_alpha", _positive(self.lora_alpha), "must be > 0"),
            ("lora_dropout", _real(dropout) and 0 <= dropout < 1, "must be in [0, 1)"),
            (
                "lora_target_modules",
                isinstance(targets, tuple)
                and len(targets) > 0
                and all(isinstance(m, str) and m for m in targets),
                "must be a non-empty list of names",
            ),
            ("max_length", _int(self.max_length, 2), "must be an integer >= 2"),
            (
                "device",
                isinstance(self.device, str)
                and (self.device in ("auto", "cpu") or self.device.startswith("cuda")),
                "expected cpu, cuda or auto",
            ),
            ("seed", _int(self.seed, 0), "must be an integer >= 0"),
            ("bf16", bf16 is None or isinstance(bf16, bool), "expected true, false or null"),
            ("gradient_checkpointing", isinstance(self.gradient_checkpointing, bool), "a bool"),
            ("precompute_ref_log_probs", isinstance(self.precompute_ref_log_probs, bool), "a bool"),
            (
                "loss_type",
                isinstance(self.loss_type, tuple)
                and len(self.loss_type) > 0
                and all(t in LOSS_TYPES for t in self.loss_type),
                f"must be a non-empty list of {', '.join(LOSS_TYPES)}",
            ),
            (
                "loss_weights",
                self.loss_weights is None
                or (
                    isinstance(self.loss_weights, tuple)
                    and len(self.loss_weights) == len(self.loss_type)
                    and all(_real(w) and w >= 0 for w in self.loss_weights)
                    and any(w > 0 for w in self.loss_weights)
                ),
                "must be null or one weight >= 0 per loss_type entry (not all 0)",
            ),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"dpo.{key}: {expected}, got {getattr(self, key)!r}")


def _real(x: Any) -> bool:
    """A finite int or float (bools excluded)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: Any) -> bool:
    return _real(x) and x > 0


def _int(x: Any, minimum: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


class DPOStep:
    """DPO with a LoRA adapter whose weights and optimizer state persist across rounds.

    Parameters
    ----------
    model
        A plain transformers causal LM: the base model, and the DPO reference (adapter off).
        It is moved to ``config.device`` and wrapped in place by PEFT; its weights never change.
    tokenizer
        Its tokenizer (a pad token is needed; ``load_causal_lm`` sets pad = EOS).
    config
        See :class:`DPOStepConfig`.

    Raises
    ------
    ValueError
        If ``model`` already carries a PEFT adapter, or no ``lora_target_modules`` exist in it.
    """

    def __init__(self, model: Any, tokenizer: Any, config: DPOStepConfig | None = None) -> None:
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model

        self.config = config = config or DPOStepConfig()
        config.validate()
        if isinstance(model, PeftModel):
            raise ValueError("model: expected a plain causal LM (DPOStep adds the LoRA adapter)")
        self.device = resolve_device(config.device)
        self.bf16 = native_bf16(self.device) if config.bf16 is None else bool(config.bf16)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        model.to(self.device)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # LoRA's A is drawn from torch's global RNG: seed it (public randomness), so a resumed
        # run and ``warm_start=False`` rounds start from the same initial adapter.
        cuda = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        try:
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(config.seed)
                self._model = get_peft_model(model, lora, adapter_name=_ADAPTER)
        except ValueError as err:
            raise ValueError(
                f"dpo.lora_target_modules: {list(config.lora_target_modules)} do not match the "
                f"model's modules: {err}"
            ) from err
        self._model.eval()
        # The forward patches TRL/Accelerate add per trainer are rolled back to this snapshot.
        self._forward_owners = [self._model, self._model.get_base_model()]
        self._forward_snapshot = [_snapshot_forward(m) for m in self._forward_owners]

        params = self._trainable()
        self._initial_adapter = (
            None if config.warm_start else [p.detach().clone() for p in params]
        )  # what a warm_start=False round restarts from
        self._new_optimizer()
        self.global_step = 0  # optimizer steps over all rounds
        self.rounds_trained = 0
        n_train = sum(p.numel() for p in params)
        logger.info(
            "DPO: LoRA r=%d on %s (%d trainable params), device %s, bf16 %s",
            config.lora_r,
            ",".join(config.lora_target_modules),
            n_train,
            self.device,
            self.bf16,
        )

    def _trainable(self) -> list[Any]:
        """The adapter's trainable parameters, in a fixed order (the optimizer's)."""
        return [p for p in self._model.parameters() if p.requires_grad]

    def _new_optimizer(self) -> None:
        """AdamW (Trainer's default, no decay) or SGD, and the warmup-then-constant schedule.

        Built once per run (``warm_start``) so AdamW's moments persist, else once per round.
        """
        import torch

        cfg, params = self.config, self._trainable()
        if cfg.optim == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.learning_rate)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        warmup = cfg.warmup_steps

        def warmup_then_constant(step: int) -> float:
            # ``step`` = optimizer steps already taken; the LR reaches its peak at step warmup-1.
            return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_then_constant)

    def _restart(self) -> None:
        """Back to the initial adapter (policy == base) with a fresh optimizer and warmup."""
        import torch

        with torch.no_grad():
            for p, p0 in zip(self._trainable(), self._initial_adapter, strict=True):
                p.copy_(p0)
        self._new_optimizer()

    @property
    def model(self) -> Any:
        """The ``PeftModel`` (adapter enabled, eval mode): generate with this."""
        return self._model

    def train_round(self, pairs: list[dict[str, str]]) -> dict[str, Any]:
        """Run one round of DPO on ``pairs`` (``epochs_per_round`` passes, capped).

        Cost measured on this repo's 2-core CPU (default SmolLM2-135M in fp32, LoRA r 16 on all
        projections, 4 pairs per step of ~64 tokens each): ~5.6 s per optimizer step with two
        torch threads on an idle machine (~10 s with one), plus ~2 s per round to build the
        trainer and tokenize. The defaults (precomputed reference, bf16 on a CPU with native
        bf16) cut a 4-step demo round from ~58 s to ~22 s (``popri_flwr.speed.dpo``).
        Cost grows about linearly with pairs x tokens, so the reference
        scale (24 pairs of ~500 tokens per step, ~75 steps per round) is a GPU job.

        Parameters
        ----------
        pairs
            ``[{"prompt": str, "chosen": str, "rejected": str}]`` in plain text: the prompt is a
            raw few-shot completion prompt, chosen/rejected are its continuations.

        Returns
        -------
        dict
            ``loss`` (mean over steps), ``reward_margin`` (mean ``rewards/margins``, i.e.
            beta * (chosen - rejected) log-ratio vs. the base), ``reward_accuracy`` (mean
            ``rewards/accuracies``), ``steps`` (optimizer steps this round), ``pairs`` (pairs
            kept after the ``max_length`` filter), ``seconds``.

        Raises
        ------
        ValueError
            If ``pairs`` is empty or malformed, or every prompt is longer than ``max_length``.
        """
        from datasets import Dataset
        from transformers.trainer_callback import PrinterCallback
        from trl import DPOConfig, DPOTrainer

        records = _check_pairs(pairs)
        cfg = self.config
        round_seed = cfg.seed + self.rounds_trained
        if not cfg.warm_start and self.rounds_trained:
            self._restart()
        batch, accumulation, max_steps = cfg.round_schedule(len(records))
        start = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix="popri_dpo_"))
        trainer = None
        try:
            args = DPOConfig(
                output_dir=str(workdir),
                beta=cfg.beta,
                loss_type=list(cfg.loss_type),
                loss_weights=None if cfg.loss_weights is None else list(cfg.loss_weights),
                learning_rate=cfg.learning_rate,  # informational: the optimizer is ours
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                num_train_epochs=cfg.epochs_per_round,
                max_steps=max_steps,
                max_length=cfg.max_length,
                logging_steps=1,
                save_strategy="no",
                eval_strategy="no",
                report_to=[],
                use_cpu=self.device == "cpu",
                bf16=self.bf16,
                activation_checkpointing=cfg.gradient_checkpointing,  # new name in transformers 5
                seed=round_seed,
                data_seed=round_seed,
                dataloader_num_workers=0,
                disable_tqdm=True,
            )
            with _quiet_datasets():
                trainer = DPOTrainer(
                    model=self._model,
                    ref_model=None,
                    args=args,
                    train_dataset=Dataset.from_list(records),
                    processing_class=self.tokenizer,
                    optimizers=(self.optimizer, self.scheduler),
                )
            trainer.remove_callback(PrinterCallback)  # prints every log dict; we log per round
            trainer.add_callback(_step_bar())  # TRL's own bar is off (it prints log dicts too)
            # TRL 1.16 copies the current adapter into "ref" and would use it as the reference;
            # POPri's reference is the base model, which TRL uses when "ref" is absent.
            if "ref" in self._model.peft_config:
                self._model.delete_adapter("ref")
            self._model.set_adapter(_ADAPTER)
            n_kept = len(trainer.train_dataset)
            if n_kept == 0:
                raise ValueError(
                    f"dpo.max_length: every prompt has >= {cfg.max_length} tokens; no pair left"
                )
            if n_kept < len(records):
                logger.warning(
                    "DPO: dropped %d of %d pairs whose prompt has >= %d tokens (dpo.max_length)",
                    len(records) - n_kept,
                    len(records),
                    cfg.max_length,
                )
            if cfg.precompute_ref_log_probs:
                with _quiet_datasets():
                    trainer.train_dataset = _with_ref_logps(trainer, self._model)
                trainer.precompute_ref_logps = True  # TRL's loss then reads the columns
            trainer.train()
            steps = int(trainer.state.global_step)
            logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
        finally:
            if trainer is not None:
                trainer.accelerator.free_memory()
            del trainer
            for owner, snap in zip(self._forward_owners, self._forward_snapshot, strict=True):
                _restore_forward(owner, snap)
            self._model.eval()
            shutil.rmtree(workdir, ignore_errors=True)

        self.global_step += steps
        self.rounds_trained += 1
        seconds = time.perf_counter() - start
        metrics = {
            "loss": _mean(h.get("loss") for h in logs),
            "reward_margin": _mean(h.get("rewards/margins") for h in logs),
            "reward_accuracy": _mean(h.get("rewards/accuracies") for h in logs),
            "steps": steps,
            "pairs": n_kept,
            "seconds": seconds,
        }
        logger.info(
            "DPO round %d: %d pairs, %d steps (total %d), loss %.4f, margin %.4f, acc %.2f, %.1f s",
            self.rounds_trained,
            n_kept,
            steps,
            self.global_step,
            _nan(metrics["loss"]),
            _nan(metrics["reward_margin"]),
            _nan(metrics["reward_accuracy"]),
            seconds,
        )
        return metrics

    def train_weighted_round(
        self, records: list[dict[str, Any]], *, share_prompts: bool = True
    ) -> dict[str, Any]:
        """One round of weighted likelihood on completions instead of DPO (``update=tilt``).

        The same adapter, optimizer, schedule and round counters as :meth:`train_round`, so
        checkpoints, resume and generation are shared; the step count and micro-batch follow
        ``steps_per_round`` (else ``max_steps_per_round``, else 1) and
        ``per_device_batch_size``. See :func:`popri_flwr.models.weighted_fit.weighted_nll_round`.

        Parameters
        ----------
        records
            ``[{"prompt", "completion", "weight"}]``.
        share_prompts
            Run each prompt once for all its records (default; False: the benchmark baseline).

        Returns
        -------
        dict
            ``loss`` (weighted mean token NLL), ``steps``, ``sequences``, ``seconds``.
        """
        from popri_flwr.models.weighted_fit import weighted_nll_round

        cfg = self.config
        if not cfg.warm_start and self.rounds_trained:
            self._restart()
        start = time.perf_counter()
        metrics = weighted_nll_round(
            self._model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            records,
            steps=cfg.steps_per_round or cfg.max_steps_per_round or 1,
            micro_batch=cfg.per_device_batch_size,
            max_length=cfg.max_length,
            bf16=self.bf16,
            seed=cfg.seed + self.rounds_trained,
            share_prompts=share_prompts,
        )
        self.global_step += metrics["steps"]
        self.rounds_trained += 1
        metrics["seconds"] = time.perf_counter() - start
        logger.info(
            "Weighted fit round %d: %d sequences, %d steps (total %d), NLL %.4f, %.1f s",
            self.rounds_trained,
            metrics["sequences"],
            metrics["steps"],
            self.global_step,
            metrics["loss"],
            metrics["seconds"],
        )
        return metrics

    def save(self, directory: str | Path) -> None:
        """Save the adapter, optimizer, scheduler and step counts to ``directory``.

        The base model weights are *not* saved: :meth:`load` expects a ``DPOStep`` built on the
        same base model and config.
        """
        import torch

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._model.save_pretrained(str(directory), selected_adapters=[_ADAPTER])
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        state = {
            "global_step": self.global_step,
            "rounds_trained": self.rounds_trained,
            "lora_r": self.config.lora_r,
            "lora_target_modules": list(self.config.lora_target_modules),
        }
        (directory / _STATE_FILE).write_text(json.dumps(state, indent=1))

    def load(self, directory: str | Path) -> None:
        """Restore what :meth:`save` wrote (adapter weights copied into the live model).

        Raises
        ------
        ValueError
            If ``directory`` lacks a file, or its adapter does not match ``config``.
        """
        import torch
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        directory = Path(directory)
        for name in (_STATE_FILE, "optimizer.pt", "scheduler.pt", "adapter_config.json"):
            if not (directory / name).is_file():
                raise ValueError(f"{directory}: no {name}; not a DPOStep checkpoint")
        state = json.loads((directory / _STATE_FILE).read_text())
        if state["lora_r"] != self.config.lora_r:
            raise ValueError(
                f"dpo.lora_r: {self.config.lora_r} but {directory} holds r={state['lora_r']}"
            )
        if sorted(state["lora_target_modules"]) != sorted(self.config.lora_target_modules):
            raise ValueError(
                f"dpo.lora_target_modules: {list(self.config.lora_target_modules)} but "
                f"{directory} holds {state['lora_target_modules']}"
            )
        weights = load_peft_weights(str(directory), device=self.device)
        # Copies in place, so the optimizer keeps pointing at the live parameters.
        result = set_peft_model_state_dict(self._model, weights, adapter_name=_ADAPTER)
        if result.unexpected_keys:
            keys = result.unexpected_keys[:3]
            raise ValueError(f"{directory}: adapter has unexpected keys, e.g. {keys}")
        self.optimizer.load_state_dict(
            torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        )
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        self.global_step = int(state["global_step"])
        self.rounds_trained = int(state["rounds_trained"])
        self._model.eval()
        logger.info(
            "DPO: restored adapter + optimizer from %s (%d rounds, %d steps)",
            directory,
            self.rounds_trained,
            self.global_step,
        )


def _step_bar() -> Any:
    """A trainer callback showing one progress bar over the round's optimizer steps."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps, desc="DPO steps", unit="step", leave=False)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.update(1)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.close()

    return StepBar()


def _with_ref_logps(trainer: Any, model: Any) -> Any:
    """``trainer.train_dataset`` plus the reference log-probs of each pair (adapter disabled).

    Uses TRL's own collator and ``compute_ref_log_probs`` (the same forward its per-step path
    runs), in order and without shuffling; call after the ``"ref"`` adapter is deleted, so the
    reference is the base model.
    """
    import torch
    from torch.utils.data import DataLoader

    dataset = trainer.train_dataset
    loader = DataLoader(
        dataset,
        batch_size=trainer.args.per_device_train_batch_size,
        collate_fn=trainer.data_collator,
        shuffle=False,
    )
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
            ref_c, ref_r = trainer.compute_ref_log_probs(model, batch)
            chosen.append(ref_c.detach().float().cpu())
            rejected.append(ref_r.detach().float().cpu())
    finally:
        model.train(was_training)
    ref_chosen = torch.cat(chosen).tolist()
    ref_rejected = torch.cat(rejected).tolist()
    dataset = dataset.add_column("ref_chosen_logps", ref_chosen)
    return dataset.add_column("ref_rejected_logps", ref_rejected)


def _check_pairs(pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    if not pairs:
        raise ValueError("pairs: need at least one preference pair, got none")
    records = []
    for i, pair in enumerate(pairs):
        try:
            rec = {k: pair[k] for k in ("prompt", "chosen", "rejected")}
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"pairs[{i}]: expected a dict with prompt, chosen, rejected; missing {err}"
            ) from err
        for k, v in rec.items():
            if not isinstance(v, str):
                raise ValueError(f"pairs[{i}].{k}: expected a string, got {type(v).__name__}")
        records.append(rec)
    return records


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the per-round ``datasets.map`` progress bars (three tiny bars per round)."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


_PATCHED_ATTRS = ("forward", "_original_forward")


def _snapshot_forward(module: Any) -> dict[str, Any]:
    """Instance-level ``forward`` overrides of ``module`` (usually none)."""
    return {k: module.__dict__[k] for k in _PATCHED_ATTRS if k in module.__dict__}


def _restore_forward(module: Any, snapshot: dict[str, Any]) -> None:
    for key in _PATCHED_ATTRS:
        if key in snapshot:
            module.__dict__[key] = snapshot[key]
        else:
            module.__dict__.pop(key, None)


def _mean(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x
