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

Each round draws new prompts, and the prompts alone move FID. ``--base`` also has the base
model write J samples for each of the same prompts (``learning_sweep.BaseSamples``: the demo's
sampling, its own seed) and reports ``fid_vs_base`` = FID(G) - FID(base, same prompts), with a
bootstrap that resamples the prompts of both together (paired). For G = 0 it is the base
model against itself on other draws: the sampling noise alone. ``--held-out run`` measures
against the run's own diagnostic held-out set (``evaluation.max_eval_texts`` texts of its
federation and seed, as its ``fid_scored``/``fid_next``) instead of the sweep's 1,000.
``--versus RUN`` compares every run's generator G with RUN's generator G on the same prompts
(a control arm of the same config seed, e.g. the placebo): ``fid_vs_other`` = FID(run, G) -
FID(RUN, G), bootstrapped over the shared prompts (paired), so the prompts' noise cancels.

Everything here is measured against held-out *private* text: a DIAGNOSTIC, never a release.
Writes ``--csv`` (one line per run and generator).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import learning_sweep  # noqa: E402  (scripts/: the held-out sample, embedder, FID terms)

from popri_flwr.evaluation.distribution_metrics import fid_bootstrap  # noqa: E402

COLUMNS = (
    "run", "generator", "samples", "prompts", "fid", "fid_se", "dfid", "dfid_se",
    "fid_mean_term", "diversity", "similarity", "fid_base", "fid_vs_base", "fid_vs_base_se",
    "fid_other", "fid_vs_other", "fid_vs_other_se",
)  # fmt: skip


def held_out_spec(which: str, run: Path) -> tuple:
    """What ``--held-out`` means for ``run``: the sweep's set, or (data, texts, seed) of its own."""
    if which == "sweep":
        return ("sweep",)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = json.dumps(cfg["data"], sort_keys=True)
    return (data, cfg["evaluation"]["max_eval_texts"], cfg["seed"])


@functools.cache  # runs of one federation and seed share one embedding pass
def held_out(spec: tuple) -> np.ndarray:
    """The sweep's 1,000 held-out texts, or a run's own diagnostic held-out set."""
    if spec == ("sweep",):
        return learning_sweep.eval_embeddings()
    from popri_flwr.data import DataConfig, load_federation

    data, n, seed = spec
    texts = load_federation(DataConfig(**json.loads(data))).eval_sample(n, seed)
    return learning_sweep.embedder().embed(texts).astype(np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--draws", type=int, default=200, help="bootstrap resamples (200)")
    parser.add_argument("--base", action="store_true", help="also the base model, same prompts")
    parser.add_argument("--held-out", choices=("sweep", "run"), default="sweep")
    parser.add_argument(
        "--versus", type=Path, help="a run with the same prompts: paired FID difference by G"
    )
    parser.add_argument("--csv", type=Path, default=Path("outputs/fid_by_generator.csv"))
    args = parser.parse_args(argv)
    for run in args.runs + ([args.versus] if args.versus else []):
        if not list((run / "samples").glob("round_*.jsonl")):
            parser.error(f"{run}: no samples/round_*.jsonl (expected a popri-run directory)")

    emb = learning_sweep.embedder()
    base = learning_sweep.BaseSamples() if args.base else None
    rng = np.random.default_rng(0)  # resampling for error bars: public randomness
    rows = []
    for run in args.runs:
        ev = held_out(held_out_spec(args.held_out, run))
        prev = None
        for path in sorted((run / "samples").glob("round_*.jsonl")):
            records = [json.loads(x) for x in path.read_text().splitlines() if x]
            prompt = np.array([r["prompt_id"] for r in records])
            e = emb.embed([r["text"] for r in records]).astype(np.float64)
            stats = learning_sweep.embedding_stats(e, ev)
            sets = [(e, prompt)]
            if base is not None:  # J samples per prompt, in prompt_id order
                texts = {r["prompt_id"]: r["prompt"] for r in records}
                j = len(records) // len(texts)
                eb = emb.embed(base.texts([texts[k] for k in sorted(texts)], j))
                sets.append((eb.astype(np.float64), np.repeat(np.arange(len(texts)), j)))
            other = args.versus / "samples" / path.name if args.versus else None
            if other is not None and other.exists():
                rec_o = [json.loads(x) for x in other.read_text().splitlines() if x]
                by_id = {r["prompt_id"]: r["prompt"] for r in records}
                if any(by_id.get(r["prompt_id"]) != r["prompt"] for r in rec_o):
                    parser.error(f"{other}: its prompts differ from {path}'s (--versus pairs them)")
                eo = emb.embed([r["text"] for r in rec_o]).astype(np.float64)
                sets.append((eo, np.array([r["prompt_id"] for r in rec_o])))
            boot = fid_bootstrap([e for e, _ in sets], [p for _, p in sets], ev, args.draws, rng)
            se = float(boot[:, 0].std(ddof=1))
            row = {
                "run": run.name, "generator": int(path.stem.split("_")[1]) - 1,
                "samples": len(records), "prompts": int(prompt.max()) + 1,
                "fid": stats["fid"], "fid_se": se, "dfid": None, "dfid_se": None,
                "fid_mean_term": stats["fid_mean_term"], "diversity": stats["diversity"],
                "similarity": stats["similarity"],
            }  # fmt: skip
            if base is not None:
                row["fid_base"] = learning_sweep.embedding_stats(sets[1][0], ev)["fid"]
                row["fid_vs_base"] = row["fid"] - row["fid_base"]
                row["fid_vs_base_se"] = float((boot[:, 0] - boot[:, 1]).std(ddof=1))
            if other is not None and other.exists():
                row["fid_other"] = learning_sweep.embedding_stats(sets[-1][0], ev)["fid"]
                row["fid_vs_other"] = row["fid"] - row["fid_other"]
                row["fid_vs_other_se"] = float((boot[:, 0] - boot[:, -1]).std(ddof=1))
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
                f"div {row['diversity']:.3f} sim {row['similarity']:.3f}"
                + (
                    ""
                    if base is None
                    else f"  vs base {row['fid_vs_base']:+.4f} +- {row['fid_vs_base_se']:.4f}"
                )
                + (
                    ""
                    if row.get("fid_vs_other") is None
                    else f"  vs {args.versus.name} {row['fid_vs_other']:+.4f} "
                    f"+- {row['fid_vs_other_se']:.4f}"
                ),
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
