"""What a node serves: a cohort of one or more clients, and per-process caches of their data.

A node serves one client (the default: a device, or a simulated node per client) or a cohort
of clients (many users behind one SuperNode, or ``simulation.clients_per_node`` > 1). Either
way the privacy unit is the client: the server samples clients, and the node answers with one
clipped vector per sampled member.

One Ray actor serves many simulated nodes, so caches are keyed by the data (a file, or the
federation and the client's index). In a real deployment each message may start a fresh
process, and the caches simply start empty. A client's centroid (one vector) is kept for the
life of the process; its text embeddings (texts x dim) only up to ``POPRI_EMBEDDING_CACHE_MB``
per process (default 512), least recently used dropped first, so an actor that serves a
federation of many thousand clients does not grow without bound.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Context

from popri_flwr.algorithms.scoring import centroid
from popri_flwr.data import DataConfig, Federation, load_federation, load_public_texts
from popri_flwr.models.embedding import Embedder, get_embedder

logger = logging.getLogger(__name__)

EMBEDDING_CACHE_ENV = "POPRI_EMBEDDING_CACHE_MB"


class ArrayCache:
    """Arrays by key, least recently used dropped first once they hold more than a byte budget.

    The budget is read from ``budget_env`` (MiB) at every insert, so it can be changed in a
    running process; the newest entry is always kept, whatever its size.
    """

    def __init__(self, budget_env: str, default_mb: float) -> None:
        self.budget_env, self.default_mb = budget_env, default_mb
        self._items: OrderedDict[Any, np.ndarray] = OrderedDict()
        self.nbytes = 0

    def budget(self) -> int:
        raw = os.environ.get(self.budget_env, "")
        try:
            mb = float(raw) if raw else self.default_mb
        except ValueError:
            raise ValueError(f"{self.budget_env}: expected a number of MiB, got {raw!r}") from None
        if not mb >= 0:
            raise ValueError(f"{self.budget_env}: expected a number of MiB >= 0, got {raw!r}")
        return int(mb * 2**20)

    def get(self, key: Any) -> np.ndarray | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Any, value: np.ndarray) -> None:
        old = self._items.pop(key, None)
        self.nbytes -= 0 if old is None else old.nbytes
        self._items[key] = value
        self.nbytes += value.nbytes
        budget = self.budget()
        while self.nbytes > budget and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


_TEXTS: dict[str, list[str]] = {}
_EMBEDDINGS = ArrayCache(EMBEDDING_CACHE_ENV, default_mb=512)
_CENTROIDS: dict[tuple[str, str], np.ndarray] = {}
_COHORTS: dict[str, Cohort] = {}


@dataclass
class NodeData:
    """One client's private data: a cache key and its texts (loaded once per process)."""

    key: str
    texts: list[str] = field(repr=False)
    fixed_embeddings: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def known_embeddings(self, embedder_name: str) -> np.ndarray | None:
        """The embeddings if they need no embedding run (fixed, or cached), else ``None``."""
        fixed = self.fixed_embeddings.get(embedder_name)
        return fixed if fixed is not None else _EMBEDDINGS.get((self.key, embedder_name))

    def embeddings(self, embedder_name: str) -> np.ndarray:
        """Embeddings of the texts by ``embedder_name`` (cached, see the module docstring)."""
        emb = self.known_embeddings(embedder_name)
        if emb is None:
            emb = embedder(embedder_name).embed(self.texts)
            _EMBEDDINGS.put((self.key, embedder_name), emb)
        return emb

    def centroid(self, embedder_name: str) -> np.ndarray:
        """Mean embedding of the texts (float64; zeros for a client without texts)."""
        key = (self.key, embedder_name)
        if key not in _CENTROIDS:
            _CENTROIDS[key] = centroid(self.embeddings(embedder_name))
        return _CENTROIDS[key]

    @classmethod
    def from_embeddings(cls, key: str, embedder_name: str, embeddings: np.ndarray) -> NodeData:
        """A client known only by its embeddings (benchmarks with synthetic clients)."""
        return cls(key, [], {embedder_name: np.asarray(embeddings)})


@dataclass
class Cohort:
    """The clients one node serves, in a fixed order (the server addresses them by index).

    Attributes
    ----------
    client_ids
        Who the members are; the server refuses two nodes claiming the same client.
    members
        Their data, in the same order.
    """

    client_ids: list[str]
    members: list[NodeData] = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.client_ids) != len(self.members):
            raise ValueError("cohort: one client id per member expected")
        if len(set(self.client_ids)) != len(self.client_ids):
            raise ValueError("cohort: client ids must be distinct")

    def __len__(self) -> int:
        return len(self.members)

    def select(self, indices: Sequence[int]) -> list[NodeData]:
        """The members at ``indices`` (as sent by the server), checked."""
        bad = [i for i in indices if not 0 <= int(i) < len(self.members)]
        if bad:
            raise ValueError(
                f"members: index {bad[0]} out of range for a node serving {len(self)} clients"
            )
        return [self.members[int(i)] for i in indices]

    def centroids(self, embedder_name: str, indices: Sequence[int]) -> np.ndarray:
        """``(len(indices), d)`` float64 centroids; missing ones embedded in one batch.

        Only the centroids are kept: the members' text embeddings are not needed again.
        """
        chosen = self.select(indices)
        todo = [m for m in chosen if (m.key, embedder_name) not in _CENTROIDS]
        todo = [m for m in todo if m.known_embeddings(embedder_name) is None]
        if todo:
            flat = [t for m in todo for t in m.texts]
            emb = embedder(embedder_name).embed(flat)  # (0, d) when nobody has texts
            start = 0
            for m in todo:
                part = emb[start : start + len(m.texts)]
                _CENTROIDS[(m.key, embedder_name)] = centroid(part)
                start += len(m.texts)
        return np.stack([m.centroid(embedder_name) for m in chosen])


def node_cohort(
    context: Context,
    load_texts: Any = None,
    config: Any = None,
    load_cohort: Any = None,
) -> Cohort:
    """The clients this node serves, from the first that applies of:

    ``load_cohort(context)`` (a mapping client id -> texts, or a :class:`Cohort`);
    ``load_texts(context)`` (one client); the node's ``data-path`` (one client); the run
    config's federation: partition ``p`` serves clients ``p*c .. p*c + c - 1`` with
    ``c = simulation.clients_per_node``.
    """
    node = context.node_config
    if load_cohort is not None:
        key = f"cohort:{getattr(load_cohort, '__qualname__', load_cohort)}:{context.node_id}"
        if key not in _COHORTS:
            loaded = load_cohort(context)
            if not isinstance(loaded, Cohort):
                loaded = _cohort_from_mapping(key, loaded)
            _COHORTS[key] = loaded
        return _COHORTS[key]
    if load_texts is not None or "data-path" in node:  # one client (its id: app.client_id)
        return Cohort([f"node:{context.node_id}"], [node_data(context, load_texts, config)])
    cfg = config or _config_from_context(context)
    partition = int(node["partition-id"])
    size = int(getattr(cfg.simulation, "clients_per_node", 1) or 1)
    key = f"fed:{_data_key(cfg.data)}:{partition}:{size}"
    if key not in _COHORTS:
        fed = federation(cfg.data)
        population = cfg.simulation.population(fed.num_clients)
        first = partition * size
        if not 0 <= first < population:
            raise ValueError(
                f"partition-id: {partition} out of range: {population} clients in nodes of "
                f"{size} make {cfg.simulation.num_nodes(population)} partitions"
            )
        indices = range(first, min(first + size, population))
        _COHORTS[key] = Cohort(
            [f"partition-{i}" for i in indices],
            [_federation_member(cfg.data, fed, i) for i in indices],
        )
    return _COHORTS[key]


def _cohort_from_mapping(key: str, clients: Mapping[str, Sequence[str]]) -> Cohort:
    if not isinstance(clients, Mapping) or not clients:
        raise ValueError(
            "load_cohort: must return a non-empty mapping client id -> texts (or a Cohort), "
            f"got {type(clients).__name__}"
        )
    ids = [str(c) for c in clients]
    members = [NodeData(f"{key}:{c}", [str(t) for t in clients[c]]) for c in clients]
    return Cohort(ids, members)


def _federation_member(cfg: DataConfig, fed: Federation, index: int) -> NodeData:
    key = f"fed:{_data_key(cfg)}:{index}"
    if key not in _TEXTS:
        _TEXTS[key] = fed.train_texts(fed.client_for_partition(index))
    return NodeData(key, _TEXTS[key])


def node_data(context: Context, load_texts: Any = None, config: Any = None) -> NodeData:
    """A one-client node's texts: from ``load_texts``, its ``data-path``, or the federation."""
    node = context.node_config
    if load_texts is not None:
        key = f"fn:{getattr(load_texts, '__qualname__', load_texts)}:{context.node_id}"
        if key not in _TEXTS:
            _TEXTS[key] = [str(t) for t in load_texts(context)]
    elif "data-path" in node:
        key = f"file:{node['data-path']}"
        if key not in _TEXTS:
            _TEXTS[key] = load_public_texts(str(node["data-path"]), key="node config data-path")
    else:
        data = (config or _config_from_context(context)).data
        partition = int(node["partition-id"])
        key = f"fed:{_data_key(data)}:{partition}"
        if key not in _TEXTS:
            _TEXTS[key] = client_texts(data, partition)
    return NodeData(key, _TEXTS[key])


def _config_from_context(context: Context) -> Any:
    from popri_flwr.hydra_config import config_from_run_config

    return config_from_run_config(dict(context.run_config))


def _data_key(cfg: DataConfig) -> str:
    return hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=4)
def _federation(key: str, cfg_json: str) -> Federation:
    return load_federation(DataConfig(**json.loads(cfg_json)))


def federation(cfg: DataConfig) -> Federation:
    """The federation of this data config, loaded once per process."""
    return _federation(_data_key(cfg), json.dumps(asdict(cfg), default=str))


def client_texts(cfg: DataConfig, partition_id: int) -> list[str]:
    """Private training texts of the client behind ``partition_id``."""
    fed = federation(cfg)
    return fed.train_texts(fed.client_for_partition(partition_id))


def embedder(name: str, device: str = "cpu") -> Embedder:
    """The sentence embedder, loaded once per process."""
    return get_embedder(name, device)
