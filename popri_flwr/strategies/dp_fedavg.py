"""DP-FedAvg as a Flower strategy: client-level DP on-device training of the downstream LM.

Round t (clip C, noise multiplier sigma, Poisson rate q, population N)::

    server  : sends w_t (the trainable parameters: whole model or LoRA adapter)
    client i: v_i = clip_C(local_train(w_t) - w_t)                       (only v_i leaves)
    server  : s = sum_i v_i + N(0, sigma^2 C^2 I)                        (PrivateStrategy)
              w_{t+1} = w_t + server_lr * s / (q N)                    (fixed denominator)

The model is the downstream LM every other method is scored with
(:mod:`popri_flwr.evaluation.downstream`),
so DP-FedAvg's final model is directly comparable with a downstream LM trained on synthetic text.
Evaluation only, with diagnostics on (simulation): after each round the global model's
next-token accuracy on held-out private text (a seeded subsample of
``evaluation.max_eval_texts``) goes into ``diagnostics.jsonl``, never into the release.

Files it adds to the run directory::

    checkpoint/global_round_NNN.npz   trainable parameters after round NNN (last two kept)
    final_model/                      the final model (LoRA merged), ``from_pretrained``-ready
    diagnostics.jsonl                 + a ``final_model`` record: final and best accuracy

Why not Flower's DP wrappers (``DifferentialPrivacyServerSideFixedClipping`` and friends):
they need a fixed number of sampled clients, divide by the realised count and account with
NO sampling amplification (and draw noise from the global ``np.random``). This strategy keeps
the base class's secret Poisson sampling, the noisy *sum* with sensitivity C and the
accountant that composes the Poisson-subsampled Gaussian mechanism, the same mechanism POPri
and PE use, so equal sigma, q and rounds spend equal epsilon.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from popri_flwr.algorithms.fedavg_update import (
    NOISE_TO_SIGNAL_WARN,
    FedAvgConfig,
    build_fedavg_model,
    expected_clients,
    flatten_params,
    frozen_fingerprint,
    load_param_arrays,
    noise_to_signal,
    param_arrays,
    server_step,
    unflatten_params,
)
from popri_flwr.evaluation.downstream import (
    DownstreamConfig,
    bf16_for,
    encode_for_lm,
    evaluate_lm,
    load_tokenizer,
)
from popri_flwr.protocol import PAYLOAD_ARRAYS, PAYLOAD_CONFIG
from popri_flwr.strategies.base import PrivateStrategy

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"global_round_(\d+)\.npz$")


def checkpoint_path(run_dir: Any, server_round: int) -> Path:
    """``checkpoint/global_round_NNN.npz`` of a run directory."""
    return Path(run_dir.checkpoint_dir) / f"global_round_{server_round:03d}.npz"


class DPFedAvgStrategy(PrivateStrategy):
    """DP-FedAvg: clients train the downstream LM; the server averages noisy clipped updates.

    Parameters
    ----------
    model
        The global model (from :func:`~popri_flwr.algorithms.fedavg_update.build_fedavg_model`); its
        trainable parameters are what is sent, trained and noised.
    tokenizer
        The downstream tokenizer (saved with the final model).
    fedavg
        Local training and server step settings.
    downstream
        The downstream config (``seq_len``, evaluation ``batch_size``).
    eval_texts
        Held-out private texts for the evaluation-only accuracy (may be empty).
    **kwargs
        See :class:`~popri_flwr.strategies.base.PrivateStrategy`.
    """

    method = "dp_fedavg"

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        fedavg: FedAvgConfig,
        downstream: DownstreamConfig,
        eval_texts: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model, self.tokenizer = model, tokenizer
        self.fedavg, self.downstream = fedavg, downstream
        self.fingerprint = frozen_fingerprint(model)
        self.global_vector = flatten_params(model)
        self._initial_vector = self.global_vector.copy()
        self.eval_texts = list(eval_texts or [])
        self._eval = (
            encode_for_lm(self.eval_texts, tokenizer, downstream.seq_len)
            if self.eval_texts
            else None
        )

    @classmethod
    def from_config(cls, cfg: Any, *, federation: Any, **common: Any) -> DPFedAvgStrategy:
        """Build the downstream model and the strategy from a :class:`~popri_flwr.config.RunConfig`.

        ``strategy.fedavg`` is a :class:`~popri_flwr.algorithms.fedavg_update.FedAvgConfig`.
        """
        from popri_flwr.models.loading import resolve_device

        fedavg = cfg.strategy.fedavg
        tokenizer = load_tokenizer(cfg.downstream)
        model = build_fedavg_model(cfg.downstream, tokenizer, fedavg)
        model.to(resolve_device(cfg.downstream.device))
        return cls(
            model=model,
            tokenizer=tokenizer,
            fedavg=fedavg,
            downstream=cfg.downstream,
            eval_texts=(
                federation.eval_sample(cfg.evaluation.max_eval_texts, cfg.seed)
                if common.get("diagnostics")
                else None
            ),
            **common,
        )

    @property
    def expected_clients(self) -> float:
        """``q * N``, the fixed denominator of the noisy average."""
        return expected_clients(self.accountant.sample_rate, self.num_clients)

    # ---------------------------------------------------------------- set-up and resume
    def prepare(self, finished_round: int) -> None:
        """Fresh run: the initial model; resume: the global model after ``finished_round``."""
        if finished_round == 0:
            self._set_global(self._initial_vector)
            logger.info(
                "DP-FedAvg: %d trainable parameters (%s), %.1f expected clients per round",
                self.global_vector.size,
                self.fedavg.train_mode,
                self.expected_clients,
            )
            self.warn_if_noise_dominates()
            return
        path = checkpoint_path(self.run_dir, finished_round)
        if not path.exists():
            raise RuntimeError(
                f"run_dir: no global model of round {finished_round} ({path}); cannot resume"
            )
        load_npz_into(self.model, path)
        self.global_vector = flatten_params(self.model)
        logger.info("Restored the global model of round %d from %s", finished_round, path)

    def warn_if_noise_dominates(self) -> float:
        """Log a warning when each round's noise norm is far above the largest signal norm.

        Returns :func:`~popri_flwr.algorithms.fedavg_update.noise_to_signal` for this run,
        ``sigma sqrt(d) / (q N)``. Public quantities only: nothing here looks at client data.
        """
        ratio = noise_to_signal(
            self.accountant.noise_multiplier, self.global_vector.size, self.expected_clients
        )
        if ratio > NOISE_TO_SIGNAL_WARN:
            logger.warning(
                "DP-FedAvg: each round's noise has ~%.0fx the norm of the largest possible "
                "signal (sigma %.3g x sqrt(%d parameters) / %.1f expected clients); the model "
                "will mostly move at random. Lower it with more clients (privacy.sample_rate, "
                "a larger federation), fewer trainable parameters (strategy.fedavg.train_mode="
                "lora, a smaller lora_r) or a higher privacy.epsilon.",
                ratio,
                self.accountant.noise_multiplier,
                self.global_vector.size,
                self.expected_clients,
            )
        return ratio

    def _set_global(self, vector: np.ndarray) -> None:
        unflatten_params(self.model, vector)
        self.global_vector = np.asarray(vector, dtype=np.float32)

    # ---------------------------------------------------------------- one round
    def train_payload(self, server_round: int) -> RecordDict:
        """The global trainable parameters (one Array per tensor) and the local settings."""
        f = self.fedavg
        config = ConfigRecord(
            {
                "method": self.method,
                "train-mode": f.train_mode,
                "lora-r": f.lora_r,
                "lora-alpha": f.lora_alpha,
                "local-steps": f.local_steps,
                "local-lr": f.local_lr,
                "local-batch-size": f.local_batch_size,
                "local-optimizer": f.local_optimizer,
                "seq-len": self.downstream.seq_len,
                "seed": self.seed,
                "base-fingerprint": self.fingerprint,
                "downstream": json.dumps(dataclasses.asdict(self.downstream)),
            }
        )
        if f.local_epochs is not None:
            config["local-epochs"] = float(f.local_epochs)
        arrays = ArrayRecord({k: Array(v) for k, v in param_arrays(self.model).items()})
        return RecordDict({PAYLOAD_CONFIG: config, PAYLOAD_ARRAYS: arrays})

    def vector_length(self, server_round: int) -> int:
        return int(self.global_vector.size)

    def server_update(self, server_round: int, release: np.ndarray) -> dict[str, Any]:
        """``w += server_lr * release / (q N)``; logs the step and the noise scale."""
        new = server_step(self.global_vector, release, self.fedavg.server_lr, self.expected_clients)
        step_norm = float(np.linalg.norm(new.astype(np.float64) - self.global_vector))
        self._set_global(new)
        noise_std = (
            self.fedavg.server_lr
            * self.accountant.noise_multiplier
            * self.clip_norm
            / self.expected_clients
        )
        metrics = {
            "num_params": int(new.size),
            "expected_clients": self.expected_clients,
            "release_norm": float(np.linalg.norm(release)),
            "update_norm": step_norm,
            "noise_std_per_param": noise_std,
            "noise_norm_expected": noise_std * float(np.sqrt(new.size)),
            "noise_to_signal": noise_to_signal(
                self.accountant.noise_multiplier, new.size, self.expected_clients
            ),
        }
        logger.info(
            "Round %d: update norm %.4g (expected noise norm %.4g over %d parameters)",
            server_round,
            step_norm,
            metrics["noise_norm_expected"],
            new.size,
        )
        return metrics

    def evaluate_round(self, server_round: int) -> dict[str, Any]:
        """Evaluation only: next-token accuracy of the global model on held-out private text."""
        if self._eval is None:
            return {}
        bf16 = bf16_for(self.downstream, str(next(self.model.parameters()).device))
        m = evaluate_lm(self.model, *self._eval, self.downstream.batch_size, bf16)
        return {
            "accuracy": m["top1"],
            "top5_accuracy": m["top5"],
            "eval_loss": m["loss"],
            "eval_tokens": m["tokens"],
        }

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, server_round: int) -> dict[str, Any]:
        """Save ``checkpoint/global_round_NNN.npz``; drop what resume no longer needs.

        The previous round's model is kept (a crash before the round is committed resumes
        from it); older models and the releases of earlier rounds (already folded into the
        model, and a full model's release is large) are deleted.
        """
        path = checkpoint_path(self.run_dir, server_round)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, **param_arrays(self.model))
        os.replace(tmp, path)
        ckpt = Path(self.run_dir.checkpoint_dir)
        for old in ckpt.glob("global_round_*.npz"):
            m = _CKPT.search(old.name)
            if m and int(m.group(1)) < server_round - 1:
                old.unlink()
        for old in ckpt.glob("release_round_*.npy"):
            m = re.search(r"release_round_(\d+)\.npy$", old.name)
            if m and int(m.group(1)) < server_round:
                old.unlink()
        return {"global_model_round": server_round}

    # ---------------------------------------------------------------- the end
    def final_arrays(self) -> ArrayRecord:
        """The global model's trainable parameters (whole model, or the LoRA adapter)."""
        return ArrayRecord({k: Array(v) for k, v in param_arrays(self.model).items()})

    def start(self, grid: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the rounds (see the base class), then export the final model."""
        result = super().start(grid, *args, **kwargs)
        self.export_final()
        return result

    def export_final(self) -> dict[str, Any]:
        """Write ``final_model/`` (released) and, with diagnostics on, its private accuracy.

        Returns
        -------
        dict
            The diagnostics record ``final_model``: ``round``, ``final_top1``/``final_top5``/
            ``final_loss`` (this model on the strategy's held-out private texts) and
            ``best_top1``/``best_top5``/``best_round`` over the rounds' diagnostics; empty when
            diagnostics are off (the accuracy on private text is not part of the release).
        """
        from popri_flwr.privacy.diagnostics import read_diagnostics

        root = self.run_dir.path
        final, tmp = root / "final_model", root / "final_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        plain = self.model
        if self.fedavg.train_mode == "lora":
            plain = copy.deepcopy(self.model).merge_and_unload()
        plain.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        logger.info("DP-FedAvg final model: %s", final)
        if not self.diagnostics.enabled:
            return {}
        rounds = [r for r in read_diagnostics(root) if r.get("accuracy") is not None]
        summary: dict[str, Any] = {
            "round": self.run_dir.finished_rounds(),
            "train_mode": self.fedavg.train_mode,
            "num_params": int(self.global_vector.size),
            "eval_texts": len(self.eval_texts),
        }
        # The model is the one the last round evaluated (or restored from its checkpoint).
        last = [r for r in rounds if r["round"] == summary["round"]]
        ev = last[-1] if last else self.evaluate_round(summary["round"])
        if ev:
            summary.update(
                final_top1=ev["accuracy"],
                final_top5=ev["top5_accuracy"],
                final_loss=ev["eval_loss"],
            )
        if rounds:
            best = max(rounds, key=lambda r: r["accuracy"])
            summary.update(
                best_top1=best["accuracy"],
                best_top5=max(r["top5_accuracy"] for r in rounds),
                best_round=best["round"],
            )
        self.diagnostics.write({"final_model": summary})
        self.diagnostics.log(logging.INFO, "DP-FedAvg final model (diagnostics): %s", summary)
        return summary


def load_npz_into(model: Any, path: Path) -> None:
    """Load a ``global_round_NNN.npz`` into ``model``'s trainable parameters."""
    with np.load(path) as data:
        load_param_arrays(model, {k: data[k] for k in data.files})


def latest_checkpoint(run_dir: Path) -> tuple[int, Path]:
    """``(round, path)`` of the newest global model of a finished round in ``run_dir``."""
    from popri_flwr.run_dir import RunDirectory

    rd = RunDirectory(run_dir)
    finished = rd.finished_rounds()
    path = checkpoint_path(rd, finished)
    if finished < 1 or not path.exists():
        raise RuntimeError(f"{run_dir}: no global model of a finished round (finished={finished})")
    return finished, path


def evaluate_run_dir(
    run_dir: str | Path, eval_texts: list[str], downstream: DownstreamConfig | None = None
) -> dict[str, Any]:
    """Next-token accuracy of a DP-FedAvg run's final global model on ``eval_texts``.

    The model (architecture, train mode, frozen base) is rebuilt from the run's own
    ``config.yaml`` and loaded from its last finished round's checkpoint.

    Parameters
    ----------
    run_dir
        A run directory of ``strategy.name=dp_fedavg``.
    eval_texts
        Held-out private texts.
    downstream
        Evaluation settings (``seq_len``, ``batch_size``, ``device``); default the run's.

    Returns
    -------
    dict
        ``accuracy`` (top-1), ``top5_accuracy``, ``eval_loss``, ``eval_tokens`` and
        ``model_round``.
    """
    from popri_flwr.models.loading import resolve_device
    from popri_flwr.run_dir import read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if cfg.strategy.name != "dp_fedavg":
        raise ValueError(f"{run_dir}: strategy.name is {cfg.strategy.name!r}, not dp_fedavg")
    ev = downstream or cfg.downstream
    max_pos = cfg.downstream.seq_len
    if cfg.downstream.model == "gpt2-small-scratch" and ev.seq_len > max_pos:
        raise ValueError(
            f"downstream.seq_len: {ev.seq_len} exceeds the {max_pos} positions of the model "
            f"trained in {run_dir}"
        )
    texts = [t for t in eval_texts if t and t.strip()]
    if not texts:
        raise ValueError("eval_texts: no non-blank evaluation texts")
    fedavg = cfg.strategy.fedavg
    tokenizer = load_tokenizer(cfg.downstream)
    model = build_fedavg_model(cfg.downstream, tokenizer, fedavg)
    rnd, path = latest_checkpoint(run_dir)
    load_npz_into(model, path)
    device = resolve_device(ev.device)
    model.to(device)
    ids, mask = encode_for_lm(texts, tokenizer, ev.seq_len)
    m = evaluate_lm(model, ids, mask, ev.batch_size, bf16_for(ev, device))
    return {
        "accuracy": m["top1"],
        "top5_accuracy": m["top5"],
        "eval_loss": m["loss"],
        "eval_tokens": m["tokens"],
        "model_round": rnd,
    }
