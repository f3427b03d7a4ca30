"""POPri's client: score the round's synthetic samples against this client's private texts.

What leaves the client is exactly one vector: ``clip_C(zscore(mean_j cos(E_k, P_j)))``, with
C the clip norm the server sent. Nothing about the private texts (not even their number) is
reported.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from popri_flwr.client_apps import resources
from popri_flwr.config import RunConfig
from popri_flwr.scoring import client_score_vector


def score(msg: Message, cfg: RunConfig, partition_id: int) -> np.ndarray:
    """Return this client's clipped score vector for the samples in ``msg``."""
    config = msg.content["config"]
    embedder_name = str(config.get("embedder") or cfg.embedder.model)
    clip_norm = float(config["clip-norm"])
    if config.get("payload") == "texts":
        texts = list(config["texts"])
        sample_emb = resources.embedder(embedder_name).embed(texts)
    else:
        sample_emb = msg.content["payload"]["embeddings"].numpy()
    private_emb = resources.private_embeddings(cfg.data, partition_id, embedder_name)
    return client_score_vector(sample_emb, private_emb, clip_norm)
