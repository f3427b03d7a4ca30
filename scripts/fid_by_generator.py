"""Does FID fall from one generator to the next by more than its sampling noise? (a diagnostic)

Usage (from the repository root; reads finished run directories)::

    .venv/bin/python scripts/fid_by_generator.py outputs/control/para_lr3e-4_popri_0 ...

For every run, generator G's samples are ``samples/round_{G+1:03d}.jsonl`` (G = 0: the base
model). Each set is embedded and compared with the same 1,000 held-out private paragraphs as
``scripts/learning_sweep.py`` (FID, its mean term, diversity, similarity to the held-out
centroid). FID of a finite sample is noisy, and a generator's samples come from new prompts
every round; the standard errors here resample *prompts* (a cluster bootstrap: all J samples
of a resampled prompt come along), the unit the generator draws afresh each round, with the
held-out set fixed. ``dFID`` is FID(G) - FID(G-1) and its standard error combines the two
generators' bootstrap errors (independent sample sets). A fall counts when dFID < -2 SE.

Everything here is measured against held-out *private* text: a DIAGNOSTIC, never a release.
Writes ``--csv`` (one line per run and generator).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import learning_sweep  # noqa: E402  (scripts/: the held-out sample, embedder, FID terms)

COLUMNS = (
    "run", "generator", "samples", "prompts", "fid", "fid_se", "dfid", "dfid_se",
    "fid_mean_term", "diversity", "similarity",
)  # fmt: skip


def bootstrap_fid(
    e: np.ndarray, prompt: np.ndarray, ev: np.ndarray, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """FID of ``draws`` resamples of the prompts (with all their samples) against ``ev``."""
    groups = [np.flatnonzero(prompt == k) for k in np.unique(prompt)]
    out = np.empty(draws)
    for b in range(draws):
        pick = rng.integers(len(groups), size=len(groups))
        idx = np.concatenate([groups[i] for i in pick])
        out[b] = learning_sweep.embedding_stats(e[idx], ev)["fid"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--draws", type=int, default=200, help="bootstrap resamples (200)")
    parser.add_argument("--csv", type=Path, default=Path("outputs/fid_by_generator.csv"))
    args = parser.parse_args(argv)
    for run in args.runs:
        if not list((run / "samples").glob("round_*.jsonl")):
            parser.error(f"{run}: no samples/round_*.jsonl (expected a popri-run directory)")

    ev = learning_sweep.eval_embeddings()
    emb = learning_sweep.embedder()
    rng = np.random.default_rng(0)  # resampling for error bars: public randomness
    rows = []
    for run in args.runs:
        prev = None
        for path in sorted((run / "samples").glob("round_*.jsonl")):
            records = [json.loads(x) for x in path.read_text().splitlines() if x]
            prompt = np.unique([r["prompt"] for r in records], return_inverse=True)[1]
            e = emb.embed([r["text"] for r in records]).astype(np.float64)
            stats = learning_sweep.embedding_stats(e, ev)
            boot = bootstrap_fid(e, prompt, ev, args.draws, rng)
            se = float(boot.std(ddof=1))
            row = {
                "run": run.name, "generator": int(path.stem.split("_")[1]) - 1,
                "samples": len(records), "prompts": int(prompt.max()) + 1,
                "fid": stats["fid"], "fid_se": se, "dfid": None, "dfid_se": None,
                "fid_mean_term": stats["fid_mean_term"], "diversity": stats["diversity"],
                "similarity": stats["similarity"],
            }  # fmt: skip
            if prev is not None:
                row["dfid"] = stats["fid"] - prev["fid"]
                row["dfid_se"] = float(np.hypot(se, prev["fid_se"]))
            rows.append(row)
            prev = row
            fall = ""
            if row["dfid"] is not None:
                fall = f"  dFID {row['dfid']:+.4f} +- {row['dfid_se']:.4f}"
            print(
                f"{run.name} G{row['generator']}: FID {row['fid']:.4f} +- {se:.4f}{fall}  "
                f"div {row['diversity']:.3f} sim {row['similarity']:.3f}",
                flush=True,
            )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
