"""The per-process caches of a node's data (popri_flwr.client_apps.resources): bounded, and
correct after an eviction."""

from __future__ import annotations

import numpy as np
import pytest

from popri_flwr.algorithms.scoring import centroid
from popri_flwr.client_apps import resources
from popri_flwr.client_apps.resources import (
    EMBEDDING_CACHE_ENV,
    ArrayCache,
    Cohort,
    NodeData,
    embedder,
)
from popri_flwr.models.embedding import DEFAULT_EMBEDDER

MIB = 2**20


def _mib(n: float) -> np.ndarray:
    return np.zeros(int(n * MIB) // 8)  # float64


def test_array_cache_drops_the_least_recently_used_beyond_its_budget(monkeypatch):
    monkeypatch.setenv("TEST_CACHE_MB", "2.5")
    cache = ArrayCache("TEST_CACHE_MB", default_mb=100)
    for key in "abc":
        cache.put(key, _mib(1))
    assert len(cache) == 2 and cache.get("a") is None  # 3 MiB > 2.5: the oldest went
    assert cache.get("b") is not None  # b is now the most recently used ...
    cache.put("d", _mib(1))
    assert cache.get("c") is None and cache.get("b") is not None  # ... so c went, not b
    assert cache.nbytes == 2 * MIB
    cache.put("big", _mib(4))  # over the budget alone: kept, everything older dropped
    assert len(cache) == 1 and cache.nbytes == 4 * MIB
    cache.put("big", _mib(1))  # replacing a key counts its bytes once
    assert cache.nbytes == MIB


def test_array_cache_budget_comes_from_the_environment_and_is_checked(monkeypatch):
    cache = ArrayCache("TEST_CACHE_MB", default_mb=1.5)
    monkeypatch.delenv("TEST_CACHE_MB", raising=False)
    assert cache.budget() == int(1.5 * MIB)
    monkeypatch.setenv("TEST_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="^TEST_CACHE_MB: expected a number of MiB, got 'lots'"):
        cache.put("a", _mib(0.1))
    monkeypatch.setenv("TEST_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="^TEST_CACHE_MB: expected a number of MiB >= 0"):
        cache.budget()


def test_evicted_embeddings_are_recomputed_and_cohorts_keep_only_centroids(monkeypatch):
    monkeypatch.setenv(EMBEDDING_CACHE_ENV, "0")  # keep only the newest client's embeddings
    monkeypatch.setattr(resources, "_EMBEDDINGS", ArrayCache(EMBEDDING_CACHE_ENV, 512))
    monkeypatch.setattr(resources, "_CENTROIDS", {})
    alice = NodeData("test:alice", ["Taxes must fall.", "The budget must balance."])
    bob = NodeData("test:bob", ["The navy patrols the seas."])
    direct = embedder(DEFAULT_EMBEDDER).embed(alice.texts)
    first = alice.embeddings(DEFAULT_EMBEDDER)
    bob.embeddings(DEFAULT_EMBEDDER)  # evicts alice's
    assert resources._EMBEDDINGS.get((alice.key, DEFAULT_EMBEDDER)) is None
    again = alice.embeddings(DEFAULT_EMBEDDER)
    np.testing.assert_allclose(again, direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(again, first)

    # A cohort's scoring path needs one centroid per member and keeps nothing else.
    monkeypatch.setenv(EMBEDDING_CACHE_ENV, "512")
    resources._EMBEDDINGS.clear()
    carol = NodeData("test:carol", ["Ships and sailors.", "A poem."])
    fixed = np.eye(3, 384, dtype=np.float32)
    synthetic = NodeData.from_embeddings("test:synthetic", DEFAULT_EMBEDDER, fixed)
    cohort = Cohort(["alice", "carol", "synthetic"], [alice, carol, synthetic])
    got = cohort.centroids(DEFAULT_EMBEDDER, [1, 0, 2])
    assert len(resources._EMBEDDINGS) == 0
    np.testing.assert_allclose(got[0], centroid(embedder(DEFAULT_EMBEDDER).embed(carol.texts)),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(got[1], centroid(direct), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[2], centroid(fixed))
