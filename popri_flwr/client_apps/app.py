"""The package's ClientApp: one app, one handler per method (``config["method"]``).

``app`` (used by ``flwr run .`` and SuperNodes) reads the run's config from
``context.run_config``; :func:`make_client_app` binds a config directly (Hydra entry point,
where the simulation engine passes no run config).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from popri_flwr.config import RunConfig
from popri_flwr.strategies.base import (
    IDENTITY_KEY,
    PAYLOAD_CONFIG,
    REPLY_ARRAYS,
    REPLY_METRICS,
    REPLY_VECTOR,
)

logger = logging.getLogger(__name__)

Handler = Callable[[Message, RunConfig, int], np.ndarray]


def _handlers() -> dict[str, Handler]:
    from popri_flwr.client_apps.local_training import train_update
    from popri_flwr.client_apps.scoring import score
    from popri_flwr.client_apps.voting import vote

    return {"popri": score, "pe": vote, "dp_fedavg": train_update}


def make_client_app(cfg: RunConfig | None = None, report_seconds: bool | None = None) -> ClientApp:
    """Build the ClientApp, bound to ``cfg`` or (if None) to the run config of the context."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = cfg if cfg is not None else _config_from_context(context)
        partition_id = int(context.node_config["partition-id"])
        method = str(msg.content["config"].get("method", "popri"))
        handler = _handlers().get(method)
        if handler is None:
            raise ValueError(f"strategy.name: this client app has no handler for {method!r}")
        start = time.perf_counter()
        vector = handler(msg, run_cfg, partition_id)
        content = RecordDict({REPLY_ARRAYS: ArrayRecord({REPLY_VECTOR: Array(vector)})})
        # Compute time hints at the client's data size: sent only when the config asks.
        report = (
            run_cfg.evaluation.report_client_seconds if report_seconds is None else (report_seconds)
        )
        if report:
            content[REPLY_METRICS] = MetricRecord({"client-seconds": time.perf_counter() - start})
        return Message(content=content, reply_to=msg)

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        """Which client this node serves, so the server can refuse two nodes per client."""
        content = RecordDict({PAYLOAD_CONFIG: ConfigRecord({IDENTITY_KEY: client_id(context)})})
        return Message(content=content, reply_to=msg)

    return app


def client_id(context: Context) -> str:
    """The client a node serves: ``client-id`` from its node config, else its partition id."""
    node = context.node_config
    if "client-id" in node:
        return str(node["client-id"])
    if "partition-id" in node:
        return f"partition-{int(node['partition-id'])}"
    raise ValueError(
        "node config: this SuperNode has neither client-id nor partition-id; start it with "
        '--node-config "partition-id=N num-partitions=M" (or client-id=NAME)'
    )


def _config_from_context(context: Context) -> RunConfig:
    from popri_flwr.hydra_config import config_from_run_config

    return config_from_run_config(dict(context.run_config))


app = make_client_app()
