"""Per-process caches of a client app: federation, embedder, private-text embeddings.

One Ray actor serves many simulated nodes, so caches are keyed by partition id. In a real
deployment each message may start a fresh process, and the caches simply start empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from functools import lru_cache

import numpy as np

from popri_flwr.data import DataConfig, Federation, load_federation
from popri_flwr.embedding import Embedder, get_embedder

logger = logging.getLogger(__name__)

_PRIVATE_EMB: dict[tuple[str, str, int], np.ndarray] = {}


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


def private_embeddings(cfg: DataConfig, partition_id: int, embedder_name: str) -> np.ndarray:
    """Embeddings of a client's private texts, computed once per (data, node, embedder)."""
    key = (_data_key(cfg), embedder_name, int(partition_id))
    if key not in _PRIVATE_EMB:
        _PRIVATE_EMB[key] = embedder(embedder_name).embed(client_texts(cfg, partition_id))
    return _PRIVATE_EMB[key]
