"""PopriStrategy on its own, driven by the fake grid, with the real models at tiny size.

SmolLM2-135M generates (2 prompts x 3 samples, 8 new tokens), MiniLM embeds, TRL runs one DPO
step. The clients are the package's own ClientApp handler on SOTU clients. What is checked:
a client's reply carries nothing but its clipped vector, the pairs follow the *noisy* sum
(not the clean one, not its negation), and the released files hold the noisy scores.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from fakegrid import FakeGrid, set_task_identity
from flwr.app import Context, Message, RecordDict

from popri_flwr.algorithms.preference import pairs_from_rows
from popri_flwr.algorithms.prompts import chat_prompt
from popri_flwr.algorithms.tilt import tilt_weights
from popri_flwr.client_apps.app import make_client_app
from popri_flwr.hydra_config import load_config
from popri_flwr.models.dpo import DPOStep, DPOStepConfig
from popri_flwr.models.embedding import get_embedder
from popri_flwr.models.generation import SamplingParams, TransformersGenerator
from popri_flwr.models.loading import load_causal_lm
from popri_flwr.privacy.accounting import PrivacyAccountant
from popri_flwr.privacy.clipping import l2_norm
from popri_flwr.privacy.diagnostics import read_diagnostics
from popri_flwr.protocol import REPLY_ARRAYS, REPLY_VECTOR
from popri_flwr.run_dir import RunDirectory
from popri_flwr.strategies import popri as popri_module
from popri_flwr.strategies.popri import GEN_EVAL_LEN, PopriStrategy

K, J, R, N = 2, 3, 1, 4
PUBLIC = [
    "The state of the Union is strong, and our economy keeps growing.",
    "We must invest in our schools, our roads and our ports.",
    "Our armed forces stand ready to defend the nation.",
]


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


@pytest.fixture(scope="module")
def cfg():
    return load_config(
        [
            "experiment=demo",
            f"data.max_clients={N}",
            "data.max_texts_per_client=4",
            "evaluation.report_client_seconds=false",
        ]
    )


def _client_grid(cfg) -> FakeGrid:
    """N nodes, each running the package's ClientApp for its own SOTU client."""
    app = make_client_app(config=cfg)

    def node(partition: int):
        context = Context(
            run_id=1,
            node_id=partition + 1,
            node_config={"partition-id": partition, "num-partitions": N},
            state=RecordDict(),
            run_config={},
        )
        return lambda msg: app(msg, context)

    return FakeGrid({i + 1: node(i) for i in range(N)})


def _strategy(
    tmp_path, sigma: float, monkeypatch, prompt_style: str = "list", **extra
) -> tuple[PopriStrategy, list]:
    cache = os.environ.get("POPRI_CACHE")
    model, tok = load_causal_lm(device="cpu", cache_dir=cache)
    dpo = DPOStep(
        model,
        tok,
        DPOStepConfig(
            beta=0.1,
            learning_rate=1e-3,
            warmup_steps=0,
            per_device_batch_size=2,
            gradient_accumulation_steps=1,
            max_steps_per_round=1,
            device="cpu",
        ),
    )
    public = tmp_path / "public.jsonl"
    RunDirectory(tmp_path).write_jsonl(public, [{"text": t} for t in PUBLIC])
    strategy = PopriStrategy(
        generator=TransformersGenerator(dpo.model, tok, batch_size=K * J, progress=False),
        tokenizer=tok,
        dpo=dpo,
        embedder=get_embedder("packaged:all-minilm-l6-v2", "cpu"),
        public_set={"description": "a paragraph", "size": 3, "path": str(public)},
        num_prompts=K,
        samples_per_prompt=J,
        reject_rank=R,
        shots=1,
        prompt_style=prompt_style,
        sampling=SamplingParams(max_new_tokens=8, truncate_tokens=8, seed=0),
        embedder_name="packaged:all-minilm-l6-v2",
        accountant=PrivacyAccountant(
            noise_multiplier=sigma,
            sample_rate=1.0,
            delta=1e-5,
            target_epsilon=math.inf if sigma == 0 else 1e9,
        ),
        clip_norm=1.0,
        num_clients=N,
        run_dir=RunDirectory(tmp_path / "run"),
        diagnostics=True,
        **extra,
    )
    seen: list = []
    monkeypatch.setattr(popri_module, "build_pairs", _keep(popri_module.build_pairs, seen))
    return strategy, seen


def _keep(real, seen):
    """The real ``build_pairs``, recording its scores and pairs (a spy, not a stand-in)."""

    def spy(prompts, samples, scores, j, r, **kw):
        pairs = real(prompts, samples, scores, j, r, **kw)
        seen.append((np.asarray(scores, dtype=np.float64).copy(), pairs))
        return pairs

    return spy


def test_a_client_reply_is_only_the_clipped_vector(cfg, tmp_path, monkeypatch):
    strategy, _ = _strategy(tmp_path, 0.0, monkeypatch)
    grid = _client_grid(cfg)
    strategy.prepare(0)
    (msg,) = strategy.configure_train(1, None, None, grid)[:1]
    reply: Message = grid.behaviours[msg.metadata.dst_node_id](msg)
    assert set(reply.content.keys()) == {REPLY_ARRAYS}  # no metrics, no counts, no timings
    arrays = reply.content[REPLY_ARRAYS]
    assert list(arrays.keys()) == [REPLY_VECTOR]
    (vector,) = arrays[REPLY_VECTOR].numpy()  # one row: the node serves one client
    assert vector.shape == (K * J,) and vector.dtype == np.float32
    assert l2_norm(vector) <= 1.0 and l2_norm(vector) > 0.99  # z-scored, then clipped to C


@pytest.mark.parametrize("sigma", [0.0, 3.0])
def test_pairs_follow_the_noisy_sum(cfg, tmp_path, monkeypatch, sigma):
    torch.set_num_threads(1)
    strategy, seen = _strategy(tmp_path, sigma, monkeypatch)
    grid = _client_grid(cfg)
    strategy.start(grid=grid, num_rounds=1)
    (scores, pairs) = seen[0]
    release = np.load(tmp_path / "run" / "checkpoint" / "release_round_001.npy")
    np.testing.assert_array_equal(scores, release)  # pairs were built from the release
    by_prompt = release.reshape(K, J)
    for chosen, rejected in zip(pairs.chosen_index, pairs.rejected_index, strict=True):
        p = chosen // J
        assert rejected // J == p
        assert release[chosen] == by_prompt[p].max()  # best under the noisy sum
        assert release[rejected] == np.sort(by_prompt[p])[::-1][R]  # rank r, descending
    # The released samples carry the same noisy scores.
    rows = RunDirectory(tmp_path / "run").read_jsonl(tmp_path / "run" / "samples/round_001.jsonl")
    np.testing.assert_allclose([r["noisy_score"] for r in rows], release)
    if sigma == 0:  # no noise: the release is the clean sum of the clients' vectors
        clean = np.zeros(K * J)
        for m in grid.messages[0]:
            reply = grid.behaviours[m.metadata.dst_node_id](m)
            clean += reply.content[REPLY_ARRAYS][REPLY_VECTOR].numpy().sum(0, dtype=np.float64)
        np.testing.assert_allclose(release, clean, atol=1e-6)
        # Without noise every pair keeps its order under the clean sum (diagnostic).
        (diag,) = read_diagnostics(tmp_path / "run")
        assert diag["recovery"] == 1.0
    else:
        assert strategy.differentially_private
        assert np.abs(release).max() > 1.5  # N(0, 9) noise on 6 entries, far beyond |sum| <= 4


def test_replayed_pairs_are_the_earlier_rounds_released_pairs(cfg, tmp_path, monkeypatch):
    # strategy.replay_rounds=1: round 2's DPO data is round 2's pairs plus round 1's, which the
    # strategy rebuilds from round 1's released samples file (noisy scores, sigma 3); with
    # strategy.pairing=all both are every pair of a prompt's samples, J(J-1)/2 per prompt.
    torch.set_num_threads(1)
    strategy, seen = _strategy(tmp_path, 3.0, monkeypatch, replay_rounds=1, pairing="all")
    trained, real = [], strategy.dpo.train_round

    def train_round(records):  # a spy: records what DPO gets, then trains for real
        trained.append(list(records))
        return real(records)

    monkeypatch.setattr(strategy.dpo, "train_round", train_round)
    strategy.start(grid=_client_grid(cfg), num_rounds=2)
    (release1, round1), (_, round2) = seen
    assert len(round1) == K * J * (J - 1) // 2 and len(trained) == 2
    assert all(release1[round1.chosen_index] > release1[round1.rejected_index])
    assert trained[0] == round1.as_records()
    assert trained[1] == round2.as_records() + round1.as_records()
    rows = strategy.run_dir.read_jsonl(strategy.run_dir.samples_path(2))
    assert strategy.replayed_pairs(3) == pairs_from_rows(rows, J, R, "all").as_records()


def test_tilt_update_fits_the_weighted_samples_instead_of_dpo(cfg, tmp_path, monkeypatch):
    # strategy.update=tilt: the adapter is fitted to each prompt's best samples under the noisy
    # sum, weighted by softmax(zscore(release) / tau); no DPO round runs.
    torch.set_num_threads(1)
    strategy, _ = _strategy(tmp_path, 3.0, monkeypatch, update="tilt", tilt_tau=0.5, tilt_keep=2)
    fitted, real = [], strategy.dpo.train_weighted_round

    def train_weighted_round(records):  # a spy: records what the fit gets, then trains
        fitted.append(list(records))
        return real(records)

    monkeypatch.setattr(strategy.dpo, "train_weighted_round", train_weighted_round)
    monkeypatch.setattr(strategy.dpo, "train_round", lambda r: pytest.fail("DPO ran"))
    strategy.start(grid=_client_grid(cfg), num_rounds=1)
    release = np.load(tmp_path / "run" / "checkpoint" / "release_round_001.npy")
    rows = RunDirectory(tmp_path / "run").read_jsonl(tmp_path / "run" / "samples/round_001.jsonl")
    weights = tilt_weights(release, J, 0.5, 2)
    expected = [
        {"prompt": row["prompt"], "completion": row["text"], "weight": float(w)}
        for row, w in zip(rows, weights, strict=True)
        if w > 0 and row["text"].strip()
    ]
    assert fitted == [expected] and len(expected) <= K * 2
    for k in range(K):  # each prompt's best sample under the noisy sum weighs the most
        best = k * J + int(np.argmax(release[k * J : (k + 1) * J]))
        assert weights[best] == weights[k * J : (k + 1) * J].max() > 0.5
    (record,) = RunDirectory(tmp_path / "run").read_rounds()
    assert record["tilt_steps"] == 1 and record["tilt_loss"] > 0
    assert "tilt" in record["seconds"] and "dpo" not in record["seconds"]
    assert strategy.dpo.rounds_trained == 1
    # Every kept sample empty: the round goes on without an update (as DPO without pairs).
    strategy.samples = [""] * (K * J)
    assert strategy._tilt_update(release, 2) == {} and strategy.dpo.rounds_trained == 1
    with pytest.raises(ValueError, match="^strategy.update: expected one of"):
        _strategy(tmp_path / "bad", 0.0, monkeypatch, update="sft")
    with pytest.raises(ValueError, match="^strategy.replay_rounds: only with strategy.update=dpo"):
        _strategy(tmp_path / "bad2", 0.0, monkeypatch, update="tilt", replay_rounds=1)


def test_chat_prompts_are_what_the_generator_and_dpo_both_see(cfg, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    strategy, seen = _strategy(tmp_path, 0.0, monkeypatch, prompt_style="chat")
    strategy.start(grid=_client_grid(cfg), num_rounds=1)
    (_, pairs) = seen[0]
    assert len(pairs) == K
    tok = strategy.tokenizer
    for prompt in pairs.prompts:  # the templated instruction over one public example
        (example,) = [t for t in PUBLIC if t in prompt]
        message = chat_prompt([example], "a paragraph")
        assert prompt == tok.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    # The replies were sampled from those prompts: the samples are the assistant's text.
    rows = RunDirectory(tmp_path / "run").read_jsonl(tmp_path / "run" / "samples/round_001.jsonl")
    assert len(rows) == K * J and any(r["text"].strip() for r in rows)
    assert not any("<|im_start|>" in r["text"] for r in rows)
    with pytest.raises(ValueError, match="^strategy.prompt_style: expected one of"):
        _strategy(tmp_path / "bad", 0.0, monkeypatch, prompt_style="instruct")


def test_probe_and_generator_eval_measure_the_generator_alone(cfg, tmp_path, monkeypatch):
    """Common random numbers for the probe; a deterministic held-out loss for the generator."""
    torch.set_num_threads(1)
    held_out_texts = [f"Paragraph {i} of a private speech about taxes and jobs." for i in range(8)]
    held_out = get_embedder("packaged:all-minilm-l6-v2", "cpu").embed(held_out_texts)
    strategy, _ = _strategy(
        tmp_path,
        0.0,
        monkeypatch,
        eval_embeddings=held_out,
        probe_prompts=K + 1,
        generator_eval_texts=held_out_texts[:3],
    )
    # The loss by hand, from transformers' own shifted cross-entropy, on the base model.
    model, tok = strategy.dpo.model, strategy.tokenizer
    total = count = 0.0
    with torch.no_grad():
        for text in held_out_texts[:3]:
            seq = [tok.bos_token_id, *tok(text)["input_ids"], tok.eos_token_id]
            ids = torch.tensor([seq[:GEN_EVAL_LEN]])
            n = ids.shape[1] - 1
            total += model(input_ids=ids, labels=ids).loss.float().item() * n
            count += n
    base_loss = strategy.generator_eval()["generator_loss"]
    assert base_loss == pytest.approx(total / count, rel=1e-5)

    calls: list = []
    real_generate = popri_module.generate_samples

    def generate_spy(generator, prompts, params, j, **kw):  # records, then runs the real one
        calls.append((list(prompts), params.seed))
        return real_generate(generator, prompts, params, j, **kw)

    monkeypatch.setattr(popri_module, "generate_samples", generate_spy)
    probes: list = []
    real_probe = strategy.probe
    strategy.probe = lambda: probes.append(real_probe()) or probes[-1]
    strategy.start(grid=_client_grid(cfg), num_rounds=1)
    # prepare: probe of the base model, round 1's samples; after DPO: round 2's, probe again.
    assert len(calls) == 4 and len(probes) == 2
    (before, seed_before), round1, round2, (after, seed_after) = calls
    assert before == after and seed_before == seed_after  # same prompts, same random draws
    assert len(before) == K + 1  # more probe prompts than the round has
    assert seed_before not in (round1[1], round2[1])  # not the round's own samples
    (diag,) = read_diagnostics(tmp_path / "run")
    assert diag["fid_probe"] == probes[1]["fid_probe"] > 0
    assert diag["fid_probe_change"] == pytest.approx(
        probes[1]["fid_probe"] - probes[0]["fid_probe"]
    )
    assert {"similarity_probe", "diversity_probe", "generator_top1"} <= diag.keys()
    # The change's standard error: a paired bootstrap over the probe prompts of both probes.
    assert 0 < diag["fid_probe_change_se"] < 10 * abs(diag["fid_probe_change"]) + 1
    # Since the base model's probe (kept in checkpoint/): after one round, the same change.
    assert diag["fid_probe_vs_base"] == pytest.approx(diag["fid_probe_change"], rel=1e-6)
    assert diag["fid_probe_vs_base_se"] > 0
    assert (tmp_path / "run" / "checkpoint" / "probe_base_embeddings.npy").exists()
    assert real_probe() == probes[1]  # the same generator writes the same texts
    # One DPO step moved the policy, and the change is measured from the base model's loss.
    assert diag["generator_loss"] != base_loss
    assert diag["generator_loss_change"] == pytest.approx(diag["generator_loss"] - base_loss)
    assert strategy.generator_eval()["generator_loss"] == diag["generator_loss"]
    # Timed on held-out private text: its seconds are a diagnostic, not in the release.
    (record,) = RunDirectory(tmp_path / "run").read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert "generator_eval" in diag["seconds"] and "dpo" in record["seconds"]
    assert not {"generator_eval", "probe", "evaluate"} & record["seconds"].keys()
    with pytest.raises(ValueError, match="^evaluation.probe_prompts: must be >= 0"):
        _strategy(tmp_path / "bad", 0.0, monkeypatch, probe_prompts=-1)


def test_pair_recovery_counts_pairs_the_clean_sum_agrees_with():
    from popri_flwr.strategies.popri import pair_recovery

    clean = np.array([3.0, 1.0, 2.0, 2.0])
    assert pair_recovery(clean, [0, 2, 1], [1, 1, 0]) == pytest.approx(2 / 3)
    assert pair_recovery(clean, [2], [3]) == 0.0  # a tie is not a recovered order
