"""``popri-benchmark --preset speed``: old and new paths side by side, as ratios.

Each row times the old path and the new one in the same process, one after the other, on the
same inputs (absolute seconds on a shared machine are noisy; their ratio much less so), and is
appended to ``results.csv`` (``measure,baseline_s,new_s,ratio``) as soon as it is measured;
``results.md`` adds what each row measured and the peak memory of the client phases.
"""

from __future__ import annotations

import csv
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROWS = (
    "generation_demo",
    "generation_3shot",
    "dpo_round",
    "tilt_round",
    "downstream_epoch",
    "client_phase_demo",
    "client_phase_72k",
)


@dataclass
class SpeedConfig:
    """What ``--preset speed`` measures (``popri_flwr/presets/speed.yaml``).

    Parameters
    ----------
    name
        Preset name; the default output folder is ``benchmarks/NAME``.
    out_dir
        Where ``results.csv`` and ``results.md`` go.
    rows
        Which of :data:`ROWS` to measure, in order.
    repeats
        Runs of each generation / DPO path, interleaved; the fastest counts.
    demo_clients_per_node
        Cohort size of ``client_phase_demo``'s new path.
    downstream_texts
        Training texts of ``downstream_epoch``.
    large_clients, large_samples, large_clients_per_node
        ``client_phase_72k``: clients, samples per round, cohort size.
    large_baseline_clients
        Clients the old path is timed on (one node each) before extrapolating to
        ``large_clients``.
    """

    name: str = "speed"
    out_dir: str | None = None
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    repeats: int = 1
    demo_clients_per_node: int = 24
    downstream_texts: int = 480
    large_clients: int = 72_000
    large_samples: int = 18_000
    large_clients_per_node: int = 2_000
    large_baseline_clients: int = 60

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"rows: unknown measure {unknown[0]!r}; expected some of {ROWS}")
        positive = (
            "repeats", "demo_clients_per_node", "downstream_texts", "large_clients",
            "large_samples", "large_clients_per_node", "large_baseline_clients",
        )  # fmt: skip
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)!r}")

    @property
    def out(self) -> Path:
        return Path(self.out_dir or f"benchmarks/{self.name}")


def _generation(case: str, sc: SpeedConfig) -> dict[str, Any]:
    from popri_flwr.speed.generation import CASES, compare_generation

    (row,) = compare_generation([CASES[case]], repeats=sc.repeats)
    c = CASES[case]
    row["note"] = (
        f"{c.num_prompts} prompts x {c.num_samples} samples, {c.shots}-shot, "
        f"{c.max_new_tokens} new tokens; baseline: float32 model.generate on the flattened "
        "batch; new: prefix-shared sampling, bf16 where the CPU has it"
    )
    return row


def _dpo(sc: SpeedConfig) -> dict[str, Any]:
    from popri_flwr.speed.dpo import compare_dpo

    return compare_dpo(repeats=sc.repeats)


def _tilt(sc: SpeedConfig) -> dict[str, Any]:
    from popri_flwr.speed.tilt import compare_tilt

    return compare_tilt(repeats=sc.repeats)


def _downstream(sc: SpeedConfig) -> dict[str, Any]:
    from popri_flwr.speed.downstream import compare_downstream

    return compare_downstream(repeats=sc.repeats, num_texts=sc.downstream_texts)


def _client_phase_demo(sc: SpeedConfig) -> dict[str, Any]:
    from popri_flwr.speed.client_phase import in_fresh_process

    return in_fresh_process("demo", clients_per_node=sc.demo_clients_per_node)


def _client_phase_large(sc: SpeedConfig) -> dict[str, Any]:
    from popri_flwr.speed.client_phase import in_fresh_process

    return in_fresh_process(
        "large",
        num_clients=sc.large_clients,
        num_samples=sc.large_samples,
        clients_per_node=sc.large_clients_per_node,
        baseline_clients=sc.large_baseline_clients,
    )


MEASURES: dict[str, Callable[[SpeedConfig], dict[str, Any]]] = {
    "generation_demo": lambda sc: _generation("demo", sc),
    "generation_3shot": lambda sc: _generation("3shot", sc),
    "dpo_round": _dpo,
    "tilt_round": _tilt,
    "downstream_epoch": _downstream,
    "client_phase_demo": _client_phase_demo,
    "client_phase_72k": _client_phase_large,
}

CSV_COLUMNS = ("measure", "baseline_s", "new_s", "ratio")


def run_speed_benchmark(sc: SpeedConfig) -> list[dict[str, Any]]:
    """Measure ``sc.rows``; write ``results.csv`` and ``results.md`` after every row."""
    out = sc.out
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for measure in sc.rows:
        logger.info("speed: measuring %s", measure)
        row = MEASURES[measure](sc)
        row["measure"] = measure
        rows.append(row)
        logger.info(
            "speed: %s baseline %.2f s, new %.2f s, ratio %.2f",
            measure,
            row["baseline_s"],
            row["new_s"],
            row["ratio"],
        )
        write_results(out, rows)
    return rows


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """``results.csv`` (the four columns) and ``results.md`` (with notes and memory)."""
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r["measure"], r["baseline_s"], r["new_s"], r["ratio"]])
    lines = [
        "# Speed: old vs new path (popri-benchmark --preset speed)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {_cpus()} CPU cores, "
        f"Python {platform.python_version()}. Ratios are baseline / new, both measured in "
        "the same run.",
        "",
        "| measure | baseline (s) | new (s) | ratio |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['measure']} | {r['baseline_s']:.2f} | {r['new_s']:.2f} | {r['ratio']:.2f}x |"
            for r in rows
        ),
        "",
        *(f"- **{r['measure']}**: {r.get('note', '')}" for r in rows),
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
