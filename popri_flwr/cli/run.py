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
    _log_summary(run_dir)


def _log_summary(run_dir: str) -> None:
    """The per-round table and ``summary.png``: the last thing the person reads."""
    from pathlib import Path

    from popri_flwr.evaluation.run_summary import summary_table, write_summary_plot

    try:
        logger.info("Per round:\n%s", summary_table(run_dir))
        write_summary_plot(run_dir)
    except Exception:  # the run itself succeeded: a summary failure must not hide its results
        logger.exception("Could not summarise %s", run_dir)
    outputs = ("rounds.jsonl", "samples", "adapter", "summary.png")
    listed = ", ".join(x for x in outputs if (Path(run_dir) / x).exists())
    logger.info("Done. Results in %s (%s)", run_dir, listed)


def _quiet_third_party_logs() -> None:
    # The SuperLink's embedded database logs every migration plugin at INFO.
    for name in ("alembic", "alembic.runtime.plugins", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Library notices a user of popri-run can do nothing about, matched by category, module and
    # message. TRL reads transformers' deprecated alias in every DPO step:
    warnings.filterwarnings(
        "ignore", ".*is_gradient_checkpointing.*", FutureWarning, r"transformers\."
    )
    # Ray's ray.init "Tip" about a future default. Not opted into with the env var it names:
    # that would let client actors with num_gpus=0 see the GPUs.
    warnings.filterwarnings("ignore", ".*RAY_ACCEL_ENV_VAR_OVERRIDE.*", FutureWarning, r"ray\.")


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
