"""POPri as a Flower strategy: private preference optimization of a synthetic-text generator.

Round t (K prompts, J samples each, clip C, noise multiplier sigma)::

    server  : samples x_1..x_{KJ} ~ generator_t(prompts built from the public set)
    client i: v_i = clip_C(zscore(mean_j cos(E(x_k), E(p_ij)))_k)     (only v_i leaves)
    server  : s = sum_i v_i + N(0, sigma^2 C^2 I)
              pairs = {(best_k, rank-r_k) of each prompt's J samples under s}
              generator_{t+1} = DPO(generator_t, pairs), reference = base model
              (``replay_rounds`` = m: pairs of rounds t-m..t, rebuilt from their releases)
              (``update=tilt``: weighted likelihood of each prompt's best samples,
              weights softmax(zscore(s) / tau), instead of DPO)
              regenerate the samples of round t+1

The shared machinery (Poisson sampling, reply checks, noise, accountant, resume) lives in
:class:`~popri_flwr.strategies.base.PrivateStrategy`.
"""

from __future__ import annotations

import json
import logging
import shutil
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from popri_flwr.algorithms.preference import PAIRINGS, build_pairs, pairs_from_rows
from popri_flwr.algorithms.prompts import PROMPT_STYLES, build_prompts
from popri_flwr.algorithms.public_set import build_public_set
from popri_flwr.algorithms.tilt import tilt_weights
from popri_flwr.config import check as _check
from popri_flwr.evaluation.distribution_metrics import fid, fid_change_bootstrap
from popri_flwr.evaluation.downstream import encode_for_lm, evaluate_lm
from popri_flwr.models.dpo import DPOStep
from popri_flwr.models.embedding import Embedder
from popri_flwr.models.generation import (
    Generator,
    SamplingParams,
    format_chat,
    generate_samples,
    render_prompts,
)
from popri_flwr.protocol import PAYLOAD_ARRAYS, PAYLOAD_CONFIG
from popri_flwr.strategies.base import PrivateStrategy, eval_embeddings_for

logger = logging.getLogger(__name__)


class PopriStrategy(PrivateStrategy):
    """POPri: clients score synthetic samples; the server turns noisy scores into DPO pairs.

    Parameters
    ----------
    generator
        Generates samples; its ``model`` is replaced by the DPO policy (LoRA adapter on).
    tokenizer
        The generator's tokenizer (for truncation to ``sampling.truncate_tokens``).
    dpo
        The server's DPO step (adapter and optimizer carry over rounds).
    embedder
        Embeds samples on the server when ``payload == "embeddings"`` and for evaluation.
    public_set
        ``dict(description=..., size=..., path=..., max_new_tokens=...)``.
    num_prompts, samples_per_prompt, reject_rank, shots
        K, J, r (zero-based) and the number of few-shot examples per prompt.
    prompt_style
        ``"list"`` (the paper's few-shot list, continued) or ``"chat"`` (the examples in an
        instruction, wrapped in the tokenizer's chat template; for instruct generators). See
        :mod:`popri_flwr.algorithms.prompts`.
    sampling
        Sampling parameters of the per-round generation.
    pairing
        ``"rank"`` (the paper: one pair per prompt, best vs rank r) or ``"all"`` (every pair
        of a prompt's samples at least r ranks apart; same release, more pairs). See
        :func:`~popri_flwr.algorithms.preference.build_pairs`.
    payload
        ``"embeddings"`` (server embeds, clients only do a matrix product) or ``"texts"``.
    embedder_name
        Sent to clients so both sides use the same embedding space.
    eval_embeddings
        Embeddings of held-out private text, for the evaluation-only FID (or None).
    replay_rounds
        DPO also trains on the pairs of up to this many earlier rounds, rebuilt from their
        released samples and noisy scores (post-processing of the release: no privacy cost).
        0 (the paper): this round's pairs only. With ``dpo.warm_start=false`` and
        ``dpo.steps_per_round`` every round refits the base model on all pairs released so far
        in a fixed number of steps, so more pairs make the steps cleaner, not more numerous.
    update, tilt_tau, tilt_keep
        The server update: ``"dpo"`` (the paper) or ``"tilt"``: weighted likelihood of each
        prompt's ``tilt_keep`` best samples (``None``: all J) with weights
        ``softmax(zscore(s) / tilt_tau)`` (:mod:`popri_flwr.algorithms.tilt`): each round fits
        the tilt of its own samples instead of following DPO's gradient. Rounds compound, so
        ``tilt_tau`` ~ the number of rounds adds up to one ``tau = 1`` tilt (docs/learning.md,
        stops 24-25).
        Same adapter, optimizer and step settings (``dpo.*``); pairs are still built for
        the diagnostics. Post-processing of the release either way.
    probe_prompts
        Diagnostics: the number of fixed probe prompts (0 = off). See :meth:`probe`.
    generator_eval_texts
        Diagnostics: held-out private texts the generator's own next-token loss is measured
        on after every round (None = off). See :meth:`generator_eval`.
    **kwargs
        See :class:`~popri_flwr.strategies.base.PrivateStrategy`.
    """

    method = "popri"

    def __init__(
        self,
        *,
        generator: Generator,
        tokenizer: Any,
        dpo: DPOStep,
        embedder: Embedder,
        public_set: dict[str, Any],
        num_prompts: int,
        samples_per_prompt: int,
        reject_rank: int,
        sampling: SamplingParams,
        pairing: str = "rank",
        shots: int = 3,
        prompt_style: str = "list",
        payload: str = "embeddings",
        replay_rounds: int = 0,
        update: str = "dpo",
        tilt_tau: float = 3.0,
        tilt_keep: int | None = None,
        embedder_name: str = "",
        eval_embeddings: np.ndarray | None = None,
        probe_prompts: int = 0,
        generator_eval_texts: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(replay_rounds, int) or replay_rounds < 0:
            raise ValueError(
                f"strategy.replay_rounds: must be an integer >= 0, got {replay_rounds!r}"
            )
        if update not in UPDATES:
            raise ValueError(f"strategy.update: expected one of {UPDATES}, got {update!r}")
        if update == "tilt":
            tilt_weights(np.zeros(samples_per_prompt), samples_per_prompt, tilt_tau, tilt_keep)
            if replay_rounds:
                raise ValueError("strategy.replay_rounds: only with strategy.update=dpo")
        if probe_prompts < 0:
            raise ValueError(f"evaluation.probe_prompts: must be >= 0, got {probe_prompts}")
        if not 1 <= reject_rank < samples_per_prompt:
            raise ValueError(
                f"strategy.reject_rank: must be in [1, {samples_per_prompt}), got {reject_rank}"
            )
        if pairing not in PAIRINGS:
            raise ValueError(f"strategy.pairing: expected one of {PAIRINGS}, got {pairing!r}")
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(
                f"strategy.prompt_style: expected one of {PROMPT_STYLES}, got {prompt_style!r}"
            )
        if prompt_style == "chat":
            format_chat(tokenizer, "")  # fails now, naming the key, if there is no template
        if payload not in ("embeddings", "texts"):
            raise ValueError(f"strategy.payload: expected embeddings or texts, got {payload!r}")
        self.generator, self.tokenizer, self.dpo, self.embedder = (
            generator,
            tokenizer,
            dpo,
            embedder,
        )
        self.public_set_cfg = public_set
        self.k, self.j, self.r, self.shots = num_prompts, samples_per_prompt, reject_rank, shots
        self.prompt_style, self.replay_rounds, self.pairing = prompt_style, replay_rounds, pairing
        self.sampling, self.payload, self.embedder_name = sampling, payload, embedder_name
        self.eval_embeddings = eval_embeddings
        self.update, self.tilt_tau = update, float(tilt_tau)
        self.tilt_keep = samples_per_prompt if tilt_keep is None else int(tilt_keep)
        self.probe_prompts = probe_prompts
        self._gen_eval = None
        if generator_eval_texts:
            self._gen_eval = encode_for_lm(list(generator_eval_texts), tokenizer, GEN_EVAL_LEN)
        self._measured_last: dict[str, float] = {}  # the generator measures of the last round
        self._probe_emb: np.ndarray | None = None  # the last probe's samples, embedded
        self._probe_groups: np.ndarray | None = None  # their prompt indices
        self._probe_base: np.ndarray | None = None  # the base model's probe, embedded
        self.public_texts: list[str] = []
        self.prompts: list[str] = []
        self.samples: list[str] = []
        self.sample_emb: np.ndarray | None = None

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """POPri's own keys, checked when the config is loaded (before any work)."""
        s = cfg.strategy
        _check(s.num_prompts >= 1, "strategy.num_prompts", "must be >= 1", s.num_prompts)
        _check(
            s.samples_per_prompt >= 2,
            "strategy.samples_per_prompt",
            "must be >= 2",
            s.samples_per_prompt,
        )
        _check(
            0 < s.reject_rank < s.samples_per_prompt,
            "strategy.reject_rank",
            f"must be in [1, samples_per_prompt={s.samples_per_prompt})",
            s.reject_rank,
        )
        _check(s.pairing in PAIRINGS, "strategy.pairing", f"expected one of {PAIRINGS}", s.pairing)
        _check(s.shots >= 1, "strategy.shots", "must be >= 1", s.shots)
        _check(s.replay_rounds >= 0, "strategy.replay_rounds", "must be >= 0", s.replay_rounds)
        _check(s.update in UPDATES, "strategy.update", f"expected one of {UPDATES}", s.update)
        _check(s.tilt_tau > 0, "strategy.tilt_tau", "must be > 0", s.tilt_tau)
        _check(
            s.tilt_keep is None or 1 <= s.tilt_keep <= s.samples_per_prompt,
            "strategy.tilt_keep",
            f"must be null (all) or in [1, samples_per_prompt={s.samples_per_prompt}]",
            s.tilt_keep,
        )
        _check(
            s.update == "dpo" or s.replay_rounds == 0,
            "strategy.replay_rounds",
            "only with strategy.update=dpo",
            s.replay_rounds,
        )
        _check(
            s.prompt_style in PROMPT_STYLES,
            "strategy.prompt_style",
            f"expected one of {PROMPT_STYLES}",
            s.prompt_style,
        )
        _check(
            s.prompt_style != "chat" or bool(cfg.public_set.description.strip()),
            "public_set.description",
            "must be set for strategy.prompt_style=chat",
            cfg.public_set.description,
        )
        _check(
            s.payload in ("embeddings", "texts"),
            "strategy.payload",
            "expected embeddings or texts",
            s.payload,
        )
        _check(
            cfg.public_set.size >= s.shots,
            "public_set.size",
            f"must be >= strategy.shots={s.shots}",
            cfg.public_set.size,
        )

    @classmethod
    def from_config(cls, cfg: Any, *, federation: Any, **common: Any) -> PopriStrategy:
        """Build models and the strategy from a :class:`~popri_flwr.config.RunConfig`."""
        from popri_flwr.models.embedding import get_embedder
        from popri_flwr.models.generation import TransformersGenerator, generator_from_config
        from popri_flwr.models.loading import load_causal_lm

        g, s = cfg.generation, cfg.strategy
        # A fresh base model per run (0.5 s from the cache): the DPO step wraps it with its
        # LoRA adapter in place, so it must not be a model another run already wrapped.
        model, tokenizer = load_causal_lm(g.model, device=cfg.dpo.device, cache_dir=g.cache_dir)
        dpo = DPOStep(model, tokenizer, cfg.dpo)
        if g.backend == "transformers":
            generator = TransformersGenerator(
                dpo.model, tokenizer, batch_size=g.batch_size, dtype=g.dtype
            )
        else:  # vLLM generates from the adapter the strategy saves after each DPO round
            generator = generator_from_config(g)
        embedder = get_embedder(cfg.embedder.model, cfg.embedder.device)
        return cls(
            generator=generator,
            tokenizer=tokenizer,
            dpo=dpo,
            embedder=embedder,
            public_set=dict(vars(cfg.public_set)),
            num_prompts=s.num_prompts,
            samples_per_prompt=s.samples_per_prompt,
            reject_rank=s.reject_rank,
            pairing=s.pairing,
            shots=s.shots,
            prompt_style=s.prompt_style,
            payload=s.payload,
            replay_rounds=s.replay_rounds,
            update=s.update,
            tilt_tau=s.tilt_tau,
            tilt_keep=s.tilt_keep,
            sampling=SamplingParams.from_config(g, cfg.seed),
            embedder_name=cfg.embedder.model,
            eval_embeddings=eval_embeddings_for(cfg, federation, embedder, common),
            probe_prompts=cfg.evaluation.probe_prompts,
            generator_eval_texts=(
                federation.eval_sample(cfg.evaluation.generator_eval_texts, cfg.seed)
                if common.get("diagnostics") and cfg.evaluation.generator_eval_texts
                else None
            ),
            **common,
        )

    # ---------------------------------------------------------------- set-up and resume
    def prepare(self, finished_round: int) -> None:
        """Public set, adapter (on resume) and the samples of the next round."""
        self._sync_generator()
        with self.timer("public_set"):
            self.public_texts = self._load_or_build_public_set()
        if finished_round:
            self._load_adapter(finished_round)
        # The generator as it stands, so that the next round's measures have a change too.
        self._measured_last = self._measure_generator()
        nxt = finished_round + 1
        path = self.run_dir.samples_path(nxt)
        if path.exists():
            rows = self.run_dir.read_jsonl(path)
            self.prompts = _unique_prompts(rows, self.k)
            self.samples = [row["text"] for row in rows]
            with self.timer("embed"):
                self.sample_emb = self.embedder.embed(self.samples)
            logger.info("Loaded %d samples for round %d from %s", len(self.samples), nxt, path)
        else:
            self._regenerate(nxt)

    def _sync_generator(self) -> None:
        """Point the generator at the current policy.

        transformers: a merged copy (base + B A folded into the weights) of the policy, so
        sampling costs what the base model costs instead of paying the unmerged LoRA matmuls
        on every token; the DPO step keeps training its own unmerged adapter. vLLM: the saved
        adapter, loaded through a LoRA request.
        """
        if hasattr(self.generator, "set_adapter"):
            path = self.run_dir.path / "checkpoint" / "vllm_adapter"
            if self.dpo.rounds_trained:
                self.dpo.model.save_pretrained(path)
                self.generator.set_adapter(path)
        elif not self.dpo.rounds_trained:
            self.generator.model = self.dpo.model.get_base_model()  # B = 0: policy == base
        else:
            self.generator.model = merged_copy(self.dpo.model)

    def _load_or_build_public_set(self) -> list[str]:
        path = self.run_dir.path / "public_set.jsonl"
        if path.exists():
            return [row["text"] for row in self.run_dir.read_jsonl(path)]
        cfg = self.public_set_cfg
        params = SamplingParams(
            temperature=float(cfg.get("temperature", self.sampling.temperature)),
            top_p=float(cfg.get("top_p", self.sampling.top_p)),
            max_new_tokens=int(cfg.get("max_new_tokens", 120)),
            truncate_tokens=None,
            seed=self.seed + 7919,
        )
        logger.info("Building the public set (%s texts)", cfg["size"])
        texts = build_public_set(
            self.generator,
            cfg["description"],
            int(cfg["size"]),
            params,
            path=cfg.get("path"),
            tokenizer=self.tokenizer,
        )
        self.run_dir.write_jsonl(path, ({"text": t} for t in texts))
        return texts

    def _regenerate(self, server_round: int) -> None:
        """Build round ``server_round``'s prompts and samples with the current policy."""
        rng = self.rng_for(server_round, "prompts")
        with self.timer("generate"):
            self.prompts = self.build_prompts(rng)
            params = SamplingParams(
                **{**self.sampling.__dict__, "seed": self.sampling.seed + 1000 * server_round}
            )
            per_prompt = generate_samples(
                self.generator, self.prompts, params, self.j, tokenizer=self.tokenizer
            )
            self.samples = [s for group in per_prompt for s in group]
        with self.timer("embed"):
            self.sample_emb = self.embedder.embed(self.samples)
        self._write_samples(server_round, None)

    def build_prompts(self, rng: np.random.Generator, n: int | None = None) -> list[str]:
        """This round's K (or ``n``) prompts from the public set, as generator and DPO see them."""
        prompts = build_prompts(
            self.public_texts,
            self.k if n is None else n,
            rng,
            shots=self.shots,
            style=self.prompt_style,
            description=str(self.public_set_cfg.get("description") or ""),
        )
        return render_prompts(self.tokenizer, prompts, self.prompt_style)

    def _write_samples(self, server_round: int, scores: np.ndarray | None) -> None:
        rows = (
            {
                "prompt_id": idx // self.j,
                "sample_id": idx,
                "prompt": self.prompts[idx // self.j],
                "text": text,
                "noisy_score": None if scores is None else float(scores[idx]),
            }
            for idx, text in enumerate(self.samples)
        )
        self.run_dir.write_jsonl(self.run_dir.samples_path(server_round), rows)

    # ---------------------------------------------------------------- one round
    def train_payload(self, server_round: int) -> RecordDict:
        """Embeddings (K*J x d float32) or the texts themselves; never model weights."""
        config = ConfigRecord(
            {"method": self.method, "payload": self.payload, "embedder": self.embedder_name}
        )
        if self.payload == "texts":
            config["texts"] = list(self.samples)
            return RecordDict({PAYLOAD_CONFIG: config})
        emb = np.ascontiguousarray(self.sample_emb, dtype=np.float32)
        return RecordDict(
            {PAYLOAD_CONFIG: config, PAYLOAD_ARRAYS: ArrayRecord({"embeddings": Array(emb)})}
        )

    def vector_length(self, server_round: int) -> int:
        return self.k * self.j

    def server_update(self, server_round: int, release: np.ndarray) -> dict[str, Any]:
        """Pairs from the noisy scores, one DPO round, regenerate for the next round."""
        self._write_samples(server_round, release)
        pairs = build_pairs(
            self.prompts, self.samples, release, self.j, self.r, pairing=self.pairing
        )
        self._pairs = pairs
        scored_emb = self.sample_emb
        metrics: dict[str, Any] = {
            "pairs": len(pairs),
            "empty_samples": sum(1 for s in self.samples if not s.strip()),
            "score_gap_mean": float(np.mean(pairs.score_gap)) if len(pairs) else None,
        }
        if self.update == "tilt":
            metrics.update(self._tilt_update(release, server_round))
        else:
            metrics.update(self._dpo_update(pairs, server_round))
        self._scored_emb = scored_emb
        self._regenerate(server_round + 1)
        return metrics

    def _dpo_update(self, pairs: Any, server_round: int) -> dict[str, Any]:
        """One DPO round on this round's pairs (and the replayed ones); its metrics."""
        metrics: dict[str, Any] = {}
        replayed = self.replayed_pairs(server_round)
        if replayed:
            metrics["replay_pairs"] = len(replayed)
        if not (len(pairs) or replayed):
            logger.warning("Round %d: no usable preference pairs; skipping DPO", server_round)
            return metrics
        with self.timer("dpo"):
            dpo = self.dpo.train_round(pairs.as_records() + replayed)
            self._sync_generator()
        metrics.update(
            dpo_loss=dpo.get("loss"),
            dpo_reward_margin=dpo.get("reward_margin"),
            dpo_reward_accuracy=dpo.get("reward_accuracy"),
            dpo_steps=dpo.get("steps"),
        )
        return metrics

    def _tilt_update(self, release: np.ndarray, server_round: int) -> dict[str, Any]:
        """One weighted-likelihood round toward the tilt of the noisy scores; its metrics."""
        records = self.tilt_records(release)
        if not records:  # every kept sample empty: nothing to fit, the round goes on
            logger.warning(
                "Round %d: no non-empty samples to fit; skipping the update", server_round
            )
            return {}
        with self.timer("tilt"):
            fit = self.dpo.train_weighted_round(records)
            self._sync_generator()
        return {"tilt_loss": fit["loss"], "tilt_steps": fit["steps"]}

    def tilt_records(self, release: np.ndarray) -> list[dict[str, Any]]:
        """The round's samples with their tilt weights (``update=tilt``), weight > 0 only."""
        weights = tilt_weights(release, self.j, self.tilt_tau, self.tilt_keep)
        return [
            {"prompt": self.prompts[i // self.j], "completion": text, "weight": float(w)}
            for i, (text, w) in enumerate(zip(self.samples, weights, strict=True))
            if w > 0 and text.strip()
        ]

    def replayed_pairs(self, server_round: int) -> list[dict[str, str]]:
        """The pairs of the ``replay_rounds`` rounds before ``server_round``, as DPO records.

        Rebuilt from the samples files, which hold only what was released (samples and noisy
        scores), so a resumed run replays the same pairs.
        """
        records: list[dict[str, str]] = []
        for past in range(max(1, server_round - self.replay_rounds), server_round):
            rows = self.run_dir.read_jsonl(self.run_dir.samples_path(past))
            records += pairs_from_rows(rows, self.j, self.r, self.pairing).as_records()
        return records

    def evaluate_round(self, server_round: int) -> dict[str, Any]:
        """Diagnostics only: FID and similarity of the samples, pair recovery.

        ``*_scored`` measure the samples the clients just scored (the previous generator's),
        ``*_next`` the fresh samples of the updated one.
        ``similarity_next`` is the fresh samples' mean similarity to held-out private text,
        ``mean_k E_k . mean_j P_j`` (the quantity clients score, so it should rise as POPri
        learns); ``diversity_next`` is the trace of their covariance; FID sees both.

        ``recovery`` is the share of the round's pairs (built from the noisy release) whose
        order the noise-free sum agrees with: ``clean[chosen] > clean[rejected]``. It needs
        the un-noised sum, which only a simulation with diagnostics keeps.
        """
        probe_before = self._probe_emb
        out: dict[str, Any] = self._measure_generator()
        for key in ("fid_probe", "generator_loss"):
            if key in out and key in self._measured_last:
                out[f"{key}_change"] = out[key] - self._measured_last[key]
        self._measured_last = dict(out)
        if probe_before is not None and "fid_probe_change" in out:
            out["fid_probe_change_se"] = self._probe_change(probe_before, server_round)["se"]
            if self._probe_base is None:  # a resumed run: the base probe from checkpoint/
                self._probe_base = self.run_dir.load_array(PROBE_BASE)
            base = self._probe_base
            if base is not None and base.shape == self._probe_emb.shape:
                since = self._probe_change(base, server_round, "probe_bootstrap_base")
                out["fid_probe_vs_base"], out["fid_probe_vs_base_se"] = since["change"], since["se"]
        pairs = getattr(self, "_pairs", None)
        if self._clean_sum is not None and pairs is not None and len(pairs):
            out["recovery"] = pair_recovery(
                self._clean_sum, pairs.chosen_index, pairs.rejected_index
            )
        if self.eval_embeddings is None or len(self.eval_embeddings) < 2:
            return out
        scored = self._distance_to_eval(self._scored_emb)
        nxt = self._distance_to_eval(self.sample_emb)
        return {
            **out,
            "fid_scored": scored["fid"],
            "similarity_scored": scored["similarity"],
            "diversity_scored": scored["diversity"],
            "fid_next": nxt["fid"],
            "similarity_next": nxt["similarity"],
            "diversity_next": nxt["diversity"],
        }

    def _measure_generator(self) -> dict[str, float]:
        """The enabled measures of the generator itself: :meth:`probe`, :meth:`generator_eval`."""
        out: dict[str, float] = {}
        if self.probe_prompts and self.eval_embeddings is not None:
            out.update(self.probe())
        if self._gen_eval is not None:
            out.update(self.generator_eval())
        return out

    def _distance_to_eval(self, emb: np.ndarray) -> dict[str, float]:
        """FID, similarity and diversity of sample embeddings against held-out private text.

        ``similarity`` is ``mean_k E_k . mean_j P_j``, what clients score (it should rise as
        POPri learns); ``diversity`` is the trace of the samples' covariance (it falls if DPO
        collapses the generator onto a few typical texts); FID sees both.
        """
        centroid = self.eval_embeddings.astype(np.float64).mean(axis=0)
        emb64 = emb.astype(np.float64)
        return {
            "fid": fid(emb, self.eval_embeddings),
            "similarity": float(np.mean(emb64 @ centroid)),
            "diversity": float(np.var(emb64, axis=0).sum()),
        }

    def probe(self) -> dict[str, float]:
        """Diagnostics: the current generator on fixed prompts with fixed sampling seeds.

        The round's own samples come from new prompts every round, and the prompts alone move
        their FID by as much as a few DPO rounds do. The probe holds the prompts and the
        per-token random draws fixed (common random numbers), so an unchanged generator writes
        the same texts. It removes the prompts' share of the noise, not FID's sampling noise:
        once a DPO step flips one token of a text, the rest of it is new (measured in the demo:
        one step with a reward margin of 0.0007 moved ``fid_probe`` of 96 texts by 0.02). So
        :meth:`evaluate_round` also reports ``fid_probe_change_se``, the standard error of the
        round's change from a paired bootstrap over the probe prompts
        (:func:`~popri_flwr.evaluation.distribution_metrics.fid_change_bootstrap`): a change
        beyond ~2 SE is the generator's, not the draws'; and ``fid_probe_vs_base`` (with
        ``_se``), the change since the base model's probe (its embeddings of public synthetic
        text are kept in ``checkpoint/``, so a resumed run still has them). For a measure
        without sampling noise see :meth:`generator_eval`. Prompts and seeds are public
        randomness (the config seed); the held-out text is private: a diagnostic.

        Returns
        -------
        dict
            ``fid_probe``, ``similarity_probe``, ``diversity_probe``.
        """
        prompts = self.build_prompts(self.rng_for(0, "probe"), self.probe_prompts)
        params = SamplingParams(**{**self.sampling.__dict__, "seed": self.sampling.seed + 999_983})
        with self.timer("probe"):
            groups = generate_samples(
                self.generator, prompts, params, self.j, tokenizer=self.tokenizer
            )
            emb = self.embedder.embed([s for group in groups for s in group])
        self._probe_emb = emb
        self._probe_groups = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        if not self.dpo.rounds_trained:  # the base model's probe: what later ones are held to
            self._probe_base = emb
            self.run_dir.save_array(PROBE_BASE, emb)
        return {f"{k}_probe": v for k, v in self._distance_to_eval(emb).items()}

    def _probe_change(
        self, before: np.ndarray, server_round: int, purpose: str = "probe_bootstrap"
    ) -> dict[str, float]:
        """FID change from ``before`` to the last probe, with its paired-bootstrap SE."""
        with self.timer("probe"):
            return fid_change_bootstrap(
                before,
                self._probe_emb,
                self.eval_embeddings,
                self._probe_groups,
                draws=PROBE_BOOTSTRAP_DRAWS,
                rng=self.rng_for(server_round, purpose),
            )

    def generator_eval(self) -> dict[str, float]:
        """Diagnostics: the policy's next-token loss and accuracy on held-out private text.

        ``generator_loss`` is the mean cross-entropy (nats per token) of the first
        ``GEN_EVAL_LEN`` tokens of each held-out text, ``generator_top1`` the share predicted
        exactly. No sampling is involved, so it has no sampling noise: if the feedback moves the
        generator toward the private distribution, the loss falls.

        Returns
        -------
        dict
            ``generator_loss``, ``generator_top1``.
        """
        ids, mask = self._gen_eval
        model = getattr(self.generator, "model", None) or self.dpo.model  # merged when there
        with self.timer("generator_eval"):  # float32: bf16 rounding moves it by ~0.3%
            out = evaluate_lm(model, ids, mask, batch_size=16, bf16=False)
        return {"generator_loss": out["loss"], "generator_top1": out["top1"]}

    def final_arrays(self) -> ArrayRecord:
        """The trained LoRA adapter's weights (PEFT names), as released."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.dpo.model)
        return ArrayRecord({k: Array(v.detach().cpu().float().numpy()) for k, v in state.items()})

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, server_round: int) -> dict[str, Any]:
        """Save the adapter + optimizer as ``adapter/`` (the previous one kept until done)."""
        final, old = self.run_dir.path / "adapter", self.run_dir.path / "adapter.old"
        tmp = self.run_dir.path / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.dpo.save(tmp)
        (tmp / "popri_round.json").write_text(json.dumps({"round": server_round}))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return {"adapter_round": server_round}

    def _load_adapter(self, finished_round: int) -> None:
        for name in ("adapter", "adapter.old"):
            path = self.run_dir.path / name
            marker = path / "popri_round.json"
            if marker.exists() and json.loads(marker.read_text())["round"] == finished_round:
                self.dpo.load(path)
                self._sync_generator()
                logger.info("Restored the adapter of round %d from %s", finished_round, path)
                return
        raise RuntimeError(
            f"run_dir: no adapter of round {finished_round} in {self.run_dir.path}; "
            "cannot resume this run"
        )


#: POPri's server updates (``strategy.update``).
UPDATES = ("dpo", "tilt")
#: Tokens of each held-out text the generator's own loss is measured on (BOS included).
GEN_EVAL_LEN = 64
#: The base model's probe embeddings (checkpoint/), for ``fid_probe_vs_base``.
PROBE_BASE = "probe_base_embeddings"
#: Prompt resamples behind ``fid_probe_change_se`` (~0.1 s each for 1,536 x 384 embeddings).
PROBE_BOOTSTRAP_DRAWS = 200


def pair_recovery(clean: np.ndarray, chosen: Any, rejected: Any) -> float:
    """Share of pairs whose order the noise-free scores ``clean`` agree with (ties count 0)."""
    chosen, rejected = np.asarray(chosen, dtype=int), np.asarray(rejected, dtype=int)
    if chosen.size == 0:
        return float("nan")
    return float(np.mean(clean[chosen] > clean[rejected]))


def merged_copy(peft_model: Any) -> Any:
    """A plain model whose weights are base + LoRA delta (the PEFT model is left untouched)."""
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.eval()
    return merged


def _unique_prompts(rows: list[dict[str, Any]], k: int) -> list[str]:
    prompts: list[str] = [""] * k
    for row in rows:
        prompts[int(row["prompt_id"])] = row["prompt"]
    return prompts
