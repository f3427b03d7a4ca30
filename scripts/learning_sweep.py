"""Does POPri's feedback move the generator? One popri-run per setting, round by round.

Usage (from the repository root; each setting is a resumable ``popri-run`` in its own process)::

    .venv/bin/python scripts/learning_sweep.py                   # every setting below
    .venv/bin/python scripts/learning_sweep.py --only demo q1 --rounds 5

For each setting it reads the run's released round log and its diagnostics (simulation only:
un-noised statistics of private data, which is why the outputs are marked as diagnostics) and
writes ``docs/learning_sweep.csv`` (one line per setting and round) and
``docs/learning_sweep.png``: FID and similarity of the fresh samples to held-out private text,
the share of pairs whose order survives the noise (recovery), and the DPO reward margin.
Runs go to ``outputs/sweep/NAME`` (not committed).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

#: name -> Hydra overrides on top of ``experiment=demo``.
SETTINGS: dict[str, list[str]] = {
    # The demo as shipped: Poisson q = 0.1 over 237 clients (~24 per round), sigma ~1.4-1.7.
    "demo": [],
    # Full participation (as in the paper): 237 clients per round from 8 cohort nodes; sigma is
    # larger but the signal grows with the number of clients (signal / noise ~ N q / sigma).
    "q1": ["privacy.sample_rate=1.0", "simulation.clients_per_node=30"],
    # The mechanism's ceiling: the same, without noise (NOT private; a reference).
    "q1_epsinf": [
        "privacy.sample_rate=1.0",
        "simulation.clients_per_node=30",
        "privacy.epsilon=inf",
    ],  # fmt: skip
    # Gentler DPO: lower learning rate, the paper's beta.
    "q1_lr3e-4": [
        "privacy.sample_rate=1.0",
        "simulation.clients_per_node=30",
        "dpo.learning_rate=3e-4",
    ],  # fmt: skip
    "q1_beta0.01": [
        "privacy.sample_rate=1.0",
        "simulation.clients_per_node=30",
        "dpo.beta=0.01",
        "dpo.learning_rate=3e-4",
    ],  # fmt: skip
}

COLUMNS = (
    "setting", "round", "epsilon_spent", "noise_multiplier", "clients_accepted", "recovery",
    "score_gap_mean", "dpo_loss", "dpo_reward_margin", "fid_next", "similarity_next",
    "diversity_next",
    "seconds_total", "overrides",
)  # fmt: skip


def run(name: str, overrides: list[str], rounds: int, out: Path, seed: int) -> Path:
    """``popri-run experiment=demo OVERRIDES`` into ``out/NAME`` (resumes if started)."""
    run_dir = out / name
    cmd = [
        sys.executable, "-m", "popri_flwr.cli.run", "experiment=demo", *overrides,
        f"rounds={rounds}", f"seed={seed}", f"run_dir={run_dir}",
    ]  # fmt: skip
    print(f"[sweep] {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"[sweep] {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return run_dir


def rows_of(name: str, overrides: list[str], run_dir: Path) -> list[dict]:
    """The released round records joined with the diagnostics, one dict per round."""
    released = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    diag_path = run_dir / "diagnostics.jsonl"
    diags = {}
    if diag_path.exists():
        for line in diag_path.read_text().splitlines():
            rec = json.loads(line)
            if "round" in rec:
                diags[rec["round"]] = rec
    rows = []
    for rec in released:
        d = diags.get(rec["round"], {})
        row = {**rec, **d, "setting": name, "overrides": " ".join(overrides)}
        row["seconds_total"] = d.get("seconds", {}).get("total")
        rows.append({k: row.get(k) for k in COLUMNS})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [
        ("fid_next", "FID of fresh samples (lower: closer)"),
        ("similarity_next", "similarity of fresh samples to held-out text"),
        ("recovery", "pairs whose order survives the noise"),
        ("dpo_reward_margin", "DPO reward margin"),
    ]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for i, (key, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for s in settings:
            pts = [(r["round"], r[key]) for r in rows if r["setting"] == s and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=s)
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("POPri learning sweep (DIAGNOSTICS: un-noised statistics of private data)",
                 fontsize=9)  # fmt: skip
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="settings to run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/sweep"))
    parser.add_argument("--csv", type=Path, default=Path("docs/learning_sweep.csv"))
    args = parser.parse_args(argv)
    names = args.only or list(SETTINGS)
    rows: list[dict] = []
    for name in names:
        run_dir = run(name, SETTINGS[name], args.rounds, args.out, args.seed)
        rows += rows_of(name, SETTINGS[name], run_dir)
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as fh:  # rewritten after each setting
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, args.csv.with_suffix(".png"))
    print(args.csv.read_text())


if __name__ == "__main__":
    main()
