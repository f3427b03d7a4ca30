"""The end of a run: the per-round table, summary.png (diagnostics labelled), quiet output."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import matplotlib.image
import pytest

from popri_flwr.evaluation import run_summary
from popri_flwr.evaluation.run_summary import summary_table, write_summary_plot
from popri_flwr.hydra_config import config_dir
from popri_flwr.privacy.diagnostics import NOTICE

PNG = b"\x89PNG\r\n\x1a\n"


def _run(path, diagnostics: bool, rounds=(1, 2)):
    """A run directory as the strategies leave it (rounds.jsonl, maybe diagnostics.jsonl)."""
    path.mkdir(parents=True, exist_ok=True)
    released = [
        {"round": r, "epsilon_spent": 0.5 * r, "dpo_loss": 0.69 - 0.01 * r,
         "dpo_reward_margin": 0.125 * r, "score_gap_mean": 3.0, "seconds": {"dpo": 40.0 + r}}
        for r in rounds
    ]  # fmt: skip
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in released))
    if diagnostics:  # the layout popri_flwr.privacy.diagnostics writes: notice, then rounds
        lines = [{"notice": NOTICE}] + [
            {"round": r, "clients_sampled": 20 + r, "clients_accepted": 18 + r,
             "fid_next": 0.7 - 0.01 * r, "seconds": {"clients": 5.0 * r, "dpo": 40.0 + r,
                                                     "total": 60.0 + r}}
            for r in rounds
        ]  # fmt: skip
        (path / "diagnostics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _cells(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def test_released_table_has_no_diagnostic_columns(tmp_path):
    text = summary_table(_run(tmp_path, diagnostics=False))
    header, *rows = _cells(text)
    assert header == ["round", "eps spent", "DPO loss", "margin", "score gap", "DPO s"]
    assert rows == [["1", "0.5", "0.68", "0.125", "3", "41"], ["2", "1", "0.67", "0.25", "3", "42"]]
    assert "*" not in text and "sampled" not in text and "NOT released" not in text


def test_diagnostic_columns_are_added_and_starred(tmp_path):
    text = summary_table(_run(tmp_path, diagnostics=True))
    header, *rows = _cells(text)
    note = rows.pop()
    assert note == [run_summary.NOTE] and "NOT released" in note[0]
    # Released columns keep their names (seconds.dpo is in both files: released wins).
    assert header == ["round", "eps spent", "DPO loss", "margin", "score gap", "sampled*",
                      "accepted*", "FID next*", "clients s*", "DPO s", "total s*"]  # fmt: skip
    by_col = [dict(zip(header, row, strict=True)) for row in rows]
    assert [r["sampled*"] for r in by_col] == ["21", "22"]
    assert [r["accepted*"] for r in by_col] == ["19", "20"]
    assert [r["FID next*"] for r in by_col] == ["0.69", "0.68"]
    assert [r["total s*"] for r in by_col] == ["61", "62"]


def test_diagnostics_of_a_missing_round_show_as_dashes(tmp_path):
    run = _run(tmp_path, diagnostics=True)
    with open(run / "rounds.jsonl", "a") as fh:  # round 3 released, its diagnostics lost
        fh.write(json.dumps({"round": 3, "epsilon_spent": 1.5}) + "\n")
    header, *rows = _cells(summary_table(run))
    last = dict(zip(header, rows[2], strict=True))
    assert last["round"] == "3" and last["eps spent"] == "1.5" and last["sampled*"] == "-"


def test_missing_round_log_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="rounds.jsonl: no such file"):
        summary_table(tmp_path)


@pytest.mark.parametrize("diagnostics", [False, True])
def test_summary_png(tmp_path, monkeypatch, diagnostics):
    figures = []
    real_save = run_summary._save

    def save(fig, path):  # keep the figure to read its panels back
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(run_summary, "_save", save)
    path = write_summary_plot(_run(tmp_path / "run", diagnostics=diagnostics, rounds=(1, 2, 3)))
    assert path == tmp_path / "run" / "summary.png"
    assert path.read_bytes()[:8] == PNG and matplotlib.image.imread(path).shape[2] in (3, 4)
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    suptitle = fig.get_suptitle()
    if diagnostics:
        assert titles[0] == "epsilon spent" and titles[1].startswith("FID") and "*" in titles[1]
        assert "DIAGNOSTIC" in suptitle
    else:  # released values only
        assert titles == ["epsilon spent", "DPO reward margin"] and "DIAGNOSTIC" not in suptitle
    xs, ys = fig.axes[0].lines[0].get_data()
    assert list(xs) == [1, 2, 3] and list(ys) == [0.5, 1.0, 1.5]


def test_flower_run_simulation_banner_alone_is_dropped(caplog):
    from flwr.supercore.logger import warn_deprecated_feature

    from popri_flwr.simulation import _DropDeprecationBanner

    flwr_logger = logging.getLogger("flwr")
    banner = _DropDeprecationBanner("`run_simulation`")
    flwr_logger.addFilter(banner)
    flwr_logger.addHandler(caplog.handler)
    try:
        warn_deprecated_feature("The `run_simulation` function is deprecated")
        warn_deprecated_feature("Something else")
        flwr_logger.error("ClientApp raised in run_simulation: boom")
    finally:
        flwr_logger.removeFilter(banner)
        flwr_logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("`run_simulation` function" in m for m in messages)
    assert any("Something else" in m for m in messages)
    assert any("boom" in m for m in messages)


def test_cli_help_lists_config_groups():
    out = subprocess.run(
        [sys.executable, "-m", "popri_flwr.cli.run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    groups = sorted(p for p in config_dir().iterdir() if p.is_dir() and p.name != "hydra")
    assert groups, "no config groups found"
    for group in groups:
        names = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        assert f"{group.name}: {names}" in out.stdout
    # Benchmark presets configure a grid of runs, not a run: not offered as a group here.
    groups_block = out.stdout.split("== Config groups")[1].split("== Config (defaults)")[0]
    assert "benchmark" not in groups_block
    assert "FutureWarning" not in out.stdout + out.stderr
