"""POPri for Flower: private synthetic text from data that never leaves the clients.

The public API (imported lazily, so client code pulls in no server code)::

    from popri_flwr import PopriStrategy, make_client_app

    strategy = PopriStrategy.create(num_clients=N, run_dir="outputs/run", rounds=3,
                                    privacy={"epsilon": 1.0, "sample_rate": 0.1})
    result = strategy.start(grid, num_rounds=3)          # inside your ServerApp's main
    app = make_client_app()                             # your ClientApp (data-path or yours)

Baselines: :class:`PrivateEvolutionStrategy`, :class:`DPFedAvgStrategy`. Config dataclasses:
:class:`RunConfig` and its sections (:class:`PrivacyConfig`, :class:`GenerationConfig`,
:class:`DPOStepConfig`, ...); :func:`load_config` composes the packaged Hydra configs.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "PopriStrategy": "popri_flwr.strategies.popri",
    "PrivateEvolutionStrategy": "popri_flwr.strategies.private_evolution",
    "DPFedAvgStrategy": "popri_flwr.strategies.dp_fedavg",
    "PrivateStrategy": "popri_flwr.strategies.base",
    "build_strategy": "popri_flwr.strategies.factory",
    "create_strategy": "popri_flwr.strategies.factory",
    "make_client_app": "popri_flwr.client_apps.app",
    "make_server_app": "popri_flwr.server_app",
    "load_config": "popri_flwr.hydra_config",
    "RunConfig": "popri_flwr.config",
    "PrivacyConfig": "popri_flwr.config",
    "GenerationConfig": "popri_flwr.config",
    "StrategyConfig": "popri_flwr.config",
    "PublicSetConfig": "popri_flwr.config",
    "DataConfig": "popri_flwr.data",
    "DPOStepConfig": "popri_flwr.models.dpo",
    "PrivacyAccountant": "popri_flwr.privacy.accounting",
    "RunDirectory": "popri_flwr.run_dir",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'popri_flwr' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
