import numpy as np
import pytest

from popri_flwr.algorithms.preference import build_pairs, pairs_from_rows


def test_best_and_rank_r_by_index_with_duplicate_strings():
    prompts = ["p0", "p1"]
    # Prompt 0 has two identical strings with different scores: indices must decide.
    samples = ["dup", "a", "dup", "b", "c", "d", "e", "f"]
    scores = np.array([0.1, 0.5, 0.9, 0.3, 1.0, 2.0, 3.0, 4.0])
    pairs = build_pairs(prompts, samples, scores, samples_per_prompt=4, reject_rank=2)
    # prompt 0 ranking: idx2 (0.9), idx1 (0.5), idx3 (0.3), idx0 (0.1)
    assert pairs.chosen_index.tolist() == [2, 7]
    assert pairs.rejected_index.tolist() == [3, 5]
    assert pairs.chosen == ["dup", "f"] and pairs.rejected == ["b", "d"]
    np.testing.assert_allclose(pairs.score_gap, [0.6, 2.0])
    rec = pairs.as_records()[0]
    assert rec == {"prompt": "p0", "chosen": "dup", "rejected": "b"}


def test_duplicate_string_as_rejected_keeps_its_own_score():
    samples = ["x", "x", "y"]
    pairs = build_pairs(["p"], samples, np.array([5.0, -1.0, 0.0]), 3, reject_rank=2)
    assert pairs.chosen_index.tolist() == [0] and pairs.rejected_index.tolist() == [1]
    assert pairs.score_gap.tolist() == [6.0]


def test_empty_samples_are_skipped_and_shapes_checked():
    pairs = build_pairs(["p", "q"], ["", "a", "b", "c"], np.array([9.0, 0, 1, 0]), 2, 1)
    assert pairs.prompts == ["q"]
    with pytest.raises(ValueError, match="expected 2\\*2=4"):
        build_pairs(["p", "q"], ["a"] * 3, np.zeros(3), 2, 1)
    with pytest.raises(ValueError, match="strategy.reject_rank"):
        build_pairs(["p"], ["a", "b"], np.zeros(2), 2, 2)


def test_pairs_from_released_rows_are_the_rounds_pairs():
    prompts, j = ["p0", "p1"], 3
    samples = ["a", "b", "c", "d", "e", "f"]
    scores = np.array([0.2, 0.9, -1.0, 3.0, 2.5, 0.1])
    rows = [
        {"prompt_id": i // j, "prompt": prompts[i // j], "text": t, "noisy_score": float(s)}
        for i, (t, s) in enumerate(zip(samples, scores, strict=True))
    ]
    again, direct = pairs_from_rows(rows, j, 2), build_pairs(prompts, samples, scores, j, 2)
    assert again.as_records() == direct.as_records()
    assert again.chosen_index.tolist() == direct.chosen_index.tolist() == [1, 3]
    assert again.as_records() == [
        {"prompt": "p0", "chosen": "b", "rejected": "c"},
        {"prompt": "p1", "chosen": "d", "rejected": "f"},
    ]
    with pytest.raises(ValueError, match="no noisy_score"):
        pairs_from_rows([{**rows[0], "noisy_score": None}, *rows[1:]], j, 2)
    with pytest.raises(ValueError, match="whole prompts of 3"):
        pairs_from_rows(rows[:4], j, 2)
    with pytest.raises(ValueError, match="prompt-major"):
        pairs_from_rows(rows[3:] + rows[:3], j, 2)


def test_all_pairing_takes_every_pair_at_least_r_ranks_apart():
    # Prompt 0 ranks idx 1 > 3 > 0 > 2; prompt 1 ranks idx 4 > 7 > 6 > 5.
    scores = np.array([0.5, 2.0, -1.0, 1.0, 9.0, 0.0, 1.0, 3.0])
    samples = ["a", "b", "c", "d", "e", "", "g", "h"]
    pairs = build_pairs(["p0", "p1"], samples, scores, 4, reject_rank=2, pairing="all")
    # Rank pairs (0, 2), (0, 3), (1, 3) per prompt, prompt-major; prompt 1's (0, 3) and
    # (1, 3) have the empty sample as rejected and are skipped, its (0, 2) is kept.
    assert pairs.chosen_index.tolist() == [1, 1, 3, 4]
    assert pairs.rejected_index.tolist() == [0, 2, 2, 6]
    assert pairs.prompts == ["p0", "p0", "p0", "p1"]
    np.testing.assert_allclose(pairs.score_gap, [1.5, 3.0, 2.0, 8.0])
    assert (scores[pairs.chosen_index] > scores[pairs.rejected_index]).all()
    # r = 1 is every pair, J(J-1)/2 per prompt; r = J - 1 is the paper's single pair.
    every = build_pairs(["p0", "p1"], list("abcdefgh"), scores, 4, 1, pairing="all")
    assert len(every) == 2 * 6
    last = build_pairs(["p0", "p1"], list("abcdefgh"), scores, 4, 3, pairing="all")
    assert (
        last.as_records() == build_pairs(["p0", "p1"], list("abcdefgh"), scores, 4, 3).as_records()
    )
    with pytest.raises(ValueError, match="strategy.pairing"):
        build_pairs(["p0", "p1"], samples, scores, 4, 2, pairing="best")
