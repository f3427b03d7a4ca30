"""``popri-run``: the Hydra entry point (``python -m popri_flwr.cli.run``).

Examples
--------
    popri-run experiment=demo                      # the laptop demo
    popri-run experiment=demo privacy.epsilon=7 rounds=5
    popri-run experiment=demo run_dir=outputs/my-run   # start again later to resume
    popri-run -m experiment=demo privacy.epsilon=1,7   # a sweep (multirun)
    popri-run --help                               # groups and every key
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig, OmegaConf

from popri_flwr.config import ConfigError, load_run_config
from popri_flwr.hydra_config import check_overrides, config_dir, register_schema

logger = logging.getLogger("popri_flwr.cli.run")


def _run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from popri_flwr.simulation import run_simulation

    logging.getLogger("flwr").propagate = False  # flwr has its own handler: no double lines
    _quiet_third_party_logs()
    data = OmegaConf.to_container(cfg, resolve=True)
    if data.get("run_dir") is None:
        data["run_dir"] = HydraConfig.get().runtime.output_dir
    try:
        run_dir = run_simulation(load_run_config(data))
    except ConfigError as err:  # bad input: one clear line, before any work, exit 2
        print(f"popri-run: error: {err}", file=sys.stderr)
        sys.exit(2)
    from popri_flwr.evaluation.run_summary import summary_table, write_summary_plot

    logger.info("Per round:\n%s", summary_table(run_dir))
    plot = write_summary_plot(run_dir)
    logger.info("Done. Results in %s (rounds.jsonl, samples/, adapter/, %s)", run_dir, plot.name)


def _quiet_third_party_logs() -> None:
    # The SuperLink's embedded database logs every migration plugin at INFO.
    for name in ("alembic", "alembic.runtime.plugins", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Library deprecation notices a user of popri-run can do nothing about (narrow filters).
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    warnings.filterwarnings(
        "ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE.*", category=FutureWarning
    )
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's tip, in workers too
    # flwr.simulation.run_simulation is our in-process path (Flower 1.41 has no supported
    # replacement that takes a ServerApp object); its deprecation banner is not for our users.
    logging.getLogger("flwr").addFilter(_DropFlowerDeprecation())


class _DropFlowerDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "DEPRECATED FEATURE" not in text and "run_simulation" not in text


def _precheck_run_dir(argv: list[str]) -> None:
    """Hydra creates ``run_dir`` (its output dir) before our code runs: check it first."""
    from popri_flwr.run_dir import RunDirectory

    for arg in argv:
        if arg.startswith("run_dir=") and "," not in arg and arg != "run_dir=null":
            RunDirectory(arg.split("=", 1)[1])


def main() -> None:
    """Console entry: Hydra parses ``sys.argv`` (overrides, -m, --help, --cfg job)."""
    from omegaconf import OmegaConf

    # ``hydra.run.dir`` follows an explicit run_dir, so Hydra's log lands in the run directory.
    if not OmegaConf.has_resolver("popri_or"):
        OmegaConf.register_new_resolver("popri_or", lambda a, b: b if a in (None, "") else a)
    _quiet_third_party_logs()
    try:
        sys.argv[1:] = check_overrides(sys.argv[1:])  # inf spelled one way; 1e999 refused
        register_schema()
        _precheck_run_dir(sys.argv[1:])
        hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_run)()
    except ConfigError as err:  # e.g. POPRI_CONFIG_DIR wrong: one clear line, exit 2
        print(f"popri-run: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
