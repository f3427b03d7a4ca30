"""What a person reads at the end of a run: a per-round table and ``summary.png``.

The table always shows the release (epsilon spent, DPO statistics on the noisy pairs, server
seconds); the columns that exist only in the run's diagnostics (client counts, the FID of fresh
samples against held-out private text, client-phase seconds) are added, and labelled as such,
only when the run kept diagnostics.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from popri_flwr.evaluation.plots import _save, read_rounds
from popri_flwr.privacy.diagnostics import FILENAME as DIAGNOSTICS_FILE

#: (column, header) of the released part of the table.
RELEASED = (
    ("epsilon_spent", "eps spent"),
    ("dpo_loss", "DPO loss"),
    ("dpo_reward_margin", "margin"),
    ("score_gap_mean", "score gap"),
    ("seconds.generate", "gen s"),
    ("seconds.dpo", "DPO s"),
)
#: (column, header) that only diagnostics hold.
DIAGNOSTIC = (
    ("clients_sampled", "sampled*"),
    ("clients_accepted", "accepted*"),
    ("fid_next", "FID next*"),
    ("seconds.clients", "clients s*"),
    ("seconds.total", "total s*"),
)


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def summary_table(run_dir: str | Path) -> str:
    """One line per finished round, as fixed-width text.

    Columns marked ``*`` come from ``diagnostics.jsonl`` (un-noised statistics of private data,
    not part of the release) and appear only when the run kept diagnostics.
    """
    frame = read_rounds(run_dir)
    has_diag = (Path(run_dir) / DIAGNOSTICS_FILE).exists()
    columns = [(k, h) for k, h in RELEASED if k in frame]
    if has_diag:
        columns += [(k, h) for k, h in DIAGNOSTIC if k in frame]
    header = ["round", *(h for _, h in columns)]
    rows = [
        [str(int(r["round"])), *(_fmt(r.get(k)) for k, _ in columns)]
        for r in frame.to_dict("records")
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True))
             for line in [header, *rows]]  # fmt: skip
    if has_diag:
        lines.append("* diagnostics: un-noised statistics of private data, NOT released")
    return "\n".join(lines)


def write_summary_plot(run_dir: str | Path) -> Path:
    """``summary.png``: epsilon spent by round, and what else the run logged by round.

    With diagnostics the figure includes the FID of fresh samples and is titled as a
    diagnostic (do not publish it); without, it shows released values only.
    """
    frame = read_rounds(run_dir)
    has_diag = (Path(run_dir) / DIAGNOSTICS_FILE).exists()
    panels = [("epsilon_spent", "epsilon spent"), ("dpo_reward_margin", "DPO reward margin")]
    if has_diag:
        panels.append(("fid_next", "FID of fresh samples* (lower is closer)"))
    panels = [(k, t) for k, t in panels if k in frame and frame[k].notna().any()]
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.2))
    for i, (key, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        data = frame[["round", key]].dropna()
        ax.plot(data["round"], pd.to_numeric(data[key]), marker="o")
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    note = "DIAGNOSTIC (*: un-noised, not released)" if has_diag else "released values"
    fig.suptitle(f"{Path(run_dir).name}: {note}", fontsize=9)
    return _save(fig, Path(run_dir) / "summary.png")
