"""Compose the Hydra config tree outside ``@hydra.main`` (``flwr run``, SuperNodes, tests).

The tree ships inside the package (``popri_flwr/conf/``, linked as ``configs/`` at the repository
root), so a plain ``pip install`` has it; ``$POPRI_CONFIG_DIR`` points elsewhere.
``flwr run`` passes the experiment and extra overrides through its run config::

    flwr run . local --run-config "experiment='demo' overrides='rounds=2 privacy.epsilon=7'"
"""

from __future__ import annotations

import math
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from popri_flwr.config import INF_SPELLINGS, ConfigError, RunConfig, load_run_config


def config_dir() -> Path:
    """The directory holding ``config.yaml`` and its groups."""
    env = os.environ.get("POPRI_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"POPRI_CONFIG_DIR: no config.yaml in {path}")
    return path


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides with infinity spelled the one way Hydra reads (``inf``); overflow refused.

    ``inf``, ``.inf`` (YAML), ``+inf``, ``Infinity`` all mean infinity. A number that overflows
    (``1e999``) is refused: Hydra would read it as ``inf``, and an infinite epsilon means no
    privacy, so infinity must be written as such.
    """
    out = []
    for override in overrides:
        if "=" not in override or override.startswith(("-", "hydra.")):
            out.append(override)
            continue
        key, value = override.split("=", 1)
        items = []
        for item in value.strip("[]").split(","):
            text = item.strip().strip("'\"").lower()
            if text in INF_SPELLINGS or text.lstrip("-") in INF_SPELLINGS:
                items.append("-inf" if text.startswith("-") else "inf")
                continue
            items.append(item)
            try:
                number = float(text)
            except ValueError:
                continue
            if math.isinf(number):
                raise ConfigError(
                    f"{key.lstrip('+~')}: {item.strip()!r} overflows to infinity; write inf "
                    "(or .inf) if you mean no privacy"
                )
        joined = ",".join(items)
        out.append(f"{key}=[{joined}]" if value.startswith("[") else f"{key}={joined}")
    return out


SCHEMA = "popri_schema"


def register_schema() -> None:
    """Register :class:`RunConfig` as the schema ``popri_schema`` of ``config.yaml``.

    The dataclasses hold every default (one place); Hydra then also checks keys and types
    while composing.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA, node=RunConfig)


def compose(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose ``config.yaml`` with Hydra overrides into a plain, resolved dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not OmegaConf.has_resolver("popri_or"):
        OmegaConf.register_new_resolver("popri_or", lambda a, b: b if a in (None, "") else a)
    overrides = check_overrides(overrides)
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise schema_error(err) from None
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(data), resolve=True)


def schema_error(err: Exception) -> ConfigError:
    """One line naming the key, from a Hydra/OmegaConf composition error."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    while err.__cause__ is not None and not getattr(err, "full_key", None):
        err = err.__cause__  # Hydra wraps OmegaConf's error ("Error merging override ...")
    first = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    if isinstance(err, ConfigKeyError | ConfigAttributeError) and key:
        return ConfigError(f"{key}: unknown key ({first})")
    if isinstance(err, ValidationError) and key:
        return ConfigError(f"{key}: expected {_type_name(err)}, got {getattr(err, 'value', '?')!r}")
    return ConfigError(f"overrides: {first}")


def _type_name(err: Exception) -> str:
    ref = getattr(err, "ref_type", None) or getattr(err, "object_type", None)
    text = str(err)
    for name, short in (
        ("Integer", "int"),
        ("Float", "float"),
        ("Boolean", "bool"),
        ("String", "str"),
    ):
        if f"to {name}" in text:
            return short
    if "valid bool" in text:
        return "bool"
    if "not a ListConfig" in text:  # ref/object type are then the enclosing dataclass
        return "a list, e.g. [a,b]"
    return getattr(ref, "__name__", str(ref)) if ref else "another type"


def load_config(overrides: Sequence[str] = ()) -> RunConfig:
    """Composed and validated :class:`RunConfig`."""
    return load_run_config(compose(overrides))


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Build the config from a Flower run config (``[tool.flwr.app.config]`` + --run-config).

    Keys: ``experiment`` (preset name, may be empty), ``overrides`` (space-separated Hydra
    overrides), ``num-server-rounds`` (> 0 overrides ``rounds``), ``output-dir``.
    """
    overrides = []
    if run_config.get("experiment"):
        overrides.append(f"experiment={run_config['experiment']}")
    overrides += shlex.split(str(run_config.get("overrides", "") or ""))
    if int(run_config.get("num-server-rounds", 0) or 0) > 0:
        overrides.append(f"rounds={int(run_config['num-server-rounds'])}")
    out = str(run_config.get("output-dir", "") or "")
    if out:
        overrides.append(f"run_dir={out}")
    cfg = load_config(overrides)
    if cfg.run_dir is None:
        cfg.run_dir = str(Path.cwd() / "outputs" / "flwr" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    return cfg
