"""Where does the tilt placebo's held-out-loss gain come from? (docs/learning.md, stop 27)

A tilt round on pure-noise scores lowers the generator's loss on held-out private paragraphs
by about half as much as the real feedback (stops 26-27). Hypothesis: the completions were
written after a public State of the Union example, so fitting them with any weights moves the
generator's bare text toward the public domain. This script fits one update (the run's step:
LoRA, lr, steps, micro-batch from its config) from the base model on the first ``--prompts``
prompts of a run's first round, in two arms, and reports the held-out loss change of each:

- ``samples``: the round's own samples, equal weights (the placebo's expected weights);
- ``public``: each prompt's public example (the text inside the prompt) as its only
  completion, cut to the same token budget: public information only.

If ``public`` lowers the loss as much as ``samples``, the gain needs no private information.
Diagnostics only (the held-out loss is an un-noised statistic of private text).

    .venv/bin/python scripts/placebo_source.py outputs/para_tilt3_placebo_seed0 --prompts 64
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

EXAMPLE = re.compile(r"Original Text Sample 1\n(.*?)\nOriginal Text Sample 2", re.S)
HEADER = re.compile(r"^[^\n]*:\n\n\"?")  # "This is a paragraph from ...:" before some examples


def round_records(run_dir: Path, prompts: int) -> list[dict[str, Any]]:
    """Samples of round 1 (written by the base model) for the first ``prompts`` prompts."""
    rows = [json.loads(x) for x in (run_dir / "samples" / "round_001.jsonl").open()]
    return [r for r in rows if r["prompt_id"] < prompts and r["text"].strip()]


def arms(rows: list[dict[str, Any]], tokenizer: Any, tokens: int) -> dict[str, list[dict]]:
    from popri_flwr.models.generation import truncate_to_tokens

    counts = Counter(r["prompt_id"] for r in rows)
    prompts = {r["prompt_id"]: r["prompt"] for r in rows}
    samples = [
        {"prompt": r["prompt"], "completion": r["text"], "weight": 1.0 / counts[r["prompt_id"]]}
        for r in rows
    ]
    public = []
    for pid in sorted(prompts):
        prompt = prompts[pid]
        found = EXAMPLE.search(prompt)
        if found:
            text = truncate_to_tokens(HEADER.sub("", found.group(1)), tokenizer, tokens)
            public.append({"prompt": prompt, "completion": text, "weight": 1.0})
    return {"samples": samples, "public": public}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    import yaml

    from popri_flwr.config import load_run_config
    from popri_flwr.data import load_federation
    from popri_flwr.evaluation.downstream import encode_for_lm, evaluate_lm
    from popri_flwr.models.dpo import DPOStep
    from popri_flwr.models.loading import load_causal_lm
    from popri_flwr.strategies.popri import GEN_EVAL_LEN

    cfg = load_run_config(yaml.safe_load((args.run_dir / "config.yaml").read_text()))
    n_eval = cfg.evaluation.generator_eval_texts or 200
    texts = load_federation(cfg.data).eval_sample(n_eval, cfg.seed)
    rows = round_records(args.run_dir, args.prompts)
    model, tok = load_causal_lm(device="cpu")
    ids, mask = encode_for_lm(texts, tok, GEN_EVAL_LEN)
    before = evaluate_lm(model, ids, mask, batch_size=16, bf16=False)["loss"]
    print("arm,records,loss_before,loss_after,change")
    for i, (name, records) in enumerate(arms(rows, tok, cfg.generation.truncate_tokens).items()):
        if i:  # a fresh base model: the adapter is injected into the modules in place
            model = load_causal_lm(device="cpu")[0]
        torch.manual_seed(0)
        step = DPOStep(model, tok, cfg.dpo)  # the run's adapter, optimizer, lr and steps
        step.train_weighted_round(records)
        after = evaluate_lm(step.model, ids, mask, batch_size=16, bf16=False)["loss"]
        print(f"{name},{len(records)},{before:.5f},{after:.5f},{after - before:+.5f}", flush=True)


if __name__ == "__main__":
    main()
