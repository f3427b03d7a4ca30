"""Tests for popri_flwr.models.dpo: the server's DPO step on the real default generator (tiny
sizes).

One module fixture trains two rounds (one optimizer step each, 4 pairs) and records what the
individual tests check, so the expensive part runs once.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from popri_flwr.models.dpo import DPOStep, DPOStepConfig
from popri_flwr.models.loading import load_causal_lm

BETA, PEAK_LR = 0.1, 1e-3


def _prompt(a: str, b: str, c: str) -> str:
    # POPri's few-shot completion prompt, with short public texts.
    return (
        "List of 6 diverse original text samples:\n"
        f"Original Text Sample 1\n{a}\n"
        f"Original Text Sample 2\n{b}\n"
        f"Original Text Sample 3\n{c}\n"
        "Original Text Sample 4\n"
    )


P1 = _prompt("The economy grew this year.", "We must keep our nation at peace.", "Taxes were cut.")
P2 = _prompt("Our schools need support.", "The army was reduced.", "Trade with Europe expanded.")
# chosen: address-like prose; rejected: spam / noise.
PAIRS = [
    {
        "prompt": P1,
        "chosen": "Our union is strong and our people are free.",
        "rejected": "Click here to buy cheap watches now!!!",
    },
    {
        "prompt": P1,
        "chosen": "Congress should pass the budget this session.",
        "rejected": "lol idk what to say here tbh",
    },
    {
        "prompt": P2,
        "chosen": "We will invest in roads, ports and canals.",
        "rejected": "banana pizza keyboard purple seven",
    },
    {
        "prompt": P2,
        "chosen": "The treasury reports a surplus for the year.",
        "rejected": "zzz zzz zzz zzz zzz zzz",
    },
]
PROBE = "The President addressed the Congress on the state of the union."


def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("POPRI_CACHE")
    return Path(env) if env else tmp_path_factory.getbasetemp() / "popri_cache"


def _completion_token_logps(model, tok, prompt: str, completion: str) -> torch.Tensor:
    """log p of each completion token given the prompt, tokenized as TRL does (EOS appended,
    common prefix); carries the gradient."""
    prompt_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + completion + tok.eos_token)["input_ids"]
    pairs = zip(prompt_ids, ids, strict=False)
    n = next((i for i, (a, b) in enumerate(pairs) if a != b), len(prompt_ids))
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
    return logp.gather(-1, x[0, 1:, None])[n - 1 :, 0]


def _completion_logp(model, tok, prompt: str, completion: str, count: bool = False):
    """Sum of log p(completion | prompt); with ``count``, also the number of its tokens."""
    part = _completion_token_logps(model, tok, prompt, completion)
    return (float(part.sum()), len(part)) if count else float(part.sum())


@torch.no_grad()
def _implicit_margin(step: DPOStep, pairs: list[dict[str, str]]) -> float:
    """Mean beta * [(log pi - log ref)(chosen) - (same)(rejected)]; ref = adapter disabled."""
    model, tok = step.model, step.tokenizer
    out = []
    for p in pairs:
        pol = [_completion_logp(model, tok, p["prompt"], p[k]) for k in ("chosen", "rejected")]
        with model.disable_adapter():
            ref = [_completion_logp(model, tok, p["prompt"], p[k]) for k in ("chosen", "rejected")]
        out.append(BETA * ((pol[0] - ref[0]) - (pol[1] - ref[1])))
    return sum(out) / len(out)


def _lora_state(step: DPOStep) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in step.model.named_parameters() if "lora_" in n}


def _adam_steps(step: DPOStep) -> set[float]:
    return {float(s["step"]) for s in step.optimizer.state.values()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores stall 3-10x; one is steady
    model, tok = load_causal_lm(cache_dir=_cache_dir(tmp_path_factory), device="cpu")
    probe = tok(PROBE, return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**probe).logits.clone()
    base_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = DPOStepConfig(
        beta=BETA,
        learning_rate=PEAK_LR,
        warmup_steps=2,
        per_device_batch_size=4,
        gradient_accumulation_steps=1,
        device="cpu",
        bf16=False,  # float32: the checks below are float32-tight (bf16: test_dpo_reference.py)
    )
    step = DPOStep(model, tok, cfg)
    rec = SimpleNamespace(step=step, cfg=cfg, tok=tok, probe=probe)
    rec.base_logits, rec.base_q = base_logits, base_q
    rec.lr0 = step.optimizer.param_groups[0]["lr"]
    rec.margin0 = _implicit_margin(step, PAIRS)

    rec.m1 = step.train_round(PAIRS)
    rec.lora1, rec.adam1 = _lora_state(step), _adam_steps(step)
    rec.sched1, rec.lr1 = step.scheduler.last_epoch, step.optimizer.param_groups[0]["lr"]
    rec.margin1 = _implicit_margin(step, PAIRS)

    rec.m2 = step.train_round(PAIRS)
    rec.lora2, rec.adam2 = _lora_state(step), _adam_steps(step)
    rec.sched2 = step.scheduler.last_epoch
    rec.margin2 = _implicit_margin(step, PAIRS)
    yield rec
    torch.set_num_threads(threads)


def test_training_increases_the_implicit_reward_margin(run):
    assert abs(run.margin0) < 1e-6  # fresh LoRA (B = 0): policy == reference
    assert run.margin1 > 0.05
    assert run.margin2 > run.margin1 + 0.05
    # TRL's own numbers: the first step sees policy == reference, so loss = log 2.
    assert run.m1["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert run.m2["loss"] < run.m1["loss"] - 0.01
    assert run.m2["reward_margin"] > run.m1["reward_margin"]
    for m in (run.m1, run.m2):
        assert m["steps"] == 1 and m["pairs"] == len(PAIRS)
        assert 0.0 <= m["reward_accuracy"] <= 1.0
        assert m["seconds"] > 0


def test_trl_reference_is_the_base_model_not_last_rounds_policy(run):
    # Round 2's single step logs the margin of the round-1 policy against TRL's reference.
    # It matches our margin against the adapter-disabled base; had TRL used its "ref" copy of
    # the adapter (its default for a PeftModel), it would be exactly 0.
    assert run.m2["reward_margin"] == pytest.approx(run.margin1, rel=1e-3, abs=1e-4)
    assert list(run.step.model.peft_config) == ["default"]


def test_only_lora_weights_change(run):
    step = run.step
    base = step.model.get_base_model()
    assert torch.equal(base.model.layers[0].self_attn.q_proj.base_layer.weight, run.base_q)
    changed = [n for n in run.lora2 if not torch.equal(run.lora1[n], run.lora2[n])]
    assert changed and all("lora_" in n for n in changed)
    names = {id(p): n for n, p in step.model.named_parameters()}
    opt_params = [p for g in step.optimizer.param_groups for p in g["params"]]
    assert opt_params and all("lora_" in names[id(p)] and p.requires_grad for p in opt_params)
    with torch.no_grad():
        with step.model.disable_adapter():
            ref_logits = step.model(**run.probe).logits
        pol_logits = step.model(**run.probe).logits
    torch.testing.assert_close(ref_logits, run.base_logits, atol=1e-5, rtol=1e-5)
    assert (pol_logits - run.base_logits).abs().max() > 1e-3


def test_optimizer_and_schedule_carry_over_rounds(run):
    step = run.step
    # Linear warmup over 2 steps counted across rounds: step 1 at lr/2, then lr.
    assert run.lr0 == pytest.approx(PEAK_LR / 2)
    assert run.lr1 == pytest.approx(PEAK_LR)
    # Adam's first update is lr * sign(grad) and LoRA B starts at 0, so max |B| = step-1 LR:
    # our scheduler, not one the Trainer made (its default would use the full lr).
    max_b = max(v.abs().max().item() for n, v in run.lora1.items() if "lora_B" in n)
    assert max_b == pytest.approx(PEAK_LR / 2, rel=1e-3)
    assert run.adam1 == {1.0} and run.adam2 == {2.0}  # AdamW state continues, not restarted
    assert (run.sched1, run.sched2) == (1, 2)
    assert step.global_step == 2 and step.rounds_trained == 2
    assert all(s["exp_avg"].abs().sum() > 0 for s in step.optimizer.state.values())


def test_model_is_left_in_eval_mode_and_generates(run):
    step = run.step
    assert not step.model.training
    # The forward patches TRL/Accelerate add per trainer are undone, so they cannot pile up.
    assert "forward" not in step.model.get_base_model().__dict__
    assert "forward" not in step.model.__dict__
    with torch.no_grad():
        out = step.model.generate(
            **run.tok(P1, return_tensors="pt"),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=run.tok.pad_token_id,
        )
    assert out.shape[1] == run.tok(P1, return_tensors="pt")["input_ids"].shape[1] + 3


def test_save_load_round_trip(run, tmp_path, tmp_path_factory):
    step = run.step
    step.save(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= files
    assert "model.safetensors" not in files  # base weights are not saved

    model2, tok2 = load_causal_lm(cache_dir=_cache_dir(tmp_path_factory), device="cpu")
    fresh = DPOStep(model2, tok2, run.cfg)
    fresh.load(tmp_path / "ckpt")
    saved, restored = _lora_state(step), _lora_state(fresh)
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[n], restored[n]) for n in saved)
    assert _adam_steps(fresh) == {2.0}
    old_state, new_state = step.optimizer.state_dict(), fresh.optimizer.state_dict()
    for k, v in old_state["state"].items():
        torch.testing.assert_close(new_state["state"][k]["exp_avg_sq"], v["exp_avg_sq"])
    assert fresh.scheduler.last_epoch == 2
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(PEAK_LR)
    assert (fresh.global_step, fresh.rounds_trained) == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.model(**run.probe).logits, step.model(**run.probe).logits, atol=1e-5, rtol=1e-5
        )


def test_sft_term_adds_the_chosen_sides_mean_nll(run, tmp_path_factory):
    # dpo.loss_type=[sigmoid, sft] (RPO): TRL's first-step loss is DPO's log 2 (policy ==
    # reference) plus weight x the mean NLL per token of the chosen completions (EOS included),
    # which we compute by hand on the base model.
    model, tok = load_causal_lm(cache_dir=_cache_dir(tmp_path_factory), device="cpu")
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for p in PAIRS:
            logp, n = _completion_logp(model, tok, p["prompt"], p["chosen"], count=True)
            nll, tokens = nll - logp, tokens + n
    cfg = dataclasses.replace(run.cfg, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5))
    step = DPOStep(model, tok, cfg)
    m = step.train_round(PAIRS)
    assert m["loss"] == pytest.approx(math.log(2) + 0.5 * nll / tokens, rel=2e-3)
    assert nll / tokens > 1.0  # the SFT term is large enough for the check to see it


def test_sgd_step_is_learning_rate_times_the_dpo_gradient(run, tmp_path_factory):
    # dpo.optim=sgd: one step moves the adapter by exactly -lr x the gradient of DPO's loss,
    # mean_i -log sigmoid(beta * [(log pi - log ref)(chosen_i) - (same)(rejected_i)]), which we
    # differentiate by hand (reference = adapter off, detached). AdamW would move every weight
    # by ~lr whatever its gradient.
    model, tok = load_causal_lm(cache_dir=_cache_dir(tmp_path_factory), device="cpu")
    lr, pairs = 0.5, PAIRS[:2]  # two pairs keep the hand-made gradient cheap
    cfg = dataclasses.replace(run.cfg, optim="sgd", learning_rate=lr, warmup_steps=0)
    step = DPOStep(model, tok, cfg)
    assert isinstance(step.optimizer, torch.optim.SGD)
    pm = step.model
    with torch.no_grad(), pm.disable_adapter():
        ref = [[_completion_logp(pm, tok, p["prompt"], p[k]) for k in ("chosen", "rejected")]
               for p in pairs]  # fmt: skip
    loss = 0.0
    for p, (ref_c, ref_r) in zip(pairs, ref, strict=True):
        pol_c = _completion_token_logps(pm, tok, p["prompt"], p["chosen"]).sum()
        pol_r = _completion_token_logps(pm, tok, p["prompt"], p["rejected"]).sum()
        margin = (pol_c - ref_c) - (pol_r - ref_r)
        loss = loss - torch.nn.functional.logsigmoid(BETA * margin) / len(pairs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if "lora_B" in n}
    pm.zero_grad(set_to_none=True)
    before = _lora_state(step)
    step.train_round(pairs)
    after = _lora_state(step)
    for name, g in grads.items():
        assert g.abs().max() > 0
        tol = 1e-3 * lr * float(g.abs().max())  # batched (padded) vs one-by-one float32 rounding
        torch.testing.assert_close(after[name] - before[name], -lr * g, rtol=2e-3, atol=tol)
    for name in before:  # lora_A: zero gradient while B = 0, so SGD leaves it
        if "lora_A" in name:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def test_cold_rounds_refit_from_the_initial_adapter_in_fixed_steps(run, tmp_path_factory):
    # dpo.warm_start=false, steps_per_round=1, micro-batches of 2: every round is one step over
    # all 4 pairs (accumulation 2, not the configured 1) from the initial adapter (same seed,
    # same A) with a fresh optimizer and warmup (lr/2). So both rounds land exactly where the
    # warm fixture's first round (one step of 4 at lr/2) did; a warm second round would not.
    model, tok = load_causal_lm(cache_dir=_cache_dir(tmp_path_factory), device="cpu")
    cfg = dataclasses.replace(
        run.cfg,
        warm_start=False,
        steps_per_round=1,
        per_device_batch_size=2,
        gradient_accumulation_steps=1,  # without steps_per_round: 2 steps of 2 pairs
    )
    step = DPOStep(model, tok, cfg)
    for _ in range(2):
        m = step.train_round(PAIRS)
        assert m["steps"] == 1 and m["pairs"] == len(PAIRS)
        state = _lora_state(step)
        for name, weights in run.lora1.items():
            # atol: Adam's first step is lr * g / (|g| + eps); where |g| ~ eps, float rounding
            # of the batched gradient shows (seen: 1.3e-5 on one weight of 3,072 after a fresh
            # set-up). A warm second round moves B by ~lr more: 20x this tolerance.
            torch.testing.assert_close(state[name], weights, rtol=1e-3, atol=5e-2 * PEAK_LR)
        assert _adam_steps(step) == {1.0}  # a fresh AdamW each round
    assert (step.global_step, step.rounds_trained) == (2, 2)
    assert max(v.abs().max().item() for n, v in state.items() if "lora_B" in n) > 0


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (16, (4, 1, 4)),  # the demo's batch: one pass of 4 steps of 4
        (48, (4, 3, 4)),  # more pairs: the same 4 steps, each of 12 (accumulation 3)
        (12, (3, 1, 4)),  # fewer than batch x steps: micro-batches of 3, no pair repeated
        (2, (1, 1, 4)),  # fewer pairs than steps: the only case where pairs repeat
    ],
)
def test_fixed_steps_take_one_pass_over_the_pairs(pairs, expected):
    cfg = DPOStepConfig(per_device_batch_size=4, gradient_accumulation_steps=3, steps_per_round=4)
    batch, accumulation, steps = cfg.round_schedule(pairs)
    assert (batch, accumulation, steps) == expected
    assert batch * accumulation * steps >= pairs  # every pair is seen ...
    assert pairs < steps or batch * accumulation * (steps - 1) < pairs  # ... and only once
    # Without steps_per_round: the configured batch and accumulation, steps by epochs.
    assert DPOStepConfig(per_device_batch_size=4).round_schedule(pairs) == (4, 3, -1)


def test_load_rejects_missing_checkpoint(run, tmp_path):
    with pytest.raises(ValueError, match="not a DPOStep checkpoint"):
        run.step.load(tmp_path)


def test_bad_pairs_raise(run):
    with pytest.raises(ValueError, match=r"^pairs: "):
        run.step.train_round([])
    with pytest.raises(ValueError, match=r"^pairs\[1\]: .*'chosen'"):
        run.step.train_round([PAIRS[0], {"prompt": "x", "rejected": "y"}])
    with pytest.raises(ValueError, match=r"^pairs\[0\]\.rejected: "):
        run.step.train_round([{"prompt": "x", "chosen": "y", "rejected": None}])
    assert run.step.global_step == 2  # nothing was trained


def test_rejects_a_model_that_already_has_an_adapter(run):
    with pytest.raises(ValueError, match=r"^model: "):
        DPOStep(run.step.model, run.tok, run.cfg)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("beta", 0.0),
        ("learning_rate", -1e-6),
        ("learning_rate", float("nan")),
        ("optim", "adam"),
        ("warmup_steps", -1),
        ("per_device_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("epochs_per_round", 0.0),
        ("max_steps_per_round", 0),
        ("steps_per_round", 0),
        ("warm_start", "no"),
        ("lora_r", 0),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("lora_target_modules", ()),
        ("lora_target_modules", "q_proj"),
        ("max_length", 1),
        ("device", "tpu"),
        ("seed", -1),
        ("bf16", "yes"),
        ("loss_type", ()),
        ("loss_type", ("dpo",)),
        ("loss_type", "sft"),
        ("loss_weights", (1.0, 1.0)),
        ("loss_weights", (0.0,)),
        ("loss_weights", (float("nan"),)),
    ],
)
def test_bad_config_raises_key_named_error(key, value):
    with pytest.raises(ValueError, match=rf"^dpo\.{key}: "):
        DPOStepConfig(**{key: value})


def test_default_config_is_the_reference_setup():
    cfg = DPOStepConfig()
    assert (cfg.beta, cfg.learning_rate, cfg.warmup_steps) == (0.01, 8e-7, 10)
    assert cfg.per_device_batch_size * cfg.gradient_accumulation_steps == 24
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 16, 0.0)
    assert set(cfg.lora_target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
