"""Private Evolution (Aug-PE for text) as a Flower strategy: the generator is never trained.

Round t with a population of M synthetic texts (clip C, noise multiplier sigma)::

    round 1 : population = M texts generated zero-shot from the public description
    server  : E = embed(population)                                 (sent to clients)
    client i: v_i = C * h_i / ||h_i||, h_i = nearest-neighbour votes of its private texts
    server  : s = sum_i v_i + N(0, sigma^2 C^2 I)                   (noisy vote histogram)
              kept = top round(keep_fraction * M) members by s
              population_{t+1} = kept + variations of the kept (round-robin, rank order)

After the last round R, ``samples/round_{R+1:03d}.jsonl`` holds the synthetic dataset; each
``samples/round_{t:03d}.jsonl`` holds round t's population with its noisy votes, one row per
member: ``sample_id``, ``text``, ``origin`` (initial / kept / variation), ``parent_id`` (index
in round t-1's population: the member itself if kept, the paraphrased one if a variation),
``noisy_votes``, ``kept`` and ``kept_rank`` (null until the round's votes exist). Only the
vote histogram depends on private data, through the same Poisson-subsampled Gaussian mechanism
(and accountant) as POPri, so the same sigma, q and rounds spend the same epsilon.

The vote maths lives in :mod:`popri_flwr.algorithms.voting`; sampling, validation, noise,
accounting and
resume in :class:`~popri_flwr.strategies.base.PrivateStrategy`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from popri_flwr.algorithms.public_set import build_public_set
from popri_flwr.algorithms.variations import generate_variations, with_seed
from popri_flwr.algorithms.voting import PEConfig, refill_parents, select_top, vote_summary
from popri_flwr.evaluation.distribution_metrics import fid
from popri_flwr.models.embedding import Embedder
from popri_flwr.models.generation import Generator, SamplingParams
from popri_flwr.protocol import PAYLOAD_ARRAYS, PAYLOAD_CONFIG
from popri_flwr.strategies.base import PrivateStrategy, eval_embeddings_for

logger = logging.getLogger(__name__)

#: Seed offset of the initial population (the same offset POPri uses for its public set).
_INITIAL_SEED_OFFSET = 7919


class PrivateEvolutionStrategy(PrivateStrategy):
    """Private Evolution: clients vote for population members; the server keeps and varies.

    Parameters
    ----------
    generator
        Any generator (API-style: only sampled from, never trained).
    embedder
        Embeds the population (sent to clients when ``payload == "embeddings"``) and, for
        evaluation, nothing private beyond ``eval_embeddings``.
    description
        Public task description; the round-1 population is generated zero-shot from it.
    pe
        Population size M, keep fraction and votes per private text.
    sampling
        Sampling parameters of the initial population and of the variations.
    tokenizer
        For truncation to ``sampling.truncate_tokens`` (default: the generator's).
    initial_path
        Optional file of public texts used as the initial population (topped up to M with
        variations if it holds fewer).
    payload
        ``"embeddings"`` (server embeds; clients only do a matrix product) or ``"texts"``.
    embedder_name
        Sent to clients so both sides use the same embedding space.
    eval_embeddings
        Embeddings of held-out private text, for the evaluation-only FID (or None).
    **kwargs
        See :class:`~popri_flwr.strategies.base.PrivateStrategy`.
    """

    method = "pe"

    def __init__(
        self,
        *,
        generator: Generator,
        embedder: Embedder,
        description: str,
        pe: PEConfig,
        sampling: SamplingParams,
        tokenizer: Any = None,
        initial_path: str | None = None,
        payload: str = "embeddings",
        embedder_name: str = "",
        eval_embeddings: np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if payload not in ("embeddings", "texts"):
            raise ValueError(f"strategy.payload: expected embeddings or texts, got {payload!r}")
        self.generator, self.embedder = generator, embedder
        self.tokenizer = tokenizer if tokenizer is not None else generator.tokenizer
        self.description, self.initial_path = description, initial_path
        self.pe, self.sampling = pe, sampling
        self.payload, self.embedder_name = payload, embedder_name
        self.eval_embeddings = eval_embeddings
        self.texts: list[str] = []
        self.origins: list[str] = []
        self.parents: list[int | None] = []
        self.pop_emb: np.ndarray | None = None
        self._voted_emb: np.ndarray | None = None

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Check ``strategy.pe`` against the population when the config is loaded."""
        s = cfg.strategy
        s.pe.resolved(s.num_prompts * s.samples_per_prompt)  # votes_k <= M, ...

    @classmethod
    def from_config(cls, cfg: Any, *, federation: Any, **common: Any) -> PrivateEvolutionStrategy:
        """Build the generator, embedder and strategy from a :class:`~popri_flwr.config.RunConfig`.

        ``strategy.pe`` carries ``population_size`` (null: ``num_prompts *
        samples_per_prompt``, the number of texts POPri generates per round), ``keep_fraction``
        and ``votes_k``.
        """
        from popri_flwr.models.embedding import get_embedder
        from popri_flwr.models.generation import generator_from_config

        g, s = cfg.generation, cfg.strategy
        # Validate before loading any model.
        pe = s.pe.resolved(s.num_prompts * s.samples_per_prompt)
        generator = generator_from_config(g)
        embedder = get_embedder(cfg.embedder.model, cfg.embedder.device)
        return cls(
            generator=generator,
            embedder=embedder,
            tokenizer=generator.tokenizer,
            description=cfg.public_set.description,
            initial_path=cfg.public_set.path,
            pe=pe,
            sampling=SamplingParams.from_config(g, cfg.seed),
            payload=s.payload,
            embedder_name=cfg.embedder.model,
            eval_embeddings=eval_embeddings_for(cfg, federation, embedder, common),
            **common,
        )

    # ---------------------------------------------------------------- set-up and resume
    def prepare(self, finished_round: int) -> None:
        """Load the population of round ``finished_round + 1``, or build the initial one."""
        nxt = finished_round + 1
        path = self.run_dir.samples_path(nxt)
        if path.exists():
            rows = self.run_dir.read_jsonl(path)
            if len(rows) != self.pe.population_size:
                raise RuntimeError(
                    f"run_dir: {path} holds {len(rows)} texts, expected "
                    f"population_size={self.pe.population_size}; cannot resume this run"
                )
            self.texts = [row["text"] for row in rows]
            self.origins = [row.get("origin", "initial") for row in rows]
            self.parents = [row.get("parent_id") for row in rows]
            with self.timer("embed"):
                self.pop_emb = self.embedder.embed(self.texts)
            logger.info(
                "Loaded the population of round %d (%d texts) from %s", nxt, len(rows), path
            )
        elif finished_round == 0:
            self._initial_population()
        else:
            raise RuntimeError(
                f"run_dir: no population of round {nxt} in {path.parent}; cannot resume this run"
            )

    def _initial_population(self) -> None:
        m = self.pe.population_size
        params = with_seed(self.sampling, self.sampling.seed + _INITIAL_SEED_OFFSET)
        logger.info("Building the initial population (%d texts)", m)
        with self.timer("generate"):
            texts = build_public_set(
                self.generator,
                self.description,
                m,
                params,
                path=self.initial_path,
                tokenizer=self.tokenizer,
            )
            origins: list[str] = ["initial"] * len(texts)
            parents: list[int | None] = [None] * len(texts)
            if len(texts) < m:  # a public file with fewer than M texts: top up by variations
                idx = refill_parents(np.arange(len(texts)), m)
                extra, _ = generate_variations(
                    self.generator, [texts[i] for i in idx], params, self.tokenizer
                )
                texts += extra
                origins += ["variation"] * len(extra)
                parents += [int(i) for i in idx]
        self.texts, self.origins, self.parents = texts, origins, parents
        with self.timer("embed"):
            self.pop_emb = self.embedder.embed(self.texts)
        self._write_population(1, None, None)

    def _write_population(
        self, server_round: int, votes: np.ndarray | None, kept: np.ndarray | None
    ) -> None:
        rank = {int(i): r for r, i in enumerate(kept)} if kept is not None else {}
        rows = (
            {
                "sample_id": idx,
                "text": text,
                "origin": self.origins[idx],
                "parent_id": self.parents[idx],
                "noisy_votes": None if votes is None else float(votes[idx]),
                "kept": None if kept is None else idx in rank,
                "kept_rank": rank.get(idx),
            }
            for idx, text in enumerate(self.texts)
        )
        self.run_dir.write_jsonl(self.run_dir.samples_path(server_round), rows)

    # ---------------------------------------------------------------- one round
    def train_payload(self, server_round: int) -> RecordDict:
        """Population embeddings (M x d float32) or the texts; plus votes per private text."""
        config = ConfigRecord(
            {
                "method": self.method,
                "payload": self.payload,
                "embedder": self.embedder_name,
                "votes-k": self.pe.votes_k,
            }
        )
        if self.payload == "texts":
            config["texts"] = list(self.texts)
            return RecordDict({PAYLOAD_CONFIG: config})
        emb = np.ascontiguousarray(self.pop_emb, dtype=np.float32)
        return RecordDict(
            {PAYLOAD_CONFIG: config, PAYLOAD_ARRAYS: ArrayRecord({"embeddings": Array(emb)})}
        )

    def vector_length(self, server_round: int) -> int:
        return self.pe.population_size

    def server_update(self, server_round: int, release: np.ndarray) -> dict[str, Any]:
        """Keep the top-voted members, refill with their variations, write both populations."""
        m = self.pe.population_size
        kept = select_top(release, self.pe.num_kept)
        self._write_population(server_round, release, kept)
        parents = refill_parents(kept, m)
        params = with_seed(self.sampling, self.sampling.seed + 1000 * server_round)
        with self.timer("generate"):
            variations, stats = generate_variations(
                self.generator, [self.texts[i] for i in parents], params, self.tokenizer
            )
        with self.timer("embed"):
            var_emb = self.embedder.embed(variations)
        metrics: dict[str, Any] = {
            "population_size": m,
            "kept": len(kept),
            "variations": len(variations),
            **vote_summary(release, kept),
            **stats,
        }
        self._voted_emb = self.pop_emb
        self.texts = [self.texts[i] for i in kept] + variations
        self.origins = ["kept"] * len(kept) + ["variation"] * len(variations)
        self.parents = [int(i) for i in kept] + [int(i) for i in parents]
        self.pop_emb = np.concatenate([self.pop_emb[kept], var_emb], axis=0)
        metrics["distinct_texts"] = len(set(self.texts))
        self._write_population(server_round + 1, None, None)
        logger.info(
            "Round %d: kept %d of %d (mean noisy votes %.3g kept vs %.3g dropped), %d variations "
            "(%d empty)",
            server_round,
            len(kept),
            m,
            metrics["votes_kept_mean"],
            metrics["votes_dropped_mean"],
            len(variations),
            stats["empty_variations"],
        )
        return metrics

    def evaluate_round(self, server_round: int) -> dict[str, Any]:
        """Evaluation only: FID of the voted population and of the next one (as in POPri)."""
        if self.eval_embeddings is None or len(self.eval_embeddings) < 2:
            return {}
        return {
            "fid_scored": fid(self._voted_emb, self.eval_embeddings),
            "fid_next": fid(self.pop_emb, self.eval_embeddings),
        }
