"""Tests for popri_flwr.evaluation.synthetic and ``popri-generate`` with the real packaged SmolLM2.

A fake-but-complete POPri run directory is written once per module: the run's resolved config
(tiny sampling settings), a public set, ``state.json`` saying round 1 finished, and a LoRA
adapter of round 1 on SmolLM2 whose B matrices are random (so it visibly changes the model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from popri_flwr.algorithms.prompts import few_shot_prompt
from popri_flwr.cli.generate import main as cli_main
from popri_flwr.config import RunConfig, from_mapping, to_dict
from popri_flwr.evaluation.synthetic import generate_synthetic, load_texts_jsonl
from popri_flwr.hydra_config import compose
from popri_flwr.models.index_sampling import _noise_processor, prompt_for
from popri_flwr.models.loading import (
    DEFAULT_GENERATOR,
    load_causal_lm,
    load_generator_model,
    resolve_model_path,
)
from popri_flwr.run_dir import find_adapter

PUBLIC = [
    "The President spoke about the economy and the jobs created this year.",
    "Congress must pass a budget that protects our schools and our roads.",
    "Our armed forces keep the nation safe and deserve our support.",
    "Trade with our neighbours grew, and farmers sold more grain abroad.",
    "We will cut taxes for working families and reform the tax code.",
]
OVERRIDES = [
    "experiment=demo",
    "seed=3",
    "generation.max_new_tokens=6",
    "generation.truncate_tokens=5",
    "generation.batch_size=2",
    "generation.device=cpu",
    "strategy.shots=2",
]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores stall 3-10x; one is steady
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("run")
    cfg = from_mapping(RunConfig, compose(OVERRIDES))  # the run's resolved config
    (root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (root / "public_set.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PUBLIC))
    (root / "state.json").write_text(json.dumps({"finished_round": 1}))
    model, _ = load_causal_lm(device="cpu")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft.save_pretrained(root / "adapter")
    (root / "adapter" / "popri_round.json").write_text(json.dumps({"round": 1}))
    return root


@pytest.fixture(scope="module")
def fresh_path(run_dir, tmp_path_factory) -> Path:
    """Four texts written in one uninterrupted call (the reference for resumed files)."""
    out = tmp_path_factory.mktemp("fresh") / "fresh.jsonl"
    return generate_synthetic(run_dir, 4, out, progress=False)


@pytest.fixture(scope="module")
def fresh4(fresh_path) -> list[dict]:
    return read_rows(fresh_path)


def copy_output(src: Path, dst: Path) -> None:
    shutil.copy(src, dst)
    shutil.copy(f"{src}.meta.json", f"{dst}.meta.json")


# ------------------------------------------------------------------ generation
def test_writes_n_texts_with_indices(fresh4, run_dir):
    assert [r["index"] for r in fresh4] == [0, 1, 2, 3]
    assert [r["prompt_index"] for r in fresh4] == [0, 1, 2, 3]
    assert all(isinstance(r["text"], str) for r in fresh4)
    assert sum(bool(r["text"].strip()) for r in fresh4) >= 3
    tok = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_GENERATOR))
    for r in fresh4:  # generation.truncate_tokens = 5 (the run's setting) is applied
        assert len(tok(r["text"], add_special_tokens=False)["input_ids"]) <= 5
        assert "Original Text Sample" not in r["text"]


def test_adapter_is_folded_into_the_weights(run_dir):
    from safetensors.torch import load_file

    base, _ = load_causal_lm(device="cpu")
    merged, _ = load_generator_model(DEFAULT_GENERATOR, run_dir / "adapter", device="cpu")
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.5.self_attn.q_proj"
    a, b = saved[f"{prefix}.lora_A.weight"], saved[f"{prefix}.lora_B.weight"]
    scale = 8 / 4  # peft's default lora_alpha / r
    expected = base.model.layers[5].self_attn.q_proj.weight + scale * b @ a
    got = merged.model.layers[5].self_attn.q_proj.weight
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base.model.layers[5].self_attn.q_proj.weight, atol=1e-3)
    assert not hasattr(merged, "peft_config")  # a plain model: no LoRA matmuls per token


def test_base_model_and_samples_per_prompt(fresh4, run_dir, tmp_path):
    out = generate_synthetic(run_dir, 2, tmp_path / "b.jsonl", adapter=False, samples_per_prompt=2)
    base = read_rows(out)
    assert [r["prompt_index"] for r in base] == [0, 0]
    # Text 0 has the same prompt and seed as with the adapter: only the model differs.
    assert base[0]["text"] != fresh4[0]["text"]
    meta = json.loads((tmp_path / "b.jsonl.meta.json").read_text())
    assert meta["adapter"] is None and meta["samples_per_prompt"] == 2
    assert meta["seed"] == 3  # the run's seed
    assert meta["sampling"]["max_new_tokens"] == 6 and meta["sampling"]["truncate_tokens"] == 5
    # Without a run directory, the same config, public set and model give the same texts.
    cfg = from_mapping(RunConfig, compose(OVERRIDES))
    runless = generate_synthetic(
        None, 2, tmp_path / "r.jsonl", config=cfg, public_texts=PUBLIC, samples_per_prompt=2
    )
    assert read_rows(runless) == base
    with pytest.raises(ValueError, match="^out_path: required when no run directory"):
        generate_synthetic(None, 2, config=cfg, public_texts=PUBLIC)


def test_chat_prompt_style_is_followed_and_recorded(tmp_path):
    import dataclasses

    cfg = from_mapping(RunConfig, compose(OVERRIDES))
    chat = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, prompt_style="chat"))
    kw = dict(public_texts=PUBLIC, samples_per_prompt=2, adapter=False, progress=False)
    out = generate_synthetic(None, 2, tmp_path / "c.jsonl", config=chat, **kw)
    listed = generate_synthetic(None, 2, tmp_path / "l.jsonl", config=cfg, **kw)
    assert read_rows(out) != read_rows(listed)  # same seeds and examples, other prompts
    meta = json.loads((tmp_path / "c.jsonl.meta.json").read_text())
    assert meta["prompt_style"] == "chat"
    # The default style is not written, so files from before the key existed still continue.
    assert "prompt_style" not in json.loads((tmp_path / "l.jsonl.meta.json").read_text())
    with pytest.raises(ValueError, match=r"other settings \(prompt_style: "):
        generate_synthetic(None, 3, out, config=cfg, **kw)


def test_final_set_may_be_sampled_otherwise_than_the_loop(run_dir, tmp_path):
    # Two texts of one prompt: the run's sampling (T = 1) draws two different continuations;
    # the greedy override (T = 0) must give the same one twice, and says so in its meta file.
    loop = read_rows(
        generate_synthetic(run_dir, 2, tmp_path / "t1.jsonl", samples_per_prompt=2, progress=False)
    )
    assert loop[0]["text"] != loop[1]["text"]
    out = tmp_path / "t0.jsonl"
    greedy = read_rows(
        generate_synthetic(
            run_dir, 2, out, samples_per_prompt=2, temperature=0.0, top_p=0.5, progress=False
        )
    )
    assert greedy[0]["text"] == greedy[1]["text"]
    meta = json.loads((tmp_path / "t0.jsonl.meta.json").read_text())
    assert meta["sampling"]["temperature"] == 0.0 and meta["sampling"]["top_p"] == 0.5
    with pytest.raises(ValueError, match=r"other settings \(sampling: "):
        generate_synthetic(run_dir, 3, out, samples_per_prompt=2)  # the run's T: refused
    with pytest.raises(ValueError, match="^temperature: must be >= 0"):
        generate_synthetic(run_dir, 2, tmp_path / "x.jsonl", temperature=-1.0)
    with pytest.raises(ValueError, match=r"^top_p: must be in \(0, 1\]"):
        generate_synthetic(run_dir, 2, tmp_path / "x.jsonl", top_p=0.0)


def test_gumbel_sampler_draws_from_the_top_p_distribution():
    # argmax(logits / T + Gumbel) after top-p must be a draw from softmax(logits / T) cut to
    # the top-p set (what transformers' multinomial sampling draws from).
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits / 1.5, 0).numpy()  # 0.52, 0.27, 0.14, 0.07
    keep = np.cumsum(probs) - probs < 0.9  # smallest prefix reaching 0.9: tokens 0..2
    assert keep.tolist() == [True, True, True, False]
    expected = np.where(keep, probs, 0) / probs[keep].sum()
    rows, steps = 3000, 4
    pipeline = LogitsProcessorList(
        [TemperatureLogitsWarper(1.5), TopPLogitsWarper(0.9), _noise_processor(range(rows))]
    )
    draws = [pipeline(None, logits.repeat(rows, 1)).argmax(-1) for _ in range(steps)]
    freq = np.bincount(torch.cat(draws).numpy(), minlength=4) / (rows * steps)
    assert freq[3] == 0  # outside the top-p set: never
    assert np.abs(freq - expected).max() < 0.015, (freq, expected)


def test_gumbel_noise_of_a_row_ignores_its_batch_mates():
    alone, batch = _noise_processor([11]), _noise_processor([5, 11, 7])
    scores = torch.zeros(1, 50)
    for _ in range(3):  # step by step, the same draws
        a = alone(None, scores.clone())
        b = batch(None, scores.repeat(3, 1))
        assert torch.equal(a[0], b[1]) and not torch.equal(b[0], b[1])


def test_prompts_follow_popri_construction():
    prompt = prompt_for(PUBLIC, 7, seed=3, shots=2)
    assert prompt == prompt_for(PUBLIC, 7, seed=3, shots=2)  # a function of (seed, index)
    shown = [t for t in PUBLIC if t in prompt]
    assert len(shown) == 2
    # The same few-shot list prompt POPri builds each round, over two public texts.
    assert prompt in {few_shot_prompt([a, b]) for a in shown for b in shown if a != b}
    assert len({prompt_for(PUBLIC, i, 3, 2) for i in range(10)}) > 3


def test_resume_equals_an_uninterrupted_file(fresh4, run_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    generate_synthetic(run_dir, 2, out, progress=False)
    rows = read_rows(out)
    assert rows == fresh4[:2]
    # Mark line 0: continuing must keep the lines already written, not start again.
    rows[0]["text"] = "KEPT"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate_synthetic(run_dir, 4, out, progress=False)
    assert read_rows(out) == [rows[0], *fresh4[1:]]


def test_resume_after_a_crash_mid_batch(fresh_path, fresh4, run_dir, tmp_path):
    # Three full lines and a torn fourth: index 3 shares its batch with index 2 (batch 2).
    out = tmp_path / "s.jsonl"
    copy_output(fresh_path, out)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    generate_synthetic(run_dir, 4, out, progress=False)
    assert read_rows(out) == fresh4


def test_texts_do_not_depend_on_batch_mates(fresh4, run_dir, tmp_path):
    # Each text has its own seeded stream: batch size 1 (no padding, no batch mates) gives the
    # texts of batch size 2 (up to float round-off of the padding, which does not flip a token
    # here).
    single = read_rows(generate_synthetic(run_dir, 2, tmp_path / "one.jsonl", batch_size=1))
    assert single == fresh4[:2]


def test_longer_file_is_cut_and_other_settings_are_refused(fresh_path, fresh4, run_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    copy_output(fresh_path, out)
    generate_synthetic(run_dir, 3, out, progress=False)  # no model needed
    assert read_rows(out) == fresh4[:3]
    with pytest.raises(ValueError, match=r"s\.jsonl: was written with other settings \(seed: 3"):
        generate_synthetic(run_dir, 4, out, seed=4)
    with pytest.raises(ValueError, match=r"other settings \(adapter_round: 1, now None\)"):
        generate_synthetic(run_dir, 4, out, adapter=False)
    (tmp_path / "s.jsonl.meta.json").unlink()
    with pytest.raises(ValueError, match=r"s\.jsonl: holds 3 lines but no s\.jsonl\.meta\.json"):
        generate_synthetic(run_dir, 4, out)


def test_cli(fresh_path, fresh4, run_dir, tmp_path, capsys):
    # A copy of the 4-text file asked for 3: the CLI reaches the library (which cuts the file
    # without loading a model) and prints the output path.
    out = tmp_path / "cli.jsonl"
    copy_output(fresh_path, out)
    assert cli_main([str(run_dir), "-n", "3", "-o", str(out), "--quiet"]) == 0
    assert read_rows(out) == fresh4[:3]
    assert capsys.readouterr().out.strip() == str(out)
    # The settings reach the library too: another seed is refused for this file.
    assert cli_main([str(run_dir), "-n", "4", "-o", str(out), "--seed", "9", "--quiet"]) == 2
    assert "other settings (seed: 3, now 9)" in capsys.readouterr().err
    assert (
        cli_main([str(run_dir), "-n", "4", "-o", str(out), "--temperature", "0.5", "--quiet"]) == 2
    )
    assert "other settings (sampling: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main([str(run_dir), "-n", "0", "-o", str(out)])
    assert exc.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "nope"), "-n", "2", "--quiet"]) == 2
    assert "nope: no such directory" in capsys.readouterr().err


# ------------------------------------------------------------------ errors
def test_n_must_be_positive(run_dir, tmp_path):
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="^n: must be a positive integer"):
            generate_synthetic(run_dir, n, tmp_path / "x.jsonl")


def test_missing_run_dir_config_and_public_set(run_dir, tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nope'}: no such directory"):
        generate_synthetic(tmp_path / "nope", 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"^{empty / 'config.yaml'}: missing"):
        generate_synthetic(empty, 2)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run_dir / "config.yaml", partial)
    with pytest.raises(ValueError, match=f"^{partial}: no finished round"):
        generate_synthetic(partial, 2)
    with pytest.raises(ValueError, match=f"^{partial / 'public_set.jsonl'}: missing"):
        generate_synthetic(partial, 2, adapter=False)
    (partial / "config.yaml").write_text("rounds: [1, 2]\n")
    with pytest.raises(ValueError, match=f"^{partial / 'config.yaml'}: rounds: expected int"):
        generate_synthetic(partial, 2)


def test_find_adapter_uses_the_last_finished_round(run_dir, tmp_path):
    assert find_adapter(run_dir) == (run_dir / "adapter", 1)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "state.json").write_text(json.dumps({"finished_round": 2}))
    with pytest.raises(ValueError, match=f"^{copy}: no adapter of its last finished round 2"):
        find_adapter(copy)
    (copy / "adapter").rename(copy / "adapter.old")  # mid-replacement: the old one is valid
    (copy / "adapter.old" / "popri_round.json").write_text(json.dumps({"round": 2}))
    assert find_adapter(copy) == (copy / "adapter.old", 2)


def _save_adapter(model, targets: list[str], path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=4, target_modules=targets)).save_pretrained(path)
    return path


def test_adapter_of_another_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    path = _save_adapter(gpt2, ["c_attn"], tmp_path / "gpt2")
    msg = f"^{path}: adapter does not match base model {DEFAULT_GENERATOR}: .*c_attn"
    with pytest.raises(ValueError, match=msg):
        load_generator_model(DEFAULT_GENERATOR, path, device="cpu")


def test_adapter_of_another_width(tmp_path, run_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )
    path = _save_adapter(small, ["q_proj", "v_proj"], tmp_path / "narrow")
    msg = f"^{path}: adapter does not match base model {DEFAULT_GENERATOR}: .*size mismatch"
    with pytest.raises(ValueError, match=msg):  # through the main API, as the CLI sees it
        generate_synthetic(run_dir, 2, tmp_path / "x.jsonl", adapter=path)


def test_adapter_of_a_shallower_model(tmp_path):
    # Same width, 1 layer instead of 30: PEFT itself only warns about the missing weights.
    from transformers import LlamaConfig, LlamaForCausalLM

    shallow = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=576,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=64,
        )
    )
    path = _save_adapter(shallow, ["q_proj", "v_proj"], tmp_path / "shallow")
    with pytest.raises(
        ValueError, match=f"^{path}: adapter does not match .*no weights for 116 of the model's 120"
    ):
        load_generator_model(DEFAULT_GENERATOR, path, device="cpu")
    with pytest.raises(ValueError, match=f"^{tmp_path}: no adapter_config.json"):
        load_generator_model(DEFAULT_GENERATOR, tmp_path, device="cpu")


# ------------------------------------------------------------------ load_texts_jsonl
def test_load_texts_jsonl(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a", "index": 0}\n\n{"text": ""}\n{"body": "b", "text": "c"}\n')
    assert load_texts_jsonl(good) == ["a", "", "c"]  # blank lines skipped, blank texts kept


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a"}\n{"body": "b"}\n', "line 2 has no 'text' field"),
        ('{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
        ('["text"]\n', "line 1 has no 'text' field"),
        ('{"text": 3}\n', "line 1: 'text' is not a string"),
        ("", r"no texts \(empty synthetic set\)"),
        ('{"text": ""}\n{"text": "  "}\n', r"no texts \(empty synthetic set\)"),
    ],
)
def test_load_texts_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        load_texts_jsonl(path)


def test_load_texts_jsonl_missing_file_and_other_field(tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nope.jsonl'}: no such file"):
        load_texts_jsonl(tmp_path / "nope.jsonl")
    path = tmp_path / "b.jsonl"
    path.write_text('{"body": "x"}\n')
    assert load_texts_jsonl(path, field="body") == ["x"]
    with pytest.raises(ValueError, match="line 1 has no 'text' field"):
        load_texts_jsonl(path)
