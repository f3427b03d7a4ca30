"""Which client score would DPO turn into samples closer to the private text? A counterfactual.

Usage (from the repository root; reads a finished one-client-per-paragraph run)::

    .venv/bin/python scripts/score_tilt.py --run outputs/control/para_popri_0

DPO's optimum for a reward r is the reference policy tilted by it, pi(y|x) ~ pi_ref(y|x)
exp(r(y)/beta). This script applies that tilt to the samples the base model wrote in round 1
(``samples/round_001.jsonl``: K prompts x J samples), prompt by prompt, with weights
softmax_j(z_kj / tau) of the standardized score z, and measures the tilted distribution against
held-out private text: FID (mean and covariance terms, weighted), diversity (trace of the
covariance), and similarity to the held-out centroid. tau = inf is the base model; smaller tau
is a stronger pull (more DPO). Scores compared, each summed over the one-paragraph clients:

- ``similarity``: the run's released scores (POPri's rule, clip(zscore(E c_i)); epsilon 1);
- ``vote``: nearest-neighbour votes (each client's paragraph votes for its most similar
  sample: one-hot, norm 1, the same sensitivity), plus Gaussian noise of the run's sigma
  drawn from OS entropy: a simulated release of a rule the clients do not run yet.

If a score's tilt raises FID as tau falls, DPO on that score moves away from the private text
however well it is trained: the score, not the noise or the optimizer, is the limit. The
private paragraphs are embedded here (the clients' side), so every number is a DIAGNOSTIC of
private data: for reports, never a release. Writes ``docs/score_tilt.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import learning_sweep  # noqa: E402  (scripts/, for the held-out sample and the embedder)

TAUS = (float("inf"), 2.0, 1.0, 0.5, 0.25)


def tilt(scores: np.ndarray, prompt: np.ndarray, tau: float) -> np.ndarray:
    """Per-prompt softmax of standardized scores at temperature ``tau``; each prompt weighs 1."""
    z = (scores - scores.mean()) / scores.std()
    w = np.zeros_like(z)
    for k in np.unique(prompt):
        sel = prompt == k
        logits = np.zeros(sel.sum()) if np.isinf(tau) else z[sel] / tau
        e = np.exp(logits - logits.max())
        w[sel] = e / e.sum()
    return w


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--csv", type=Path, default=Path("docs/score_tilt.csv"))
    args = parser.parse_args(argv)

    from popri_flwr.algorithms.voting import vote_counts
    from popri_flwr.data import DataConfig, load_federation

    rows = [json.loads(x) for x in (args.run / "samples/round_001.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["text"].strip()]  # empty samples are in no pair
    prompt = np.array([r["prompt_id"] for r in rows])
    emb_model = learning_sweep.embedder()
    emb = emb_model.embed([r["text"] for r in rows]).astype(np.float64)
    ev = learning_sweep.eval_embeddings(1000)
    data = DataConfig(**yaml.safe_load((args.run / "config.yaml").read_text())["data"])
    private = emb_model.embed(load_federation(data).all_train_texts()).astype(np.float64)
    first = json.loads((args.run / "rounds.jsonl").read_text().splitlines()[0])
    sigma = first["noise_multiplier"]
    votes = vote_counts(emb, private) + np.random.default_rng().normal(0, sigma, len(emb))
    scores = {"similarity": np.array([r["noisy_score"] for r in rows]), "vote": votes}

    out = []
    print(f"{len(rows)} samples, {len(private)} one-paragraph clients, sigma {sigma:.2f}")
    print("score        tau   FID     mean term  cov term  diversity  similarity")
    for name, s in scores.items():
        for tau in TAUS:
            st = learning_sweep.embedding_stats(emb, ev, tilt(s, prompt, tau))
            out.append({"score": name, "tau": tau, **st})
            print(
                f"{name:11s} {tau:5.2f}  {st['fid']:.4f}  {st['fid_mean_term']:.4f}     "
                f"{st['fid_cov_term']:.4f}    {st['diversity']:.4f}     {st['similarity']:.4f}"
            )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
