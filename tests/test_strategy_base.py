"""The shared strategy machinery driven through Flower's Grid interface, without a runtime.

`FakeGrid` (tests/fakegrid.py) stands in for the SuperLink (it is the documented way to
unit-test a Flower strategy): each node answers with a function of our choosing, so malicious,
failing and silent clients can be exercised. `SumStrategy` is the smallest concrete
PrivateStrategy: it releases the noisy sum and records it, so sampling, validation, noise,
accounting and resume are tested exactly as every real method uses them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fakegrid import FakeGrid, reply_with, set_task_identity
from flwr.app import ConfigRecord, Error, Message, RecordDict

from popri_flwr.privacy import PrivacyAccountant, compute_epsilon
from popri_flwr.run_dir import RunDirectory
from popri_flwr.strategies.base import PrivateStrategy

DIM = 8


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def honest(msg: Message) -> Message:
    v = np.full(DIM, 1.0 / math.sqrt(DIM), dtype=np.float32)  # norm exactly 1 = C
    return reply_with(v)(msg)


def failing(msg: Message) -> Message:
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=msg)


def garbage_content(msg: Message) -> Message:
    return Message(RecordDict({"other": ConfigRecord({"x": 1})}), reply_to=msg)


class SumStrategy(PrivateStrategy):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.releases: list[np.ndarray] = []

    def train_payload(self, server_round):
        return RecordDict({"config": ConfigRecord({"method": "sum"})})

    def vector_length(self, server_round):
        return DIM

    def server_update(self, server_round, release):
        self.releases.append(release)
        return {"release_norm": float(np.linalg.norm(release))}


def make(tmp_path, q=1.0, sigma=0.0, eps=math.inf, n=5, seed=0):
    acc = PrivacyAccountant(noise_multiplier=sigma, sample_rate=q, delta=1e-5, target_epsilon=eps)
    return SumStrategy(
        accountant=acc,
        clip_norm=1.0,
        num_clients=n,
        run_dir=RunDirectory(tmp_path),
        seed=seed,
        node_wait_timeout=5,
    )


def test_bad_replies_are_dropped_and_the_round_goes_on(tmp_path, caplog):
    behaviours = {
        1: honest,
        2: honest,
        3: reply_with(np.full(DIM, 10.0, dtype=np.float32)),  # ignores the clip
        4: reply_with(np.array([np.nan] * DIM, dtype=np.float32)),
        5: reply_with(np.zeros(DIM + 1, dtype=np.float32)),  # wrong length
        6: failing,
        7: garbage_content,
        8: lambda m: None,  # times out
    }
    strategy = make(tmp_path, n=len(behaviours))
    with caplog.at_level("WARNING"):
        strategy.start(grid=FakeGrid(behaviours), num_rounds=1)
    # Only the two honest vectors are summed (sigma = 0 here).
    np.testing.assert_allclose(strategy.releases[0], 2 / math.sqrt(DIM), rtol=1e-6)
    rec = RunDirectory(tmp_path).read_rounds()[0]
    assert rec["clients_sampled"] == 8 and rec["clients_accepted"] == 2
    assert rec["clients_rejected"] == 4 and rec["clients_failed"] == 2
    text = caplog.text
    assert "exceeds the clip bound" in text and "non-finite" in text
    assert "wrong shape" in text and "malformed reply" in text and "failed" in text


def test_poisson_sampling_rate_and_reproducibility(tmp_path):
    n, q, rounds = 200, 0.1, 20
    behaviours = {i: honest for i in range(1, n + 1)}
    grid = FakeGrid(behaviours)
    make(tmp_path / "a", q=q, n=n, seed=3).start(grid=grid, num_rounds=rounds)
    sizes = [len(s) for s in grid.sent]
    # Binomial(200, 0.1) per round: mean 20, sd ~4.2; over 20 rounds the mean is within ~3 sd.
    assert abs(np.mean(sizes) - n * q) < 3 * math.sqrt(n * q * (1 - q) / rounds)
    assert len(set(map(tuple, grid.sent))) > 1  # independent draws per round
    grid2 = FakeGrid(behaviours)
    make(tmp_path / "b", q=q, n=n, seed=3).start(grid=grid2, num_rounds=rounds)
    assert grid.sent == grid2.sent  # own seeded RNG, not the global one


def test_noise_has_the_calibrated_spread(tmp_path):
    sigma = 2.0
    strategy = make(tmp_path, sigma=sigma, eps=1e9)
    strategy.vector_length = lambda r: 20_000  # type: ignore[method-assign]
    behaviours = {i: (lambda m: None) for i in range(1, 6)}  # nobody answers: pure noise
    strategy.start(grid=FakeGrid(behaviours), num_rounds=1)
    assert strategy.releases[0].std() == pytest.approx(sigma * 1.0, rel=0.03)


def test_refuses_the_round_that_would_overspend(tmp_path):
    acc = PrivacyAccountant.calibrated(target_epsilon=1.0, delta=1e-5, rounds=2, sample_rate=1.0)
    strategy = SumStrategy(
        accountant=acc,
        clip_norm=1.0,
        num_clients=3,
        run_dir=RunDirectory(tmp_path),
        node_wait_timeout=5,
    )
    strategy.start(grid=FakeGrid({i: honest for i in range(1, 4)}), num_rounds=5)
    rounds = RunDirectory(tmp_path).read_rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["epsilon_spent"] <= 1.0
    assert rounds[-1]["epsilon_spent"] == pytest.approx(
        compute_epsilon(acc.noise_multiplier, 1.0, 2, 1e-5)
    )


def test_resume_after_crash_does_not_spend_twice(tmp_path):
    behaviours = {i: honest for i in range(1, 4)}

    class Crashing(SumStrategy):
        def server_update(self, server_round, release):
            if server_round == 2:
                raise KeyboardInterrupt("simulated crash after the release of round 2")
            return super().server_update(server_round, release)

    acc = PrivacyAccountant(noise_multiplier=5.0, sample_rate=1.0, delta=1e-5, target_epsilon=50.0)
    first = Crashing(
        accountant=acc,
        clip_norm=1.0,
        num_clients=3,
        run_dir=RunDirectory(tmp_path),
        seed=1,
        node_wait_timeout=5,
    )
    grid = FakeGrid(behaviours)
    with pytest.raises(KeyboardInterrupt):
        first.start(grid=grid, num_rounds=3)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["finished_round"] == 1 and state["released_round"] == 2
    release2 = np.load(tmp_path / "checkpoint" / "release_round_002.npy")

    fresh_acc = PrivacyAccountant(
        noise_multiplier=5.0, sample_rate=1.0, delta=1e-5, target_epsilon=50.0
    )
    second = make(tmp_path, sigma=5.0, eps=50.0, n=3, seed=1)
    second.accountant = fresh_acc
    grid2 = FakeGrid(behaviours)
    second.start(grid=grid2, num_rounds=3)
    # Round 2 was finished from its saved release (no messages); only round 3 asked clients.
    assert len(grid2.sent) == 1
    np.testing.assert_array_equal(second.releases[0], release2)
    rounds = RunDirectory(tmp_path).read_rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert second.accountant.rounds_spent == 3
    assert rounds[-1]["epsilon_spent"] == pytest.approx(compute_epsilon(5.0, 1.0, 3, 1e-5))


def test_resume_refuses_a_different_mechanism(tmp_path):
    behaviours = {i: honest for i in range(1, 4)}
    make(tmp_path, sigma=5.0, eps=50.0, n=3).start(grid=FakeGrid(behaviours), num_rounds=1)
    other = make(tmp_path, sigma=4.0, eps=50.0, n=3)
    with pytest.raises(ValueError, match="privacy: the run being resumed used sigma=5"):
        other.start(grid=FakeGrid(behaviours), num_rounds=2)
