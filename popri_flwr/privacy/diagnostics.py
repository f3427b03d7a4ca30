"""Diagnostics: un-noised statistics of private data, kept out of the release.

What a run *releases* (safe to publish, covered by the DP guarantee) is the trained adapter or
model, the synthetic samples, the noisy scores or votes, the public set, the config and the
epsilon spent. Anything else computed from private data without noise is a *diagnostic*:
evaluation on held-out private text (FID, DP-FedAvg's accuracy), the number of clients sampled,
failed or rejected, which nodes were rejected and why, client-side timings. Diagnostics go to
``diagnostics.jsonl`` in the run directory (its first line says what it is) and to the
``popri_flwr.privacy.diagnostics`` logger, only when enabled: on by default in simulation, off by
default in a deployment, one switch (``diagnostics``) for every strategy.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("popri_flwr.privacy.diagnostics")

FILENAME = "diagnostics.jsonl"
NOTICE = (
    "DIAGNOSTICS: un-noised statistics of private data (client counts, rejections, timings, "
    "evaluation on held-out private text). NOT part of the differentially private release: "
    "do not publish this file."
)


class Diagnostics:
    """Collects a round's diagnostics and appends them as one JSON line (when enabled).

    Parameters
    ----------
    run_dir
        The run directory (``diagnostics.jsonl`` goes there); ``None`` keeps nothing on disk.
    enabled
        False: nothing is computed by callers that check :attr:`enabled`, nothing is written,
        nothing is logged.
    """

    def __init__(self, run_dir: str | Path | None, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.path = Path(run_dir) / FILENAME if run_dir is not None else None
        self._round: dict[str, Any] = {}
        #: The last round's record (after :meth:`write_round`), e.g. for a log line.
        self.last: dict[str, Any] = {}

    def add(self, **values: Any) -> None:
        """Remember values for the current round (ignored when disabled)."""
        if self.enabled:
            self._round.update(values)

    def get(self, key: str, default: Any = None) -> Any:
        return self._round.get(key, default)

    def log(self, level: int, msg: str, *args: Any) -> None:
        """Log a line that carries private statistics (node ids, counts) only when enabled."""
        if self.enabled:
            logger.log(level, msg, *args)

    def write_round(self, server_round: int, extra: Mapping[str, Any] | None = None) -> None:
        """Append ``{"round": r, ...}`` for the round collected so far, then start afresh."""
        record = {"round": server_round, **self._round, **(extra or {})}
        self._round = {}
        if self.enabled:
            self.last = record
            self.write(record)

    def truncate(self, finished_round: int) -> None:
        """Drop records of rounds after ``finished_round`` (left by a crash before commit)."""
        if not self.enabled or self.path is None or not self.path.exists():
            return
        rows = read_diagnostics(self.path.parent)
        keep = [r for r in rows if int(r.get("round", 0)) <= finished_round]
        if len(keep) != len(rows):
            self.path.unlink()
            for row in keep:
                self.write(row)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (the notice line first, when the file is new)."""
        if not self.enabled or self.path is None:
            return
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as fh:
            if new:
                fh.write(json.dumps({"notice": NOTICE}) + "\n")
            fh.write(json.dumps(dict(record), default=_default, allow_nan=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_diagnostics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-round diagnostic records of a run (the notice line and torn lines skipped)."""
    path = Path(run_dir) / FILENAME
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "notice" not in row:
            out.append(row)
    return out


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
