"""Downstream LM speed: one training epoch in float32 vs under bf16 autocast.

Run by ``popri-benchmark --preset speed`` (row ``downstream_epoch``). The ``small`` preset's
downstream model (a 2-layer GPT-2 from scratch, batch 8, lr 2e-3) trains one epoch on
``num_texts`` State of the Union training paragraphs and is scored on ``num_eval`` held-out
ones, once with ``bf16=False`` (the old path) and once with bf16 autocast (the new default
where the CPU has native bf16). Both runs are seeded alike; their top-1 accuracies go into the
note so that a speed-up bought with a different metric would show.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


def compare_downstream(
    repeats: int = 1, num_texts: int = 480, num_eval: int = 474, epochs: int = 1
) -> dict[str, Any]:
    """Time ``epochs`` of downstream training (evaluation included), float32 vs bf16."""
    from popri_flwr.config import DataConfig
    from popri_flwr.data import load_federation
    from popri_flwr.evaluation.downstream import DownstreamConfig, train_downstream
    from popri_flwr.models.loading import native_bf16

    federation = load_federation(DataConfig())
    train = federation.all_train_texts()[:num_texts]
    evaluation = federation.eval_sample(num_eval, 0)
    best: dict[bool, float] = {}
    top1: dict[bool, float] = {}
    for _ in range(repeats):
        for bf16 in (False, True):
            cfg = DownstreamConfig(batch_size=8, epochs=epochs, learning_rate=2e-3, bf16=bf16)
            start = time.perf_counter()
            result = train_downstream(train, evaluation, cfg, progress=False)
            best[bf16] = min(best.get(bf16, float("inf")), time.perf_counter() - start)
            top1[bf16] = result.best_top1
            logger.info("downstream bf16=%s: %.2f s, top-1 %.4f", bf16, best[bf16], top1[bf16])
    base, new = best[False], best[True]
    note = (
        f"small preset's scratch GPT-2, {epochs} epoch(s) on {len(train)} texts + evaluation on "
        f"{len(evaluation)}; baseline: float32; new: bf16 autocast "
        f"({'native' if native_bf16('cpu') else 'NOT native here, emulated'}); top-1 "
        f"{top1[False]:.4f} vs {top1[True]:.4f}"
    )
    return {
        "baseline_s": round(base, 2),
        "new_s": round(new, 2),
        "ratio": round(base / new, 2),
        "note": note,
    }
