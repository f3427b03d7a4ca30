"""A benchmark-only strategy: POPri's client phase with fixed samples, nothing else.

:class:`ScoringProbeStrategy` is a :class:`~popri_flwr.strategies.base.PrivateStrategy` (the
real sampling, identity check, row-by-row checks, noise and accounting) whose payload is a
fixed matrix of sample embeddings and whose server update does nothing, so that timing a round
times the clients and the server's handling of their replies, without generation or DPO.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from popri_flwr.protocol import PAYLOAD_ARRAYS, PAYLOAD_CONFIG
from popri_flwr.strategies.base import PrivateStrategy


class ScoringProbeStrategy(PrivateStrategy):
    """Sends ``sample_emb`` to the sampled clients every round (method ``popri``).

    Parameters
    ----------
    sample_emb
        ``(n, d)`` unit-norm sample embeddings; each client returns ``n`` scores.
    embedder_name
        The embedder the clients use for their own texts.
    **kwargs
        See :class:`~popri_flwr.strategies.base.PrivateStrategy`.
    """

    method = "popri"

    def __init__(self, *, sample_emb: np.ndarray, embedder_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample_emb = np.ascontiguousarray(sample_emb, dtype=np.float32)
        self.embedder_name = embedder_name

    def train_payload(self, server_round: int) -> RecordDict:
        config = ConfigRecord(
            {"method": self.method, "payload": "embeddings", "embedder": self.embedder_name}
        )
        arrays = ArrayRecord({"embeddings": Array(self.sample_emb)})
        return RecordDict({PAYLOAD_CONFIG: config, PAYLOAD_ARRAYS: arrays})

    def vector_length(self, server_round: int) -> int:
        return len(self.sample_emb)

    def server_update(self, server_round: int, release: np.ndarray) -> dict[str, Any]:
        return {}
