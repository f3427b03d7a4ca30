"""Prefix-shared sampling (popri_flwr.models.sampling) and the TransformersGenerator on the real
SmolLM2.

What is checked: the sampler's distribution equals transformers' (warping exactly, draws
statistically), greedy equals transformers' greedy exactly in float32 (plain and PEFT models,
left padding, a row that stops at EOS), texts depend only on (seed, prompt, sample) up to
float32 rounding at near-boundary draws, and bf16 stays within a stated distance of float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from popri_flwr.models.generation import (
    SamplingParams,
    TransformersGenerator,
    _row_batches,
    cpu_supports_bf16,
    resolve_dtype,
)
from popri_flwr.models.loading import load_causal_lm
from popri_flwr.models.sampling import (
    SharedPrefix,
    pick_tokens,
    row_seed,
    row_uniforms,
    sample_shared_prefix,
    supports_shared_prefix,
    warp_logits,
)

PROMPTS = [
    "List of 2 diverse original text samples:\nOriginal Text Sample 1\nThe state of the union "
    "is strong, and our economy grew faster than anyone expected.\nOriginal Text Sample 2\n",
    "The President said that",
    # SmolLM2's chat template: greedy answers "2 + 2 = 4" and ends with <|im_end|> (EOS) at
    # step 8, while the other rows go on (the finished row leaves the decoding batch).
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2 + 2? Answer with a number only.<|im_end|>\n"
    "<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def lm():
    model, tok = load_causal_lm(device="cpu")
    return model, tok


def _hf_warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    scores = logits.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.fixture(scope="module")
def next_token_logits(lm):
    model, tok = lm
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        return model(**enc).logits[:, -1]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (1.3, 0.5)])
def test_warping_equals_transformers(next_token_logits, temperature, top_p):
    logits = next_token_logits
    ours, theirs = warp_logits(logits, temperature, top_p), _hf_warp(logits, temperature, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # same nucleus
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=0, atol=1e-7)


def test_inverse_cdf_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log().expand(40_000, -1)  # log 0 = -inf: must never be drawn
    u = row_uniforms(range(40_000), 1)[:, 0]
    freq = torch.bincount(pick_tokens(logits, u, 1.0, 1.0), minlength=6) / 40_000
    assert freq[1] == 0
    # 40k draws: a frequency's standard error is <= 0.0025; 0.01 is 4 of them.
    assert (freq - probs).abs().max() < 0.01
    # top-p 0.75 keeps {0, 2, 3} (cumulative 0.85 from the top), renormalized.
    freq = torch.bincount(pick_tokens(logits, u, 1.0, 0.75), minlength=6) / 40_000
    kept = torch.tensor([0.5, 0, 0.2, 0.15, 0, 0]) / 0.85
    assert freq[[1, 4, 5]].sum() == 0 and (freq - kept).abs().max() < 0.01
    # Temperature 0 is the argmax whatever the uniforms.
    assert torch.all(pick_tokens(logits[:5], u[:5], 0.0, 1.0) == 0)


def test_first_tokens_follow_the_model_distribution(lm):
    """400 samples of one prompt through the shared prefix: the draws match the warped softmax."""
    model, tok = lm
    gen = TransformersGenerator(model, tok, batch_size=400, progress=False, dtype="float32")
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=1, seed=5)
    (texts,) = gen.generate(PROMPTS[1:2], params, num_samples=400)
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    with torch.inference_mode():
        probs = _hf_warp(model(**enc).logits[:, -1], 0.8, 0.9).softmax(-1)[0]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(len(i) == 1 for i in ids)  # each text is one token (no EOS here)
    drawn = torch.bincount(torch.tensor([i[0] for i in ids]), minlength=len(probs)) / 400
    assert float(probs[drawn > 0].min()) > 0  # nothing outside the nucleus
    # Total variation between the empirical and the true distribution. Its expectation from
    # sampling noise alone is ~0.5 * sum(sqrt(p (1 - p) / n)) (~0.1 here); a wrong distribution
    # (e.g. no temperature or no top-p, or another prompt's logits) is >= 0.25 away.
    noise = 0.5 * float(torch.sqrt(probs * (1 - probs) / 400).sum())
    tv = 0.5 * float((drawn - probs).abs().sum())
    assert tv < 1.5 * noise + 0.02, (tv, noise)


def _count_shared_attention_calls(monkeypatch):
    """Counts SharedPrefix.attend calls from now on (the shared path really ran)."""
    seen = []
    original = SharedPrefix.attend

    def spy(self, *args, **kwargs):
        seen.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SharedPrefix, "attend", spy)
    return lambda: len(seen)


def _hf_greedy(model, tok, prompts, max_new_tokens):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id
        )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def hf_greedy(lm):
    model, tok = lm
    want = _hf_greedy(model, tok, PROMPTS, 12)
    n_tokens = [len(tok(w, add_special_tokens=False)["input_ids"]) for w in want]
    assert n_tokens[2] < 10 and "4" in want[2] and n_tokens[0] == 12  # row 2 stopped at EOS
    return want


@pytest.mark.parametrize("shared_attention", [True, False])
def test_greedy_equals_transformers_greedy_plain(lm, hf_greedy, shared_attention, monkeypatch):
    model, tok = lm
    want = hf_greedy
    gen = TransformersGenerator(
        model, tok, 8, progress=False, dtype="float32", shared_attention=shared_attention
    )
    calls = _count_shared_attention_calls(monkeypatch)
    got = gen.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12), num_samples=2)
    assert got == [[w, w] for w in want]
    # One batch of 6 rows; when shared: 30 layers x 11 decoding steps (rows 4-5 stop early)
    assert calls() == (30 * 11 if shared_attention else 0)
    assert model.config._attn_implementation == "sdpa"  # routing restored after decoding


@pytest.mark.parametrize("shared_attention", [True, False])
def test_decoding_hands_the_cache_over_under_the_installed_transformers_name(lm, shared_attention):
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40):
    the decoding loop must use the name the installed version takes, so no deprecation fires."""
    import inspect
    import warnings

    from transformers import LlamaForCausalLM

    from popri_flwr.models.kv_cache import cache_arg

    assert cache_arg() in inspect.signature(LlamaForCausalLM.forward).parameters
    model, tok = lm
    gen = TransformersGenerator(
        model, tok, 4, progress=False, dtype="float32", shared_attention=shared_attention
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=4), num_samples=2)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_greedy_equals_transformers_greedy_peft(lm, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    # A LoRA adapter with non-zero B (init_lora_weights=False), so the policy is not the base.
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(model), cfg).eval()
    want = _hf_greedy(peft, tok, PROMPTS[:2], 8)
    assert want != _hf_greedy(model, tok, PROMPTS[:2], 8)  # the adapter changes the text
    assert supports_shared_prefix(peft)  # the default path runs shared-prefix attention
    gen = TransformersGenerator(peft, tok, batch_size=3, progress=False, dtype="float32")
    calls = _count_shared_attention_calls(monkeypatch)
    got = gen.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=8), 3)
    assert got == [[w] * 3 for w in want]
    assert calls() == 2 * 30 * 7  # 2 batches (one prompt x 3 samples each), 7 decoding steps


def test_texts_depend_only_on_seed_prompt_and_sample(lm):
    """Texts repeat exactly at a batch size whatever ran before and whatever the global RNG;
    across batch sizes row (i, j) keeps its stream (the test below bounds how float32
    rounding may still flip a near-boundary draw)."""
    model, tok = lm
    params = SamplingParams(max_new_tokens=6, seed=11)
    big = TransformersGenerator(model, tok, batch_size=9, progress=False, dtype="float32")
    small = TransformersGenerator(model, tok, batch_size=2, progress=False, dtype="float32")
    torch.manual_seed(0)
    a = big.generate(PROMPTS, params, num_samples=3)
    b = small.generate(PROMPTS, params, num_samples=3)
    torch.manual_seed(123)  # the global RNG and other work must not matter
    torch.rand(1000)
    small.generate(PROMPTS[1:], SamplingParams(max_new_tokens=3, seed=1), 2)
    assert big.generate(PROMPTS, params, num_samples=3) == a
    assert small.generate(PROMPTS, params, num_samples=3) == b
    # 54 draws, each flipping with probability ~1e-4: a batch-dependent stream would change
    # nearly every text.
    same = [x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    assert sum(same) >= 8
    assert len(set(a[0])) > 1  # samples of one prompt are different draws
    c = big.generate(PROMPTS, SamplingParams(max_new_tokens=6, seed=12), num_samples=3)
    assert c != a
    # Sample j of prompt i uses stream (seed, i, j): distinct across prompts and samples.
    seeds = {row_seed(11, i, j) for i in range(3) for j in range(3)}
    assert len(seeds) == 9


def _draw(model, tok, prompts, counts, seeds, steps):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = [tok.eos_token_id]
    with torch.inference_mode():
        tokens, lengths = sample_shared_prefix(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            counts,
            row_uniforms(seeds, steps),
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=steps,
            eos_token_ids=eos,
            pad_token_id=tok.pad_token_id,
        )
    return [t[:n].tolist() for t, n in zip(tokens, lengths, strict=True)]


def _tokens_near_u(model, tok, prompt: str, prefix: list[int], u: float, tol: float) -> set[int]:
    """Tokens whose CDF interval (model alone on prompt + prefix, float32) lies within ``tol``
    of ``u``: the draws that a perturbation of the CDF by less than ``tol`` can produce."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([ids, torch.tensor([prefix], dtype=torch.long)], dim=1)
    with torch.inference_mode():
        probs = model(input_ids=ids).logits[0, -1].double().softmax(-1)
    upper = probs.cumsum(0)
    lower = upper - probs
    return set(((lower <= u + tol) & (upper > u - tol) & (probs > 0)).nonzero()[:, 0].tolist())


def test_rows_differ_across_batch_shapes_only_by_rounding(lm):
    """Row (i, j) draws from stream (seed, i, j) whatever batch it is in. Float32 kernels round
    a row differently in batches of other shapes (left padding to another prompt's length:
    logits ~3e-5 apart), so a draw may flip only where its uniform lies within that of a CDF
    boundary. Every row decoded in one padded batch and in per-prompt batches of <= 2 rows
    either agrees or first differs at such a near-boundary draw; a batch-dependent stream or
    position would make rows differ at ordinary draws."""
    model, tok = lm
    steps, seed, tol = 12, 11, 1e-4
    rows = [(i, j) for i in range(3) for j in range(3)]
    seeds = [row_seed(seed, i, j) for i, j in rows]
    together = _draw(model, tok, PROMPTS, [3, 3, 3], seeds, steps)
    apart = []
    for i in range(3):  # like batch_size=2: samples {0, 1}, then {2}, prompt alone
        apart += _draw(model, tok, PROMPTS[i : i + 1], [2], seeds[3 * i : 3 * i + 2], steps)
        apart += _draw(model, tok, PROMPTS[i : i + 1], [1], seeds[3 * i + 2 : 3 * i + 3], steps)
    uniforms = row_uniforms(seeds, steps)
    same = 0
    for r, (i, _) in enumerate(rows):
        a, b = together[r], apart[r]
        if a == b:
            same += 1
            continue
        t = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
        near = _tokens_near_u(model, tok, PROMPTS[i], a[:t], float(uniforms[r, t]), tol)
        assert {a[t], b[t]} <= near, f"row {rows[r]} differs at step {t}, not near a boundary"
    assert same >= 7  # a near-boundary draw is rare (~1e-4 per draw)


def test_bf16_texts_are_reproducible_at_a_fixed_batch_size(lm):
    """bf16 kernels round a row differently in batches of other shapes (measured: texts
    diverge within 20 tokens when batch_size changes), so bf16 runs repeat exactly only at
    the same batch size; fp32 ones also across batch sizes (test above)."""
    model, tok = lm
    params = SamplingParams(max_new_tokens=8, seed=4)
    first = TransformersGenerator(model, tok, batch_size=4, progress=False, dtype="bfloat16")
    a = first.generate(PROMPTS[:2], params, num_samples=2)
    torch.manual_seed(7)
    first.generate(PROMPTS[2:], SamplingParams(max_new_tokens=3, seed=1), 3)  # other work
    again = TransformersGenerator(model, tok, batch_size=4, progress=False, dtype="bfloat16")
    assert again.generate(PROMPTS[:2], params, num_samples=2) == a


def test_row_batches_cover_every_row_once():
    for k, j, size in [(16, 6, 16), (3, 10, 4), (5, 1, 2), (1, 7, 7), (4, 3, 100)]:
        batches = _row_batches(k, j, size)
        rows = [(i, first + s) for b in batches for i, first, n in b for s in range(n)]
        assert sorted(rows) == [(i, s) for i in range(k) for s in range(j)]
        assert all(sum(n for _, _, n in b) <= size for b in batches)
        if j <= size:  # whole prompts: each prompt prefilled once
            assert sum(len(b) for b in batches) == k
    assert len(_row_batches(16, 6, 16)) == 8  # 2 prompts (12 rows) per batch


def test_bf16_detection_and_dtype_resolution(tmp_path):
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_supports_bf16(flags)
    flags.write_text("flags\t\t: fpu avx512f avx512bw\n")
    assert not cpu_supports_bf16(flags)
    assert not cpu_supports_bf16(tmp_path / "missing")
    auto = resolve_dtype("auto", "cpu", torch.float32)
    assert auto == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert resolve_dtype("auto", "cpu", torch.float16) == torch.float16  # left as it is
    assert resolve_dtype("float32", "cpu", torch.bfloat16) == torch.float32
    with pytest.raises(ValueError, match="generation.dtype: expected one of auto"):
        resolve_dtype("fp8", "cpu")


def test_bf16_copy_is_cached_until_the_weights_change(lm):
    model, tok = lm
    gen = TransformersGenerator(model, tok, progress=False, dtype="bfloat16")
    cast = gen.inference_model()
    assert cast is not model and next(cast.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the policy itself is not cast
    assert gen.inference_model() is cast
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight.add_(0.0)  # an in-place update (as an optimizer step does)
    assert gen.inference_model() is not cast
    gen.model = copy.deepcopy(model)
    assert gen._cast is None  # replacing the model drops the old copy
    f32 = TransformersGenerator(model, tok, progress=False, dtype="float32")
    assert f32.inference_model() is model


def test_bf16_next_token_distributions_stay_close_to_float32(lm):
    """Tolerance: mean TV < 0.05, max < 0.15, greedy agreement > 90% over all positions.

    Measured (2026-11, this CPU): on these 88 positions mean TV 0.020, max 0.067, argmax
    agreement 98.9%; on six 3-shot SOTU prompts (~2,000 positions) 0.015, 0.096 and 97.6%.
    """
    model, tok = lm
    bf16 = TransformersGenerator(model, tok, progress=False, dtype="bfloat16").inference_model()
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        p32 = model(**enc).logits.float().softmax(-1)
        p16 = bf16(**enc).logits.float().softmax(-1)
    real = enc["attention_mask"].bool()
    tv = 0.5 * (p32 - p16).abs().sum(-1)[real]  # every real position of every prompt
    assert float(tv.mean()) < 0.05 and float(tv.max()) < 0.15, (tv.mean(), tv.max())
    agree = (p32.argmax(-1) == p16.argmax(-1))[real].float().mean()
    assert float(agree) > 0.9


def test_prefix_sharing_false_keeps_the_flattened_path(lm):
    model, tok = lm
    params = SamplingParams(temperature=0, max_new_tokens=5)
    old = TransformersGenerator(model, tok, 4, False, prefix_sharing=False, dtype="float32")
    new = TransformersGenerator(model, tok, 4, False, dtype="float32")
    assert old.generate(PROMPTS[:2], params, 2) == new.generate(PROMPTS[:2], params, 2)
    with pytest.raises(ValueError, match="generation.batch_size"):
        TransformersGenerator(model, tok, batch_size=0)


def test_speed_comparison_is_importable_and_returns_rows(lm):
    from popri_flwr.speed import generation as bench

    tiny = bench.SpeedCase("tiny", num_prompts=2, shots=1, num_samples=2, max_new_tokens=2)
    rows = bench.compare_generation([tiny], *lm, breakdown=True)
    assert [r["measure"] for r in rows] == ["tiny", "tiny:prefix_fp32"]
    for r in rows:
        assert r["baseline_s"] > 0 and r["new_s"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_s"] / r["new_s"], rel=0.05)
