"""POPri's client: score the round's synthetic samples against each member's private texts.

What leaves the node is exactly one vector per sampled member:
``clip_C(zscore(mean_j cos(E_k, P_j)))``, with C the clip norm the server sent. Nothing about
the private texts (not even their number) is reported. A cohort is scored in one chunked
matrix product (:func:`~popri_flwr.algorithms.scoring.score_matrix`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Message

from popri_flwr.algorithms.scoring import client_score_vector, score_matrix
from popri_flwr.client_apps import resources
from popri_flwr.protocol import PAYLOAD_ARRAYS, PAYLOAD_CONFIG


def _sample_embeddings(msg: Message) -> tuple[np.ndarray, str, float]:
    config = msg.content[PAYLOAD_CONFIG]
    embedder_name = str(config["embedder"])
    if config.get("payload") == "texts":
        sample_emb = resources.embedder(embedder_name).embed(list(config["texts"]))
    else:
        sample_emb = msg.content[PAYLOAD_ARRAYS]["embeddings"].numpy()
    return sample_emb, embedder_name, float(config["clip-norm"])


def score(msg: Message, node: resources.NodeData) -> np.ndarray:
    """One client's clipped score vector for the samples in ``msg``."""
    sample_emb, embedder_name, clip_norm = _sample_embeddings(msg)
    return client_score_vector(sample_emb, node.embeddings(embedder_name), clip_norm)


def score_cohort(msg: Message, cohort: resources.Cohort, members: Sequence[int]) -> np.ndarray:
    """``(len(members), K*J)`` clipped score vectors, one row per sampled member."""
    sample_emb, embedder_name, clip_norm = _sample_embeddings(msg)
    return score_matrix(sample_emb, cohort.centroids(embedder_name, members), clip_norm)
