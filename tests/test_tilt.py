"""The tilt update (``strategy.update=tilt``): weights from noisy scores and the weighted
likelihood step, on the real SmolLM2 with its LoRA adapter.

What is checked: the weights are the per-prompt softmax of standardized scores over each
prompt's best ``keep`` samples; one SGD step (completions sharing a prompt run from its cached
keys, prompts of different lengths left-padded together) moves the adapter by exactly -lr x
the gradient of the weighted mean token NLL (computed by hand, one sequence at a time); AdamW
steps raise the likelihood of the weighted completions; bad input names the key.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from popri_flwr.algorithms.tilt import tilt_weights
from popri_flwr.models.dpo import DPOStep, DPOStepConfig
from popri_flwr.models.loading import load_causal_lm
from popri_flwr.models.weighted_fit import weighted_nll_round

PROMPT = "List of 2 diverse original text samples:\nOriginal Text Sample 1\nTaxes were cut.\n"
RECORDS = [
    {"prompt": PROMPT, "completion": "Our union is strong and our people are free.", "weight": 0.7},
    {"prompt": PROMPT, "completion": "We will invest in roads and ports.", "weight": 0.3},
    {"prompt": "The President said", "completion": " that the budget is balanced.", "weight": 1.0},
]


def test_tilt_weights_are_a_per_prompt_softmax_of_standardized_scores():
    scores = np.array([3.0, 1.0, 2.0, 10.0, 10.0, -4.0])
    w = tilt_weights(scores, 3, tau=1.0, keep=3)
    z = (scores - scores.mean()) / scores.std()
    for k in range(2):
        e = np.exp(z[3 * k : 3 * k + 3])
        np.testing.assert_allclose(w[3 * k : 3 * k + 3], e / e.sum(), rtol=1e-12)
    top = tilt_weights(scores, 3, tau=0.5, keep=2)
    assert top[1] == 0 and top[5] == 0  # each prompt's worst left out
    np.testing.assert_allclose(top.reshape(2, 3).sum(axis=1), 1.0)
    assert top[0] > top[2] and top[3] == top[4] == 0.5
    one = tilt_weights(scores, 3, tau=1.0, keep=1)
    assert one.tolist() == [1, 0, 0, 1, 0, 0]  # best of n (ties: the first)
    np.testing.assert_allclose(tilt_weights(scores, 3, np.inf, 3), 1 / 3)  # no pull
    assert tilt_weights(scores, 3, tau=1.0).tolist() == w.tolist()  # keep=None: all J
    sharper = tilt_weights(scores, 3, tau=0.25, keep=3)
    assert sharper[0] > w[0]  # a lower tau pulls harder toward the best
    with pytest.raises(ValueError, match="strategy.tilt_tau"):
        tilt_weights(scores, 3, tau=0.0, keep=2)
    with pytest.raises(ValueError, match="strategy.tilt_keep"):
        tilt_weights(scores, 3, tau=1.0, keep=4)
    with pytest.raises(ValueError, match="expected K"):
        tilt_weights(scores[:5], 3, tau=1.0, keep=2)


def _step(batch: int = 2, **overrides) -> DPOStep:
    model, tok = load_causal_lm(device="cpu")
    cfg = DPOStepConfig(
        warmup_steps=0,
        per_device_batch_size=batch,
        steps_per_round=1,
        bf16=False,
        device="cpu",
        **overrides,
    )
    return DPOStep(model, tok, cfg)


def _token_nll(model, tok, prompt: str, completion: str) -> tuple[torch.Tensor, int]:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    x = torch.tensor([p + c])
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
    return -logp.gather(-1, x[0, 1:, None])[len(p) - 1 :, 0].sum(), len(c)


def _lora(step: DPOStep) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in step.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("batch", [2, 8])
def test_sgd_step_is_learning_rate_times_the_weighted_nll_gradient(batch):
    # batch 2: the shared prompt's two completions in one pass, the other prompt alone;
    # batch 8: both prompts (different lengths, left-padded) in one pass.
    torch.manual_seed(0)
    lr = 0.5
    step = _step(batch, optim="sgd", learning_rate=lr)
    # B = 0 at first, so A has no gradient: give B a value so both move.
    with torch.no_grad():
        for n, p in step.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1e-3)
    pm, tok = step.model, step.tokenizer
    nll, tokens = 0.0, 0.0
    for r in RECORDS:
        value, n = _token_nll(pm, tok, r["prompt"], r["completion"])
        nll = nll + r["weight"] * value
        tokens += r["weight"] * n
    (nll / tokens).backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.grad is not None}
    expected_loss = float((nll / tokens).detach())
    pm.zero_grad(set_to_none=True)
    before = _lora(step)
    out = step.train_weighted_round(RECORDS)
    after = _lora(step)
    assert out["steps"] == 1 and out["sequences"] == 3
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert step.rounds_trained == 1 and step.global_step == 1
    assert len(grads) == len(before) and not step.model.training
    for name, g in grads.items():
        assert g.abs().max() > 0
        # Batched (padded) vs one-by-one float32 rounding: a few elements that are sums of
        # cancelling terms differ by ~1% of the largest; each tensor's step agrees to ~1e-3.
        moved = after[name] - before[name]
        assert float((moved + lr * g).norm()) <= 5e-3 * float((lr * g).norm()), name


def test_adamw_steps_raise_the_likelihood_of_the_weighted_completions():
    step = _step(learning_rate=1e-3)
    step.config.steps_per_round = 2
    heavy = RECORDS[0]

    @torch.no_grad()
    def nll():
        nll_sum, _ = _token_nll(step.model, step.tokenizer, heavy["prompt"], heavy["completion"])
        return float(nll_sum)

    before = nll()
    out = step.train_weighted_round(RECORDS)
    assert out["steps"] == 2 and nll() < before - 0.5


def test_weighted_nll_round_rejects_bad_records():
    step = _step(learning_rate=1e-3)
    args = (step.model, step.tokenizer, step.optimizer, step.scheduler)
    kw = dict(steps=1, micro_batch=2, max_length=256, bf16=False, seed=0)
    with pytest.raises(ValueError, match="weights > 0"):
        weighted_nll_round(*args, [{**RECORDS[0], "weight": 0.0}], **kw)
    with pytest.raises(ValueError, match="weights > 0"):
        weighted_nll_round(*args, [], **kw)
    with pytest.raises(ValueError, match="dpo.max_length"):
        weighted_nll_round(*args, RECORDS[:1], **{**kw, "max_length": 4})


def test_speed_row_paths_train_the_same_records_to_the_same_loss():
    # popri_flwr.speed.tilt times both paths; they must do the same work.
    from popri_flwr.speed.tilt import demo_records, time_round

    records = demo_records(num_prompts=2, samples=3)
    assert len({r["prompt"] for r in records}) == 2 and len(records) == 6
    np.testing.assert_allclose(sum(r["weight"] for r in records), 2.0)
    old, new = time_round(records, share_prompts=False), time_round(records, share_prompts=True)
    assert old["sequences"] == new["sequences"] == 6
    assert new["steps"] == 2 and old["steps"] == 4  # steps split whole prompts
    assert new["loss"] == pytest.approx(old["loss"], rel=2e-2)
