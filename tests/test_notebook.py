"""notebooks/results.ipynb runs end to end (nbclient, the venv's python3 kernel) on a small
benchmark CSV and fake-but-well-formed run directories, and draws its plots."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "results.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = (
    "method,epsilon,status,accuracy,top5_accuracy,gap_closed,fid,precision,recall,epsilon_spent,"
    "wall_seconds,bytes_down_per_client_round,bytes_up_per_client_round,"
    "client_seconds_per_round,run_dir"
)


def write_run(root: Path, rounds: int, fid0: float) -> Path:
    root.mkdir(parents=True)
    records = [
        {
            "round": r,
            "epsilon_spent": 0.3 * r,
            "epsilon_target": 1.0,
            "clients_sampled": 5,
            "bytes_down": 14016,
            "bytes_up": 164,
            "fid_scored": fid0 - 0.1 * r,
            "fid_next": fid0 - 0.1 * r - 0.05,
            "seconds": {"clients": 2.0, "dpo": 3.0, "total": 6.0},
        }
        for r in range(1, rounds + 1)
    ]
    (root / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture
def benchmark(tmp_path: Path) -> Path:
    popri = write_run(tmp_path / "runs" / "popri_eps1", 3, 2.0)
    pe = write_run(tmp_path / "runs" / "pe_eps1", 2, 2.5)
    csv = tmp_path / "results.csv"
    csv.write_text(
        f"{HEADER}\n"
        "eps0,0.0,ok,0.279,0.50,0.0,2.1,0.5,0.4,0.0,30.5,,,,\n"
        "epsinf,inf,ok,0.415,0.62,1.0,0.3,0.9,0.9,inf,40.2,,,,\n"
        f"popri,1.0,ok,0.348,0.57,0.507,1.6,0.7,0.6,0.93,900.0,14016,164,0.4,{popri}\n"
        f"pe,1.0,ok,0.311,0.55,0.235,1.9,0.6,0.5,0.88,700.0,30000,200,0.3,{pe}\n"
        '"dp_fedavg",1.0,"failed: RuntimeError: popri-run exited with 1",,,,,,,,12.0,,,,\n'
    )
    return csv


def execute(tmp_path: Path, monkeypatch, **env: str) -> nbformat.NotebookNode:
    for key in ("POPRI_RESULTS_CSV", "POPRI_RUN_DIRS", "POPRI_PLOTS_DIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def images(nb: nbformat.NotebookNode) -> list[bytes]:
    pngs = [o["data"]["image/png"] for o in outputs(nb) if "image/png" in o.get("data", {})]
    return [base64.b64decode(p) for p in pngs]


def all_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for out in outputs(nb):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
        parts.append(out.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def test_kernel_is_this_venv(tmp_path):
    # The "python3" kernelspec starts `python -m ipykernel_launcher`; jupyter_client runs it
    # with the interpreter of the calling process, i.e. the venv's python.
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys; print(sys.prefix)")]
    )
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    assert nb.cells[0].outputs[0]["text"].strip() == sys.prefix


def test_notebook_runs_with_run_dirs_from_the_csv(tmp_path, benchmark, monkeypatch):
    nb = execute(tmp_path, monkeypatch, POPRI_RESULTS_CSV=str(benchmark))
    pngs = images(nb)
    assert len(pngs) == 3  # accuracy, fid_next by round, epsilon_spent by round
    assert all(p.startswith(PNG_MAGIC) and len(p) > 10_000 for p in pngs)
    plots_dir = benchmark.parent / "notebook"
    for name in ("accuracy.png", "fid_next_by_round.png", "epsilon_spent_by_round.png"):
        assert (plots_dir / name).read_bytes() in pngs
    text = all_text(nb)
    assert "5 rows from" in text
    assert "popri-run exited with 1" in text  # the failed row is listed, not fatal
    assert "34.8" in text  # accuracy shown in percent in the table
    assert "popri_eps1" in text and "pe_eps1" in text  # the last-round table of both runs


def test_notebook_run_dirs_and_plots_dir_from_the_environment(tmp_path, benchmark, monkeypatch):
    out = tmp_path / "figs"
    nb = execute(
        tmp_path,
        monkeypatch,
        POPRI_RESULTS_CSV=str(benchmark),
        POPRI_RUN_DIRS=f"only={benchmark.parent / 'runs' / 'pe_eps1'}",
        POPRI_PLOTS_DIR=str(out),
    )
    assert len(images(nb)) == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "epsilon_spent_by_round.png",
        "fid_next_by_round.png",
    ]
    text = all_text(nb)
    assert "only" in text and "popri_eps1" not in text


def test_notebook_stops_with_a_clear_error_on_a_missing_csv(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="nope.csv: no such file"):
        execute(tmp_path, monkeypatch, POPRI_RESULTS_CSV=str(tmp_path / "nope.csv"))
