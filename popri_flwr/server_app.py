"""The package's ServerApp.

``app`` is what ``flwr run .`` and a SuperLink deployment start (config from the run config);
:func:`make_server_app` binds an already-built strategy (Hydra entry point, tests). Strategies
are built by :mod:`popri_flwr.strategies.factory`.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from popri_flwr.config import ConfigError, RunConfig
from popri_flwr.strategies.base import PrivateStrategy
from popri_flwr.strategies.factory import build_strategy, population

__all__ = ["app", "build_strategy", "make_server_app", "population", "run_strategy"]

logger = logging.getLogger(__name__)


def run_strategy(grid: Grid, strategy: PrivateStrategy, cfg: RunConfig) -> None:
    """Drive ``strategy`` for ``cfg.rounds`` rounds on ``grid``."""
    strategy.start(grid=grid, num_rounds=cfg.rounds, timeout=cfg.simulation.round_timeout)
    logger.info("Run directory: %s", strategy.run_dir.path)


def make_server_app(cfg: RunConfig, strategy: PrivateStrategy | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (and to a pre-built strategy, if given)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_strategy(grid, strategy or build_strategy(cfg), cfg)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry of ``flwr run .``: config from ``[tool.flwr.app.config]`` / ``--run-config``."""
    from popri_flwr.hydra_config import config_from_run_config

    if not logging.getLogger().handlers:  # a bare flwr-serverapp process: show our progress
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("popri_flwr").setLevel(logging.INFO)
    cfg = config_from_run_config(dict(context.run_config))
    if cfg.privacy.debug_noise_seed is not None:
        raise ConfigError(
            "privacy.debug_noise_seed: refused by the Flower app (flwr run, deployments); a "
            "seeded noise run is NOT differentially private and is for popri-run debugging only"
        )
    run_strategy(grid, build_strategy(cfg, simulation=False), cfg)
