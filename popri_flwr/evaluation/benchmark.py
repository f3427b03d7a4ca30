"""The side-by-side comparison: methods x epsilons, evaluated the same way, as CSV, Markdown, PNG.

One row per (method, epsilon)::

    eps0       downstream LM trained on public zero-shot samples (no client feedback)
    epsinf     downstream LM trained on the clients' private training text itself
    popri_round0  POPri's prompts and sampling with the base generator: everything POPri does
               except the client feedback (no privacy spent; needs a popri row, whose public
               set it shares)
    popri, pe  a private run (``popri-run strategy=NAME privacy.epsilon=EPS``), then N synthetic
               texts from its result, then the downstream LM trained on them
    dp_fedavg  a private run that trains the downstream LM itself; its final model is scored

With ``seeds = S`` every row runs S times (``seed = downstream.seed = s``, s = 0..S-1);
``results.csv`` holds the mean and std over seeds and ``results_by_seed.csv`` every seed.

Every row is scored by the same metric on the same held-out private evaluation text
(:func:`popri_flwr.evaluation.downstream.train_downstream`, same seed, same token budget) and::

    gap_closed = (acc - acc_eps0) / (acc_epsinf - acc_eps0)

Private runs go through ``popri-run`` in a subprocess each, so one method that crashes shows up
as a failed row while the rest of the table still appears; every row is cached in
``OUT/rows/<method>_eps<eps>.json`` and a benchmark started again skips finished rows (and the
runs themselves resume from their run directories).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popri_flwr.config import ConfigError, RunConfig
from popri_flwr.run_dir import read_run_config

logger = logging.getLogger(__name__)

#: Rows that need no private run; every other method name is a ``strategy.name``.
REFERENCES = ("eps0", "epsinf")

#: POPri without feedback: the base generator through POPri's prompts (from a popri run).
ROUND0 = "popri_round0"

#: Bumped when the way rows are scored changes (2: eps-inf texts cut to truncate_tokens; 3: PLD
#: accounting and secret noise; 4: prefix-shared, bf16 generation; 5: seeds set downstream.seed
#: and rows carry their seed; 6: the downstream LM trains under bf16 autocast where native), so
#: rows cached by an older version are computed again instead of mixed into a new table.
SCORING_VERSION = 6

#: Column order of ``results.csv`` (and of the Markdown table, minus ``run_dir``).
COLUMNS = (
    "method",
    "epsilon",
    "status",
    "accuracy",
    "top5_accuracy",
    "gap_closed",
    "gap_closed_top5",
    "fid",
    "precision",
    "recall",
    "generator_loss_change",
    "epsilon_spent",
    "wall_seconds",
    "seeds",
    "bytes_down_per_client_round",
    "bytes_up_per_client_round",
    "client_seconds_per_round",
    "run_dir",
)


@dataclass
class BenchmarkConfig:
    """A grid of methods x epsilons and the shared settings of every run in it.

    Parameters
    ----------
    name
        Preset name (``popri_flwr/presets/NAME.yaml``); also the default output folder.
    out_dir
        Where rows, runs, ``results.csv``, ``results.md`` and plots go (default
        ``benchmarks/NAME``).
    methods
        ``eps0``, ``epsinf`` and any registered strategy (``popri``, ``pe``, ``dp_fedavg``).
    epsilons
        Privacy budgets of the private methods (references get one row each).
    run_overrides
        Hydra overrides shared by every run (federation, delta, rounds, q, generator, downstream
        model...). The same values define the references' data and downstream settings.
    method_overrides
        Extra overrides per method (e.g. ``pe: [strategy.pe.population_size=96]``).
    synthetic_size
        Number of synthetic texts the downstream LM trains on (every text-producing method).
    max_eval_texts
        Held-out private texts the downstream accuracy and FID are measured on (seeded subsample).
    resume
        Skip rows already in ``rows/`` (and let runs resume).
    seeds
        Runs of every row with seeds 0..seeds-1 (public randomness: prompts, generation, DPO,
        downstream training); the table reports mean and std. The held-out evaluation text is
        the same for every seed.
    method_epsilons
        Per-method budgets replacing ``epsilons`` (e.g. ``{popri: [1.0, 7.0, .inf]}``: POPri
        also without noise, the mechanism's ceiling, without running PE at infinity).
    method_seeds
        Per-method seed counts replacing ``seeds`` (at most ``seeds``; e.g. ``{pe: 1,
        dp_fedavg: 1}`` runs the baselines once while the rows that need error bars get all
        seeds).
    synthetic_temperature, synthetic_top_p
        Sampling of POPri's final synthetic set and of ``popri_round0`` (null: the run's
        ``generation.temperature`` / ``top_p``, the loop's). Post-processing of the release:
        the loop keeps sampling as configured.
    """

    name: str = "small"
    out_dir: str | None = None
    methods: list[str] = field(default_factory=lambda: ["eps0", "epsinf", "popri"])
    epsilons: list[float] = field(default_factory=lambda: [1.0, 7.0])
    run_overrides: list[str] = field(default_factory=lambda: ["experiment=demo"])
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    synthetic_size: int = 200
    max_eval_texts: int = 1000
    resume: bool = True
    seeds: int = 1
    method_epsilons: dict[str, list[float]] = field(default_factory=dict)
    synthetic_temperature: float | None = None
    synthetic_top_p: float | None = None
    method_seeds: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from popri_flwr.strategies import STRATEGIES

        known = set(REFERENCES) | set(STRATEGIES) | {ROUND0}
        for m in self.methods:
            if m not in known:
                raise ConfigError(
                    f"methods: unknown method {m!r}; expected some of {sorted(known)}"
                )
        if not self.methods:
            raise ConfigError("methods: must name at least one method")
        for e in self.epsilons:
            if not (float(e) > 0):
                raise ConfigError(f"epsilons: each must be > 0 (or .inf), got {e!r}")
        for m, eps in self.method_epsilons.items():
            if m not in set(STRATEGIES):
                raise ConfigError(
                    f"method_epsilons: {m!r} is not a private method; expected some of "
                    f"{sorted(STRATEGIES)}"
                )
            if not eps or not all(float(e) > 0 for e in eps):
                raise ConfigError(
                    f"method_epsilons.{m}: a non-empty list of budgets > 0 (or .inf), got {eps!r}"
                )
        if int(self.seeds) < 1:
            raise ConfigError(f"seeds: must be >= 1, got {self.seeds!r}")
        if ROUND0 in self.methods and "popri" not in self.methods:
            raise ConfigError(f"methods: {ROUND0} needs a popri row (it reuses its public set)")
        for key in ("synthetic_size", "max_eval_texts"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)!r}")
        for m in self.method_overrides:
            if m not in known:
                raise ConfigError(f"method_overrides: unknown method {m!r}")
        for m, n in self.method_seeds.items():
            if m not in known:
                raise ConfigError(f"method_seeds: unknown method {m!r}")
            if m in REFERENCES:
                raise ConfigError(
                    f"method_seeds.{m}: the references anchor gap_closed on every seed; "
                    "they always run all seeds"
                )
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= int(self.seeds):
                raise ConfigError(
                    f"method_seeds.{m}: an integer from 1 to seeds ({self.seeds}), got {n!r}"
                )
        if ROUND0 in self.methods and self.seeds_of(ROUND0) > self.seeds_of("popri"):
            raise ConfigError(
                f"method_seeds.{ROUND0}: at most popri's seeds (it reuses that seed's popri run)"
            )
        t, p = self.synthetic_temperature, self.synthetic_top_p
        if t is not None and not float(t) >= 0:
            raise ConfigError(f"synthetic_temperature: must be >= 0 or null, got {t!r}")
        if p is not None and not 0 < float(p) <= 1:
            raise ConfigError(f"synthetic_top_p: must be in (0, 1] or null, got {p!r}")

    @property
    def out(self) -> Path:
        return Path(self.out_dir or f"benchmarks/{self.name}")

    def settings_hash(self) -> str:
        """Hash of what a row's numbers depend on (a cached row is reused only if equal)."""
        keys = ("run_overrides", "method_overrides", "synthetic_size", "max_eval_texts")
        settings = {k: getattr(self, k) for k in keys} | {"scoring": SCORING_VERSION}
        # Added only when set, so rows cached before these keys existed stay valid.
        settings |= {k: v for k, v in self.synthetic_sampling().items() if v is not None}
        blob = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def synthetic_sampling(self) -> dict[str, float | None]:
        """Keyword arguments of :func:`generate_synthetic` for the final sets."""
        return {"temperature": self.synthetic_temperature, "top_p": self.synthetic_top_p}

    def seeds_of(self, method: str) -> int:
        """How many seeds ``method`` runs (``method_seeds``, else ``seeds``)."""
        return int(self.method_seeds.get(method, self.seeds))

    def epsilons_of(self, method: str) -> list[float]:
        """The budgets ``method`` runs at (``method_epsilons``, else ``epsilons``)."""
        return [float(e) for e in self.method_epsilons.get(method, self.epsilons)]

    def grid(self, seed: int | None = None) -> list[tuple[str, float | None]]:
        """(method, epsilon) of every row of one seed: references first (they anchor
        ``gap_closed``), then private rows, then ``popri_round0`` (after the popri run).
        With ``seed``, methods whose :meth:`seeds_of` is ``<= seed`` are left out."""
        methods = [m for m in self.methods if seed is None or seed < self.seeds_of(m)]
        rows: list[tuple[str, float | None]] = [(m, None) for m in REFERENCES if m in methods]
        rows += [
            (m, e)
            for m in methods
            if m not in REFERENCES and m != ROUND0
            for e in self.epsilons_of(m)
        ]
        if ROUND0 in methods:
            rows.append((ROUND0, None))
        return rows


def gap_closed(acc: float, acc_eps0: float, acc_epsinf: float) -> float:
    """``(acc - acc_eps0) / (acc_epsinf - acc_eps0)``; NaN when the references coincide."""
    denom = acc_epsinf - acc_eps0
    if not all(map(math.isfinite, (acc, acc_eps0, acc_epsinf))) or denom == 0:
        return float("nan")
    return (acc - acc_eps0) / denom


def row_key(method: str, epsilon: float | None, seed: int = 0) -> str:
    """File stem of a row: ``popri_eps1``, ``popri_eps7.5``, ``eps0``; ``..._seed2`` for seed 2."""
    suffix = f"_seed{seed}" if seed else ""
    if epsilon is None:
        return method + suffix
    eps = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    return f"{method}_eps{eps}{suffix}"


# ------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Scores text sets (or a trained model) the same way for every row.

    Holds the run config shared by the grid, the federation and a fixed, seeded subsample of
    its held-out private evaluation text.
    """

    def __init__(self, cfg: RunConfig, max_eval_texts: int) -> None:
        from popri_flwr.data import load_federation

        self.cfg = cfg
        self.federation = load_federation(cfg.data)
        texts = self.federation.eval_sample(max_eval_texts, cfg.seed)
        if not texts:
            raise ValueError(f"data: federation {self.federation.name} has no evaluation texts")
        self.eval_texts = texts
        self._eval_emb: np.ndarray | None = None
        self._embedder = None

    def for_seed(self, seed: int) -> Evaluator:
        """The same evaluation text and embedder; generation and downstream seeded ``seed``."""
        import copy
        import dataclasses

        other = copy.copy(self)
        other.cfg = dataclasses.replace(
            self.cfg,
            seed=int(seed),
            downstream=dataclasses.replace(self.cfg.downstream, seed=int(seed)),
        )
        return other

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from popri_flwr.models.embedding import get_embedder

        if self._embedder is None:
            self._embedder = get_embedder(self.cfg.embedder.model, self.cfg.embedder.device)
        return self._embedder.embed(list(texts))

    def distribution(self, texts: Sequence[str]) -> dict[str, float]:
        """FID and k-NN precision/recall of ``texts`` against the evaluation text."""
        from popri_flwr.evaluation.distribution_metrics import fid, precision_recall

        if self._eval_emb is None:
            self._eval_emb = self.embed(self.eval_texts)
        emb = self.embed(texts)
        if len(emb) < 2:
            return {"fid": float("nan"), "precision": float("nan"), "recall": float("nan")}
        pr = precision_recall(self._eval_emb, emb)
        return {"fid": fid(emb, self._eval_emb), **pr}

    def downstream(self, texts: Sequence[str]) -> dict[str, float]:
        """Best-over-epochs top-1/top-5 next-token accuracy of the LM trained on ``texts``."""
        from popri_flwr.evaluation.downstream import train_downstream

        result = train_downstream(list(texts), self.eval_texts, self.cfg.downstream)
        return {"accuracy": result.best_top1, "top5_accuracy": result.best_top5}

    def texts(self, texts: Sequence[str]) -> dict[str, float]:
        """Both: downstream accuracy and distribution metrics."""
        return {**self.downstream(texts), **self.distribution(texts)}


def reference_texts(method: str, cfg: RunConfig, evaluator: Evaluator, n: int) -> list[str]:
    """Training texts of a reference row (``n`` of them, like every other row).

    ``eps0``: ``n`` public samples generated zero-shot from ``public_set.description`` with the
    run's generator (what POPri starts from, with no client feedback). ``epsinf``: a seeded
    sample of ``n`` of the clients' private training texts, each cut to
    ``generation.truncate_tokens`` tokens like every generated sample, so that the downstream LM
    gets the same number of texts, steps and (at most) tokens as for the synthetic sets.
    """
    if method == "epsinf":
        texts = evaluator.federation.all_train_texts()
        order = np.random.default_rng(cfg.seed).permutation(len(texts))[:n]
        texts = [texts[i] for i in order]
        if cfg.generation.truncate_tokens:
            from transformers import AutoTokenizer

            from popri_flwr.models.generation import truncate_to_tokens
            from popri_flwr.models.loading import resolve_model_path

            g = cfg.generation
            tok = AutoTokenizer.from_pretrained(resolve_model_path(g.model, g.cache_dir))
            texts = [truncate_to_tokens(t, tok, g.truncate_tokens) for t in texts]
        return texts
    from popri_flwr.algorithms.public_set import build_public_set
    from popri_flwr.models.generation import SamplingParams, generator_from_config

    g, p = cfg.generation, cfg.public_set
    generator = generator_from_config(g)
    params = SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        max_new_tokens=g.max_new_tokens,
        truncate_tokens=g.truncate_tokens,
        seed=cfg.seed + 7919,
    )
    return build_public_set(generator, p.description, n, params, path=p.path)


def synthetic_texts(
    method: str,
    run_dir: Path,
    n: int,
    temperature: float | None = None,
    top_p: float | None = None,
) -> list[str]:
    """The synthetic set of a finished private run, ``n`` texts.

    POPri: ``n`` fresh samples from the final policy (base + LoRA adapter), same prompts as the
    run, sampled as the run did unless ``temperature`` / ``top_p`` say otherwise. PE: the final
    population, expanded by variations to ``n``.
    """
    if method == "popri":
        from popri_flwr.evaluation.synthetic import generate_synthetic, load_texts_jsonl

        out = _synthetic_path(run_dir, _sampling_tag(temperature, top_p))
        path = generate_synthetic(run_dir, n, out, temperature=temperature, top_p=top_p)
        return load_texts_jsonl(path)
    if method == "pe":
        return pe_synthetic(run_dir, n)
    raise ValueError(f"methods: {method!r} produces no synthetic text")


def pe_synthetic(run_dir: Path, n: int) -> list[str]:
    """PE's final population (``samples/round_{R+1}.jsonl``), expanded by variations to ``n``."""
    from popri_flwr.algorithms.variations import expand_population
    from popri_flwr.models.generation import SamplingParams, generator_from_config
    from popri_flwr.run_dir import RunDirectory

    out = _synthetic_path(run_dir)
    if out.exists():
        rows = RunDirectory.read_jsonl(out)
        if len(rows) >= n:
            return [r["text"] for r in rows[:n]]
    rd = RunDirectory(run_dir)
    cfg = read_run_config(run_dir)
    final = rd.samples_path(rd.finished_rounds() + 1)
    if not final.exists():
        raise FileNotFoundError(f"{final}: PE's final population is missing (run not finished?)")
    texts = [r["text"] for r in rd.read_jsonl(final)]
    g = cfg.generation
    generator = generator_from_config(g)
    params = SamplingParams.from_config(g, cfg.seed + 104729)
    texts = expand_population(generator, texts, n, params)
    rd.write_jsonl(out, ({"text": t} for t in texts))
    return texts


def _sampling_tag(temperature: float | None, top_p: float | None) -> str:
    """File-name suffix of a final set sampled otherwise than the run (``""``: as the run)."""
    tag = "" if temperature is None else f"_T{float(temperature):g}"
    return tag + ("" if top_p is None else f"_p{float(top_p):g}")


def _synthetic_path(run_dir: Path, tag: str = "") -> Path:
    # Named by the rounds it comes from: a run extended later gets a new synthetic set.
    from popri_flwr.run_dir import RunDirectory

    rounds = RunDirectory(run_dir).finished_rounds()
    return run_dir / f"synthetic_round{rounds:03d}{tag}.jsonl"


def run_costs(run_dir: Path) -> dict[str, float]:
    """Epsilon spent and mean per-client-per-round costs of a run.

    Epsilon and the download size come from the release (``rounds.jsonl``); the upload size,
    client seconds and ``generator_loss_change`` from the run's diagnostics (the benchmark runs
    with diagnostics on). ``generator_loss_change`` is the generator's held-out loss after the
    last round minus the base model's (nats/token, the sum of the per-round changes; NaN unless
    the run measured it with ``evaluation.generator_eval_texts``): the one measure of learning
    with no sampling noise.
    """
    from popri_flwr.privacy.diagnostics import read_diagnostics
    from popri_flwr.run_dir import RunDirectory

    released = RunDirectory(run_dir).read_rounds()
    if not released:
        raise RuntimeError(f"{run_dir}/rounds.jsonl: no finished round")
    diag = {r["round"]: r for r in read_diagnostics(run_dir) if "round" in r}
    rounds = [{**diag.get(r["round"], {}), **r} for r in released]

    def mean(key: str) -> float:
        vals = [float(r[key]) for r in rounds if r.get(key) is not None]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "differentially_private": all(r.get("differentially_private", True) for r in released),
        "epsilon_spent": float(rounds[-1]["epsilon_spent"]),
        "bytes_down_per_client_round": mean("bytes_down"),
        "bytes_up_per_client_round": mean("bytes_up"),
        "client_seconds_per_round": mean("client_seconds"),
        "generator_loss_change": _loss_change(rounds),
    }


def _loss_change(rounds: Sequence[Mapping[str, Any]]) -> float:
    # Every round must carry its change: a sum over some rounds would understate the total.
    changes = [r.get("generator_loss_change") for r in rounds]
    if not changes or any(_number(c) is None for c in changes):
        return float("nan")
    return float(sum(float(c) for c in changes))


# ------------------------------------------------------------------------------- running
def run_private(
    bc: BenchmarkConfig, method: str, epsilon: float, run_dir: Path, log_path: Path, seed: int = 0
) -> None:
    """``popri-run`` for one row, in a subprocess (a crash fails the row, not the grid)."""
    args = [
        sys.executable,
        "-m",
        "popri_flwr.cli.run",
        *bc.run_overrides,
        f"strategy={method}",
        *bc.method_overrides.get(method, []),
        f"privacy.epsilon={'.inf' if math.isinf(epsilon) else epsilon}",
        f"seed={seed}",
        f"downstream.seed={seed}",
        "evaluation.report_client_seconds=true",
        "diagnostics=true",
        f"run_dir={run_dir}",
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    logger.info("%s: %s (log: %s)", row_key(method, epsilon, seed), " ".join(args[3:]), log_path)
    returncode = run_child(args, log_path, env)
    if returncode != 0:
        raise RuntimeError(f"popri-run exited with {returncode}; see {log_path}")
    if not (run_dir / "rounds.jsonl").exists():
        raise RuntimeError(f"popri-run wrote no rounds; see {log_path}")


def run_child(args: Sequence[str], log_path: Path, env: Mapping[str, str] | None) -> int:
    """Run ``args`` with its output appended to ``log_path``; stop it if this process is stopped.

    If waiting is interrupted (Ctrl-C, or SIGTERM turned into ``SystemExit`` by
    :func:`popri_flwr.cli.benchmark.exit_on_sigterm`), the child gets SIGTERM, 30 s to shut
    down, then SIGKILL, so no run is left going in a directory the next benchmark will use.

    Returns
    -------
    int
        The child's exit status.
    """
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def round0_texts(bc: BenchmarkConfig, seed: int, n: int) -> list[str]:
    """``n`` texts of the base generator through POPri's prompts (the popri run's public set).

    Nothing here depends on the clients: the public set is model-written from the public
    description, the prompts are drawn from it, and the adapter is left out.
    """
    from popri_flwr.evaluation.synthetic import generate_synthetic, load_texts_jsonl

    run_dir = (bc.out / "runs" / row_key("popri", bc.epsilons_of("popri")[0], seed)).resolve()
    if not (run_dir / "public_set.jsonl").exists():
        raise RuntimeError(f"{run_dir}: no popri run to take the public set from (failed?)")
    sampling = bc.synthetic_sampling()
    out = run_dir / f"synthetic_round0{_sampling_tag(**sampling)}.jsonl"
    return load_texts_jsonl(generate_synthetic(run_dir, n, out, adapter=False, **sampling))


def evaluate_row(
    bc: BenchmarkConfig,
    method: str,
    epsilon: float | None,
    evaluator: Evaluator,
    seed: int = 0,
) -> dict[str, Any]:
    """Run (if private) and score one row; exceptions propagate to :func:`run_row`."""
    evaluator = evaluator.for_seed(seed)
    cfg = evaluator.cfg
    row: dict[str, Any] = {"method": method, "epsilon": epsilon, "seed": seed}
    if method == ROUND0:
        row.update(evaluator.texts(round0_texts(bc, seed, bc.synthetic_size)))
        row["epsilon_spent"] = 0.0
        return row
    if method in REFERENCES:
        texts = reference_texts(method, cfg, evaluator, bc.synthetic_size)
        if method == "eps0":  # public texts: kept for inspection (the private ones are not)
            path = bc.out / "rows" / f"{row_key('eps0', None, seed)}_texts.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        row.update(evaluator.texts(texts))
        row["epsilon_spent"] = 0.0 if method == "eps0" else float("inf")
        return row
    key = row_key(method, epsilon, seed)
    run_dir = (bc.out / "runs" / key).resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_private(bc, method, epsilon, run_dir, bc.out / "logs" / f"{key}.log", seed)
    row["run_dir"] = str(run_dir)
    row.update(run_costs(run_dir))
    if method == "dp_fedavg":
        from popri_flwr.strategies.dp_fedavg import evaluate_run_dir

        row.update(evaluate_run_dir(run_dir, evaluator.eval_texts, cfg.downstream))
    else:
        texts = synthetic_texts(method, run_dir, bc.synthetic_size, **bc.synthetic_sampling())
        row.update(evaluator.texts(texts))
    return row


def run_row(
    bc: BenchmarkConfig,
    method: str,
    epsilon: float | None,
    evaluator: Evaluator | None,
    seed: int = 0,
) -> dict[str, Any]:
    """One row of one seed, cached in ``rows/``; a failure becomes a row saying why."""
    key = row_key(method, epsilon, seed)
    path = bc.out / "rows" / f"{key}.json"
    if bc.resume and path.exists():
        row = json.loads(path.read_text())
        if str(row.get("status")).startswith("ok") and row.get("settings") == bc.settings_hash():
            logger.info("%s: done earlier (%s)", key, path)
            return row
        if row.get("status") == "ok":
            logger.warning("%s: settings changed since %s; running it again", key, path)
    start = time.perf_counter()
    try:
        if evaluator is None:
            raise RuntimeError("the evaluation set-up failed (see the log above)")
        row = {**evaluate_row(bc, method, epsilon, evaluator, seed), "status": "ok"}
        private = row.pop("differentially_private", True)
        if not private and epsilon is not None and math.isfinite(epsilon):
            # Seeded debug noise: the epsilon column means nothing for this row.
            row["status"] = "ok (NOT differentially private: debug_noise_seed)"
    except Exception as err:  # noqa: BLE001 - one failed method must not hide the others
        logger.exception("%s failed", key)
        row = {
            "method": method,
            "epsilon": epsilon,
            "seed": seed,
            "status": f"failed: {err}".splitlines()[0],
        }
    row["wall_seconds"] = time.perf_counter() - start
    row["settings"] = bc.settings_hash()
    if method in REFERENCES or method == ROUND0:  # shown as the budgets they stand for
        row["epsilon"] = float("inf") if method == "epsinf" else 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, allow_nan=True))
    return row


def run_benchmark(bc: BenchmarkConfig) -> list[dict[str, Any]]:
    """Run the grid and write ``results.csv``, ``results.md`` and the plots into ``bc.out``."""
    from popri_flwr.hydra_config import load_config

    cfg = load_config(bc.run_overrides)  # bad overrides stop here, before any work
    for method, extra in bc.method_overrides.items():
        load_config([*bc.run_overrides, f"strategy={method}", *extra])
    bc.out.mkdir(parents=True, exist_ok=True)
    (bc.out / "logs").mkdir(exist_ok=True)
    (bc.out / "benchmark.json").write_text(json.dumps(asdict(bc), indent=2, allow_nan=True))
    try:
        evaluator: Evaluator | None = Evaluator(cfg, bc.max_eval_texts)
    except Exception:  # noqa: BLE001 - every row then fails with the reason logged
        logger.exception("evaluation set-up failed")
        evaluator = None
    by_seed: list[dict[str, Any]] = []
    for seed in range(bc.seeds):
        seed_rows: list[dict[str, Any]] = []
        for method, epsilon in bc.grid(seed):
            seed_rows.append(run_row(bc, method, epsilon, evaluator, seed))
            finish_rows(seed_rows)
            write_results(aggregate_seeds([*by_seed, *seed_rows]), bc.out)
            write_results([*by_seed, *seed_rows], bc.out, name="results_by_seed")
        by_seed += seed_rows
    rows = aggregate_seeds(by_seed)
    write_plots(rows, bc.out)
    return rows


#: Columns averaged over seeds (each also gets ``<column>_std``).
MEAN_COLUMNS = (
    "accuracy", "top5_accuracy", "gap_closed", "gap_closed_top5", "fid", "precision", "recall",
    "generator_loss_change", "epsilon_spent", "wall_seconds", "bytes_down_per_client_round",
    "bytes_up_per_client_round", "client_seconds_per_round",
)  # fmt: skip


def aggregate_seeds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, epsilon): mean and sample std over its successful seeds.

    ``gap_closed`` is computed per seed against that seed's references, then averaged.
    ``seeds`` counts the seeds that succeeded; with none, the row keeps the first failure.
    """
    groups: dict[tuple[str, Any], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("epsilon")), []).append(r)
    out = []
    for (method, epsilon), group in groups.items():
        ok = [r for r in group if str(r.get("status", "")).startswith("ok")]
        if not ok:
            out.append({**group[0], "seeds": 0})
            continue
        row: dict[str, Any] = {**ok[0], "method": method, "epsilon": epsilon, "seeds": len(ok)}
        row.pop("seed", None)
        for col in MEAN_COLUMNS:
            vals = [float(r[col]) for r in ok if _number(r.get(col)) is not None]
            if not vals:
                continue
            row[col] = float(np.mean(vals))
            spread = len(vals) > 1 and all(map(math.isfinite, vals))  # not for epsilon = inf
            row[f"{col}_std"] = float(np.std(vals, ddof=1)) if spread else float("nan")
        if len(ok) < len(group):
            row["status"] = f"ok ({len(group) - len(ok)} of {len(group)} seeds failed)"
        out.append(row)
    return out


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def finish_rows(rows: list[dict[str, Any]]) -> None:
    """Fill ``gap_closed`` (top-1) and ``gap_closed_top5`` from the reference rows (NaN
    without both)."""
    for column, out in (("accuracy", "gap_closed"), ("top5_accuracy", "gap_closed_top5")):
        ref = {r["method"]: r.get(column) for r in rows if r["method"] in REFERENCES}
        a0, ainf = ref.get("eps0"), ref.get("epsinf")
        for r in rows:
            if r.get(column) is None or a0 is None or ainf is None:
                r[out] = float("nan")
            else:
                r[out] = gap_closed(float(r[column]), float(a0), float(ainf))


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf"
        if key.startswith("bytes"):
            return f"{value:,.0f}"
        if key in ("wall_seconds", "client_seconds_per_round"):
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value)


def write_results(
    rows: Sequence[Mapping[str, Any]], out: Path, name: str = "results"
) -> tuple[Path, Path]:
    """``NAME.csv`` (all columns, raw values) and ``NAME.md`` (formatted table).

    Rows aggregated over seeds carry ``<column>_std``: the CSV gets those columns and the
    Markdown shows ``mean ± std``.
    """
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    stds = [f"{c}_std" for c in MEAN_COLUMNS if any(f"{c}_std" in r for r in rows)]
    columns = [*COLUMNS, *stds] if name == "results" else ["seed", *COLUMNS]
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    os.replace(tmp, csv_path)
    cols = [c for c in columns if c != "run_dir" and not c.endswith("_std")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            cell = _fmt(r.get(c), c)
            std = r.get(f"{c}_std")
            if cell and isinstance(std, float) and math.isfinite(std):
                cell += f" ± {_fmt(std, c)}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_plots(rows: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    """Accuracy bars by method and epsilon; FID and epsilon spent by round of every run."""
    written = []
    try:
        from popri_flwr.evaluation import plots

        plots.plot_accuracy(rows, out / "accuracy.png")
        written.append(out / "accuracy.png")
        runs = {
            row_key(r["method"], r["epsilon"], int(r.get("seed") or 0)): r["run_dir"]
            for r in rows
            if r.get("run_dir") and (Path(r["run_dir"]) / "rounds.jsonl").exists()
        }
        if runs:
            for metric in ("epsilon_spent", "fid_next"):
                path = out / f"{metric}_by_round.png"
                try:
                    plots.plot_rounds(runs, path, metric)
                    written.append(path)
                except ValueError as err:  # e.g. no run logs this metric
                    logger.warning("plot %s skipped: %s", path.name, err)
    except Exception:  # noqa: BLE001 - the table is already written; a plot must not lose it
        logger.exception("plots failed")
    return written
