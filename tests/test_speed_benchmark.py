"""``popri-benchmark --preset speed`` at toy sizes, through the real Flower simulation.

The client-phase rows run the real client app, Ray actors and the strategy's checks; only the
sizes are small. Timings are not asserted (speed is measured by the benchmark, not by tests):
the tests check that both paths ran every client and that the table says what it measured.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from popri_flwr.cli.benchmark import main
from popri_flwr.privacy.diagnostics import read_diagnostics
from popri_flwr.speed.client_phase import run_client_phase, synthetic_cohorts, unit_rows


def test_cohorts_of_uneven_size_answer_for_every_client(tmp_path):
    emb = unit_rows(np.random.default_rng(0), 40)
    result = run_client_phase(
        sample_emb=emb,
        num_clients=10,
        clients_per_node=4,  # nodes of 4, 4 and 2 clients
        rounds=2,
        sample_rate=1.0,
        load_cohort=synthetic_cohorts(10, 4),
        run_dir=tmp_path,
    )
    assert result.sampled == [10, 10] and len(result.seconds) == 2
    for diag in read_diagnostics(tmp_path):
        assert diag["clients_accepted"] == 10 and diag["clients_rejected"] == 0
        assert diag["nodes_contacted"] == 3
    assert result.peak_bytes > 0


def test_speed_preset_writes_the_table(tmp_path, capsys):
    out = tmp_path / "speed"
    code = main(
        [
            "--preset", "speed", "rows=[client_phase_72k]", "large_clients=60",
            "large_samples=30", "large_clients_per_node=25", "large_baseline_clients=3",
            f"out_dir={out}",
        ]
    )  # fmt: skip
    assert code == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["measure", "baseline_s", "new_s", "ratio"]
    (row,) = rows
    assert row["measure"] == "client_phase_72k"
    base, new = float(row["baseline_s"]), float(row["new_s"])
    assert base > 0 and new > 0
    # The ratio is of the unrounded seconds; the table shows seconds to 0.01 s.
    slack = 0.005 / new + 0.005 / base + 0.01
    assert float(row["ratio"]) == pytest.approx(base / new, rel=slack)
    md = (out / "results.md").read_text()
    assert "EXTRAPOLATED from 3 clients" in md and "client_phase_72k" in capsys.readouterr().out


def test_downstream_row_times_float32_against_bf16():
    from popri_flwr.speed.downstream import compare_downstream

    row = compare_downstream(num_texts=8, num_eval=8)
    assert row["baseline_s"] > 0 and row["new_s"] > 0
    assert row["ratio"] == pytest.approx(row["baseline_s"] / row["new_s"], rel=0.05)
    # Both runs really trained and were scored: the note carries their two top-1 accuracies.
    assert "8 texts" in row["note"] and row["note"].count("0.") >= 2


def test_speed_preset_refuses_an_unknown_row(tmp_path, capsys):
    assert main(["--preset", "speed", "rows=[warp_drive]", f"out_dir={tmp_path}"]) == 2
    assert "rows: unknown measure 'warp_drive'" in capsys.readouterr().err
