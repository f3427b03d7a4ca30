"""Prompts, sample extraction, the transformers generator (real SmolLM2) and the embedder."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from popri_flwr.algorithms.prompts import (
    build_prompts,
    chat_prompt,
    extract_sample,
    few_shot_prompt,
)
from popri_flwr.models.embedding import get_embedder
from popri_flwr.models.generation import (
    SamplingParams,
    VLLMGenerator,
    format_chat,
    generate_samples,
    generator_from_config,
    make_generator,
)
from popri_flwr.models.sampling import prompt_seed

PUBLIC = [f"Public paragraph number {i} about the state of the union." for i in range(6)]


def test_few_shot_template_and_distinct_examples():
    prompts = build_prompts(PUBLIC, 20, np.random.default_rng(0), shots=3)
    assert prompts == build_prompts(PUBLIC, 20, np.random.default_rng(0), shots=3)
    for p in prompts:
        assert p.startswith("List of 6 diverse original text samples:\nOriginal Text Sample 1\n")
        assert p.endswith("Original Text Sample 4\n")
        used = [t for t in PUBLIC if t in p]
        assert len(used) == 3  # distinct within a prompt
    assert few_shot_prompt(["a", "b"]).count("Original Text Sample") == 3
    with pytest.raises(ValueError, match="public_set: needs at least 3 texts, got 2"):
        build_prompts(PUBLIC[:2], 1, np.random.default_rng(0))


def test_chat_style_shows_the_same_examples_in_an_instruction():
    kw = dict(shots=2, description="a paragraph of a speech")
    listed = build_prompts(PUBLIC, 8, np.random.default_rng(5), **kw)
    chat = build_prompts(PUBLIC, 8, np.random.default_rng(5), style="chat", **kw)
    for a, b in zip(listed, chat, strict=True):
        # Same rng, same examples: the style changes the wording only.
        assert [t for t in PUBLIC if t in a] == [t for t in PUBLIC if t in b]
        assert "Original Text Sample" not in b
        assert b.startswith("Examples of a paragraph of a speech:\n\n")
        assert "Write one more, new and different from these examples." in b
    assert (
        chat_prompt(["x"], "a poem")
        == build_prompts(
            ["x"], 1, np.random.default_rng(0), shots=1, style="chat", description="a poem"
        )[0]
    )
    with pytest.raises(ValueError, match="^strategy.prompt_style: expected one of"):
        build_prompts(PUBLIC, 1, np.random.default_rng(0), style="instruct")
    with pytest.raises(ValueError, match="^public_set.description: the chat prompt style"):
        build_prompts(PUBLIC, 1, np.random.default_rng(0), style="chat", description=" ")


def test_extraction_cuts_at_the_next_item_only():
    assert extract_sample(" We honor the original intent.\nOriginal Text Sample 5\nx") == (
        "We honor the original intent."
    )
    assert extract_sample("Text. Original Text Sample 5 more") == "Text."
    assert extract_sample("\nOrig") == ""


def test_sampling_params_validation():
    for kwargs, key in [
        ({"temperature": -1}, "generation.temperature"),
        ({"top_p": 0}, "generation.top_p"),
        ({"max_new_tokens": 0}, "generation.max_new_tokens"),
        ({"truncate_tokens": 0}, "generation.truncate_tokens"),
    ]:
        with pytest.raises(ValueError, match=key):
            SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def generator():
    return make_generator("transformers", device="cpu", batch_size=4, progress=False)


def test_seeded_batched_generation(generator):
    prompts = build_prompts(PUBLIC, 2, np.random.default_rng(1))
    params = SamplingParams(max_new_tokens=10, truncate_tokens=6, seed=3)
    a = generate_samples(generator, prompts, params, num_samples=2)
    b = generate_samples(generator, prompts, params, num_samples=2)
    c = generate_samples(generator, prompts, SamplingParams(max_new_tokens=10, seed=4), 2)
    assert a == b and a != c  # same seed -> same texts; another seed -> others
    assert [len(g) for g in a] == [2, 2]
    tok = generator.tokenizer
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 6 for g in a for t in g)


def test_chat_generation_gives_text(generator):
    (out,) = generate_samples(
        generator,
        ["Write one sentence about taxes."],
        SamplingParams(max_new_tokens=12),
        num_samples=1,
        chat=True,
    )
    assert len(out[0].split()) >= 2


def test_a_chat_formatted_prompt_generates_what_chat_mode_does(generator):
    """format_chat gives the exact prompt text chat=True samples from (so DPO sees it too)."""
    message = chat_prompt(PUBLIC[:1], "a paragraph of a speech")
    prompt = format_chat(generator.tokenizer, message)
    assert message in prompt and prompt != message
    assert prompt.rstrip().endswith("assistant")  # SmolLM2's template opens the reply
    params = SamplingParams(max_new_tokens=10, seed=7)
    assert generate_samples(generator, [prompt], params, 2) == generate_samples(
        generator, [message], params, 2, chat=True
    )

    class NoTemplate:  # test double: a base model's tokenizer, which has no chat template
        chat_template = None

    with pytest.raises(ValueError, match="^strategy.prompt_style: 'chat' needs a generator"):
        format_chat(NoTemplate(), message)


def test_unknown_backend_and_missing_vllm(monkeypatch):
    with pytest.raises(ValueError, match="generation.backend: expected transformers or vllm"):
        make_generator("tgi")
    # vLLM is not installable here: a None entry makes `import vllm` fail like a missing one.
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install 'popri-flwr\\[vllm\\]'"):
        make_generator("vllm")


class FakeVLLMModuleForTests(types.ModuleType):
    """A stand-in for the ``vllm`` module (not installable here, no GPU): records what the
    generator asks of the engine and answers each request with texts naming its seed."""

    def __init__(self) -> None:
        super().__init__("vllm")
        fake = self
        self.engine_kwargs: dict = {}
        self.requests: list = []

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        class LLM:
            def __init__(self, **kwargs):
                fake.engine_kwargs = kwargs

            def get_tokenizer(self):
                return "fake-tokenizer"

            def _answer(self, prompts, sampling_params):
                assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
                fake.requests = list(zip(prompts, sampling_params, strict=True))
                ns = types.SimpleNamespace
                return [
                    ns(outputs=[ns(text=f"seed {sp.seed} #{j}") for j in range(sp.n)])
                    for sp in sampling_params
                ]

            def generate(self, prompts, sampling_params, lora_request=None):
                return self._answer(prompts, sampling_params)

            def chat(self, messages, sampling_params, lora_request=None):
                return self._answer(messages, sampling_params)

        self.SamplingParams, self.LLM = SamplingParams, LLM


def test_vllm_seeds_each_prompt_and_caches_prefixes(monkeypatch):
    fake = FakeVLLMModuleForTests()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gen = VLLMGenerator("/models/smollm2")
    assert fake.engine_kwargs["enable_prefix_caching"] is True
    assert fake.engine_kwargs["enable_lora"] is True and gen.tokenizer == "fake-tokenizer"
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=33, seed=7)
    out = gen.generate(["a", "b", "c"], params, num_samples=2)
    seeds = [sp.seed for _, sp in fake.requests]
    assert seeds == [prompt_seed(7, i) for i in range(3)] and len(set(seeds)) == 3
    assert out == [[f"seed {s} #0", f"seed {s} #1"] for s in seeds]  # out[i][j]: prompt i
    sp = fake.requests[0][1]
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens) == (2, 0.9, 0.95, 33)
    gen.generate(["a", "b", "c"], SamplingParams(seed=8), 1, chat=True)
    assert fake.requests[0][0] == [{"role": "user", "content": "a"}]
    assert {sp.seed for _, sp in fake.requests}.isdisjoint(seeds)  # another seed, other streams
    VLLMGenerator("/models/smollm2", enable_prefix_caching=False)  # a caller may turn it off
    assert fake.engine_kwargs["enable_prefix_caching"] is False


def test_make_generator_passes_dtype_and_path(generator):
    assert generator.prefix_sharing and generator.dtype == "auto"  # the defaults
    cfg = types.SimpleNamespace(
        backend="transformers",
        model="packaged:smollm2-135m-instruct",
        device="cpu",
        batch_size=5,
        cache_dir=None,
        dtype="float32",
    )
    gen = generator_from_config(cfg, progress=False)
    assert (gen.dtype, gen.batch_size, gen.model) == ("float32", 5, generator.model)
    flat = make_generator("transformers", device="cpu", prefix_sharing=False, progress=False)
    assert not flat.prefix_sharing
    with pytest.raises(ValueError, match="generation.dtype: expected one of auto, float32"):
        make_generator("transformers", device="cpu", dtype="half")


def test_embedder_unit_rows_and_similarity():
    emb = get_embedder()
    assert get_embedder() is emb  # loaded once per process
    x = emb.embed(["The economy grew.", "Economic growth was strong.", "A cat sat on a mat."])
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]
    assert emb.embed([]).shape == (0, 384)
