"""Tests for popri_flwr.evaluation.downstream: the paper's downstream next-token accuracy.

The metric is checked against a hand-computed case, the encoding against a hand-made tokenizer,
and training on a tiny GPT-2 (1 layer, 32 wide, 16 tokens) against an untrained model.
"""

from __future__ import annotations

import pytest
import torch

from popri_flwr.evaluation.downstream import (
    DownstreamConfig,
    build_model,
    encode_for_lm,
    evaluate_lm,
    load_tokenizer,
    next_token_accuracy,
    train_downstream,
)

# Two sentences the tiny model can memorize; the eval set repeats them.
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
]
TRAIN = SENTENCES * 20
EVAL = SENTENCES * 3
UNRELATED = ["purple monkeys dance under a silver moon tonight"] * 40


def tiny_config(**kw) -> DownstreamConfig:
    base = dict(
        n_layer=1,
        n_head=2,
        n_embd=32,
        seq_len=16,
        epochs=3,
        batch_size=8,
        learning_rate=1e-2,
        seed=0,
    )
    return DownstreamConfig(**{**base, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores stall 3-10x; one is steady
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ next_token_accuracy
def test_next_token_accuracy_hand_computed():
    # vocab 6, two rows of length 4; right padding with pad id 0.
    input_ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logits = torch.zeros(2, 4, 6)
    # row 0, position 0 predicts token 2 (target 2): right at top-1.
    logits[0, 0] = torch.tensor([0.0, 1.0, 9.0, 2.0, 3.0, 4.0])
    # row 0, position 1: target 3 is second best -> wrong at top-1, right at top-2 and top-5.
    logits[0, 1] = torch.tensor([0.0, 1.0, 2.0, 8.0, 9.0, 3.0])
    # row 0, position 2 -> target is padding: a perfect prediction of the pad id must not count.
    logits[0, 2] = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # row 1, position 0: target 5 has the lowest logit -> wrong even at top-5 (of 6).
    logits[1, 0] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, -1.0])
    # row 1, positions 1 and 2 -> padding targets, predicted "correctly"; ignored.
    logits[1, 1] = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    logits[1, 2] = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # the last position has no target at all; make it "predict" everything.
    logits[:, 3] = 100.0

    out = next_token_accuracy(logits, input_ids, mask, k=(1, 2, 5))
    # Scored: (0,0)->2, (0,1)->3, (1,0)->5. top1: 1/3, top2: 2/3, top5: 2/3.
    assert out["total"] == 3
    assert out["correct_top1"] == 1 and out["top1"] == pytest.approx(1 / 3)
    assert out["correct_top2"] == 2 and out["top2"] == pytest.approx(2 / 3)
    assert out["correct_top5"] == 2 and out["top5"] == pytest.approx(2 / 3)

    # Counting the padding would change the numbers: unmask everything to prove it matters.
    full = next_token_accuracy(logits, input_ids, torch.ones_like(mask), k=(1,))
    assert full["total"] == 6 and full["correct_top1"] == 4


def test_next_token_accuracy_nothing_scored_and_shape_error():
    ids = torch.tensor([[1, 0, 0]])
    mask = torch.tensor([[1, 0, 0]])
    out = next_token_accuracy(torch.randn(1, 3, 5), ids, mask)
    assert out["total"] == 0 and out["top1"] == 0.0 and out["top5"] == 0.0
    with pytest.raises(ValueError, match="do not match input_ids"):
        next_token_accuracy(torch.randn(1, 2, 5), ids, mask)
    with pytest.raises(ValueError, match="do not match input_ids"):
        next_token_accuracy(torch.randn(3, 5), ids, mask)


# ------------------------------------------------------------------ encode_for_lm
class WordTokenizer:
    """Maps each word to a fixed id; no BOS token (GPT-2 style), EOS = 9, no pad token."""

    VOCAB = {"a": 3, "b": 4, "c": 5, "d": 6, "e": 7}
    bos_token_id = None
    eos_token_id = 9
    pad_token_id = None

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[self.VOCAB[w] for w in t.split()] for t in texts]}


class WordTokenizerWithBos(WordTokenizer):
    bos_token_id = 1
    pad_token_id = 0


def test_encode_for_lm_bos_eos_padding_by_hand():
    ids, mask = encode_for_lm(["a b", "c d e a b", ""], WordTokenizerWithBos(), seq_len=5)
    assert ids.tolist() == [
        [1, 3, 4, 9, 0],  # BOS a b EOS pad
        [1, 5, 6, 7, 3],  # longer than seq_len - 1: cut, no EOS
        [1, 9, 0, 0, 0],  # empty text: BOS EOS
    ]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_encode_for_lm_without_bos_uses_eos_and_mask_from_lengths():
    # No BOS and no pad token: EOS plays both; the mask must still mark the real EOS.
    ids, mask = encode_for_lm(["a", "b c"], WordTokenizer(), seq_len=4)
    assert ids.tolist() == [[9, 3, 9, 9], [9, 4, 5, 9]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    empty_ids, empty_mask = encode_for_lm([], WordTokenizer(), seq_len=4)
    assert empty_ids.shape == (0, 4) and empty_mask.sum() == 0
    with pytest.raises(ValueError, match="downstream.seq_len"):
        encode_for_lm(["a"], WordTokenizer(), seq_len=1)


def test_encode_for_lm_real_tokenizer_round_trip():
    tok = load_tokenizer(DownstreamConfig())
    text = "The state of the union is strong."
    ids, mask = encode_for_lm([text, "Hi"], tok, seq_len=32)
    real = ids[0][mask[0].bool()].tolist()
    assert real[0] == tok.bos_token_id and real[-1] == tok.eos_token_id
    assert tok.decode(real[1:-1]) == text
    # SmolLM2's pad id equals its EOS id: only the mask tells them apart.
    assert tok.pad_token_id == tok.eos_token_id
    assert int(mask[1].sum()) == len(tok("Hi", add_special_tokens=False)["input_ids"]) + 2
    assert (ids[1][mask[1] == 0] == tok.pad_token_id).all()


# ------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained():
    return train_downstream(TRAIN, EVAL, tiny_config(), progress=False)


def test_training_beats_an_untrained_model(trained):
    cfg = tiny_config()
    tok = load_tokenizer(cfg)
    ids, mask = encode_for_lm(EVAL, tok, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    untrained = evaluate_lm(build_model(cfg, tok), ids, mask, cfg.batch_size)
    assert trained.eval_tokens == untrained["tokens"] == int(mask[:, 1:].sum())
    assert trained.best_top1 >= untrained["top1"] + 0.4, (trained.best_top1, untrained)
    assert trained.best_top5 >= trained.best_top1
    assert trained.per_epoch[-1]["eval_loss"] < untrained["loss"] - 2.0
    # best_* are the maxima over the per-epoch log, and best_epoch points at the best top-1.
    assert trained.best_top1 == max(r["top1"] for r in trained.per_epoch)
    assert trained.per_epoch[trained.best_epoch - 1]["top1"] == trained.best_top1
    assert len(trained.per_epoch) == 3
    assert trained.train_tokens == int(encode_for_lm(TRAIN, tok, cfg.seq_len)[1].sum())


def test_training_on_unrelated_text_scores_lower(trained):
    other = train_downstream(UNRELATED, EVAL, tiny_config(), progress=False)
    assert other.best_top1 < trained.best_top1 - 0.2, (other.best_top1, trained.best_top1)


def test_seed_reproducibility_and_global_rng_untouched(trained):
    state = torch.get_rng_state()
    # Same seed: one epoch reproduces the first epoch of the 3-epoch run exactly.
    again = train_downstream(TRAIN, EVAL, tiny_config(epochs=1), progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    strip = {k: v for k, v in trained.per_epoch[0].items() if k != "seconds"}
    assert {k: v for k, v in again.per_epoch[0].items() if k != "seconds"} == strip
    other_seed = train_downstream(TRAIN, EVAL, tiny_config(seed=1, epochs=1), progress=False)
    assert other_seed.per_epoch[0]["train_loss"] != trained.per_epoch[0]["train_loss"]


def test_bf16_autocast_stays_close_to_float32():
    # The same seeded run in float32 and under bf16 autocast: not bit-identical (so autocast is
    # really on), but within a stated tolerance of the loss and the metric.
    fp32 = train_downstream(TRAIN, EVAL, tiny_config(bf16=False), progress=False)
    bf16 = train_downstream(TRAIN, EVAL, tiny_config(bf16=True), progress=False)
    first32, first16 = fp32.per_epoch[0], bf16.per_epoch[0]
    assert first16["train_loss"] != first32["train_loss"]
    assert first16["train_loss"] == pytest.approx(first32["train_loss"], rel=0.02)
    assert first16["eval_loss"] == pytest.approx(first32["eval_loss"], rel=0.05)
    assert abs(bf16.best_top1 - fp32.best_top1) <= 0.05, (bf16.best_top1, fp32.best_top1)


def test_bf16_default_follows_the_hardware(caplog):
    from popri_flwr.models.loading import native_bf16

    assert DownstreamConfig().bf16 is None
    with caplog.at_level("INFO", logger="popri_flwr.evaluation.downstream"):
        train_downstream(TRAIN[:4], EVAL, tiny_config(epochs=1), progress=False)
    assert f"bf16 {native_bf16('cpu')}" in caplog.text


def test_token_budget_cuts_the_training_set():
    result = train_downstream(
        TRAIN, EVAL, tiny_config(epochs=1, max_train_tokens=50), progress=False
    )
    assert result.train_tokens == 50


# ------------------------------------------------------------------ errors
def test_empty_training_set():
    with pytest.raises(ValueError, match="synthetic set is empty"):
        train_downstream(["", "   "], EVAL, tiny_config(), progress=False)


def test_evaluation_split_without_tokens():
    with pytest.raises(ValueError, match="evaluation split has no tokens"):
        train_downstream(TRAIN, ["", "\n"], tiny_config(), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"n_layer": 0}, "downstream.n_layer"),
        ({"batch_size": 2.5}, "downstream.batch_size"),
        ({"seq_len": 1}, "downstream.seq_len"),
        ({"n_embd": 30, "n_head": 4}, "downstream.n_embd"),
        ({"dropout": 1.0}, "downstream.dropout"),
        ({"learning_rate": 0.0}, "downstream.learning_rate"),
        ({"learning_rate": float("nan")}, "downstream.learning_rate"),
        ({"weight_decay": -0.1}, "downstream.weight_decay"),
        ({"max_train_tokens": 0}, "downstream.max_train_tokens"),
        ({"model": ""}, "downstream.model"),
        ({"bf16": "yes"}, "downstream.bf16"),
    ],
)
def test_bad_config_values(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}: "):
        DownstreamConfig(**kwargs)
