"""A fake Flower Grid for driving strategies without a runtime (shared by strategy tests).

`FakeGrid` stands in for the SuperLink (the documented way to unit-test a Flower strategy):
each node answers with a function of our choosing, so honest, malicious, failing and silent
clients can be exercised. Test modules must set the task identity first (``Message(...)``
needs it outside a runtime): call :func:`set_task_identity` from an autouse fixture.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from popri_flwr.protocol import (
    IDENTITY_KEY,
    IDENTITY_MEMBERS,
    PAYLOAD_CONFIG,
    REPLY_ARRAYS,
    REPLY_VECTOR,
)


def set_task_identity() -> None:
    """Give messages the run/task/node ids a runtime would set."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid(Grid):
    """Delivers each message to ``behaviours[node_id](msg)``; ``None`` means no reply.

    Identity queries (which clients a node serves) are answered with ``identities[node]``,
    by default ``"client-<node>"``: one node per client; a list is a cohort (many clients on
    one node). ``sent`` and ``messages`` record the
    train messages only; ``queries`` counts the identity queries.
    """

    def __init__(
        self,
        behaviours: dict[int, Callable[[Message], Message | None]],
        identities: dict[int, str | list[str]] | None = None,
    ):
        self.behaviours = behaviours
        self.identities = identities or {}
        self.sent: list[list[int]] = []
        self.messages: list[list[Message]] = []
        self.queries = 0

    def get_node_ids(self):
        return list(self.behaviours)

    def _identify(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        client = self.identities.get(node, f"client-{node}")
        key = IDENTITY_MEMBERS if isinstance(client, list) else IDENTITY_KEY
        return Message(RecordDict({PAYLOAD_CONFIG: ConfigRecord({key: client})}), reply_to=msg)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.QUERY:
            self.queries += len(messages)
            return [self._identify(m) for m in messages]
        self.sent.append([m.metadata.dst_node_id for m in messages])
        self.messages.append(messages)
        out = []
        for m in messages:
            reply = self.behaviours[m.metadata.dst_node_id](m)
            if reply is not None:
                out.append(reply)
        return out

    # Unused parts of the Grid interface.
    def set_run(self, run_id):  # pragma: no cover
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError


def reply_with(vector) -> Callable[[Message], Message]:
    """A client that always answers with ``vector``."""

    def behave(msg: Message) -> Message:
        return Message(
            RecordDict({REPLY_ARRAYS: ArrayRecord({REPLY_VECTOR: Array(np.asarray(vector))})}),
            reply_to=msg,
        )

    return behave
