"""Flower strategies. ``strategy.name`` in the config picks one of :data:`STRATEGIES`."""

from __future__ import annotations

import importlib

#: name -> "module:Class"; a new method is one file here plus a config group.
STRATEGIES: dict[str, str] = {
    "popri": "popri_flwr.strategies.popri:PopriStrategy",
    "pe": "popri_flwr.strategies.private_evolution:PrivateEvolutionStrategy",
    "dp_fedavg": "popri_flwr.strategies.dp_fedavg:DPFedAvgStrategy",
}


def strategy_class(name: str) -> type:
    """Import and return the strategy class registered under ``name``."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name: expected one of {sorted(STRATEGIES)}, got {name!r}")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)
