"""Is it the feedback, or just DPO? POPri against a placebo, measured on the generator itself.

Usage (from the repository root; each run is a resumable ``popri-run experiment=demo``)::

    .venv/bin/python scripts/feedback_control.py --runs 4            # 3 arms x 4 runs
    .venv/bin/python scripts/feedback_control.py --runs 4 --tag lr3e-4 -- dpo.learning_rate=3e-4
    .venv/bin/python scripts/feedback_control.py --report            # re-read finished runs

Three arms, each the demo with ``evaluation.generator_eval_texts`` on:

- ``popri``: the demo as shipped (epsilon 1);
- ``noise_free``: the same without noise (``privacy.epsilon=inf``; NOT private, a reference);
- ``placebo``: the same with ``privacy.noise_multiplier=10000``: the noise (~14,000 per score)
  swamps the clients' sum (at most ~30), so each pair's order is a coin flip. Same prompts,
  same sampling, same DPO; only the information in the pairs is gone.

Every run uses the same config seed, so round 1 has the same prompts and samples in every
arm and run, and every later round the same prompts and random draws: arms differ only in the
generator, runs only by the client sampling and the noise (fresh OS entropy) and what
follows. The measure is ``generator_loss``: the generator's own next-token cross-entropy on
200 held-out private paragraphs after each round. It is deterministic given
the generator (no sampling noise, unlike the FID of 96 samples), so its change is the
generator's. Diagnostics (un-noised statistics of private data): for reports, not releases.
Writes ``docs/feedback_control.csv`` (one line per run and round; rows of runs not on disk
are kept) and prints a summary.
"""

from __future__ import annotations

import argparse
import csv
import textwrap
from pathlib import Path

import learning_sweep  # scripts/, on the path when run as a script
import numpy as np
import pandas as pd
import yaml

from popri_flwr.evaluation.plots import read_rounds

#: The placebo's noise multiplier unless ``--placebo-noise`` says otherwise.
PLACEBO_NOISE = 10000.0
ARMS: dict[str, list[str]] = {
    "popri": [],
    "noise_free": ["privacy.epsilon=inf"],
    "placebo": [f"privacy.noise_multiplier={PLACEBO_NOISE}"],
}
COLUMNS = (
    "tag", "arm", "run", "round", "generator_loss", "generator_loss_change", "generator_top1",
    "fid_scored", "fid_next", "similarity_next", "diversity_next", "recovery", "dpo_reward_margin",
    "overrides",
)  # fmt: skip


def launch(path: Path, overrides: list[str], texts: int, seed: int) -> None:
    """``popri-run experiment=demo`` into ``path`` (resumes if started), 3 rounds."""
    overrides = [*overrides, f"evaluation.generator_eval_texts={texts}"]
    learning_sweep.run(path.name, overrides, rounds=3, out=path.parent, seed=seed)


def read_run(path: Path) -> list[dict]:
    """Round log joined with the run's diagnostics, one dict per finished round."""
    if not (path / "rounds.jsonl").exists():
        return []
    return read_rounds(path).to_dict("records")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="runs per arm (default 4)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--texts", type=int, default=200, help="held-out texts scored")
    parser.add_argument("--seed", type=int, default=0, help="config seed of every run")
    parser.add_argument("--tag", default="", help="prefix of the run names (for --overrides)")
    parser.add_argument("--out", type=Path, default=Path("outputs/control"))
    parser.add_argument("--csv", type=Path, default=Path("docs/feedback_control.csv"))
    parser.add_argument(
        "--placebo-noise", type=float, default=PLACEBO_NOISE,
        help=f"the placebo's noise multiplier (default {PLACEBO_NOISE:g}; a federation of "
        "13,342 one-paragraph clients sums scores into the hundreds, so use 1e6 there)",
    )  # fmt: skip
    parser.add_argument("--report", action="store_true", help="only read finished runs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every arm (after --)")
    args = parser.parse_args(argv)
    tag = f"{args.tag}_" if args.tag else ""
    if not args.report:
        for i in range(args.runs):  # interleaved, so a stopped sweep leaves balanced arms
            for arm in args.arms:
                path = args.out / f"{tag}{arm}_{i}"
                if len(read_run(path)) < 3:
                    arm_overrides = ARMS[arm]
                    if arm == "placebo":  # the flag's value replaces the default's
                        arm_overrides = [f"privacy.noise_multiplier={args.placebo_noise}"]
                    launch(path, [*arm_overrides, *args.overrides], args.texts, args.seed)
    rows = []
    for path in sorted(args.out.glob("*_[0-9]*")):
        name, _, i = path.name.rpartition("_")
        arm = next((a for a in ARMS if name.endswith(a)), None)
        if arm is None or not (path / "rounds.jsonl").exists():
            continue
        run_tag = name[: -len(arm)].rstrip("_")
        run_cfg = yaml.safe_load((path / "config.yaml").read_text())
        dpo, replay = run_cfg["dpo"], run_cfg["strategy"].get("replay_rounds", 0)
        loss = ",".join(dpo.get("loss_type", ["sigmoid"]))
        what = f"dpo.learning_rate={dpo['learning_rate']}"
        what += "" if loss == "sigmoid" else f" dpo.loss_type=[{loss}]"
        if replay:
            what += f" strategy.replay_rounds={replay}"
        if not dpo.get("warm_start", True):
            what += " dpo.warm_start=false"
        if dpo.get("steps_per_round"):
            what += f" dpo.steps_per_round={dpo['steps_per_round']}"
        for r in read_run(path):
            if pd.isna(r.get("generator_loss_change")):
                continue
            rows.append(
                {
                    "tag": run_tag, "arm": arm, "run": int(i), "round": r["round"],
                    **{c: r.get(c) for c in COLUMNS[4:-1]},
                    "overrides": what,
                }
            )  # fmt: skip
    rows = kept_rows(args.csv, rows) + rows
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv} ({len(rows)} rows)")
    summarize(rows)
    if rows:
        print(f"wrote {plot(rows, args.csv.with_suffix('.png'))}")


def kept_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of an existing CSV whose run (tag, arm, run) is not among ``rows``.

    ``outputs/`` is not committed, so a fresh checkout has none of the runs behind the docs'
    CSV; rereading the runs it has must not drop the rows of those it lacks.
    """
    if not path.exists():
        return []
    have = {(r["tag"], r["arm"], int(r["run"])) for r in rows}
    old = pd.read_csv(path, keep_default_na=False, dtype={"tag": str})
    keep = [
        {**r, "run": int(r["run"]), "round": int(r["round"])}
        for r in old.to_dict("records")
        if (r["tag"], r["arm"], int(r["run"])) not in have
    ]
    for r in keep:  # CSV strings back to numbers (empty cells stay None)
        for c in COLUMNS[4:-1]:
            r[c] = None if r[c] == "" else float(r[c])
    return keep


def summarize(rows: list[dict]) -> None:
    """Per tag and arm: loss change over the run (mean +- std), rounds where it fell."""
    print("tag           arm         runs  change G0->G3 (mean +- std)  per run            falls")
    for tag in sorted({r["tag"] for r in rows}):
        for arm in ARMS:
            runs: dict[int, list[dict]] = {}
            for r in rows:
                if r["tag"] == tag and r["arm"] == arm:
                    runs.setdefault(r["run"], []).append(r)
            done = [sorted(v, key=lambda r: r["round"]) for v in runs.values() if len(v) >= 3]
            if not done:
                continue
            total = np.array([sum(r["generator_loss_change"] for r in v) for v in done])
            falls = sum(r["generator_loss_change"] < 0 for v in done for r in v)
            per = " ".join(f"{t:+.3f}" for t in total)
            print(
                f"{tag or '-':13s} {arm:11s} {len(done):4d}  {total.mean():+.4f} +- "
                f"{total.std(ddof=1) if len(total) > 1 else 0:.4f}          {per:18s} "
                f"{falls}/{3 * len(done)}"
            )
    print("\nmeans over runs by generator G (G0: the base model's samples of round 1, the same in")
    print("every run of a seed; every arm samples the same prompts with the same draws each round)")
    print("tag           arm         G  loss change  FID next  similarity  recovery")
    for tag in sorted({r["tag"] for r in rows}):
        for arm in ARMS:
            sel = [r for r in rows if r["tag"] == tag and r["arm"] == arm]
            if not sel:
                continue
            g0 = np.mean([r["fid_scored"] for r in sel if r["round"] == 1])
            print(f"{tag or '-':13s} {arm:11s} 0       0       {g0:8.4f}")
            for g in sorted({r["round"] for r in sel}):
                runs = {r["run"] for r in sel}
                cum = [
                    sum(
                        r["generator_loss_change"] for r in sel if r["run"] == i and r["round"] <= g
                    )
                    for i in runs
                ]
                at = [r for r in sel if r["round"] == g]
                print(
                    f"{tag or '-':13s} {arm:11s} {g}  {np.mean(cum):+.4f}     "
                    f"{np.mean([r['fid_next'] for r in at]):8.4f}  "
                    f"{np.mean([r['similarity_next'] for r in at]):10.4f}  "
                    f"{np.mean([r['recovery'] for r in at]):8.3f}"
                )


def plot(rows: list[dict], path: Path) -> Path:
    """Cumulative loss change by generator, one line per run, one panel per tag."""
    from matplotlib.figure import Figure

    tags = sorted({r["tag"] for r in rows})
    fig = Figure(figsize=(4.6 * len(tags), 3.8), layout="constrained")
    colors = {"popri": "C0", "noise_free": "C2", "placebo": "C3"}
    for k, tag in enumerate(tags, start=1):
        ax = fig.add_subplot(1, len(tags), k)
        seen = set()
        for arm, i in sorted({(r["arm"], r["run"]) for r in rows if r["tag"] == tag}):
            run = sorted((r for r in rows if (r["tag"], r["arm"], r["run"]) == (tag, arm, i)),
                         key=lambda r: r["round"])  # fmt: skip
            y = np.concatenate([[0.0], np.cumsum([r["generator_loss_change"] for r in run])])
            ax.plot(range(len(y)), y, marker="o", color=colors[arm], alpha=0.7,
                    label=None if arm in seen else arm)  # fmt: skip
            seen.add(arm)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(4))
        ax.set_xlabel("generator (DPO rounds trained)")
        ax.set_ylabel("held-out loss change (nats/token)")
        lr = next(r["overrides"] for r in rows if r["tag"] == tag)
        ax.set_title(textwrap.fill(f"{tag or 'demo'} ({lr})", 44), fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("DIAGNOSTIC (held-out private text): generator loss vs its base model", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
