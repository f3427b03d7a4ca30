"""Next-token accuracy of the downstream model with no fine-tuning at all (a floor for the table).

Usage (from the repository root)::

    .venv/bin/python scripts/downstream_untrained.py                 # small's downstream model
    .venv/bin/python scripts/downstream_untrained.py downstream.seq_len=64

It evaluates the pretrained downstream model of the ``small`` benchmark preset (SmolLM2-135M)
on the same held-out private texts as the benchmark (``max_eval_texts``, seeded), exactly as a
row's fine-tuned model is evaluated. Every synthetic set is worth only what it adds to this.
The number is an un-noised statistic of private data: a diagnostic, not a release.
"""

from __future__ import annotations

import argparse
import json
import logging

from popri_flwr.cli.benchmark import load_benchmark_config
from popri_flwr.evaluation.benchmark import Evaluator
from popri_flwr.evaluation.downstream import (
    bf16_for,
    build_model,
    encode_for_lm,
    evaluate_lm,
    load_tokenizer,
)
from popri_flwr.hydra_config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", help="benchmark preset (default small)")
    parser.add_argument("overrides", nargs="*", help="run overrides on top of the preset's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bc = load_benchmark_config(args.preset, [])
    cfg = load_config([*bc.run_overrides, *args.overrides])
    evaluator = Evaluator(cfg, bc.max_eval_texts)
    d = cfg.downstream
    tokenizer = load_tokenizer(d)
    model = build_model(d, tokenizer)
    ids, mask = encode_for_lm(evaluator.eval_texts, tokenizer, d.seq_len)
    metrics = evaluate_lm(model, ids, mask, d.batch_size, bf16_for(d, "cpu"))  # no_grad inside
    print(json.dumps({"model": d.model, "eval_texts": len(evaluator.eval_texts), **metrics}))


if __name__ == "__main__":
    main()
