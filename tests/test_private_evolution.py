"""Private Evolution: the vote maths (popri_flwr.algorithms.voting), the client handler and the
strategy.

The strategy runs through the shared FakeGrid with the real SmolLM2 generator and MiniLM
embedder at tiny sizes (population 6, 16 new tokens). Fake clients vote, through the real
:func:`client_vote_vector`, for members picked by the test, so the selection can be checked.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fakegrid import FakeGrid, reply_with, set_task_identity
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from popri_flwr.algorithms.variations import expand_population
from popri_flwr.algorithms.voting import (
    PEConfig,
    client_vote_vector,
    num_kept,
    refill_parents,
    select_top,
    vote_counts,
)
from popri_flwr.config import RunConfig
from popri_flwr.data import DataConfig
from popri_flwr.models.embedding import DEFAULT_EMBEDDER, get_embedder
from popri_flwr.models.generation import SamplingParams, make_generator
from popri_flwr.privacy.accounting import PrivacyAccountant, compute_epsilon
from popri_flwr.privacy.diagnostics import read_diagnostics
from popri_flwr.run_dir import RunDirectory
from popri_flwr.strategies import strategy_class
from popri_flwr.strategies.private_evolution import PrivateEvolutionStrategy

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARAMS = SamplingParams(max_new_tokens=16, truncate_tokens=16, seed=0)
DESCRIPTION = "a paragraph from a US presidential State of the Union address"


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def _fixture_texts() -> list[str]:
    rows = [json.loads(line) for line in (FIXTURES / "texts.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows if isinstance(r["text"], str)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- voting maths
def test_vote_vector_norm_never_exceeds_c():
    rng = np.random.default_rng(0)
    for trial in range(300):
        m, n, d = rng.integers(2, 60), rng.integers(0, 40), rng.integers(2, 16)
        c = float(rng.choice([1e-3, 0.37, 1.0, 7.5]))
        k = int(rng.integers(1, m + 1))
        pop, priv = _unit(rng.normal(size=(m, d))), _unit(rng.normal(size=(n, d)))
        v = client_vote_vector(pop, priv, c, k=k)
        assert v.dtype == np.float32 and v.shape == (m,)
        norm = float(np.linalg.norm(v.astype(np.float64)))
        assert norm <= c, (trial, norm, c)
        if n > 0:  # every non-empty client uses its whole sensitivity budget
            assert norm == pytest.approx(c, rel=1e-5)


def test_vote_counts_on_a_hand_built_case():
    pop = np.eye(4)  # members 0..3 = the axes
    priv = _unit(
        np.array(
            [
                [0.9, 0.3, 0.0, 0.1],  # nearest 0, second 1
                [1.0, 0.0, 0.2, 0.0],  # nearest 0, second 2
                [0.1, 0.0, 0.8, 0.5],  # nearest 2, second 3
            ]
        )
    )
    np.testing.assert_array_equal(vote_counts(pop, priv, k=1), [2.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(vote_counts(pop, priv, k=2), [1.0, 0.5, 1.0, 0.5])
    assert vote_counts(pop, priv, k=3).sum() == pytest.approx(3.0)  # one unit per text
    # The sent vector is the histogram's direction scaled to C.
    v = client_vote_vector(pop, priv, clip_norm=2.0, k=1)
    np.testing.assert_allclose(v, 2.0 * np.array([2, 0, 1, 0]) / math.sqrt(5), rtol=1e-5)


def test_empty_client_sends_zeros():
    pop = _unit(np.random.default_rng(1).normal(size=(5, 3)))
    v = client_vote_vector(pop, np.zeros((0, 3)), clip_norm=1.0, k=2)
    assert v.dtype == np.float32 and not v.any() and v.shape == (5,)


def test_one_client_moves_the_sum_by_at_most_c():
    rng = np.random.default_rng(2)
    pop = _unit(rng.normal(size=(30, 8)))
    c = 0.8
    clients = [_unit(rng.normal(size=(int(rng.integers(0, 20)), 8))) for _ in range(25)]
    vectors = [client_vote_vector(pop, p, c, k=2).astype(np.float64) for p in clients]
    total = np.sum(vectors, axis=0)
    for i in range(len(vectors)):
        without = total - vectors[i]
        assert np.linalg.norm(total - without) <= c * (1 + 1e-9)
    # A client with all its texts on one member moves that member by C (the worst case).
    one = client_vote_vector(pop, np.repeat(pop[:1], 7, axis=0), c)
    assert one[0] == pytest.approx(c, rel=1e-5) and np.count_nonzero(one) == 1


def test_vote_rejects_mismatched_embedders_and_bad_k():
    pop = _unit(np.ones((4, 3)))
    with pytest.raises(ValueError, match="embedding dims differ"):
        vote_counts(pop, _unit(np.ones((2, 5))))
    with pytest.raises(ValueError, match="strategy.pe.votes_k"):
        vote_counts(pop, _unit(np.ones((2, 3))), k=5)


def test_selection_and_refill_plan():
    votes = np.array([0.5, 3.0, -1.0, 3.0, 2.0, 0.0])
    np.testing.assert_array_equal(select_top(votes, 3), [1, 3, 4])  # ties by index
    assert num_kept(6, 0.5) == 3 and num_kept(6, 0.01) == 1 and num_kept(6, 0.99) == 5
    np.testing.assert_array_equal(refill_parents(np.array([4, 1]), 7), [4, 1, 4, 1, 4])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("keep_fraction=0.0", r"strategy.pe.keep_fraction: must be in \(0, 1\)"),
        ("keep_fraction=1.0", r"strategy.pe.keep_fraction: must be in \(0, 1\)"),
        ("keep_fraction=half", "strategy.pe.keep_fraction: expected float"),
        ("votes_k=0", r"strategy.pe.votes_k: must be in \[1, population_size=10\]"),
        ("votes_k=11", r"strategy.pe.votes_k: must be in \[1, population_size=10\]"),
        ("votes_k=1.5", "strategy.pe.votes_k: expected int"),
        ("population_size=1", "strategy.pe.population_size: must be >= 2"),
    ],
)
def test_bad_pe_config_names_the_key(override, key):
    from popri_flwr.hydra_config import load_config

    size = [] if override.startswith("population_size") else ["strategy.pe.population_size=10"]
    with pytest.raises(ValueError, match=f"^{key}"):
        load_config(["experiment=demo", "strategy=pe", *size, f"strategy.pe.{override}"])
    with pytest.raises(ValueError, match="^strategy.pe.keep_fracton: unknown key"):
        load_config(["strategy=pe", "+strategy.pe.keep_fracton=0.5"])


def test_pe_yaml_composes_with_the_demo_preset_and_fails_early():
    from popri_flwr.hydra_config import load_config

    cfg = load_config(["experiment=demo", "strategy=pe"])
    s = cfg.strategy
    assert s.name == "pe" and strategy_class("pe") is PrivateEvolutionStrategy
    pe = s.pe.resolved(s.num_prompts * s.samples_per_prompt)
    # Same number of generated texts per round as POPri with the demo's K and J.
    popri = load_config(["experiment=demo"]).strategy
    assert pe.population_size == popri.num_prompts * popri.samples_per_prompt
    assert pe.keep_fraction == 0.5 and pe.votes_k == 1
    # votes_k against the resolved population is checked when the config is loaded.
    with pytest.raises(ValueError, match="^strategy.pe.votes_k"):
        load_config(["experiment=demo", "strategy=pe", "strategy.pe.votes_k=97"])
    with pytest.raises(ValueError, match="^strategy.pe.keep_fraction"):
        PEConfig(keep_fraction=1.5)


# --------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores stall; one is steady
    env = os.environ.get("POPRI_CACHE")
    cache = env or str(tmp_path_factory.getbasetemp() / "popri_cache")
    generator = make_generator(
        "transformers", "packaged:smollm2-135m-instruct", "cpu", 8, cache, progress=False
    )
    yield generator, get_embedder(DEFAULT_EMBEDDER, "cpu")
    torch.set_num_threads(threads)


def _make(models, tmp_path, *, sigma=0.0, q=1.0, eps=math.inf, n=3, **kw):
    generator, embedder = models
    acc = PrivacyAccountant(noise_multiplier=sigma, sample_rate=q, delta=1e-5, target_epsilon=eps)
    return PrivateEvolutionStrategy(
        generator=generator,
        embedder=embedder,
        description=DESCRIPTION,
        pe=kw.pop("pe", PEConfig(population_size=6, keep_fraction=0.5, votes_k=1)),
        sampling=PARAMS,
        accountant=acc,
        clip_norm=kw.pop("clip_norm", 1.0),
        num_clients=n,
        run_dir=RunDirectory(tmp_path),
        node_wait_timeout=5,
        **kw,
    )


def voting_client(targets: list[int], seen: list[Message] | None = None):
    """A client whose private texts are exactly the population members ``targets``."""

    def behave(msg: Message) -> Message:
        if seen is not None:
            seen.append(msg)
        cfg = msg.content["config"]
        pop = msg.content["payload"]["embeddings"].numpy()
        vec = client_vote_vector(pop, pop[targets], float(cfg["clip-norm"]), int(cfg["votes-k"]))
        return reply_with(vec)(msg)

    return behave


def test_top_voted_members_are_kept_and_the_population_refills(models, tmp_path):
    eval_emb = models[1].embed(_fixture_texts())  # stands in for held-out private text
    strategy = _make(models, tmp_path, eval_embeddings=eval_emb, diagnostics=True)
    run_dir = strategy.run_dir
    strategy.prepare(0)  # builds the zero-shot initial population (round 1)
    first = [r["text"] for r in run_dir.read_jsonl(run_dir.samples_path(1))]
    assert len(first) == 6 and all(t.strip() for t in first)
    # Targets with distinct texts, deliberately not the first indices.
    distinct = [i for i in range(6) if first.count(first[i]) == 1]
    a, b, c = distinct[-1], distinct[-2], distinct[-3]
    seen: list[Message] = []
    # votes: a = 1 + 1/sqrt2 + 1/sqrt3, b = 1/sqrt2 + 1/sqrt3, c = 1/sqrt3, others 0
    grid = FakeGrid(
        {1: voting_client([a], seen), 2: voting_client([a, b]), 3: voting_client([a, b, c])}
    )
    strategy.start(grid=grid, num_rounds=2)

    msg = seen[0]
    assert msg.content["config"]["method"] == "pe" and msg.content["config"]["votes-k"] == 1
    assert msg.content["payload"]["embeddings"].numpy().shape == (6, models[1].dim)

    r1 = run_dir.read_jsonl(run_dir.samples_path(1))
    assert [r["text"] for r in r1] == first
    votes = np.array([r["noisy_votes"] for r in r1])
    expected = np.zeros(6)
    expected[a] += 1 + 1 / math.sqrt(2) + 1 / math.sqrt(3)
    expected[b] += 1 / math.sqrt(2) + 1 / math.sqrt(3)
    expected[c] += 1 / math.sqrt(3)
    np.testing.assert_allclose(votes, expected, atol=1e-5)  # sigma = 0: the exact sum
    assert [i for i, r in enumerate(r1) if r["kept"]] == sorted([a, b, c])

    r2 = run_dir.read_jsonl(run_dir.samples_path(2))
    assert [r["text"] for r in r2[:3]] == [first[a], first[b], first[c]]  # kept, best first
    assert [r["parent_id"] for r in r2] == [a, b, c, a, b, c]  # variations round-robin
    assert [r["origin"] for r in r2] == ["kept"] * 3 + ["variation"] * 3
    assert all(r["text"].strip() for r in r2)

    final = run_dir.read_jsonl(run_dir.samples_path(3))  # the synthetic dataset
    assert len(final) == 6 and all(r["text"].strip() for r in final)

    rounds = run_dir.read_rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["kept"] == 3 and rounds[0]["variations"] == 3
    assert rounds[0]["votes_kept_mean"] == pytest.approx(expected[[a, b, c]].mean(), abs=1e-5)
    assert rounds[0]["votes_dropped_mean"] == pytest.approx(0.0, abs=1e-6)
    assert rounds[0]["empty_variations"] >= 0 and rounds[0]["population_size"] == 6
    diag = read_diagnostics(run_dir.path)
    assert diag[0]["fid_scored"] >= 0 and diag[0]["fid_next"] >= 0
    assert "fid_next" not in rounds[0]  # evaluation on private text is a diagnostic
    assert rounds[1]["epsilon_spent"] == math.inf  # sigma 0: no privacy, as asked


def test_noise_scale_is_sigma_times_c(models, tmp_path):
    sigma, c, m = 2.0, 0.5, 40_000
    strategy = _make(
        models, tmp_path, sigma=sigma, eps=1e9, clip_norm=c, pe=PEConfig(population_size=m)
    )
    arrays, _ = strategy.aggregate_train(1, [])  # nobody answered: pure noise of length M
    release = arrays["release"].numpy()
    assert release.shape == (m,)
    assert release.std() == pytest.approx(sigma * c, rel=0.02)
    assert abs(release.mean()) < 4 * sigma * c / math.sqrt(m)


def test_resume_reloads_the_population_and_spends_like_popri(models, tmp_path):
    public = tmp_path / "public.jsonl"  # a public file instead of zero-shot generation
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in _fixture_texts()[:6]))
    # q = 1: sampling is secret, and at q = 0.5 round 3 would ask no client 1 time in 16.
    sigma, q, delta = 1.3, 1.0, 1e-5
    behaviours = {i: voting_client([i % 6]) for i in range(1, 5)}

    class Crashing(PrivateEvolutionStrategy):
        def server_update(self, server_round, release):
            if server_round == 2:
                raise KeyboardInterrupt("crash after the release of round 2")
            return super().server_update(server_round, release)

    generator, embedder = models
    acc = PrivacyAccountant(noise_multiplier=sigma, sample_rate=q, delta=delta, target_epsilon=50)
    first = Crashing(
        generator=generator,
        embedder=embedder,
        description=DESCRIPTION,
        pe=PEConfig(population_size=6),
        sampling=PARAMS,
        initial_path=str(public),
        accountant=acc,
        clip_norm=1.0,
        num_clients=4,
        run_dir=RunDirectory(tmp_path / "run"),
        seed=5,
        node_wait_timeout=5,
    )
    with pytest.raises(KeyboardInterrupt):
        first.start(grid=FakeGrid(behaviours), num_rounds=3)
    run_dir = first.run_dir
    pop2 = [r["text"] for r in run_dir.read_jsonl(run_dir.samples_path(2))]
    assert pop2 == first.texts  # round 2's population was on disk before round 1 committed

    second = _make(
        models, tmp_path / "run", sigma=sigma, q=q, eps=50, n=4, initial_path=str(public), seed=5
    )
    grid = FakeGrid(behaviours)
    second.start(grid=grid, num_rounds=3)
    assert len(grid.sent) == 1  # round 2 finished from its saved release; only round 3 asked
    r2 = run_dir.read_jsonl(run_dir.samples_path(2))
    assert [r["text"] for r in r2] == pop2 and r2[0]["noisy_votes"] is not None
    assert len(run_dir.read_jsonl(run_dir.samples_path(4))) == 6
    rounds = run_dir.read_rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:  # the same Poisson-subsampled Gaussian accountant as POPri
        assert r["epsilon_spent"] == pytest.approx(compute_epsilon(sigma, q, r["round"], delta))


def test_expand_population_adds_variations(models):
    texts = ["The nation is strong.", "We must lower taxes.", "Our schools need teachers."]
    out = expand_population(models[0], texts, 5, PARAMS)
    assert out[:3] == texts and len(out) == 5 and all(t.strip() for t in out[3:])
    assert expand_population(models[0], texts, 2, PARAMS) == texts[:2]


def test_client_handler_votes_with_its_private_texts(models):
    from popri_flwr.client_apps import resources
    from popri_flwr.client_apps.app import _handlers
    from popri_flwr.client_apps.voting import vote

    assert _handlers()["pe"].__qualname__.startswith("per_member")  # vote, member by member
    cfg = RunConfig(data=DataConfig(source="file", path=str(FIXTURES / "texts.jsonl"), min_words=1))
    embedder = models[1]
    pop = embedder.embed(["A harbor at dawn.", "Taxes and the budget.", "Schools and teachers."])
    msg = Message(
        RecordDict(
            {
                "config": ConfigRecord(
                    {"method": "pe", "clip-norm": 0.7, "votes-k": 2, "embedder": DEFAULT_EMBEDDER}
                ),
                "payload": ArrayRecord({"embeddings": Array(pop)}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    texts = resources.client_texts(cfg.data, 0)
    vec = vote(msg, resources.NodeData("test-node", texts))
    cohort = resources.Cohort(["a", "b"], [resources.NodeData("empty", []),
                                           resources.NodeData("test-node", texts)])  # fmt: skip
    rows = _handlers()["pe"](msg, cohort, [1, 0])
    np.testing.assert_array_equal(rows[0], vec)
    np.testing.assert_array_equal(rows[1], 0)  # a member without texts votes for nobody
    private = embedder.embed(texts)
    assert len(private) > 0
    np.testing.assert_allclose(vec, client_vote_vector(pop, private, 0.7, k=2), rtol=1e-5)
    assert np.linalg.norm(vec) <= 0.7
