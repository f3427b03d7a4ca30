"""Prompts, sample extraction, the transformers generator (real SmolLM2) and the embedder."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from popri_flwr.embedding import get_embedder
from popri_flwr.generation import SamplingParams, generate_samples, make_generator
from popri_flwr.prompts import build_prompts, extract_sample, few_shot_prompt

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


def test_unknown_backend_and_missing_vllm(monkeypatch):
    with pytest.raises(ValueError, match="generation.backend: expected transformers or vllm"):
        make_generator("tgi")
    # vLLM is not installable here: a None entry makes `import vllm` fail like a missing one.
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install 'popri-flwr\\[vllm\\]'"):
        make_generator("vllm")


def test_embedder_unit_rows_and_similarity():
    emb = get_embedder()
    assert get_embedder() is emb  # loaded once per process
    x = emb.embed(["The economy grew.", "Economic growth was strong.", "A cat sat on a mat."])
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]
    assert emb.embed([]).shape == (0, 384)
