"""Building a strategy from a :class:`~popri_flwr.config.RunConfig` (Hydra, ``flwr run``).

The strategies themselves take plain values; this factory loads the models, calibrates the
accountant, opens the run directory (checking a resume before anything is written) and picks
the class named by ``strategy.name``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from popri_flwr.config import ConfigError, RunConfig, load_run_config, to_dict
from popri_flwr.data import Federation, load_federation
from popri_flwr.privacy.accounting import (
    PrivacyAccountant,
    compute_epsilon,
)
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
    if p.noise_multiplier is None and not math.isinf(p.epsilon):
        acc = PrivacyAccountant.calibrated(
            p.epsilon, p.delta, cfg.rounds, p.sample_rate, accounting=p.accounting
        )
    else:
        if math.isinf(p.epsilon):
            logger.warning("privacy.epsilon=inf: NO differential privacy for this run")
        sigma = p.noise_multiplier or 0.0
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
    sigma = acc.noise_multiplier
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
    cfg: RunConfig,
    federation: Federation | None = None,
    *,
    simulation: bool = True,
    num_clients: int | None = None,
) -> PrivateStrategy:
    """Run directory, accountant, models and the strategy named by ``strategy.name``.

    Everything that can fail on bad input fails here, before any client is contacted, and
    ``config.yaml`` is written only once a resume has been accepted.

    Parameters
    ----------
    cfg
        The validated run config.
    federation
        The simulated federation (loaded from ``cfg.data`` if needed and not given). A
        deployment passes ``num_clients`` instead: the server never needs the clients' data.
    simulation
        Picks the default of ``diagnostics`` (on in simulation, off in a deployment).
    num_clients
        The population N. Default: in a deployment ``simulation.num_supernodes`` (one client
        per node; the server then never loads client data), else the federation's size
        (``simulation.population``).
    """
    run_dir = RunDirectory(cfg.run_dir or "outputs/run")
    config = to_dict(cfg)
    run_dir.check_resume(config, cfg.resume)
    diagnostics = simulation if cfg.diagnostics is None else cfg.diagnostics
    if num_clients is None and not simulation and cfg.simulation.clients_per_node == 1:
        num_clients = cfg.simulation.num_supernodes  # a deployment: N from the config, no data
    if federation is None and (num_clients is None or diagnostics):
        federation = load_federation(cfg.data)
    accountant = make_accountant(cfg)
    run_dir.check_resume(config, cfg.resume, accountant.state_dict())
    run_dir.write_config(config, resume=cfg.resume)
    common = dict(
        accountant=accountant,
        clip_norm=cfg.privacy.clip_norm,
        num_clients=num_clients if num_clients is not None else population(cfg, federation),
        run_dir=run_dir,
        seed=cfg.seed,
        round_timeout=cfg.simulation.round_timeout,
        min_reply_fraction=cfg.simulation.min_reply_fraction,
        diagnostics=diagnostics,
        debug_noise_seed=cfg.privacy.debug_noise_seed,
    )
    return strategy_class(cfg.strategy.name).from_config(cfg, federation=federation, **common)


def population(cfg: RunConfig, federation: Federation) -> int:
    """N, the number of clients the sampling rate refers to (see ``simulation.*``)."""
    return cfg.simulation.population(federation.num_clients)


def create_strategy(
    name: str,
    *,
    num_clients: int,
    run_dir: str,
    rounds: int = 3,
    diagnostics: bool = False,
    **sections: Any,
) -> PrivateStrategy:
    """A strategy from plain values: the config sections as dataclasses or dicts.

    ``sections`` are fields of :class:`~popri_flwr.config.RunConfig` (``privacy=``,
    ``generation=``, ``dpo=``, ``strategy=`` (without ``name``), ``public_set=``, ``seed=``,
    ...); anything not given keeps its default. Diagnostics are off (a deployment's default).

    Raises
    ------
    ValueError
        A :class:`~popri_flwr.config.ConfigError` naming the first bad key.
    """
    import dataclasses

    strategy = sections.pop("strategy", {})
    if dataclasses.is_dataclass(strategy):
        strategy = dataclasses.asdict(strategy)
    data = {
        **{
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in sections.items()
        },
        "strategy": {**strategy, "name": name},
        "rounds": rounds,
        "run_dir": str(run_dir),
        "diagnostics": diagnostics,
    }
    cfg = load_run_config(data)
    return build_strategy(cfg, num_clients=num_clients, simulation=False)
