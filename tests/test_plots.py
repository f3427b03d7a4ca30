"""Tests for popri_flwr.evaluation.plots: PNGs are written, and the drawn content matches the
rows."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from popri_flwr.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = (
    "method,epsilon,status,accuracy,top5_accuracy,gap_closed,fid,precision,recall,epsilon_spent,"
    "wall_seconds,bytes_down_per_client_round,bytes_up_per_client_round,"
    "client_seconds_per_round,run_dir"
)


def rows() -> list[dict]:
    return [
        {"method": "eps0", "epsilon": 0.0, "status": "ok", "accuracy": 0.279},
        {"method": "epsinf", "epsilon": math.inf, "status": "ok", "accuracy": 0.415},
        {"method": "popri", "epsilon": 1.0, "status": "ok", "accuracy": 0.348},
        {"method": "pe", "epsilon": 1.0, "status": "ok", "accuracy": 0.311},
        {"method": "popri", "epsilon": 7.0, "status": "ok", "accuracy": 0.36},
        {"method": "pe", "epsilon": 7.0, "status": "failed: RuntimeError: boom"},
        {"method": "dp_fedavg", "epsilon": 1.0, "status": "ok", "accuracy": float("nan")},
    ]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def figures(monkeypatch):
    """Record every figure the module saves (the PNG is still written)."""
    saved = []
    original = plots._save

    def record(fig, path):
        saved.append(fig)
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    return saved


def write_run(root: Path, records: list[dict], torn: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (root / "rounds.jsonl").write_text(text + ('{"round": 9, "fid' if torn else ""))
    return root


def run_records(n: int, fid0: float, with_fid: bool = True) -> list[dict]:
    out = []
    for r in range(1, n + 1):
        rec = {"round": r, "epsilon_spent": 0.25 * r, "seconds": {"total": 10.0 + r}}
        if with_fid:
            rec["fid_next"] = fid0 - 0.1 * r
        out.append(rec)
    return out


# ------------------------------------------------------------------ accuracy bars
def test_plot_accuracy_writes_a_png_with_the_right_bars(tmp_path, figures):
    path = plots.plot_accuracy(rows(), tmp_path / "out" / "accuracy.png")
    assert path == tmp_path / "out" / "accuracy.png"
    width, height = png_size(path)
    assert width > 400 and height > 300
    assert path.stat().st_size > 10_000

    (ax,) = figures[0].axes
    heights = [round(p.get_height(), 6) for p in ax.patches]
    # Bars in (epsilon, method) order: popri/pe at 1, popri at 7; failed/NaN rows have none.
    assert heights == [34.8, 31.1, 36.0]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("failed") == 1 and texts.count("n/a") == 1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ε = 1", "ε = 7"]
    ref_levels = sorted(round(line.get_ydata()[0], 6) for line in ax.lines)
    assert ref_levels == [27.9, 41.5]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["popri", "pe", "dp_fedavg"]
    assert any("27.9" in x for x in legend) and any("41.5" in x for x in legend)


def test_plot_accuracy_all_failed_does_not_crash(tmp_path, figures):
    failed = [
        {"method": m, "epsilon": e, "status": "failed: x", "accuracy": None}
        for m, e in (("eps0", 0.0), ("popri", 1.0), ("pe", 1.0))
    ]
    path = plots.plot_accuracy(failed, tmp_path / "a.png")
    png_size(path)
    (ax,) = figures[0].axes
    assert ax.patches == [] or all(p.get_height() == 0 for p in ax.patches)
    assert [t.get_text() for t in ax.texts] == ["failed", "failed"]
    assert any("failed" in t.get_text() for t in ax.get_legend().get_texts())


def test_plot_accuracy_from_a_results_csv(tmp_path, figures):
    csv = tmp_path / "results.csv"
    csv.write_text(
        COLUMNS + "\n"
        "eps0,0.0,ok,0.25,0.5,0.0,,,,0.0,10,,,,\n"
        "epsinf,inf,ok,0.45,0.7,1.0,,,,inf,12,,,,\n"
        "popri,1.0,ok,0.30,0.55,0.25,1.2,0.8,0.7,0.99,100,14016,164,0.5,\n"
        'pe,1.0,"failed: ValueError: a, b",,,,,,,,5,,,,\n'
    )
    frame = plots.read_results(csv)
    assert math.isinf(frame.loc[1, "epsilon"]) and frame.loc[3, "status"].startswith("failed")
    plots.plot_accuracy(frame, tmp_path / "top5.png", metric="top5_accuracy")
    (ax,) = figures[0].axes
    assert [round(p.get_height(), 6) for p in ax.patches] == [55.0]
    assert "top-5" in ax.get_ylabel()


def test_plot_accuracy_errors(tmp_path):
    with pytest.raises(ValueError, match="^plot_accuracy: no rows"):
        plots.plot_accuracy([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="^plot_accuracy: no row has 'bleu' .keys: accuracy"):
        plots.plot_accuracy(rows(), tmp_path / "a.png", metric="bleu")
    with pytest.raises(ValueError, match="^plot_accuracy: row 1 has no 'method'"):
        plots.plot_accuracy([rows()[0], {"epsilon": 1.0, "accuracy": 0.3}], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


# ------------------------------------------------------------------ rounds
def test_read_rounds_flattens_sorts_and_skips_a_torn_line(tmp_path):
    records = run_records(3, 2.0)
    run = write_run(tmp_path / "run", [records[2], records[0], records[1]], torn=True)
    frame = plots.read_rounds(run)
    assert frame["round"].tolist() == [1, 2, 3]
    assert frame["seconds.total"].tolist() == [11.0, 12.0, 13.0]
    assert frame["fid_next"].tolist() == pytest.approx([1.9, 1.8, 1.7])


def test_read_rounds_errors(tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path / 'rounds.jsonl'}: no such file"):
        plots.read_rounds(tmp_path)
    (tmp_path / "rounds.jsonl").write_text('{"round": 1}\nnot json\n{"round": 2}\n')
    with pytest.raises(ValueError, match="rounds.jsonl: line 2 is not valid JSON"):
        plots.read_rounds(tmp_path)
    (tmp_path / "rounds.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ValueError, match="rounds.jsonl: records have no 'round' key"):
        plots.read_rounds(tmp_path)


def test_plot_rounds_draws_one_line_per_run(tmp_path, figures):
    a = write_run(tmp_path / "a", run_records(4, 2.0))
    b = write_run(tmp_path / "b", run_records(2, 3.0))
    path = plots.plot_rounds({"popri_eps1": a, "pe_eps1": b}, tmp_path / "fid.png", "fid")
    width, height = png_size(path)
    assert width > 300 and height > 200 and path.stat().st_size > 10_000
    (ax,) = figures[0].axes
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"popri_eps1", "pe_eps1"}
    assert list(lines["popri_eps1"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["pe_eps1"].get_ydata()) == pytest.approx([2.9, 2.8])
    assert ax.get_ylabel() == "fid_next"  # "fid" resolved to the key the runs log

    plots.plot_rounds({"a": a}, tmp_path / "eps.png", "epsilon_spent")
    assert list(figures[1].axes[0].lines[0].get_ydata()) == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_plot_rounds_leaves_out_runs_without_the_metric(tmp_path, figures):
    a = write_run(tmp_path / "a", run_records(3, 2.0))
    b = write_run(tmp_path / "b", run_records(3, 2.0, with_fid=False))
    plots.plot_rounds({"a": a, "b": b}, tmp_path / "fid.png", "fid_next")
    assert [line.get_label() for line in figures[0].axes[0].lines] == ["a"]


def test_plot_rounds_errors(tmp_path):
    a = write_run(tmp_path / "a", run_records(3, 2.0, with_fid=False))
    msg = "^plot_rounds: no run logs 'fid_next' .keys: epsilon_spent, round, seconds.total"
    with pytest.raises(ValueError, match=msg):
        plots.plot_rounds({"a": a}, tmp_path / "x.png", "fid_next")
    with pytest.raises(ValueError, match="^plot_rounds: no run directories"):
        plots.plot_rounds({}, tmp_path / "x.png", "fid_next")
    with pytest.raises(ValueError, match="missing/rounds.jsonl: no such file"):
        plots.plot_rounds({"a": a, "m": tmp_path / "missing"}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ results.csv
def test_read_results_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.csv: no such file"):
        plots.read_results(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("method,epsilon\npopri,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing columns \['status', 'accuracy'\]"):
        plots.read_results(bad)


def test_run_dirs_of(tmp_path):
    a = write_run(tmp_path / "a", run_records(1, 1.0))
    table = [
        {"method": "popri", "epsilon": 1.0, "run_dir": str(a)},
        {"method": "pe", "epsilon": math.inf, "run_dir": str(a)},
        {"method": "pe", "epsilon": 7.0, "run_dir": str(tmp_path / "no_rounds")},
        {"method": "eps0", "epsilon": 0.0, "run_dir": float("nan")},
    ]
    assert plots.run_dirs_of(table) == {"popri_eps1": a, "pe_epsinf": a}
