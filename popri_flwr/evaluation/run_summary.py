"""What a person reads at the end of a run: a per-round table and ``summary.png``.

The table always shows what the run releases (epsilon spent, DPO statistics on the noisy pairs,
server seconds). Columns that exist only in the run's diagnostics (client counts, the FID of
fresh samples against held-out private text, client-phase and total seconds) are added only
when the run kept diagnostics, and are marked ``*`` with a note that they are not released.
Whether a column is released is read from ``rounds.jsonl`` itself, not assumed from its name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from popri_flwr.evaluation.plots import _save, read_rounds
from popri_flwr.privacy.diagnostics import FILENAME as DIAGNOSTICS_FILE

#: (column, header) candidates of the table, in order; absent columns are left out.
COLUMNS = (
    ("epsilon_spent", "eps spent"),
    ("dpo_loss", "DPO loss"),
    ("dpo_reward_margin", "margin"),
    ("tilt_loss", "tilt NLL"),
    ("score_gap_mean", "score gap"),
    ("clients_sampled", "sampled"),
    ("clients_accepted", "accepted"),
    ("recovery", "recovery"),
    ("fid_next", "FID next"),
    ("similarity_next", "sim next"),
    ("diversity_next", "div next"),
    ("fid_probe", "FID probe"),
    ("fid_probe_change", "probe chg"),
    ("fid_probe_change_se", "chg SE"),
    ("fid_probe_vs_base", "vs base"),
    ("fid_probe_vs_base_se", "base SE"),
    ("generator_loss", "gen loss"),
    ("generator_loss_change", "loss chg"),
    ("accuracy", "top-1"),
    ("seconds.clients", "clients s"),
    ("seconds.generate", "gen s"),
    ("seconds.dpo", "DPO s"),
    ("seconds.tilt", "tilt s"),
    ("seconds.total", "total s"),
)
#: (column, title) candidates of ``summary.png``.
PANELS = (
    ("epsilon_spent", "epsilon spent"),
    ("fid_next", "FID of fresh samples (lower is closer)"),
    ("fid_probe", "FID on fixed probe prompts and seeds"),
    ("similarity_next", "similarity of fresh samples to held-out text"),
    ("recovery", "pairs whose order survives the noise"),
    ("dpo_reward_margin", "DPO reward margin"),
)
NOTE = "* diagnostics: un-noised statistics of private data, NOT released"


def summary_table(run_dir: str | Path) -> str:
    """The run's finished rounds as fixed-width text, one line per round.

    Parameters
    ----------
    run_dir
        A run directory with a ``rounds.jsonl`` (and, if the run kept them, diagnostics).

    Returns
    -------
    str
        A header line, one line per round; when the run has ``diagnostics.jsonl``, the columns
        found only there (marked ``*``) and a last line saying they are not released.

    Raises
    ------
    ValueError
        From :func:`~popri_flwr.evaluation.plots.read_rounds` (no or unreadable round log).
    """
    frame, columns, has_diag = _columns(run_dir, COLUMNS)
    header = ["round", *(title for _, title in columns)]
    rows = [
        [str(int(r["round"])), *(_fmt(r.get(key)) for key, _ in columns)]
        for r in frame.to_dict("records")
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True))
             for line in [header, *rows]]  # fmt: skip
    if has_diag and any(title.endswith("*") for _, title in columns):
        lines.append(NOTE)
    return "\n".join(lines)


def write_summary_plot(run_dir: str | Path) -> Path:
    """Write ``summary.png`` into the run directory: epsilon spent (and more) by round.

    Without diagnostics the figure holds released values only (epsilon spent, the DPO reward
    margin). With diagnostics it adds the FID of fresh samples and is titled as a diagnostic:
    do not publish it.

    Parameters
    ----------
    run_dir
        A run directory with a ``rounds.jsonl``.

    Returns
    -------
    Path
        ``<run_dir>/summary.png``.
    """
    frame, panels, has_diag = _columns(run_dir, PANELS)
    panels = [(key, title) for key, title in panels if frame[key].notna().any()]
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.2), layout="constrained")
    for i, (key, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        data = frame[["round", key]].dropna()
        ax.plot(data["round"], pd.to_numeric(data[key]), marker="o")
        ax.set_xlabel("round")
        if len(data) <= 12:  # whole rounds as ticks (a locator gives 0.96 .. 1.04 for one)
            ax.set_xticks(data["round"].astype(int).tolist())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    if has_diag:
        note = "DIAGNOSTIC, do not publish (*: un-noised statistics of private data)"
    else:
        note = "released values"
    fig.suptitle(f"{Path(run_dir).name}: {note}", fontsize=9)
    return _save(fig, Path(run_dir) / "summary.png")


def _columns(
    run_dir: str | Path, candidates: tuple[tuple[str, str], ...]
) -> tuple[pd.DataFrame, list[tuple[str, str]], bool]:
    """The round frame, the candidates it has (diagnostic-only ones starred), and has_diag."""
    frame = read_rounds(run_dir)
    has_diag = (Path(run_dir) / DIAGNOSTICS_FILE).exists()
    released = _released_keys(run_dir)
    out = []
    for key, title in candidates:
        if key not in frame:
            continue
        if key in released:
            out.append((key, title))
        elif has_diag:  # only in diagnostics.jsonl: un-noised, say so
            out.append((key, f"{title}*"))
    return frame, out, has_diag


def _released_keys(run_dir: str | Path) -> set[str]:
    """Flattened keys (``seconds.dpo``) of the records in ``rounds.jsonl`` (torn lines skipped)."""
    keys: set[str] = set()
    for line in (Path(run_dir) / "rounds.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            keys.update(pd.json_normalize(record).columns)
    return keys


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:  # counts read back as floats beside NaN
            return str(int(value))
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)
