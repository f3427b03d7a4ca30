"""Does POPri's feedback move the generator? One popri-run per setting, round by round.

Usage (from the repository root; each setting is a resumable ``popri-run`` in its own process)::

    .venv/bin/python scripts/learning_sweep.py                   # every setting below
    .venv/bin/python scripts/learning_sweep.py --only demo q1 --rounds 5

For each setting it reads the run's released round log and its diagnostics (simulation only:
un-noised statistics of private data, which is why the outputs are marked as diagnostics), and
embeds the samples each generator wrote (``samples/round_G.jsonl``: generator G-1, the base
model for G = 1) to compare them with the same 1,000 held-out private texts: FID split into its
mean term ``|mu_s - mu_p|^2`` and covariance term, the samples' diversity (trace of their
covariance) and their mean similarity to the held-out centroid (what clients score). It writes
``docs/learning_sweep.csv`` (one line per setting and generator) and ``docs/learning_sweep.png``.
Runs go to ``outputs/sweep/NAME`` (not committed); ``--report`` only re-reads finished runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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
    "setting", "generator", "fid", "fid_base", "fid_vs_base", "similarity", "similarity_base",
    "fid_mean_term", "fid_cov_term", "diversity",
    "epsilon_spent", "noise_multiplier", "clients_accepted", "recovery", "score_gap_mean",
    "dpo_loss", "dpo_reward_margin", "seconds_total", "overrides",
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


def eval_embeddings(n: int = 1000) -> np.ndarray:
    """Embeddings of a fixed sample of the demo federation's held-out private text."""
    from popri_flwr.data import load_federation
    from popri_flwr.hydra_config import load_config

    fed = load_federation(load_config(["experiment=demo"]).data)
    return embedder().embed(fed.eval_sample(n, 0)).astype(np.float64)


def embedder():
    from popri_flwr.models.embedding import DEFAULT_EMBEDDER, get_embedder

    return get_embedder(DEFAULT_EMBEDDER, "cpu")


def sample_stats(texts: list[str], ev: np.ndarray) -> dict:
    """FID (mean and covariance terms), diversity and similarity of ``texts`` to ``ev``."""
    return embedding_stats(embedder().embed(texts).astype(np.float64), ev)


def embedding_stats(e: np.ndarray, ev: np.ndarray, w: np.ndarray | None = None) -> dict:
    """:func:`sample_stats` of embeddings ``e``, each weighted by ``w`` (default: equally)."""
    from scipy import linalg

    w = np.full(len(e), 1.0 / len(e)) if w is None else w / w.sum()
    mu_s, mu_p = w @ e, ev.mean(0)
    cov_s = (e - mu_s).T @ ((e - mu_s) * w[:, None]) / (1 - (w**2).sum())  # unbiased
    cov_p = np.cov(ev, rowvar=False)
    mean_term = float(((mu_s - mu_p) ** 2).sum())
    cov_term = float(np.trace(cov_s + cov_p - 2 * linalg.sqrtm(cov_s @ cov_p).real))
    return {
        "fid": mean_term + cov_term,
        "fid_mean_term": mean_term,
        "fid_cov_term": cov_term,
        "diversity": float(np.trace(cov_s)),
        "similarity": float(mu_s @ mu_p),
    }


class BaseSamples:
    """The base model's samples on given prompts (the prompt-matched reference).

    Prompts change every round, and the FID of 96 samples moves with them by as much as DPO
    moves it; comparing each generator with the base model *on the same prompts* takes the
    prompts' share out (``fid_vs_base``).
    """

    def __init__(self) -> None:
        from popri_flwr.hydra_config import load_config
        from popri_flwr.models.generation import SamplingParams, TransformersGenerator
        from popri_flwr.models.loading import load_causal_lm

        cfg = load_config(["experiment=demo"])
        model, self.tokenizer = load_causal_lm(device="cpu")
        self.generator = TransformersGenerator(model, self.tokenizer, batch_size=96)
        self.params = SamplingParams.from_config(cfg.generation, 12345)
        self.cache: dict[tuple, list[str]] = {}

    def texts(self, prompts: list[str], j: int) -> list[str]:
        from popri_flwr.models.generation import generate_samples

        key = (tuple(prompts), j)
        if key not in self.cache:
            out = generate_samples(self.generator, prompts, self.params, j,
                                   tokenizer=self.tokenizer)  # fmt: skip
            self.cache[key] = [t for group in out for t in group]
        return self.cache[key]


def rows_of(
    name: str, overrides: list[str], run_dir: Path, ev: np.ndarray, base: BaseSamples
) -> list[dict]:
    """One dict per generator: its samples' statistics, and the round that trained it."""
    released = {
        r["round"]: r for r in map(json.loads, (run_dir / "rounds.jsonl").read_text().splitlines())
    }
    diags = {}
    diag_path = run_dir / "diagnostics.jsonl"
    if diag_path.exists():
        for rec in map(json.loads, diag_path.read_text().splitlines()):
            if "round" in rec:
                diags[rec["round"]] = rec
    rows = []
    for path in sorted((run_dir / "samples").glob("round_*.jsonl")):
        g = int(path.stem.split("_")[1]) - 1  # samples of round G come from generator G-1
        records = [json.loads(x) for x in path.read_text().splitlines() if x]
        texts = [r["text"] for r in records]
        prompts = list(dict.fromkeys(r["prompt"] for r in records))
        ref = sample_stats(base.texts(prompts, len(records) // len(prompts)), ev)
        trained_by = {**released.get(g, {}), **diags.get(g, {})}  # round g made generator g
        row = {**trained_by, **sample_stats(texts, ev), "setting": name, "generator": g}
        row.update(fid_base=ref["fid"], similarity_base=ref["similarity"])
        row["fid_vs_base"] = row["fid"] - ref["fid"]
        row["seconds_total"] = trained_by.get("seconds", {}).get("total")
        row["overrides"] = " ".join(overrides)
        rows.append({k: row.get(k) for k in COLUMNS})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [
        ("fid", "FID of the samples (lower: closer)"),
        ("fid_vs_base", "FID minus the base model's on the same prompts"),
        ("similarity", "similarity to held-out text"),
        ("diversity", "diversity (trace of covariance)"),
        ("recovery", "pairs whose order survives the noise"),
    ]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for i, (key, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for s in settings:
            pts = [(r["generator"], r[key]) for r in rows
                   if r["setting"] == s and r[key] is not None]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=s)
        ax.set_xlabel("generator (DPO rounds trained)")
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
    parser.add_argument("--report", action="store_true", help="only re-read finished runs")
    args = parser.parse_args(argv)
    names = args.only or list(SETTINGS)
    ev = eval_embeddings()
    base = BaseSamples()
    rows: list[dict] = []
    for name in names:
        if args.report:
            run_dir = args.out / name
            if not (run_dir / "rounds.jsonl").exists():
                continue
        else:
            run_dir = run(name, SETTINGS[name], args.rounds, args.out, args.seed)
        rows += rows_of(name, SETTINGS[name], run_dir, ev, base)
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as fh:  # rewritten after each setting
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, args.csv.with_suffix(".png"))
    print(args.csv.read_text())


if __name__ == "__main__":
    main()
