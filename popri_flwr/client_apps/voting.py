"""Private Evolution's client: vote for the population members nearest to the private texts.

What leaves the client is exactly one vector: its nearest-neighbour vote histogram scaled to L2
norm C (zeros for a client without texts), see
:func:`popri_flwr.algorithms.voting.client_vote_vector`.
Nothing about the private texts (not even their number) is reported.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from popri_flwr.algorithms.voting import client_vote_vector
from popri_flwr.client_apps import resources
from popri_flwr.protocol import PAYLOAD_ARRAYS, PAYLOAD_CONFIG


def vote(msg: Message, node: resources.NodeData) -> np.ndarray:
    """Return this client's bounded vote vector for the population in ``msg``."""
    config = msg.content[PAYLOAD_CONFIG]
    embedder_name = str(config["embedder"])
    clip_norm = float(config["clip-norm"])
    votes_k = int(config.get("votes-k", 1))
    if config.get("payload") == "texts":
        pop_emb = resources.embedder(embedder_name).embed(list(config["texts"]))
    else:
        pop_emb = msg.content[PAYLOAD_ARRAYS]["embeddings"].numpy()
    return client_vote_vector(pop_emb, node.embeddings(embedder_name), clip_norm, k=votes_k)
