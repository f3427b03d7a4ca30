"""DP-FedAvg: update maths (popri_flwr.algorithms.fedavg_update), the client handler and the
strategy.

The downstream LM is a real GPT-2 at tiny size (1 layer, width 32, 24 tokens) with the SmolLM2
tokenizer; clients are 6 SOTU speeches. The strategy runs through the shared FakeGrid with the
real client handler, and once end to end on Flower's simulation engine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch
from fakegrid import FakeGrid, set_task_identity
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import clip_inputs_inplace
from tiny_run import at_sample_rate

from popri_flwr.algorithms.fedavg_update import (
    FedAvgConfig,
    build_fedavg_model,
    expected_clients,
    flatten_params,
    frozen_fingerprint,
    local_train,
    noise_to_signal,
    param_arrays,
    server_step,
    unflatten_params,
)
from popri_flwr.client_apps.local_training import train_update
from popri_flwr.client_apps.resources import NodeData, client_texts
from popri_flwr.config import ConfigError
from popri_flwr.data import load_federation
from popri_flwr.evaluation.downstream import load_tokenizer
from popri_flwr.hydra_config import load_config
from popri_flwr.privacy.accounting import PrivacyAccountant, compute_epsilon
from popri_flwr.privacy.clipping import clip_to_norm
from popri_flwr.privacy.diagnostics import read_diagnostics
from popri_flwr.protocol import REPLY_ARRAYS, REPLY_VECTOR
from popri_flwr.run_dir import RunDirectory
from popri_flwr.strategies.dp_fedavg import DPFedAvgStrategy, evaluate_run_dir
from popri_flwr.strategies.factory import build_strategy, make_accountant


def num_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


TINY = [
    "strategy=dp_fedavg",
    "data.max_clients=6",
    "data.max_texts_per_client=8",
    "downstream.n_layer=1",
    "downstream.n_head=2",
    "downstream.n_embd=32",
    "downstream.seq_len=24",
    "downstream.batch_size=8",
    "strategy.fedavg.local_steps=2",
    "strategy.fedavg.local_batch_size=4",
    "evaluation.max_eval_texts=8",
    "privacy.noise_multiplier=2.0",
    "privacy.epsilon=100",
    "privacy.sample_rate=0.5",
]


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


@pytest.fixture(scope="module")
def cfg():
    return load_config([*TINY, "rounds=2"])


@pytest.fixture(scope="module")
def tokenizer(cfg):
    return load_tokenizer(cfg.downstream)


@pytest.fixture(scope="module")
def federation(cfg):
    return load_federation(cfg.data)


def _model(cfg, tokenizer, **extra):
    return build_fedavg_model(cfg.downstream, tokenizer, FedAvgConfig(**extra))


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_flatten_unflatten_round_trip(cfg, tokenizer, mode):
    model = _model(cfg, tokenizer, train_mode=mode, lora_r=2)
    vec = flatten_params(model)
    assert vec.dtype == np.float32 and vec.size == num_trainable(model)
    # The vector is the named arrays concatenated in order (what the payload carries).
    np.testing.assert_array_equal(
        np.concatenate([a.ravel() for a in param_arrays(model).values()]), vec
    )
    ids = torch.tensor([[1, 5, 9, 13]])
    before = model(input_ids=ids).logits.detach().clone()
    new = np.random.default_rng(0).normal(0, 0.1, vec.size).astype(np.float32)
    unflatten_params(model, new)
    np.testing.assert_array_equal(flatten_params(model), new)
    assert not torch.allclose(model(input_ids=ids).logits, before)  # really written
    unflatten_params(model, vec)
    np.testing.assert_array_equal(flatten_params(model), vec)
    assert torch.allclose(model(input_ids=ids).logits, before)
    with pytest.raises(ValueError, match="does not match"):
        unflatten_params(model, vec[:-1])


def test_lora_vector_is_small_and_bases_agree(cfg, tokenizer):
    full, lora = _model(cfg, tokenizer), _model(cfg, tokenizer, train_mode="lora", lora_r=2)
    again = _model(cfg, tokenizer, train_mode="lora", lora_r=2)
    assert num_trainable(lora) < num_trainable(full) / 100
    # Two processes building the model get the same frozen base (seeded build).
    assert frozen_fingerprint(lora) == frozen_fingerprint(again)
    np.testing.assert_array_equal(flatten_params(lora), flatten_params(again))
    unflatten_params(again, flatten_params(again) + 1.0)  # adapter only: base unchanged
    assert frozen_fingerprint(lora) == frozen_fingerprint(again)
    other = build_fedavg_model(
        type(cfg.downstream)(**{**vars(cfg.downstream), "seed": 1}),
        tokenizer,
        FedAvgConfig(train_mode="lora", lora_r=2),
    )
    assert frozen_fingerprint(other) != frozen_fingerprint(lora)


# --------------------------------------------------------------------------- clipping
def test_clip_to_norm_bound_and_agreement_with_flower():
    rng = np.random.default_rng(1)
    for c in (1e-3, 0.37, 1.0, 5.0):
        big = rng.normal(0, 1e4, 1000)
        out = clip_to_norm(big, c)
        norm = float(np.linalg.norm(out.astype(np.float64)))
        assert out.dtype == np.float32 and norm <= c and norm == pytest.approx(c, rel=1e-5)
        np.testing.assert_allclose(out / norm, big / np.linalg.norm(big), rtol=1e-4, atol=1e-7)
        # Flower's FlatClip on the same update split into "tensors" gives the same vector.
        parts = [big[:300].copy(), big[300:].copy()]
        clip_inputs_inplace(parts, c)
        np.testing.assert_allclose(out, np.concatenate(parts), rtol=1e-5, atol=1e-9)
    small = rng.normal(0, 1e-3, 50).astype(np.float32)
    np.testing.assert_array_equal(clip_to_norm(small, 1.0), small)  # inside the ball: as is
    assert not clip_to_norm(np.zeros(7), 1.0).any()  # zero update (Flower's divides by 0)
    with pytest.raises(ValueError, match="privacy.clip_norm"):
        clip_to_norm(small, 0.0)


def test_local_training_under_bf16_autocast_stays_close_to_float32(cfg, tokenizer, federation):
    # The same seeded local steps in float32 and under bf16 autocast: the update stays a float32
    # vector, is not bit-identical (autocast is really on), and points the same way.
    texts = federation.train_texts(federation.client_ids[0])
    kw = dict(steps=2, lr=0.5, batch_size=4, seq_len=24, seed=0)
    fp32 = local_train(_model(cfg, tokenizer), texts, tokenizer, **kw)
    bf16 = local_train(_model(cfg, tokenizer), texts, tokenizer, bf16=True, **kw)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(bf16, fp32)
    cosine = float(bf16 @ fp32 / (np.linalg.norm(bf16) * np.linalg.norm(fp32)))
    assert cosine > 0.99, cosine
    assert np.linalg.norm(bf16) == pytest.approx(np.linalg.norm(fp32), rel=0.02)


def test_handler_output_never_exceeds_c(cfg, tokenizer, federation):
    """A huge local step: the raw update is far outside the ball, the reply is on it."""
    model = _model(cfg, tokenizer)
    texts = federation.train_texts(federation.client_ids[0])
    raw = local_train(model, texts, tokenizer, steps=2, lr=50.0, batch_size=4, seq_len=24, seed=0)
    assert np.linalg.norm(raw) > 100
    strategy_model = _model(cfg, tokenizer)
    vec_len = num_trainable(strategy_model)
    for c in (1e-3, 1.0):
        config = {
            "method": "dp_fedavg",
            "train-mode": "full",
            "lora-r": 8,
            "lora-alpha": 16.0,
            "local-steps": 2,
            "local-lr": 50.0,
            "local-batch-size": 4,
            "local-optimizer": "sgd",
            "seq-len": 24,
            "seed": 0,
            "base-fingerprint": frozen_fingerprint(strategy_model),
            "server-round": 1,
            "clip-norm": c,
            "vector-length": vec_len,
            "downstream": json.dumps(dataclasses.asdict(cfg.downstream)),
        }
        arrays = {k: Array(v) for k, v in param_arrays(strategy_model).items()}
        msg = Message(
            RecordDict({"config": ConfigRecord(config), "payload": ArrayRecord(arrays)}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        out = train_update(msg, NodeData("node-0", client_texts(cfg.data, 0)))
        norm = float(np.linalg.norm(out.astype(np.float64)))
        assert out.shape == (vec_len,) and norm <= c and norm == pytest.approx(c, rel=1e-5)


# --------------------------------------------------------------------------- server step
def test_server_step_is_release_over_q_n():
    rng = np.random.default_rng(2)
    w = rng.normal(size=100).astype(np.float32)
    release = rng.normal(size=100)
    n_exp = expected_clients(0.1, 237)
    assert n_exp == pytest.approx(23.7)
    new = server_step(w, release, 0.5, n_exp)
    np.testing.assert_allclose(new, w + 0.5 * release / 23.7, rtol=1e-6, atol=1e-7)
    assert new.dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        server_step(w, release[:-1], 1.0, n_exp)
    with pytest.raises(ValueError, match="sample_rate"):
        expected_clients(0.0, 10)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("local_steps=0", "local_steps"),
        ("local_steps=2.5", "local_steps"),
        ("local_lr=0", "local_lr"),
        ("local_lr=-1e-3", "local_lr"),
        ("server_lr=fast", "server_lr"),
        ("local_batch_size=0", "local_batch_size"),
        ("local_epochs=0", "local_epochs"),
        ("train_mode=adapter", "train_mode"),
        ("local_optimizer=lbfgs", "local_optimizer"),
        ("lora_r=0", "lora_r"),
        ("+strategy.fedavg.local_step=3", "local_step"),  # typo: unknown key
    ],
)
def test_bad_fedavg_config_names_its_key(override, key):
    arg = override if override.startswith("+") else f"strategy.fedavg.{override}"
    with pytest.raises(ConfigError, match=rf"^strategy\.fedavg\.{key}:"):
        load_config(["strategy=dp_fedavg", arg])


def test_config_errors_at_load_time():
    with pytest.raises(ConfigError, match=r"^privacy\.clip_norm:"):
        load_config(["strategy=dp_fedavg", "privacy.clip_norm=0"])
    cfg = load_config(["strategy=dp_fedavg"])  # the shipped defaults are valid
    assert cfg.strategy.fedavg.local_steps >= 1


def test_same_accountant_for_every_method():
    common = ["privacy.noise_multiplier=1.3", "privacy.epsilon=10", "privacy.sample_rate=0.1"]
    accs = {
        m: make_accountant(load_config([f"strategy={m}", "rounds=7", *common]))
        for m in ("dp_fedavg", "pe", "popri")
    }
    eps = {m: a.epsilon_after(7) for m, a in accs.items()}
    assert {(a.noise_multiplier, a.sample_rate, a.delta) for a in accs.values()} == {
        (1.3, 0.1, 1e-5)
    }
    assert eps["dp_fedavg"] == eps["pe"] == eps["popri"]
    assert eps["dp_fedavg"] == pytest.approx(compute_epsilon(1.3, 0.1, 7, 1e-5))


# --------------------------------------------------------------------------- the strategy
def test_noise_to_signal_is_the_measured_noise_norm_over_c():
    """sigma sqrt(d) / (q N) is the norm of one round's noisy average over C, measured."""
    sigma, c, q_n, d = 1.4, 0.7, 23.7, 40_000
    rng = np.random.default_rng(0)  # public test randomness, not a mechanism's
    average = rng.normal(0.0, sigma * c, size=d) / q_n
    assert noise_to_signal(sigma, d, q_n) == pytest.approx(np.linalg.norm(average) / c, rel=0.02)
    assert noise_to_signal(0.0, d, q_n) == 0.0
    with pytest.raises(ValueError, match="num_expected"):
        noise_to_signal(sigma, d, 0.0)


def test_noise_has_the_calibrated_spread(tmp_path, cfg, tokenizer, caplog):
    """Nobody answers: the release is pure N(0, (sigma C)^2) and the step its (q N)-th part."""
    sigma, c, q, n = 2.0, 0.5, 0.25, 8
    acc = PrivacyAccountant(noise_multiplier=sigma, sample_rate=q, delta=1e-5, target_epsilon=1e9)
    model = _model(cfg, tokenizer)
    strategy = DPFedAvgStrategy(
        model=model,
        tokenizer=tokenizer,
        fedavg=FedAvgConfig(server_lr=0.5),
        downstream=cfg.downstream,
        accountant=acc,
        clip_norm=c,
        num_clients=n,
        run_dir=RunDirectory(tmp_path),
        node_wait_timeout=5,
        min_reply_fraction=0.0,  # release the noise alone
    )
    w0 = strategy.global_vector.copy()
    with caplog.at_level(logging.WARNING, logger="popri_flwr.strategies.dp_fedavg"):
        strategy.start(grid=FakeGrid({i: (lambda m: None) for i in range(1, n + 1)}), num_rounds=1)
    # sigma sqrt(d) / (q N) = 2 sqrt(d) / 2: hundreds of times the signal, and it says so.
    (warning,) = [r for r in caplog.records if "noise has" in r.getMessage()]
    assert f"~{np.sqrt(w0.size):.0f}x" in warning.getMessage()
    release = RunDirectory(tmp_path).load_array("release_round_001")
    assert release.size == w0.size > 100_000
    assert release.std() == pytest.approx(sigma * c, rel=0.01)
    step = strategy.global_vector.astype(np.float64) - w0
    assert step.std() == pytest.approx(0.5 * sigma * c / (q * n), rel=0.01)
    (rec,) = RunDirectory(tmp_path).read_rounds()
    assert rec["epsilon_spent"] == pytest.approx(compute_epsilon(sigma, q, 1, 1e-5))
    assert rec["noise_std_per_param"] == pytest.approx(0.5 * sigma * c / (q * n))
    assert rec["noise_to_signal"] == pytest.approx(sigma * np.sqrt(w0.size) / (q * n))


def _real_clients(cfg, n):
    """FakeGrid nodes that run the real client handler (node i = partition i - 1)."""

    def client(pid):
        def behave(msg):
            vec = train_update(msg, NodeData(f"node-{pid}", client_texts(cfg.data, pid)))
            return Message(
                RecordDict({REPLY_ARRAYS: ArrayRecord({REPLY_VECTOR: Array(vec)})}),
                reply_to=msg,
            )

        return behave

    return {i + 1: client(i) for i in range(n)}


def _every_client_sampled() -> list[str]:
    """TINY at q = 1: at q = 0.5 a round of 6 clients samples none with probability 1/64."""
    return at_sample_rate(TINY, 1.0)


def test_rounds_with_real_clients_resume_and_evaluate(tmp_path, cfg, federation):
    run = tmp_path / "run"
    overrides = [*_every_client_sampled(), f"run_dir={run}"]
    grid = FakeGrid(_real_clients(cfg, 6))
    s1 = build_strategy(load_config([*overrides, "rounds=1"]), federation)
    w0 = s1.global_vector.copy()
    s1.start(grid=grid, num_rounds=1)
    d = w0.size
    (rec,) = RunDirectory(run).read_rounds()
    (diag,) = [r for r in read_diagnostics(run) if "round" in r]
    assert diag["clients_accepted"] == diag["clients_sampled"] >= 1
    assert diag["clients_rejected"] == 0
    assert rec["bytes_down"] >= 4 * d and diag["bytes_up"] >= 4 * d
    assert 0 <= diag["accuracy"] <= 1 and diag["eval_tokens"] > 0
    assert "accuracy" not in rec  # accuracy on held-out private text is a diagnostic
    assert rec["update_norm"] > 0
    # Resume: a new strategy on the same directory starts from round 1's model.
    s2 = build_strategy(load_config([*overrides, "rounds=2"]), federation)
    s2.start(grid=grid, num_rounds=2)
    rounds = RunDirectory(run).read_rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["epsilon_spent"] == pytest.approx(compute_epsilon(2.0, 1.0, 2, 1e-5))
    diags = [r for r in read_diagnostics(run) if "round" in r]
    assert not np.array_equal(s2.global_vector, w0)
    assert sorted(p.name for p in (run / "checkpoint").glob("global_round_*.npz")) == [
        "global_round_001.npz",
        "global_round_002.npz",
    ]
    assert not (run / "checkpoint" / "release_round_001.npy").exists()  # folded into the model
    # The exported model and the run-dir evaluation agree with the round diagnostics.
    summary = [r["final_model"] for r in read_diagnostics(run) if "final_model" in r][-1]
    assert summary["final_top1"] == pytest.approx(diags[1]["accuracy"])
    ev = evaluate_run_dir(run, s2.eval_texts)
    assert ev["model_round"] == 2 and ev["accuracy"] == pytest.approx(diags[1]["accuracy"])
    assert (run / "final_model" / "config.json").exists()


def test_lora_round_sends_only_the_adapter(tmp_path, cfg, federation):
    run = tmp_path / "lora"
    s = build_strategy(
        load_config(
            [*_every_client_sampled(), "strategy.fedavg.train_mode=lora", "rounds=1"]
            + [f"run_dir={run}"]
        ),
        federation,
    )
    w0 = s.global_vector.copy()
    s.start(grid=FakeGrid(_real_clients(cfg, 6)), num_rounds=1)
    (rec,) = [r for r in read_diagnostics(run) if "round" in r]
    assert rec["clients_accepted"] == rec["clients_sampled"] >= 1
    (rec,) = RunDirectory(run).read_rounds()
    assert rec["num_params"] == w0.size < 20_000
    assert 4 * w0.size <= rec["bytes_down"] < 8 * w0.size + 4096  # adapter + config only
    assert not np.array_equal(s.global_vector, w0)
    # The exported model is the merged base + adapter: same predictions as the PEFT model.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "final_model")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, s.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )


# --------------------------------------------------------------------------- end to end
def test_end_to_end_flower_simulation(tmp_path):
    from popri_flwr.simulation import run_simulation

    run = tmp_path / "sim"
    cfg = load_config(
        [
            *TINY,
            "rounds=2",
            f"run_dir={run}",
            "evaluation.report_client_seconds=true",
            "simulation.client_num_cpus=2",
        ]
    )
    run_simulation(cfg)
    released = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    diags = [r for r in read_diagnostics(run) if "round" in r]
    rounds = [{**d, **r} for d, r in zip(diags, released, strict=True)]
    assert [r["round"] for r in rounds] == [1, 2]
    for k, r in enumerate(rounds, start=1):
        assert r["epsilon_spent"] == pytest.approx(compute_epsilon(2.0, 0.5, k, 1e-5))
        assert r["clients_accepted"] == r["clients_sampled"] and r["clients_failed"] == 0
        if r["clients_sampled"]:
            assert r["bytes_up"] >= 4 * r["num_params"] and r["client_seconds"] > 0
        assert r["bytes_down"] >= 4 * r["num_params"]
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["eval_loss"])
    assert (run / "final_model" / "config.json").exists()
    final = [r["final_model"] for r in read_diagnostics(run) if "final_model" in r]
    assert final[-1]["round"] == 2
