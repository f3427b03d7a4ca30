"""How much of one DPO round is the clients' signal, and how much is drift? (a diagnostic)

Usage (from the repository root, after ``scripts/feedback_control.py`` has finished runs)::

    .venv/bin/python scripts/dpo_signal.py --runs outputs/control/popri_{0,1,2,3} \\
        --setting base= --setting lr3e-4=dpo.learning_rate=3e-4

Each run's round-1 samples (or ``--round``'s) and their *noisy* scores (what POPri released)
give that round's preference pairs. For every DPO setting, a fresh adapter on the base model is
trained one round on the pairs twice: once in the clients' order and once with every pair
reversed. The held-out loss change (generator's next-token cross-entropy on held-out private
text, float32, as ``evaluation.generator_eval_texts`` measures it) of each gives

- **signal** = (change reversed - change in order) / 2: what the order of the pairs, i.e. the
  feedback, is worth;
- **drift** = (change in order + change reversed) / 2: what training on these texts costs
  whatever their order (DPO on any pairs).

A setting helps the generator in one round when signal > drift. Same texts, same steps, same
seeds in both orders: only the information differs. Diagnostics of private data (held-out
text): for reports, not releases. Appends one line per (run, setting) to ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from popri_flwr.algorithms.preference import build_pairs, pairs_from_rows
from popri_flwr.algorithms.scoring import score_matrix
from popri_flwr.data import load_federation
from popri_flwr.evaluation.downstream import encode_for_lm, evaluate_lm
from popri_flwr.hydra_config import load_config
from popri_flwr.models.dpo import DPOStep
from popri_flwr.models.loading import load_causal_lm
from popri_flwr.privacy.aggregation import add_noise
from popri_flwr.privacy.randomness import secret_rng
from popri_flwr.strategies.popri import GEN_EVAL_LEN

FIELDS = ("setting", "overrides", "run", "round", "pairs", "base_loss", "change", "change_reversed",
          "signal", "drift", "seconds")  # fmt: skip


def read_round(run_dir: Path, rnd: int) -> tuple[list[dict], int]:
    """Round ``rnd``'s released samples of a run, prompt-major, and the samples per prompt."""
    rows = [json.loads(line) for line in (run_dir / "samples" / f"round_{rnd:03d}.jsonl").open()]
    rows.sort(key=lambda r: (r["prompt_id"], r["sample_id"]))
    return rows, len(rows) // len({r["prompt_id"] for r in rows})


def round_pairs(run_dir: Path, strategy, rnd: int = 1) -> list[dict[str, str]]:
    """The preference pairs of round ``rnd`` of a finished run, from its released samples,
    as ``strategy`` (``reject_rank``, ``pairing``) builds them."""
    rows, j = read_round(run_dir, rnd)
    return pairs_from_rows(rows, j, strategy.reject_rank, strategy.pairing).as_records()


def cohort_pairs(
    run_dir: Path,
    rnd: int,
    centroids: np.ndarray,
    embedder,
    size: int,
    sigma: float,
    strategy,
    rng: np.random.Generator,
) -> list[dict[str, str]]:
    """Pairs of round ``rnd``'s samples scored afresh by ``size`` random clients (noise-free sum,
    plus Gaussian noise ``sigma`` x clip norm 1 if ``sigma`` > 0), as POPri's clients score."""
    rows, j = read_round(run_dir, rnd)
    texts = [r["text"] for r in rows]
    members = rng.choice(len(centroids), size=min(size, len(centroids)), replace=False)
    total = score_matrix(embedder.embed(texts), centroids[members], 1.0).sum(axis=0)
    total = add_noise(total, sigma, rng)  # clip norm 1: noise std = sigma, as POPri releases
    prompts = [r["prompt"] for r in rows[::j]]
    pairs = build_pairs(prompts, texts, total, j, strategy.reject_rank, pairing=strategy.pairing)
    return pairs.as_records()


def held_out_loss(model, ids, mask) -> float:
    """The generator's next-token loss on the held-out texts, as ``generator_eval`` measures it."""
    return evaluate_lm(model, ids, mask, batch_size=16, bf16=False)["loss"]


def loss_after(cfg, pairs: list[dict[str, str]], ids, mask) -> float:
    """Held-out loss of a fresh base model after one DPO round on ``pairs``."""
    g = cfg.generation
    model, tok = load_causal_lm(g.model, device="cpu", cache_dir=g.cache_dir)
    step = DPOStep(model, tok, cfg.dpo)
    step.train_round(pairs)
    return held_out_loss(step.model, ids, mask)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        required=True,
        help="finished run dirs; DIR@R takes round R's pairs of that run instead of --round's",
    )
    parser.add_argument(
        "--pool", action="store_true",
        help="train on all the runs' pairs together, as one round (one line; with --cohort: "
        "every run's samples, each scored by its own fresh cohort)",
    )  # fmt: skip
    parser.add_argument(
        "--setting", action="append", default=[], metavar="NAME=OVERRIDES",
        help="a DPO setting: a name and space-separated Hydra overrides on top of "
        "experiment=demo, e.g. 'rpo=dpo.loss_type=[sigmoid,sft]' (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--round", type=int, default=1,
        help="whose pairs (default 1: the base model's samples; later rounds' pairs are "
        "off-policy for the base model, a measure of the information in them)",
    )  # fmt: skip
    parser.add_argument(
        "--cohort",
        action="append",
        default=[],
        metavar="NAME=SIZE[:SIGMA]",
        help="instead of the run's released scores: score its samples afresh with SIZE random "
        "clients of the federation (all: every client), noise-free or with noise multiplier "
        "SIGMA; one line per --draws draw, with the first --runs dir's samples (all of them "
        "with --pool) (repeatable)",
    )
    parser.add_argument("--draws", type=int, default=3, help="draws per --cohort (default 3)")
    parser.add_argument("--texts", type=int, default=100, help="held-out texts (default 100)")
    parser.add_argument("--csv", type=Path, default=Path("outputs/dpo_signal.csv"))
    args = parser.parse_args(argv)
    settings = [s.partition("=")[::2] for s in args.setting] or [("base", "")]

    base_cfg = load_config(["experiment=demo"])
    texts = load_federation(base_cfg.data).eval_sample(args.texts, base_cfg.seed)
    g = base_cfg.generation
    model, tok = load_causal_lm(g.model, device="cpu", cache_dir=g.cache_dir)
    ids, mask = encode_for_lm(texts, tok, GEN_EVAL_LEN)
    base = held_out_loss(model, ids, mask)
    del model
    print(f"base model: held-out loss {base:.4f} on {len(texts)} texts", flush=True)

    sources = pair_sources(args, base_cfg)
    new = not args.csv.exists()
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for name, overrides in settings:
            cfg = load_config(["experiment=demo", *filter(None, overrides.split())])
            for source, make_pairs in sources:
                start = time.perf_counter()
                pairs = make_pairs(cfg.strategy)
                flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
                fwd = loss_after(cfg, pairs, ids, mask) - base
                rev = loss_after(cfg, flipped, ids, mask) - base
                row = {
                    "setting": name, "overrides": overrides, "run": source, "round": args.round,
                    "pairs": len(pairs), "base_loss": round(base, 5),
                    "change": round(fwd, 5), "change_reversed": round(rev, 5),
                    "signal": round((rev - fwd) / 2, 5), "drift": round((fwd + rev) / 2, 5),
                    "seconds": round(time.perf_counter() - start, 1),
                }  # fmt: skip
                writer.writerow(row)
                fh.flush()
                print(
                    f"{name:12s} {source:14s} change {fwd:+.4f} "
                    f"reversed {rev:+.4f} signal {row['signal']:+.4f} drift {row['drift']:+.4f} "
                    f"({row['seconds']:.0f} s)",
                    flush=True,
                )


def pair_sources(args: argparse.Namespace, cfg) -> list[tuple[str, Callable]]:
    """(name, strategy -> pairs): the runs' released pairs, or fresh cohorts' (``--cohort``)."""
    runs = []
    for run in args.runs:
        path, _, rnd = str(run).partition("@")
        runs.append((Path(path), int(rnd or args.round)))
    if not args.cohort:
        sources = [(f"{p.name}@{r}", lambda st, p=p, r=r: round_pairs(p, st, r)) for p, r in runs]
        if args.pool:
            name = "+".join(n for n, _ in sources)
            return [(name, lambda st: [x for _, f in sources for x in f(st)])]
        return sources
    from popri_flwr.algorithms.scoring import centroid  # noqa: I001 (cohort mode only)
    from popri_flwr.models.embedding import get_embedder

    fed = load_federation(cfg.data)
    embedder = get_embedder(cfg.embedder.model, cfg.embedder.device)
    ids = list(fed.client_ids)
    print(f"embedding the private texts of {len(ids)} clients", flush=True)
    cents = np.stack([centroid(embedder.embed(fed.train_texts(c))) for c in ids])
    rng = secret_rng()  # cohorts and noise as the run draws them: fresh OS entropy
    out = []
    scored = runs if args.pool else runs[:1]  # --pool: every run's samples, one fresh cohort each
    for spec in args.cohort:
        name, _, rest = spec.partition("=")
        size, _, sigma = rest.partition(":")
        n = len(ids) if size == "all" else int(size)
        for d in range(args.draws):
            out.append(
                (
                    f"{name}_{d}",
                    lambda st, n=n, s=float(sigma or 0): [
                        x
                        for p, r in scored
                        for x in cohort_pairs(p, r, cents, embedder, n, s, st, rng)
                    ],
                )
            )
    return out


if __name__ == "__main__":
    main()
