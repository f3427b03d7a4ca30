"""Per-process caches of a client app: the node's texts, the embedder, text embeddings.

One Ray actor serves many simulated nodes, so caches are keyed by the node's data (its file,
or the federation and partition). In a real deployment each message may start a fresh
process, and the caches simply start empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Context

from popri_flwr.data import DataConfig, Federation, load_federation, load_public_texts
from popri_flwr.models.embedding import Embedder, get_embedder

logger = logging.getLogger(__name__)

_TEXTS: dict[str, list[str]] = {}
_EMBEDDINGS: dict[tuple[str, str], np.ndarray] = {}


@dataclass
class NodeData:
    """This node's private data: a cache key and its texts (loaded once per process)."""

    key: str
    texts: list[str] = field(repr=False)

    def embeddings(self, embedder_name: str) -> np.ndarray:
        """Embeddings of the texts, computed once per (node, embedder)."""
        key = (self.key, embedder_name)
        if key not in _EMBEDDINGS:
            _EMBEDDINGS[key] = embedder(embedder_name).embed(self.texts)
        return _EMBEDDINGS[key]


def node_data(context: Context, load_texts: Any = None, config: Any = None) -> NodeData:
    """The node's texts: from ``load_texts``, the node's ``data-path``, or the federation."""
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
