"""Figures of a benchmark: downstream accuracy by method and epsilon, metrics by round.

* :func:`plot_accuracy`: grouped bars of downstream top-1 accuracy, one group per epsilon and
  one bar per private method, with the ``eps0`` / ``epsinf`` references as horizontal lines
  (the layout of the paper's figure). Failed rows leave a gap marked "failed".
* :func:`plot_rounds`: one line per run of a ``rounds.jsonl`` metric (``fid_next``,
  ``epsilon_spent``, ``seconds.total``, ...) against the round.
* :func:`read_rounds`, :func:`read_results`: the round log and ``results.csv`` as DataFrames;
  :func:`run_dirs_of`: the run directories of benchmark rows, keyed like the benchmark's rows.

Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot state, no display,
safe in a server process and in a notebook alike. No Flower imports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from popri_flwr.privacy.diagnostics import read_diagnostics

logger = logging.getLogger(__name__)

#: Reference rows of the benchmark, drawn as horizontal lines.
REFERENCES = {"eps0": "ε = 0 (public only)", "epsinf": "ε = ∞ (private data)"}
#: Columns :func:`read_results` requires in a benchmark CSV.
REQUIRED_COLUMNS = ("method", "epsilon", "status", "accuracy")
#: Metric names that stand for another key of ``rounds.jsonl`` when absent.
METRIC_ALIASES = {"fid": ("fid", "fid_next", "fid_scored")}


# ----------------------------------------------------------------------------- reading
def read_rounds(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``rounds.jsonl`` as a DataFrame, one row per finished round.

    Nested records are flattened with dots (``seconds.total``). A torn last line (a crash
    while appending) is skipped, as the run itself does. The run's diagnostics (FID, client
    counts, client-phase seconds; ``diagnostics.jsonl``, not part of the release), if any, are
    joined on the round; a key in both keeps the released value.

    Raises
    ------
    ValueError
        ``"<run_dir>/rounds.jsonl: no such file"`` or a line that is not a JSON object.
    """
    path = Path(run_dir) / "rounds.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: ignoring a torn last line", path)
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    diagnostics = {int(r["round"]): r for r in read_diagnostics(run_dir) if "round" in r}
    records = [_with_diagnostics(r, diagnostics.get(r.get("round"))) for r in records]
    frame = pd.json_normalize(records) if records else pd.DataFrame({"round": []})
    if "round" not in frame:
        raise ValueError(f"{path}: records have no 'round' key")
    return frame.sort_values("round", kind="stable").reset_index(drop=True)


def _with_diagnostics(record: dict, diag: dict | None) -> dict:
    if not diag:
        return record
    out = {**diag, **record}
    if isinstance(diag.get("seconds"), dict):
        out["seconds"] = {**diag["seconds"], **record.get("seconds", {})}
    return out


def read_results(csv_path: str | Path) -> pd.DataFrame:
    """A benchmark ``results.csv`` (``inf`` epsilons as floats, numbers as numbers).

    Raises
    ------
    ValueError
        ``"<csv_path>: no such file"`` or ``"<csv_path>: missing columns ..."``.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    frame = pd.read_csv(path, keep_default_na=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing columns {missing} (has {list(frame.columns)}); "
            "expected a results.csv written by popri-benchmark"
        )
    frame["epsilon"] = pd.to_numeric(frame["epsilon"], errors="coerce")
    for col in frame.columns:
        if col not in ("method", "status", "run_dir"):
            with contextlib.suppress(TypeError, ValueError):  # a text column stays text
                frame[col] = pd.to_numeric(frame[col])
    frame["status"] = frame["status"].fillna("").astype(str)
    return frame


def run_dirs_of(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> dict[str, Path]:
    """``{"popri_eps1": run_dir, ...}`` for the rows whose run directory has a round log."""
    out: dict[str, Path] = {}
    for row in _rows(rows):
        run_dir = row.get("run_dir")
        if not isinstance(run_dir, str | Path) or not str(run_dir).strip():
            continue
        if not (Path(run_dir) / "rounds.jsonl").is_file():
            logger.info("run_dirs_of: %s has no rounds.jsonl; left out", run_dir)
            continue
        eps = _number(row.get("epsilon"))
        label = str(row["method"])
        if eps is not None:
            label += "_eps" + ("inf" if math.isinf(eps) else f"{eps:g}")
        out[label] = Path(run_dir)
    return out


# ----------------------------------------------------------------------------- helpers
def _rows(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> list[dict[str, Any]]:
    if isinstance(rows, pd.DataFrame):
        return rows.to_dict("records")
    return [dict(r) for r in rows]


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / blank / NaN values."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _eps_label(eps: float | None) -> str:
    if eps is None:
        return "ε = ?"
    if math.isinf(eps):
        return "ε = ∞"
    return f"ε = {eps:g}"


def _ok(row: Mapping[str, Any]) -> bool:
    return str(row.get("status", "ok")).strip() == "ok"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------- figures
def plot_accuracy(
    rows: Iterable[Mapping[str, Any]] | pd.DataFrame,
    path: str | Path,
    metric: str = "accuracy",
    title: str | None = None,
) -> Path:
    """Grouped bars of downstream accuracy by method (bars) and epsilon (groups).

    Parameters
    ----------
    rows
        Benchmark rows (dicts or a DataFrame) with ``method``, ``epsilon``, ``status`` and
        ``metric``. ``eps0`` / ``epsinf`` rows become horizontal reference lines. A row whose
        status is not ``"ok"`` (or whose value is missing) leaves its bar out and is marked
        ``failed`` / ``n/a`` at the bar's place. A ``<metric>_std`` column (the spread over
        seeds) becomes error bars, and a band around the reference lines.
    path
        PNG file to write.
    metric
        Column to plot (``accuracy`` = top-1; ``top5_accuracy``); fractions in [0, 1] are
        shown in percent.
    title
        Figure title (default: derived from ``metric``).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        No rows, a row without ``method``, or no row with ``metric``.
    """
    rows = _rows(rows)
    if not rows:
        raise ValueError("plot_accuracy: no rows to plot")
    for i, row in enumerate(rows):
        if not isinstance(row.get("method"), str) or not row["method"]:
            raise ValueError(f"plot_accuracy: row {i} has no 'method'")
    if not any(metric in row for row in rows):
        keys = sorted({k for row in rows for k in row})
        raise ValueError(f"plot_accuracy: no row has {metric!r} (keys: {', '.join(keys)})")

    refs = [r for r in rows if r["method"] in REFERENCES]
    private = [r for r in rows if r["method"] not in REFERENCES]
    methods = list(dict.fromkeys(r["method"] for r in private))
    epsilons = sorted(
        {_number(r.get("epsilon")) for r in private},
        key=lambda e: (e is None, e if e is not None else 0.0),
    )
    values = [_number(r.get(metric)) for r in rows if _ok(r)]
    percent = all(v is None or 0.0 <= v <= 1.0 for v in values)
    scale = 100.0 if percent else 1.0

    fig = Figure(figsize=(max(5.0, 1.4 + 1.1 * max(1, len(epsilons)) * max(1, len(methods))), 4))
    ax = fig.add_subplot()
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    width = 0.8 / max(1, len(methods))
    top = max([v * scale for v in values if v is not None] or [1.0]) or 1.0
    for gi, eps in enumerate(epsilons):
        for mi, method in enumerate(methods):
            x = gi - 0.4 + width * (mi + 0.5)
            match = [
                r for r in private if r["method"] == method and _number(r.get("epsilon")) == eps
            ]
            if not match:
                continue
            row = match[-1]
            value = _number(row.get(metric))
            if not _ok(row) or value is None:
                label = "failed" if not _ok(row) else "n/a"
                ax.text(x, 0.02 * top, label, rotation=90, ha="center", va="bottom", fontsize=8)
                continue
            std = _number(row.get(f"{metric}_std"))  # over seeds, when there are several
            ax.bar(x, value * scale, width * 0.95, color=colors[method],
                   yerr=None if std is None else std * scale, capsize=3)  # fmt: skip
            ax.text(x, value * scale, f"{value * scale:.1f}", ha="center", va="bottom", fontsize=8)
    # Legend: every method (whatever its bars did), then the references.
    handles: list[Any] = [Patch(color=colors[m], label=m) for m in methods]
    styles = {"eps0": ("0.45", "--"), "epsinf": ("black", ":")}
    for ref in refs:
        value = _number(ref.get(metric))
        color, style = styles[ref["method"]]
        label = REFERENCES[ref["method"]]
        if not _ok(ref) or value is None:
            label += ": failed" if not _ok(ref) else ": n/a"
        else:
            ax.axhline(value * scale, color=color, ls=style)
            std = _number(ref.get(f"{metric}_std"))
            if std is not None:  # the reference's spread over seeds
                ax.axhspan((value - std) * scale, (value + std) * scale, color=color, alpha=0.12)
            label += f": {value * scale:.1f}"
        handles.append(Line2D([], [], color=color, ls=style, label=label))
    ax.set_xticks(range(len(epsilons)), [_eps_label(e) for e in epsilons])
    if not epsilons:
        ax.set_xticks([])
    ax.set_xlim(-0.6, max(0.6, len(epsilons) - 0.4))
    ax.set_ylim(0, top * 1.15)
    name = {"accuracy": "top-1", "top5_accuracy": "top-5"}.get(metric, metric)
    ax.set_ylabel(f"downstream {name} next-token accuracy" + (" (%)" if percent else ""))
    ax.set_title(title or f"Downstream {name} accuracy by method and privacy budget")
    ax.grid(axis="y", alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_rounds(
    run_dirs: Mapping[str, str | Path],
    path: str | Path,
    metric: str = "fid_next",
    title: str | None = None,
) -> Path:
    """Line plot of one ``rounds.jsonl`` metric against the round, one line per run.

    Parameters
    ----------
    run_dirs
        Label -> run directory (each with a ``rounds.jsonl``).
    path
        PNG file to write.
    metric
        A key of the round records (``epsilon_spent``, ``fid_next``, ``fid_scored``,
        ``bytes_up``, ``seconds.total``, ...). ``"fid"`` means ``fid_next`` (or ``fid_scored``)
        where a run has no ``fid`` key. Runs without the metric are left out (logged).
    title
        Figure title (default: the metric).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        No runs, a run without ``rounds.jsonl``, or no run that logs ``metric`` (the message
        lists the keys that are there).
    """
    if not run_dirs:
        raise ValueError("plot_rounds: no run directories given")
    frames = {label: read_rounds(d) for label, d in run_dirs.items()}
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    drawn, available, keys = 0, set(), []
    for i, (label, frame) in enumerate(frames.items()):
        available |= set(frame.columns)
        key = next((k for k in METRIC_ALIASES.get(metric, (metric,)) if k in frame.columns), None)
        if key is None or frame[key].isna().all():
            logger.info("plot_rounds: %s logs no %r; left out", label, metric)
            continue
        series = pd.to_numeric(frame[key], errors="coerce")
        ax.plot(frame["round"], series, marker="o", color=f"C{i % 10}", label=label)
        drawn += 1
        keys.append(key)
    if not drawn:
        raise ValueError(
            f"plot_rounds: no run logs {metric!r} (keys: {', '.join(sorted(available))})"
        )
    ax.set_xlabel("round")
    ax.set_ylabel(" / ".join(dict.fromkeys(keys)))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title or f"{metric} by round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


__all__ = [
    "METRIC_ALIASES",
    "REFERENCES",
    "plot_accuracy",
    "plot_rounds",
    "read_results",
    "read_rounds",
    "run_dirs_of",
]
