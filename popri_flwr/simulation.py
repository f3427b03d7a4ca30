"""Run a configured experiment on Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os

from popri_flwr.config import ConfigError, RunConfig
from popri_flwr.data import load_federation

logger = logging.getLogger(__name__)


def backend_config(cfg: RunConfig) -> dict:
    """Ray backend settings: per-client CPUs/GPUs and ``ray.init`` arguments.

    Without an ``address`` in ``simulation.init_args`` (and no ``$RAY_ADDRESS``) the run starts
    its own local Ray instance (``address="local"``: never one left running by ``ray start``)
    with all of this machine's CPUs. With one (``HOST:PORT``, ``auto``, ``ray://...``) the run
    joins that cluster, whose nodes declared their own resources: Ray refuses ``num_cpus`` there,
    so none is added (one written in ``init_args`` is still passed on). Ray's rules: address
    ``None`` or ``auto`` defers to ``$RAY_ADDRESS`` when set, ``local`` always starts anew.
    """
    init_args = {"include_dashboard": False, "log_to_driver": True, **cfg.simulation.init_args}
    address = init_args.get("address")
    if address in (None, "", "auto") and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if not address or address == "local":
        init_args["address"] = "local"
        init_args.setdefault("num_cpus", os.cpu_count() or 1)
    return {
        "client_resources": {
            "num_cpus": cfg.simulation.client_num_cpus,
            "num_gpus": cfg.simulation.client_num_gpus,
        },
        "init_args": init_args,
    }


def run_simulation(cfg: RunConfig) -> str:
    """Build the strategy (models, accountant, run directory), then simulate the federation.

    Returns
    -------
    str
        The run directory.
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    from popri_flwr.client_apps.app import make_client_app
    from popri_flwr.server_app import build_strategy, make_server_app, population

    try:  # everything that can fail on bad input fails here, before Ray starts
        federation = load_federation(cfg.data)
        num_clients = population(cfg, federation)
        num_nodes = cfg.simulation.num_nodes(num_clients)
        strategy = build_strategy(cfg, federation)
    except ValueError as err:  # data/model/config errors name their key or file
        raise ConfigError(str(err)) from err
    logger.info("Simulating %d clients (%s) on %d nodes", num_clients, federation.name, num_nodes)
    # Flower 1.41's supported path (`flwr run`) loads apps by module name into a SuperLink's
    # processes; this in-process call with our ServerApp object has no replacement yet, so its
    # deprecation banner ("use flwr run") is not advice our users can act on.
    flwr_logger = logging.getLogger("flwr")
    banner = _DropDeprecationBanner("`run_simulation`")
    flwr_logger.addFilter(banner)
    try:
        flwr_run_simulation(
            server_app=make_server_app(cfg, strategy),
            client_app=make_client_app(config=cfg),
            num_supernodes=num_nodes,
            backend_name="ray",
            backend_config=backend_config(cfg),
        )
    finally:
        flwr_logger.removeFilter(banner)
    return str(strategy.run_dir.path)


class _DropDeprecationBanner(logging.Filter):
    """Drops Flower's ``DEPRECATED FEATURE`` banner about one feature, nothing else."""

    def __init__(self, feature: str) -> None:
        super().__init__()
        self.feature = feature

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("DEPRECATED FEATURE"):
            return True
        return self.feature not in record.getMessage()
