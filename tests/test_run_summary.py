"""The end-of-run summary: a per-round table and summary.png, diagnostics labelled as such."""

from __future__ import annotations

import json

from popri_flwr.evaluation.run_summary import summary_table, write_summary_plot
from popri_flwr.privacy.diagnostics import Diagnostics


def _run(tmp_path, diagnostics: bool):
    rounds = [
        {"round": r, "epsilon_spent": 0.5 * r, "dpo_loss": 0.69 - 0.01 * r,
         "dpo_reward_margin": 0.01 * r, "score_gap_mean": 3.0, "seconds": {"dpo": 40.0}}
        for r in (1, 2)
    ]  # fmt: skip
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    if diagnostics:
        d = Diagnostics(tmp_path, enabled=True)
        for r in (1, 2):
            d.add(clients_sampled=20 + r, clients_accepted=20 + r)
            d.write_round(r, {"fid_next": 0.7 - 0.01 * r, "seconds": {"clients": 5.0}})
    return tmp_path


def test_released_table_has_no_diagnostic_columns(tmp_path):
    text = summary_table(_run(tmp_path, diagnostics=False))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["round", "eps", "spent", "DPO"]
    assert len(lines) == 3 and lines[2].split()[:2] == ["2", "1"]
    assert "sampled" not in text and "FID" not in text and "NOT released" not in text


def test_diagnostics_are_added_and_labelled(tmp_path):
    text = summary_table(_run(tmp_path, diagnostics=True))
    assert "sampled*" in text and "FID next*" in text and "clients s*" in text
    assert text.splitlines()[-1].startswith("* diagnostics") and "NOT released" in text
    assert " 22 " in text.splitlines()[2] and "0.68" in text


def test_summary_png_is_written(tmp_path):
    for diag in (False, True):
        (tmp_path / str(diag)).mkdir()
        path = write_summary_plot(_run(tmp_path / str(diag), diagnostics=diag))
        assert path.name == "summary.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
