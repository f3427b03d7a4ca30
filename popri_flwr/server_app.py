"""The package's ServerApp and the factory that builds a strategy from a :class:`RunConfig`.

``app`` is what ``flwr run .`` and a SuperLink deployment start (config from the run config);
:func:`make_server_app` binds an already-built strategy (Hydra entry point, tests).
"""

from __future__ import annotations

import logging
import math

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from popri_flwr.config import ConfigError, RunConfig, to_dict
from popri_flwr.data import Federation, load_federation
from popri_flwr.privacy import PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon
from popri_flwr.run_dir import RunDirectory
from popri_flwr.strategies import strategy_class
from popri_flwr.strategies.base import PrivateStrategy

logger = logging.getLogger(__name__)


def make_accountant(cfg: RunConfig) -> PrivacyAccountant:
    """Accountant with sigma calibrated to (epsilon, delta) over ``rounds`` at rate q.

    ``privacy.epsilon = inf`` means no noise (sigma 0) unless a noise multiplier is given.
    A given noise multiplier must not overspend the target over the configured rounds.
    """
    p = cfg.privacy
    if math.isinf(p.epsilon):
        logger.warning("privacy.epsilon=inf: NO differential privacy for this run")
        sigma = p.noise_multiplier or 0.0
    elif p.noise_multiplier is None:
        sigma = calibrate_noise_multiplier(
            p.epsilon, p.delta, cfg.rounds, p.sample_rate, accounting=p.accounting
        )
    else:
        sigma = p.noise_multiplier
        eps = compute_epsilon(sigma, p.sample_rate, cfg.rounds, p.delta, accounting=p.accounting)
        if eps > p.epsilon:
            raise ConfigError(
                f"privacy.noise_multiplier: {sigma:g} spends epsilon {eps:.4g} > "
                f"privacy.epsilon={p.epsilon:g} over {cfg.rounds} rounds; raise it or unset it"
            )
    acc = PrivacyAccountant(
        noise_multiplier=sigma,
        sample_rate=p.sample_rate,
        delta=p.delta,
        target_epsilon=p.epsilon,
        accounting=p.accounting,
    )
    logger.info(
        "Privacy: sigma=%.4g for epsilon=%s, delta=%g, %d rounds, q=%g (Poisson, add/remove one "
        "client, %s)",
        sigma,
        p.epsilon,
        p.delta,
        cfg.rounds,
        p.sample_rate,
        p.accounting.upper(),
    )
    return acc


def build_strategy(
    cfg: RunConfig, federation: Federation | None = None, *, simulation: bool = True
) -> PrivateStrategy:
    """Run directory, accountant, models and the strategy named by ``strategy.name``.

    Everything that can fail on bad input fails here, before any client is contacted, and
    ``config.yaml`` is written only once a resume has been accepted. ``simulation`` picks the
    default of ``diagnostics`` (on in simulation, off in a deployment).
    """
    run_dir = RunDirectory(cfg.run_dir or "outputs/run")
    config = to_dict(cfg)
    run_dir.check_resume(config, cfg.resume)
    federation = federation or load_federation(cfg.data)
    accountant = make_accountant(cfg)
    run_dir.check_resume(config, cfg.resume, accountant.state_dict())
    run_dir.write_config(config, resume=cfg.resume)
    diagnostics = simulation if cfg.diagnostics is None else cfg.diagnostics
    common = dict(
        accountant=accountant,
        clip_norm=cfg.privacy.clip_norm,
        num_clients=population(cfg, federation),
        run_dir=run_dir,
        seed=cfg.seed,
        round_timeout=cfg.simulation.round_timeout,
        diagnostics=diagnostics,
        debug_noise_seed=cfg.privacy.debug_noise_seed,
    )
    return strategy_class(cfg.strategy.name).from_config(cfg, federation=federation, **common)


def population(cfg: RunConfig, federation: Federation) -> int:
    """N, the number of clients (= simulated nodes) the sampling rate refers to."""
    n = cfg.simulation.num_supernodes or federation.num_clients
    if n > federation.num_clients:
        raise ConfigError(
            f"simulation.num_supernodes: {n} > the {federation.num_clients} clients of the "
            "federation"
        )
    return n


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
