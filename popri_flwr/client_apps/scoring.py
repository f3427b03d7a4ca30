"""POPri's client: score the round's synthetic samples against this client's private texts.

What leaves the client is exactly one vector: ``clip_C(zscore(mean_j cos(E_k, P_j)))``, with
C the clip norm the server sent. Nothing about the private texts (not even their number) is
reported.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from popri_flwr.algorithms.scoring import client_score_vector
from popri_flwr.client_apps import resources
from popri_flwr.protocol import PAYLOAD_ARRAYS, PAYLOAD_CONFIG


def score(msg: Message, node: resources.NodeData) -> np.ndarray:
    """Return this client's clipped score vector for the samples in ``msg``."""
    config = msg.content[PAYLOAD_CONFIG]
    embedder_name = str(config["embedder"])
    clip_norm = float(config["clip-norm"])
    if config.get("payload") == "texts":
        sample_emb = resources.embedder(embedder_name).embed(list(config["texts"]))
    else:
        sample_emb = msg.content[PAYLOAD_ARRAYS]["embeddings"].numpy()
    return client_score_vector(sample_emb, node.embeddings(embedder_name), clip_norm)
