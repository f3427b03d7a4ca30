"""``popri-benchmark``: methods x epsilons, evaluated the same way, as a table and plots.

Examples
--------
    popri-benchmark                                   # preset small (about an hour on 2 cores)
    popri-benchmark --preset tiny                     # minutes: check the pipeline
    popri-benchmark --preset small methods=[eps0,epsinf,popri] epsilons=[1]
    popri-benchmark out_dir=benchmarks/mine "run_overrides=[experiment=demo,rounds=5]"
    popri-benchmark --preset speed                    # old vs new paths (about 15 minutes)
    popri-benchmark --preset speed "rows=[client_phase_72k]"

Presets live in ``popri_flwr/presets/`` (tiny, small, paper, speed); ``key=value`` arguments
override their keys (OmegaConf dotlist syntax). Started again with the same ``out_dir``,
finished rows are reused and unfinished runs resume (``speed`` measures every row again).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from popri_flwr.config import ConfigError

#: Benchmark presets. Not in Hydra's search path: they configure a grid of runs, not a run, so
#: ``popri-run --help`` must not offer them as a config group.
PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def load_benchmark_config(preset: str, overrides: list[str]):
    """The preset ``popri_flwr/presets/PRESET.yaml`` with ``key=value`` overrides applied.

    ``speed`` gives a :class:`~popri_flwr.speed.report.SpeedConfig`, every other preset a
    :class:`~popri_flwr.evaluation.benchmark.BenchmarkConfig`.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from popri_flwr.config import from_mapping
    from popri_flwr.evaluation.benchmark import BenchmarkConfig
    from popri_flwr.speed.report import SpeedConfig

    folder = PRESETS_DIR
    path = folder / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"--preset: no {path}; expected one of {names}")
    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides: {err}".splitlines()[0]) from None
    schema = SpeedConfig if data.get("name") == "speed" else BenchmarkConfig
    try:
        return from_mapping(schema, data)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _keys(schema: str) -> list[str]:
    """The settable fields of a benchmark config class (``name`` comes from the preset)."""
    import dataclasses

    if schema == "SpeedConfig":
        from popri_flwr.speed.report import SpeedConfig as cls
    else:
        from popri_flwr.evaluation.benchmark import BenchmarkConfig as cls
    return [f.name for f in dataclasses.fields(cls) if f.name != "name"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="popri-benchmark",
        description=__doc__.split("\n\n")[0],
        epilog="Writes OUT/results.csv, OUT/results.md, OUT/accuracy.png, "
        "OUT/epsilon_spent_by_round.png, OUT/fid_next_by_round.png, OUT/runs/, OUT/logs/ "
        "(--preset speed: OUT/results.csv and OUT/results.md only).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default="small",
        help="popri_flwr/presets/PRESET.yaml: tiny, small, paper, or speed (old vs new paths)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"override preset keys: {', '.join(_keys('BenchmarkConfig'))} "
        f"(speed: {', '.join(_keys('SpeedConfig'))}). Lists take YAML syntax, e.g. "
        "'methods=[eps0,epsinf]' or 'run_overrides=[\"experiment=demo\",\"rounds=5\"]'",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        bc = load_benchmark_config(args.preset, args.overrides)
        from popri_flwr.speed.report import SpeedConfig, run_speed_benchmark

        if isinstance(bc, SpeedConfig):
            run_speed_benchmark(bc)
            print((bc.out / "results.md").read_text())
            return 0
        from popri_flwr.evaluation.benchmark import run_benchmark

        with exit_on_sigterm():
            rows = run_benchmark(bc)
    except ConfigError as err:
        print(f"popri-benchmark: error: {err}", file=sys.stderr)
        return 2
    print((bc.out / "results.md").read_text())
    failed = [r for r in rows if r.get("status") != "ok"]
    return 1 if failed else 0


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` instead of ending the process.

    The default action would end the benchmark at once and leave its current ``popri-run``
    child running; raised as an exception, it reaches
    :func:`~popri_flwr.evaluation.benchmark.run_child`, which stops the child first.
    """

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
