"""Precomputed reference log-probs (``DPOStepConfig.precompute_ref_log_probs``) vs. TRL's
per-step reference forward: same pairs, config and seed, two rounds of one optimizer step each.

Round 1 starts from a zero LoRA B (policy == reference), so it mostly checks the plumbing; round
2 is the real check: the policy differs from the base there, and a reference that were last
round's policy (TRL's ``"ref"`` adapter copy) would give a margin of exactly 0 instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_dpo import BETA, PAIRS, PEAK_LR  # same pairs as the main DPO tests

from popri_flwr.models.dpo import DPOStep, DPOStepConfig
from popri_flwr.models.generation import cpu_supports_bf16
from popri_flwr.models.loading import load_causal_lm

# Tolerances: both paths run the same float32 forward; only the batch each sequence is padded in
# differs (precompute batches in order, training shuffles), which moves log-probs by ~1e-5.
LOSS_TOL = 1e-4
LORA_ATOL = 1e-6
# bf16 autocast (CPU with native bf16) vs float32, both precomputed: logits carry ~3 significant
# digits. Measured here: round-2 loss 0.47178 (fp32) vs 0.47092 (bf16), margin 0.50863 vs 0.51116.
BF16_LOSS_TOL = 5e-3
BF16_MARGIN_TOL = 1e-2


def _train(precompute: bool, cache_dir: Path, bf16: bool = False) -> SimpleNamespace:
    model, tok = load_causal_lm(cache_dir=cache_dir, device="cpu")
    cfg = DPOStepConfig(
        beta=BETA,
        learning_rate=PEAK_LR,
        warmup_steps=2,
        per_device_batch_size=4,
        gradient_accumulation_steps=1,
        device="cpu",
        bf16=bf16,
        precompute_ref_log_probs=precompute,
    )
    torch.manual_seed(0)  # LoRA A's random init
    step = DPOStep(model, tok, cfg)
    out = SimpleNamespace(step=step)
    out.m1 = step.train_round(PAIRS)
    out.lora1 = {n: p.detach().clone() for n, p in step.model.named_parameters() if "lora_" in n}
    out.m2 = step.train_round(PAIRS)
    out.lora2 = {n: p.detach().clone() for n, p in step.model.named_parameters() if "lora_" in n}
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_dpo.py: steady on two shared cores
    env = os.environ.get("POPRI_CACHE")
    cache = Path(env) if env else tmp_path_factory.getbasetemp() / "popri_cache"
    try:
        old, new = _train(False, cache), _train(True, cache)
        bf16 = _train(True, cache, bf16=True) if cpu_supports_bf16() else None
        yield SimpleNamespace(old=old, new=new, bf16=bf16)
    finally:
        torch.set_num_threads(threads)


def test_first_step_loss_and_update_match_the_per_step_reference(both):
    old, new = both.old, both.new
    assert old.m1["loss"] == pytest.approx(math.log(2), abs=LOSS_TOL)
    assert new.m1["loss"] == pytest.approx(old.m1["loss"], abs=LOSS_TOL)
    assert new.m1["reward_margin"] == pytest.approx(old.m1["reward_margin"], abs=LOSS_TOL)
    for name, value in old.lora1.items():
        torch.testing.assert_close(new.lora1[name], value, atol=LORA_ATOL, rtol=0)


def test_second_round_uses_the_base_model_as_reference(both):
    old, new = both.old, both.new
    # The round-1 policy differs from the base, so a wrong reference would show here.
    assert abs(old.m2["reward_margin"]) > 0.05
    assert new.m2["loss"] == pytest.approx(old.m2["loss"], abs=LOSS_TOL)
    assert new.m2["reward_margin"] == pytest.approx(old.m2["reward_margin"], abs=LOSS_TOL)
    assert new.m2["reward_accuracy"] == old.m2["reward_accuracy"]
    for name, value in old.lora2.items():
        torch.testing.assert_close(new.lora2[name], value, atol=LORA_ATOL, rtol=0)
    assert list(new.step.model.peft_config) == ["default"]


def test_cpu_bf16_autocast_stays_close_to_float32(both):
    if both.bf16 is None:
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    fp32, bf16 = both.new, both.bf16
    assert bf16.step.bf16 and not fp32.step.bf16
    for m32, m16 in ((fp32.m1, bf16.m1), (fp32.m2, bf16.m2)):
        assert m16["loss"] == pytest.approx(m32["loss"], abs=BF16_LOSS_TOL)
        assert m16["reward_margin"] == pytest.approx(m32["reward_margin"], abs=BF16_MARGIN_TOL)
    assert bf16.m2["loss"] < bf16.m1["loss"] - 0.01  # it still learns


def test_bf16_default_follows_the_hardware():
    assert DPOStepConfig().bf16 is None
    # DPOStep resolves None to bf16 on CUDA and on a CPU with native bf16 instructions.
    from popri_flwr.models.loading import native_bf16

    assert native_bf16("cpu") == cpu_supports_bf16()
    assert native_bf16("cuda:0") is True
    assert native_bf16("mps") is False


def test_precompute_flag_is_validated():
    assert DPOStepConfig().precompute_ref_log_probs is True
    with pytest.raises(ValueError, match=r"^dpo\.precompute_ref_log_probs: "):
        DPOStepConfig(precompute_ref_log_probs="yes")
