"""The wire protocol between the strategies and the client apps (no server code imported).

A node serves one client or a cohort of clients. A query message with
:data:`IDENTITY_CONFIG` asks a node which clients it serves; it answers
``{IDENTITY_MEMBERS: [client ids]}`` (older nodes: ``{IDENTITY_KEY: "id"}``) so the server can
refuse a client served by two nodes and sample *clients* from the whole population.

A train message holds a :class:`~flwr.app.ConfigRecord` under :data:`PAYLOAD_CONFIG` (the
method, the clip norm C, the vector length, :data:`MEMBERS_KEY`: the indices of the node's
sampled members, method settings) and, for most methods, an :class:`~flwr.app.ArrayRecord`
under :data:`PAYLOAD_ARRAYS` (sample embeddings, or model weights for DP-FedAvg). The node
answers with one float32 row per sampled member, each of that length and L2 norm <= C, as a
``(members, length)`` array under ``reply[REPLY_ARRAYS][REPLY_VECTOR]`` (a 1-D vector when
the message names no members). Nothing else leaves the node unless the operator turned on
``evaluation.report_client_seconds`` (then a MetricRecord under :data:`REPLY_METRICS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

PAYLOAD_CONFIG = "config"
PAYLOAD_ARRAYS = "payload"
MEMBERS_KEY = "members"
REPLY_ARRAYS = "reply"
REPLY_VECTOR = "vector"
REPLY_METRICS = "metrics"
IDENTITY_CONFIG = "identity"
IDENTITY_KEY = "client-id"
IDENTITY_MEMBERS = "client-ids"


def vector_reply(msg: Message, vectors: np.ndarray, seconds: float | None = None) -> Message:
    """The reply to a train message: the clipped row(s) (and, if given, compute seconds)."""
    content = RecordDict({REPLY_ARRAYS: ArrayRecord({REPLY_VECTOR: Array(vectors)})})
    if seconds is not None:
        content[REPLY_METRICS] = MetricRecord({"client-seconds": float(seconds)})
    return Message(content=content, reply_to=msg)


def identity_reply(msg: Message, client_ids: str | Sequence[str]) -> Message:
    """The reply to an identity query: the client(s) this node serves."""
    ids = [client_ids] if isinstance(client_ids, str) else [str(c) for c in client_ids]
    content = RecordDict({PAYLOAD_CONFIG: ConfigRecord({IDENTITY_MEMBERS: ids})})
    return Message(content=content, reply_to=msg)


def reply_identities(msg: Message) -> list[str] | None:
    """The client ids of an identity reply, or None if it names none."""
    record = msg.content.get(PAYLOAD_CONFIG)
    if not isinstance(record, ConfigRecord):
        return None
    if IDENTITY_MEMBERS in record:
        ids = record[IDENTITY_MEMBERS]
        return [str(c) for c in ids] if isinstance(ids, list) and ids else None
    if IDENTITY_KEY in record:
        return [str(record[IDENTITY_KEY])]
    return None


def reply_vector(msg: Message) -> np.ndarray:
    """The array of a client's reply (raises KeyError/TypeError on a malformed reply)."""
    return msg.content[REPLY_ARRAYS][REPLY_VECTOR].numpy()
