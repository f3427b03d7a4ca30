"""The wire protocol between the strategies and the client apps (no server code imported).

A train message holds a :class:`~flwr.app.ConfigRecord` under :data:`PAYLOAD_CONFIG` (the
method, the clip norm C, the vector length, method settings) and, for most methods, an
:class:`~flwr.app.ArrayRecord` under :data:`PAYLOAD_ARRAYS` (sample embeddings, or model
weights for DP-FedAvg). A client answers with exactly one float32 vector of that length and
L2 norm <= C, under ``reply[REPLY_ARRAYS][REPLY_VECTOR]``; nothing else leaves the client
unless the operator turned on ``evaluation.report_client_seconds`` (then a MetricRecord under
:data:`REPLY_METRICS`). A query message with :data:`IDENTITY_CONFIG` asks a node which client
it serves; it answers ``{IDENTITY_KEY: "..."}`` so the server can enforce one node per client.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

PAYLOAD_CONFIG = "config"
PAYLOAD_ARRAYS = "payload"
REPLY_ARRAYS = "reply"
REPLY_VECTOR = "vector"
REPLY_METRICS = "metrics"
IDENTITY_CONFIG = "identity"
IDENTITY_KEY = "client-id"


def vector_reply(msg: Message, vector: np.ndarray, seconds: float | None = None) -> Message:
    """The reply to a train message: the clipped vector (and, if given, compute seconds)."""
    content = RecordDict({REPLY_ARRAYS: ArrayRecord({REPLY_VECTOR: Array(vector)})})
    if seconds is not None:
        content[REPLY_METRICS] = MetricRecord({"client-seconds": float(seconds)})
    return Message(content=content, reply_to=msg)


def identity_reply(msg: Message, client_id: str) -> Message:
    """The reply to an identity query."""
    content = RecordDict({PAYLOAD_CONFIG: ConfigRecord({IDENTITY_KEY: str(client_id)})})
    return Message(content=content, reply_to=msg)


def reply_vector(msg: Message) -> np.ndarray:
    """The vector of a client's reply (raises KeyError/TypeError on a malformed reply)."""
    return msg.content[REPLY_ARRAYS][REPLY_VECTOR].numpy()
