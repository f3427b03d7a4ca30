"""The shared strategy machinery driven through Flower's Grid interface, without a runtime.

`FakeGrid` (tests/fakegrid.py) stands in for the SuperLink (it is the documented way to
unit-test a Flower strategy): each node answers with a function of our choosing, so malicious,
failing and silent clients can be exercised. `SumStrategy` is the smallest concrete
PrivateStrategy: it releases the noisy sum and records it, so sampling, validation, noise,
accounting, diagnostics and resume are tested exactly as every real method uses them.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from fakegrid import FakeGrid, reply_with, set_task_identity
from flwr.app import ConfigRecord, Error, Message, RecordDict

from popri_flwr.config import ConfigError
from popri_flwr.privacy.accounting import PrivacyAccountant, compute_epsilon
from popri_flwr.privacy.clipping import clip_to_norm
from popri_flwr.privacy.diagnostics import read_diagnostics
from popri_flwr.run_dir import RunDirectory
from popri_flwr.strategies.base import (
    NOT_DP_MARKER,
    PopulationError,
    PrivateStrategy,
    TooFewReplies,
)

DIM = 8


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def honest(msg: Message) -> Message:
    v = np.full(DIM, 1.0 / math.sqrt(DIM), dtype=np.float32)  # norm 1 = C (within float32)
    return reply_with(clip_to_norm(v, 1.0))(msg)


def failing(msg: Message) -> Message:
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=msg)


def garbage_content(msg: Message) -> Message:
    return Message(RecordDict({"other": ConfigRecord({"x": 1})}), reply_to=msg)


class SumStrategy(PrivateStrategy):
    def __init__(self, dim=DIM, **kw):
        super().__init__(**kw)
        self.dim = dim
        self.releases: list[np.ndarray] = []

    def train_payload(self, server_round):
        return RecordDict({"config": ConfigRecord({"method": "sum"})})

    def vector_length(self, server_round):
        return self.dim

    def server_update(self, server_round, release):
        self.releases.append(release)
        return {"release_norm": float(np.linalg.norm(release))}


def make(tmp_path, q=1.0, sigma=0.0, eps=math.inf, n=5, seed=0, clip=1.0, **kw):
    acc = PrivacyAccountant(noise_multiplier=sigma, sample_rate=q, delta=1e-5, target_epsilon=eps)
    return SumStrategy(
        accountant=acc,
        clip_norm=clip,
        num_clients=n,
        run_dir=RunDirectory(tmp_path),
        seed=seed,
        node_wait_timeout=1,
        **kw,
    )


# ------------------------------------------------------------------------------ validation
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
    strategy = make(tmp_path, n=len(behaviours), diagnostics=True)
    with caplog.at_level("INFO"):
        strategy.start(grid=FakeGrid(behaviours), num_rounds=1)
    # Only the two honest vectors are summed (sigma = 0 here).
    np.testing.assert_allclose(strategy.releases[0], 2 / math.sqrt(DIM), rtol=1e-6)
    diag = read_diagnostics(tmp_path)[0]
    assert diag["clients_sampled"] == 8 and diag["clients_accepted"] == 2
    assert diag["clients_rejected"] == 4 and diag["clients_failed"] == 2
    assert {r["node"] for r in diag["rejections"]} == {3, 4, 5, 7}
    text = caplog.text
    assert "exceeds the clip bound" in text and "non-finite" in text
    assert "wrong shape" in text and "malformed reply" in text and "failed" in text
    # The released round record carries none of it.
    rec = RunDirectory(tmp_path).read_rounds()[0]
    assert not {k for k in rec if k.startswith("clients_")} and "fid_next" not in rec
    assert {"clients", "aggregate", "total"}.isdisjoint(rec["seconds"])


def test_without_diagnostics_nothing_about_clients_is_kept_or_logged(tmp_path, caplog):
    behaviours = {1: honest, 2: reply_with(np.full(DIM, 10.0, dtype=np.float32)), 3: failing}
    strategy = make(tmp_path, n=3)  # diagnostics default off (a deployment's default)
    with caplog.at_level("DEBUG"):
        strategy.start(grid=FakeGrid(behaviours), num_rounds=1)
    assert not (tmp_path / "diagnostics.jsonl").exists()
    assert read_diagnostics(tmp_path) == []
    # The operator still learns that a reply was rejected, but not from whom or what it held.
    assert "rejected a client reply: L2 norm over the clip bound" in caplog.text
    # The messages, not caplog.text: its timestamps (10:10:49) would contain "10" by chance.
    logged = "\n".join(caplog.messages)
    assert "from node 2" not in logged and "10" not in logged.split("rejected")[-1]
    assert "sampled" not in caplog.text
    rec = RunDirectory(tmp_path).read_rounds()[0]
    assert not {k for k in rec if k.startswith("clients_")}


def test_a_reply_exactly_at_the_bound_is_accepted_and_one_ulp_above_is_not(tmp_path):
    at = np.zeros(DIM, dtype=np.float32)
    at[0] = 1.0
    above = at.copy()
    above[0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    strategy = make(tmp_path, n=2, diagnostics=True)
    strategy.start(grid=FakeGrid({1: reply_with(at), 2: reply_with(above)}), num_rounds=1)
    np.testing.assert_array_equal(strategy.releases[0], at.astype(np.float64))
    assert read_diagnostics(tmp_path)[0]["rejections"][0]["node"] == 2


# ------------------------------------------------------------------------------ population
def test_more_nodes_than_clients_are_refused_before_sampling(tmp_path):
    strategy = make(tmp_path, n=3)
    grid = FakeGrid({i: honest for i in range(1, 5)})
    with pytest.raises(PopulationError, match="serve 4 clients but the population is 3"):
        strategy.start(grid=grid, num_rounds=1)
    assert grid.sent == [] and RunDirectory(tmp_path).read_rounds() == []


def test_two_nodes_claiming_one_client_are_refused(tmp_path):
    strategy = make(tmp_path, n=3)
    grid = FakeGrid({i: honest for i in range(1, 4)}, identities={1: "alice", 3: "alice"})
    with pytest.raises(PopulationError, match="nodes 1 and 3 both serve client 'alice'"):
        strategy.start(grid=grid, num_rounds=1)
    assert grid.sent == []  # nobody was asked for data, nothing spent
    assert strategy.accountant.rounds_spent == 0


def test_identities_are_asked_once_per_node(tmp_path):
    strategy = make(tmp_path, n=4, sigma=5.0, eps=100.0)
    grid = FakeGrid({i: honest for i in range(1, 5)})
    strategy.start(grid=grid, num_rounds=3)
    assert grid.queries == 4 and len(grid.sent) == 3


# ------------------------------------------------------------------------------ cohorts
def cohort_rows(rows_by_member):
    """A node serving a cohort: answers one row per member named in the message."""

    def behave(msg: Message) -> Message:
        members = list(msg.content["config"]["members"])
        return reply_with(np.stack([rows_by_member(i) for i in members]))(msg)

    return behave


def unit_row(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i % DIM] = 1.0
    return v


def test_a_cohort_node_answers_for_its_sampled_members_row_by_row(tmp_path):
    cohorts = {1: ["a", "b", "c"], 2: ["d", "e"]}
    strategy = make(tmp_path, n=5, diagnostics=True)
    grid = FakeGrid({n: cohort_rows(unit_row) for n in cohorts}, identities=cohorts)
    strategy.start(grid=grid, num_rounds=1)
    members = {m.metadata.dst_node_id: list(m.content["config"]["members"]) for m in
               grid.messages[0]}  # fmt: skip
    assert members == {1: [0, 1, 2], 2: [0, 1]}  # q = 1: every client of every cohort
    expected = np.zeros(DIM)
    for i in (0, 1, 2, 0, 1):
        expected[i] += 1.0
    np.testing.assert_allclose(strategy.releases[0], expected)
    diag = read_diagnostics(tmp_path)[0]
    assert diag["clients_sampled"] == 5 and diag["clients_accepted"] == 5
    assert diag["nodes_contacted"] == 2


def test_bad_rows_of_a_cohort_reply_are_dropped_one_by_one(tmp_path):
    def rows(i):
        if i == 1:
            return np.full(DIM, 10.0, dtype=np.float32)  # over the bound
        if i == 2:
            return np.full(DIM, np.nan, dtype=np.float32)
        return unit_row(0)

    def short(msg):  # one row missing: the node's whole reply is refused
        return reply_with(np.stack([unit_row(0)]))(msg)

    cohorts = {1: ["a", "b", "c", "d"], 2: ["e", "f"]}
    strategy = make(tmp_path, n=6, diagnostics=True)
    grid = FakeGrid({1: cohort_rows(rows), 2: short}, identities=cohorts)
    strategy.start(grid=grid, num_rounds=1)
    np.testing.assert_allclose(strategy.releases[0], 2 * unit_row(0))  # rows 0 and 3 of node 1
    diag = read_diagnostics(tmp_path)[0]
    assert diag["clients_accepted"] == 2 and diag["clients_rejected"] == 4
    assert {(r["node"], r["row"]) for r in diag["rejections"]} == {(1, 1), (1, 2), (2, 0), (2, 1)}


def test_cohorts_are_sampled_client_by_client_not_node_by_node(tmp_path):
    n_nodes, size, q, draws = 10, 20, 0.3, 300
    cohorts = {k: [f"c{k}-{i}" for i in range(size)] for k in range(1, n_nodes + 1)}
    strategy = make(tmp_path, q=q, n=n_nodes * size, sigma=1.0, eps=1e9)
    grid = FakeGrid({k: cohort_rows(unit_row) for k in cohorts}, identities=cohorts)
    sizes = np.array(
        [sum(map(len, strategy.sample_clients(grid, 1).values())) for _ in range(draws)]
    )
    n = n_nodes * size
    # Binomial(200, 0.3): variance 42. Sampling whole nodes would give 20^2 * 10 * 0.21 = 840.
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.3)


def test_a_client_in_two_cohorts_is_refused(tmp_path):
    cohorts = {1: ["a", "b"], 2: ["c", "a"]}
    strategy = make(tmp_path, n=4)
    grid = FakeGrid({n: cohort_rows(unit_row) for n in cohorts}, identities=cohorts)
    with pytest.raises(PopulationError, match="nodes 1 and 2 both serve client 'a'"):
        strategy.start(grid=grid, num_rounds=1)
    assert grid.sent == []


def test_replies_are_summed_as_they_stream_in(tmp_path):
    """aggregate_train takes an iterator and never needs two replies at once."""
    strategy = make(tmp_path, n=3)
    grid = FakeGrid({i: honest for i in range(1, 4)})
    messages = list(strategy.configure_train(1, None, None, grid))
    alive = []

    def stream():
        for m in messages:
            reply = honest(m)
            alive.append(reply)
            yield reply
            alive.remove(reply)  # the consumer asked for the next one: it is done with this

    strategy.aggregate_train(1, stream())
    assert alive == []


# ------------------------------------------------------------------------------ sampling
def test_poisson_sample_has_binomial_size_and_independent_members(tmp_path):
    n, q, draws = 200, 0.3, 400
    strategy = make(tmp_path, q=q, n=n, sigma=1.0, eps=1e9)
    grid = FakeGrid({i: honest for i in range(1, n + 1)})
    samples = [strategy.sample_nodes(grid, server_round=1) for _ in range(draws)]
    sizes = np.array([len(s) for s in samples])
    # Binomial(N, q): mean Nq = 60, variance Nq(1-q) = 42. A fixed-size sample has variance 0.
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.3)
    # Every node is taken with probability q, independently of the others.
    member = np.zeros((draws, n))
    for d, s in enumerate(samples):
        member[d, np.array(s) - 1] = 1
    freq = member.mean(axis=0)
    assert np.all(np.abs(freq - q) < 5 * math.sqrt(q * (1 - q) / draws))
    corr = np.corrcoef(member.T)[np.triu_indices(n, 1)]
    assert abs(corr.mean()) < 0.01
    # Same round, same config seed: the draws differ (secret, not derived from the seed).
    assert len({tuple(s) for s in samples}) > draws - 5


def test_noise_has_the_calibrated_spread_with_clients_replying(tmp_path):
    sigma, clip, dim, n = 2.0, 0.25, 20_000, 10
    rng = np.random.default_rng(0)
    vectors = {i: clip_to_norm(rng.normal(size=dim), clip) for i in range(1, n + 1)}
    strategy = make(tmp_path, sigma=sigma, eps=1e9, n=n, clip=clip, dim=dim)
    strategy.start(grid=FakeGrid({i: reply_with(v) for i, v in vectors.items()}), num_rounds=1)
    noise = strategy.releases[0] - np.sum([v.astype(np.float64) for v in vectors.values()], 0)
    # N(0, (sigma C)^2): not divided by the number of replies, not missing the clip norm.
    assert noise.std() == pytest.approx(sigma * clip, rel=0.03)
    assert abs(noise.mean()) < 5 * sigma * clip / math.sqrt(dim)


# ------------------------------------------------------------------------------ the attacker
def _candidate_noises(seed: int, server_round: int, dim: int, std: float):
    """Every way an attacker might re-derive the noise from a seed found in the run dir."""
    from popri_flwr.privacy.randomness import seeded_rng

    gens = [
        seeded_rng(seed, server_round, "noise"),
        np.random.default_rng(seed),
        np.random.default_rng([seed, server_round]),
    ]
    for g in gens:
        yield g.normal(0.0, std, size=dim)
    yield np.random.RandomState(seed).normal(0.0, std, size=dim)


def _integers(tree) -> set[int]:
    if isinstance(tree, dict):
        return set().union(*(_integers(v) for v in tree.values())) if tree else set()
    if isinstance(tree, list):
        return set().union(*(_integers(v) for v in tree)) if tree else set()
    return {tree} if isinstance(tree, int) and not isinstance(tree, bool) else set()


def _attack(run_dir, dim, sigma, clip) -> bool:
    """True if some seed-derived noise, removed from a release, leaves a zero-sum vector.

    The attacker reads every file of the run directory and tries every integer in the config
    and state as a seed. The clients' vectors sum to zero (z-scored, as in POPri), so removing
    the *right* noise leaves a vector whose entries sum to ~0, while a wrong guess leaves a sum
    of order sigma * C * sqrt(dim).
    """
    import yaml

    seeds = _integers(yaml.safe_load((run_dir / "config.yaml").read_text()))
    seeds |= _integers(json.loads((run_dir / "state.json").read_text())) | {0, 1, 42}
    for path in sorted((run_dir / "checkpoint").glob("release_round_*.npy")):
        rnd = int(path.stem.split("_")[-1])
        release = np.load(path)
        for s in seeds:
            for noise in _candidate_noises(s, rnd, dim, sigma * clip):
                if abs(float(np.sum(release - noise))) < 1e-3:
                    return True
    return False


@pytest.mark.parametrize("debug", [False, True])
def test_the_released_run_directory_does_not_give_the_noise_away(tmp_path, debug):
    sigma, clip, dim, n = 1.5, 1.0, 64, 6
    rng = np.random.default_rng(7)
    vecs = {}
    for i in range(1, n + 1):
        x = rng.normal(size=dim)
        vecs[i] = clip_to_norm((x - x.mean()) / x.std(), clip)  # zero-sum, like z-scores
    behaviours = {i: reply_with(v) for i, v in vecs.items()}
    releases = []
    for name in ("a", "b"):
        run = tmp_path / name
        debug_seed = 123 if debug else None
        strategy = make(
            run, sigma=sigma, eps=1e9, n=n, clip=clip, dim=dim, seed=5, debug_noise_seed=debug_seed
        )
        privacy = {"noise_multiplier": sigma, "debug_noise_seed": debug_seed}
        RunDirectory(run).write_config({"seed": 5, "privacy": privacy})
        strategy.start(grid=FakeGrid(behaviours), num_rounds=2)
        releases.append(np.stack(strategy.releases))
    if debug:
        # Seeded noise: two runs release the same thing, and the attack works. This shows the
        # attack below is strong enough to catch a seeded mechanism.
        np.testing.assert_array_equal(releases[0], releases[1])
        assert _attack(tmp_path / "a", dim, sigma, clip)
        assert (tmp_path / "a" / NOT_DP_MARKER).exists()
        rec = RunDirectory(tmp_path / "a").read_rounds()
        assert [r["differentially_private"] for r in rec] == [False, False]
    else:
        # Same config and seed, yet different releases: the noise is fresh every time.
        assert not np.allclose(releases[0], releases[1])
        assert not _attack(tmp_path / "a", dim, sigma, clip)
        assert not _attack(tmp_path / "b", dim, sigma, clip)
        # Nor do the two runs' noises cancel: their difference is not the zero vector's.
        assert abs(float(np.sum(releases[0] - releases[1]))) > 1e-3
        assert not (tmp_path / "a" / NOT_DP_MARKER).exists()
        rec = RunDirectory(tmp_path / "a").read_rounds()
        assert [r["differentially_private"] for r in rec] == [True, True]


def test_debug_noise_is_marked_in_the_log(tmp_path, caplog):
    strategy = make(tmp_path, sigma=1.0, eps=1e9, n=2, debug_noise_seed=1)
    with caplog.at_level(logging.INFO):
        strategy.start(grid=FakeGrid({1: honest, 2: honest}), num_rounds=1)
    assert "NOT DIFFERENTIALLY PRIVATE" in caplog.text
    assert "[NOT differentially private]" in caplog.text


# ------------------------------------------------------------------------------ budget, resume
def test_refuses_the_round_that_would_overspend(tmp_path):
    acc = PrivacyAccountant.calibrated(target_epsilon=1.0, delta=1e-5, rounds=2, sample_rate=1.0)
    strategy = SumStrategy(
        accountant=acc,
        clip_norm=1.0,
        num_clients=3,
        run_dir=RunDirectory(tmp_path),
        node_wait_timeout=1,
    )
    strategy.start(grid=FakeGrid({i: honest for i in range(1, 4)}), num_rounds=5)
    rounds = RunDirectory(tmp_path).read_rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["epsilon_spent"] <= 1.0
    assert rounds[-1]["epsilon_spent"] == pytest.approx(
        compute_epsilon(acc.noise_multiplier, 1.0, 2, 1e-5, accounting=acc.accounting)
    )


class Crashing(SumStrategy):
    def server_update(self, server_round, release):
        if server_round == 2:
            raise KeyboardInterrupt("simulated crash after the release of round 2")
        return super().server_update(server_round, release)


def _crash_in_round_2(tmp_path):
    acc = PrivacyAccountant(noise_multiplier=5.0, sample_rate=1.0, delta=1e-5, target_epsilon=50.0)
    first = Crashing(
        accountant=acc,
        clip_norm=1.0,
        num_clients=3,
        run_dir=RunDirectory(tmp_path),
        node_wait_timeout=1,
    )
    with pytest.raises(KeyboardInterrupt):
        first.start(grid=FakeGrid({i: honest for i in range(1, 4)}), num_rounds=3)


def test_resume_after_crash_does_not_spend_twice(tmp_path):
    _crash_in_round_2(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["finished_round"] == 1 and state["released_round"] == 2
    release2 = np.load(tmp_path / "checkpoint" / "release_round_002.npy")

    second = make(tmp_path, sigma=5.0, eps=50.0, n=3)
    grid2 = FakeGrid({i: honest for i in range(1, 4)})
    second.start(grid=grid2, num_rounds=3)
    # Round 2 was finished from its saved release (no messages); only round 3 asked clients.
    assert len(grid2.sent) == 1
    np.testing.assert_array_equal(second.releases[0], release2)
    rounds = RunDirectory(tmp_path).read_rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert second.accountant.rounds_spent == 3
    acc = second.accountant
    assert rounds[-1]["epsilon_spent"] == pytest.approx(
        compute_epsilon(5.0, 1.0, 3, 1e-5, accounting=acc.accounting)
    )


def test_a_round_most_clients_miss_stops_before_the_release_and_resumes(tmp_path, caplog):
    """Failed nodes (e.g. client actors Ray's memory monitor killed) are not replaced: a round
    under min_reply_fraction stops before the noise, spends nothing, and the run resumes."""
    broken = {1: honest, 2: failing, 3: failing, 4: failing}
    first = make(tmp_path, sigma=5.0, eps=50.0, n=4, diagnostics=True)
    with (
        caplog.at_level("INFO"),
        pytest.raises(TooFewReplies, match="min_reply_fraction=0.5") as err,
    ):
        first.start(grid=FakeGrid(broken), num_rounds=2)
    assert "1 of 4" not in str(err.value)  # counts are diagnostics, not in the error
    assert first.releases == [] and first.accountant.rounds_spent == 0
    assert not (tmp_path / "checkpoint" / "release_round_001.npy").exists()
    assert RunDirectory(tmp_path).read_rounds() == []
    assert "1 of 4 sampled clients replied" in caplog.text  # the diagnostics log only

    again = make(tmp_path, sigma=5.0, eps=50.0, n=4)
    again.start(grid=FakeGrid({i: honest for i in range(1, 5)}), num_rounds=2)
    rounds = RunDirectory(tmp_path).read_rounds()
    assert [r["round"] for r in rounds] == [1, 2] and again.accountant.rounds_spent == 2
    assert rounds[-1]["epsilon_spent"] == pytest.approx(
        compute_epsilon(5.0, 1.0, 2, 1e-5, accounting=again.accountant.accounting)
    )
    # 0: go on with whoever replied (3 of 4 nodes failed here).
    lenient = make(tmp_path / "lenient", n=4, min_reply_fraction=0.0)
    lenient.start(grid=FakeGrid(broken), num_rounds=1)
    np.testing.assert_allclose(lenient.releases[0], 1 / math.sqrt(DIM), rtol=1e-6)
    with pytest.raises(ValueError, match="^simulation.min_reply_fraction: must be in"):
        make(tmp_path / "bad", n=4, min_reply_fraction=1.5)


def test_a_lost_state_file_is_refused_instead_of_spending_again(tmp_path, caplog):
    _crash_in_round_2(tmp_path)
    (tmp_path / "state.json").unlink()
    again = make(tmp_path, sigma=5.0, eps=50.0, n=3)
    grid = FakeGrid({i: honest for i in range(1, 4)})
    with pytest.raises(ConfigError, match="holds the noisy release of round 2 but no state.json"):
        again.start(grid=grid, num_rounds=3)
    assert grid.sent == [] and grid.queries == 0


def test_an_older_state_file_is_refused(tmp_path):
    _crash_in_round_2(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    state.update(released_round=1, finished_round=1)
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="state.json accounts for round 1 only"):
        make(tmp_path, sigma=5.0, eps=50.0, n=3).start(grid=FakeGrid({}), num_rounds=3)


def test_scored_samples_without_state_are_refused(tmp_path):
    rd = RunDirectory(tmp_path)
    rd.write_jsonl(rd.samples_path(1), [{"text": "a", "noisy_score": 0.3}])
    with pytest.raises(ConfigError, match="noisy release of round 1"):
        rd.check_resume({"seed": 0}, resume=True)


def test_config_is_locked_once_anything_is_released(tmp_path):
    rd = RunDirectory(tmp_path)
    cfg = {"seed": 0, "privacy": {"epsilon": 1.0, "accounting": "pld"}, "rounds": 3}
    rd.write_config(cfg)
    rd.write_config({**cfg, "privacy": {"epsilon": 7.0, "accounting": "pld"}})  # nothing yet
    cfg = {**cfg, "privacy": {"epsilon": 7.0, "accounting": "pld"}}
    # Released but not finished (a crash right after the release): already locked.
    rd.save_array("release_round_001", np.zeros(3))
    rd.save_state({"released_round": 1, "finished_round": 0})
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="privacy: differs from the run being resumed"):
        rd.write_config({**cfg, "privacy": {"epsilon": 1.0, "accounting": "pld"}})
    with pytest.raises(ConfigError, match="seed: differs"):
        rd.write_config({**cfg, "seed": 1})
    with pytest.raises(ConfigError, match="set resume=true"):
        rd.write_config(cfg, resume=False)
    assert (tmp_path / "config.yaml").read_text() == before  # never overwritten when refused
    rd.write_config({**cfg, "rounds": 5})  # rounds may grow (the mechanism check guards sigma)


def test_resume_refuses_a_different_mechanism_before_writing_the_config(tmp_path):
    rd = RunDirectory(tmp_path)
    cfg = {"seed": 0, "privacy": {"epsilon": 1.0}}
    rd.write_config(cfg)
    acc = PrivacyAccountant(noise_multiplier=5.0, sample_rate=1.0, delta=1e-5, target_epsilon=50)
    rd.save_state({"released_round": 1, "finished_round": 1, "accountant": acc.state_dict()})
    other = PrivacyAccountant(noise_multiplier=4.0, sample_rate=1.0, delta=1e-5, target_epsilon=50)
    with pytest.raises(ConfigError, match="noise_multiplier=5.0, now 4.0"):
        rd.check_resume(cfg, True, other.state_dict())
    rd.check_resume(cfg, True, acc.state_dict())


def test_resume_refuses_a_different_mechanism(tmp_path):
    behaviours = {i: honest for i in range(1, 4)}
    make(tmp_path, sigma=5.0, eps=50.0, n=3).start(grid=FakeGrid(behaviours), num_rounds=1)
    other = make(tmp_path, sigma=4.0, eps=50.0, n=3)
    with pytest.raises(ValueError, match="privacy: the run being resumed used sigma=5"):
        other.start(grid=FakeGrid(behaviours), num_rounds=2)


def test_a_second_run_on_a_held_directory_fails_before_doing_anything(tmp_path):
    """Another process holds the run directory: start() refuses it; once free, it runs."""
    import subprocess
    import sys

    holder = subprocess.Popen(  # a real second process, as a stray run would be
        [
            sys.executable,
            "-c",
            "import sys\nfrom popri_flwr.run_dir import RunDirectory\n"
            f"with RunDirectory({str(tmp_path)!r}).exclusive():\n"
            "    print('held', flush=True)\n    sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        strategy = make(tmp_path, n=2)
        grid = FakeGrid({1: honest, 2: honest})
        with pytest.raises(
            RuntimeError, match=rf"^run_dir: .* in use by another run \(pid {holder.pid} on "
        ):
            strategy.start(grid=grid, num_rounds=1)
        assert grid.sent == [] and not (tmp_path / "rounds.jsonl").exists()
    finally:
        holder.communicate("\n", timeout=60)  # let it go; the lock goes with it
    strategy.start(grid=grid, num_rounds=1)
    assert [r["round"] for r in RunDirectory(tmp_path).read_rounds()] == [1]
    # The same process cannot hold it twice either (each run opens the lock anew).
    with (
        RunDirectory(tmp_path).exclusive(),
        pytest.raises(RuntimeError, match="in use by another run"),
        RunDirectory(tmp_path).exclusive(),
    ):
        pass
