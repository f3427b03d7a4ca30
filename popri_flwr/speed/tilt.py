"""Tilt round speed: every completion with its own prompt pass vs one pass per prompt.

Run by ``popri-benchmark --preset speed`` (row ``tilt_round``), or alone:
``python -m popri_flwr.speed.tilt --repeats 2 --check``.

One tilt round (``strategy.update=tilt``) at the demo's shape: 16 one-shot POPri prompts (a
State of the Union paragraph of 60-110 words, as :func:`popri_flwr.speed.dpo.demo_pairs`
builds them) x 6 completions of ~32 tokens (the first 24 words of other paragraphs), softmax
weights; SmolLM2-135M with LoRA r 16 on all projections, 4 optimizer steps, micro-batch 4,
bf16 autocast where the CPU has it. Each run builds a fresh :class:`DPOStep` with the same seeds
and times ``train_weighted_round``. The baseline runs every completion's prompt again
(``share_prompts=False``: the cost of the path before prompts were shared); the new path runs
each prompt once and its completions from the cached keys. Both minimize the same loss
(``--check`` prints it; they agree to bf16 rounding). Prints ``measure,baseline_s,new_s,ratio``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def demo_records(num_prompts: int = 16, samples: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """``num_prompts`` one-shot prompts x ``samples`` short completions with softmax weights."""
    from popri_flwr.speed.dpo import demo_pairs

    pairs = demo_pairs(num_pairs=num_prompts * samples // 2, seed=seed)
    completions = [t for p in pairs for t in (p["chosen"], p["rejected"])]
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(samples), size=num_prompts).ravel()
    return [
        {
            "prompt": pairs[k]["prompt"],
            "completion": completions[k * samples + j],
            "weight": float(weights[k * samples + j]),
        }
        for k in range(num_prompts)
        for j in range(samples)
    ]


def time_round(records: list[dict[str, Any]], share_prompts: bool) -> dict[str, Any]:
    """Seconds of one fresh tilt round on ``records``, plus its metrics."""
    import torch

    from popri_flwr.models.dpo import DPOStep, DPOStepConfig
    from popri_flwr.models.loading import load_causal_lm

    model, tok = load_causal_lm(device="cpu")
    cfg = DPOStepConfig(
        learning_rate=3e-4, warmup_steps=0, per_device_batch_size=4, steps_per_round=4
    )
    torch.manual_seed(0)
    step = DPOStep(model, tok, cfg)
    start = time.perf_counter()
    metrics = step.train_weighted_round(records, share_prompts=share_prompts)
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def compare_tilt(repeats: int = 1, check: bool = False) -> dict[str, Any]:
    """Time one demo-shaped tilt round on both paths (fastest of ``repeats``): the row."""
    records = demo_records()
    best: dict[bool, float] = {}
    for _ in range(repeats):
        for share in (False, True):
            m = time_round(records, share)
            best[share] = min(best.get(share, float("inf")), m["wall_s"])
            logger.info("tilt share_prompts=%s: %.2f s, loss %.5f", share, m["wall_s"], m["loss"])
            if check:
                print(f"share_prompts={share}: {m['wall_s']:.2f} s, loss {m['loss']:.5f}",
                      file=sys.stderr)  # fmt: skip
    return {
        "measure": "tilt_round",
        "baseline_s": round(best[False], 2),
        "new_s": round(best[True], 2),
        "ratio": round(best[False] / best[True], 2),
        "note": (
            "16 one-shot prompts x 6 completions, 4 optimizer steps, SmolLM2-135M + LoRA r16; "
            "baseline: every completion runs its prompt again; new: one prompt pass per prompt"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs; fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--check", action="store_true", help="print each run's time and loss")
    args = parser.parse_args(argv)

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = compare_tilt(args.repeats, check=args.check)
    print("measure,baseline_s,new_s,ratio")
    print(f"{row['measure']},{row['baseline_s']:.2f},{row['new_s']:.2f},{row['ratio']:.2f}")
    return row


if __name__ == "__main__":
    main()
