"""What a node serves: a cohort of one or more clients, and per-process caches of their data.

A node serves one client (the default: a device, or a simulated node per client) or a cohort
of clients (many users behind one SuperNode, or ``simulation.clients_per_node`` > 1). Either
way the privacy unit is the client: the server samples clients, and the node answers with one
clipped vector per sampled member.

One Ray actor serves many simulated nodes, so caches are keyed by the data (a file, or the
federation and the client's index). In a real deployment each message may start a fresh
process, and the caches simply start empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

_TEXTS: dict[str, list[str]] = {}
_EMBEDDINGS: dict[tuple[str, str], np.ndarray] = {}
_CENTROIDS: dict[tuple[str, str], np.ndarray] = {}
_COHORTS: dict[str, Cohort] = {}


@dataclass
class NodeData:
    """One client's private data: a cache key and its texts (loaded once per process)."""

    key: str
    texts: list[str] = field(repr=False)

    def embeddings(self, embedder_name: str) -> np.ndarray:
        """Embeddings of the texts, computed once per (client, embedder)."""
        key = (self.key, embedder_name)
        if key not in _EMBEDDINGS:
            _EMBEDDINGS[key] = embedder(embedder_name).embed(self.texts)
        return _EMBEDDINGS[key]

    def centroid(self, embedder_name: str) -> np.ndarray:
        """Mean embedding of the texts (float64; zeros for a client without texts)."""
        key = (self.key, embedder_name)
        if key not in _CENTROIDS:
            _CENTROIDS[key] = centroid(self.embeddings(embedder_name))
        return _CENTROIDS[key]

    @classmethod
    def from_embeddings(cls, key: str, embedder_name: str, embeddings: np.ndarray) -> NodeData:
        """A client known only by its embeddings (benchmarks with synthetic clients)."""
        _EMBEDDINGS[(key, embedder_name)] = np.asarray(embeddings)
        return cls(key, [])


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
        """``(len(indices), d)`` float64 centroids; missing ones embedded in one batch."""
        chosen = self.select(indices)
        todo = [m for m in chosen if (m.key, embedder_name) not in _EMBEDDINGS]
        if todo:
            flat = [t for m in todo for t in m.texts]
            emb = embedder(embedder_name).embed(flat)  # (0, d) when nobody has texts
            start = 0
            for m in todo:
                _EMBEDDINGS[(m.key, embedder_name)] = emb[start : start + len(m.texts)]
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
