"""The package's ClientApp: one app, one handler per method (``config["method"]``).

Where a node's private texts come from, in this order:

1. a ``load_texts(context)`` function given to :func:`make_client_app` (your own data);
2. ``data-path='FILE'`` in the SuperNode's ``--node-config`` (TOML: quote the path; ``.txt``
   paragraphs, ``.json`` or ``.jsonl`` with a ``text`` field): each device reads its own file;
3. the federation of the run's config (``data.*``), client ``partition-id`` (simulation).

Nothing here imports server code: the message format lives in :mod:`popri_flwr.protocol`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from popri_flwr.client_apps import resources
from popri_flwr.protocol import PAYLOAD_CONFIG, identity_reply, vector_reply

logger = logging.getLogger(__name__)

#: ``load_texts(context) -> texts``: this node's private texts.
TextsLoader = Callable[[Context], Sequence[str]]
#: ``handler(message, node) -> clipped vector``.
Handler = Callable[[Message, "resources.NodeData"], np.ndarray]


def _handlers() -> dict[str, Handler]:
    from popri_flwr.client_apps.local_training import train_update
    from popri_flwr.client_apps.scoring import score
    from popri_flwr.client_apps.voting import vote

    return {"popri": score, "pe": vote, "dp_fedavg": train_update}


def make_client_app(
    load_texts: TextsLoader | None = None,
    *,
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
        vector = handler(msg, resources.node_data(context, load_texts, config))
        seconds = time.perf_counter() - start if report_seconds else None
        return vector_reply(msg, vector, seconds)

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        """Which client this node serves, so the server can refuse two nodes per client."""
        return identity_reply(msg, client_id(context))

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
