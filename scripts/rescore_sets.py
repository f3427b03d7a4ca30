"""Score a finished benchmark's text sets again, with other downstream settings (a probe).

Usage (from the repository root)::

    .venv/bin/python scripts/rescore_sets.py outputs/sens_ft --seeds 0 \\
        --sets floor,eps0,epsinf,popri,round0 -- downstream.model=/path/to/model \\
        downstream.learning_rate=1e-5

It reads the texts a ``small``-preset benchmark wrote (``rows/eps0*_texts.jsonl``, the popri
run's ``synthetic_round003.jsonl`` and ``synthetic_round0.jsonl``; eps-inf is re-drawn from
the seed), trains the downstream model the overrides describe on each, and prints one JSON
line per set. ``floor`` is that model with no fine-tuning. Every number is an un-noised
statistic of private data: a diagnostic, not a release.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from popri_flwr.cli.benchmark import load_benchmark_config
from popri_flwr.evaluation.benchmark import Evaluator, reference_texts, row_key
from popri_flwr.evaluation.downstream import (
    bf16_for,
    build_model,
    encode_for_lm,
    evaluate_lm,
    load_tokenizer,
)
from popri_flwr.evaluation.synthetic import load_texts_jsonl
from popri_flwr.hydra_config import load_config

SETS = ("floor", "eps0", "epsinf", "popri", "round0")


def texts_of(name: str, out: Path, seed: int, evaluator: Evaluator, n: int) -> list[str]:
    """The ``n`` training texts of set ``name`` for ``seed`` in the benchmark folder ``out``."""
    suffix = "" if seed == 0 else f"_seed{seed}"
    if name == "eps0":
        return load_texts_jsonl(out / "rows" / f"eps0{suffix}_texts.jsonl")[:n]
    if name == "epsinf":
        return reference_texts("epsinf", evaluator.cfg, evaluator, n)
    run = out / "runs" / row_key("popri", 1.0, seed)
    file = "synthetic_round003.jsonl" if name == "popri" else "synthetic_round0.jsonl"
    return load_texts_jsonl(run / file)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="a benchmark's out_dir")
    parser.add_argument("--preset", default="small", help="its preset (default small)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"any of {', '.join(SETS)}")
    parser.add_argument("overrides", nargs="*", help="run overrides on top of the preset's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sets = args.sets.split(",")
    if unknown := set(sets) - set(SETS):
        parser.error(f"--sets: unknown {sorted(unknown)}; expected any of {SETS}")
    bc = load_benchmark_config(args.preset, [])
    cfg = load_config([*bc.run_overrides, *args.overrides])
    evaluator = Evaluator(cfg, bc.max_eval_texts)
    if "floor" in sets:
        d = cfg.downstream
        tokenizer = load_tokenizer(d)
        ids, mask = encode_for_lm(evaluator.eval_texts, tokenizer, d.seq_len)
        start = time.time()
        model = build_model(d, tokenizer)
        metrics = evaluate_lm(model, ids, mask, d.batch_size, bf16_for(d, "cpu"))
        print(json.dumps({"set": "floor", **metrics, "seconds": round(time.time() - start, 1)}))
    for seed in (int(s) for s in args.seeds.split(",")):
        ev = evaluator.for_seed(seed)
        for name in (s for s in sets if s != "floor"):
            texts = texts_of(name, args.out, seed, ev, bc.synthetic_size)
            start = time.time()
            result = ev.downstream(texts)
            seconds = round(time.time() - start, 1)
            print(json.dumps({"seed": seed, "set": name, **result, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
