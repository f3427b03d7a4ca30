"""The package's ClientApp: one app, one handler per method (``config["method"]``).

Where a node's private texts come from, in this order:

1. a ``load_cohort(context)`` function given to :func:`make_client_app`: the node serves many
   clients (users of one silo), ``{client_id: texts}``;
2. a ``load_texts(context)`` function given to :func:`make_client_app` (your own data);
3. ``data-path='FILE'`` in the SuperNode's ``--node-config`` (TOML: quote the path; ``.txt``
   paragraphs, ``.json`` or ``.jsonl`` with a ``text`` field): each device reads its own file;
4. the federation of the run's config (``data.*``), client ``partition-id`` (simulation); with
   ``simulation.clients_per_node = c`` node ``p`` serves clients ``p*c .. p*c + c - 1``.

The server samples clients, not nodes: a train message names the sampled members of the node
(``members``, indices into its cohort) and the reply holds one clipped row per member.

Nothing here imports server code: the message format lives in :mod:`popri_flwr.protocol`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from popri_flwr.client_apps import resources
from popri_flwr.protocol import MEMBERS_KEY, PAYLOAD_CONFIG, identity_reply, vector_reply

logger = logging.getLogger(__name__)

#: ``load_texts(context) -> texts``: this node's private texts.
TextsLoader = Callable[[Context], Sequence[str]]
#: ``load_cohort(context) -> {client_id: texts}``: the clients this node serves.
CohortLoader = Callable[[Context], Mapping[str, Sequence[str]]]
#: ``handler(message, cohort, members) -> (len(members), dim)`` clipped rows.
Handler = Callable[[Message, "resources.Cohort", Sequence[int]], np.ndarray]


def per_member(
    handler: Callable[[Message, resources.NodeData], np.ndarray],
) -> Handler:
    """A cohort handler that calls a one-client handler for each sampled member in turn."""

    def run(msg: Message, cohort: resources.Cohort, members: Sequence[int]) -> np.ndarray:
        return np.stack([handler(msg, node) for node in cohort.select(members)])

    return run


def _handlers() -> dict[str, Handler]:
    from popri_flwr.client_apps.local_training import train_update
    from popri_flwr.client_apps.scoring import score_cohort
    from popri_flwr.client_apps.voting import vote

    return {"popri": score_cohort, "pe": per_member(vote), "dp_fedavg": per_member(train_update)}


def make_client_app(
    load_texts: TextsLoader | None = None,
    *,
    load_cohort: CohortLoader | None = None,
    config: Any = None,
    report_seconds: bool | None = None,
) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    load_texts
        ``load_texts(context)`` returns this node's private texts (called once per process
        and node). Default: ``data-path`` from the node config, else the run config's
        federation by ``partition-id``.
    load_cohort
        ``load_cohort(context)`` returns ``{client_id: texts}`` for a node that serves many
        clients (a silo); each client is sampled, clipped and accounted on its own.
    config
        A :class:`~popri_flwr.config.RunConfig` to take the federation from (the Hydra entry
        point, where the simulation engine passes no run config); default: the run config.
    report_seconds
        Send the client's compute seconds with each reply (a timing side channel: benchmarks
        only). Default: ``evaluation.report_client_seconds`` of ``config``, else off.
    """
    app = ClientApp()
    if report_seconds is None:
        report_seconds = bool(config is not None and config.evaluation.report_client_seconds)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        method = str(msg.content[PAYLOAD_CONFIG].get("method", "popri"))
        handler = _handlers().get(method)
        if handler is None:
            raise ValueError(f"strategy.name: this client app has no handler for {method!r}")
        start = time.perf_counter()
        cohort = resources.node_cohort(context, load_texts, config, load_cohort)
        config_record = msg.content[PAYLOAD_CONFIG]
        members = [int(i) for i in config_record.get(MEMBERS_KEY, [0])]
        rows = handler(msg, cohort, members)
        if MEMBERS_KEY not in config_record:  # a server that predates cohorts: one vector
            rows = rows[0]
        seconds = time.perf_counter() - start if report_seconds else None
        return vector_reply(msg, rows, seconds)

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        """Which clients this node serves, so the server can refuse a client on two nodes."""
        if load_cohort is None and (load_texts is not None or "data-path" in context.node_config):
            return identity_reply(msg, client_id(context))
        cohort = resources.node_cohort(context, load_texts, config, load_cohort)
        return identity_reply(msg, cohort.client_ids)

    return app


def client_id(context: Context) -> str:
    """The client a node serves: ``client-id``, else ``data-path``, else its partition id."""
    node = context.node_config
    if "client-id" in node:
        return str(node["client-id"])
    if "data-path" in node:
        return f"file:{node['data-path']}"
    if "partition-id" in node:
        return f"partition-{int(node['partition-id'])}"
    raise ValueError(
        "node config: this SuperNode has no data-path, client-id or partition-id; start it "
        'with --node-config "data-path=\'FILE\'" (or "partition-id=N num-partitions=M")'
    )


app = make_client_app()
