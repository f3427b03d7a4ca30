"""A run's directory: resolved config, per-round log, samples, adapter, accountant state.

Layout::

    run_dir/
      config.yaml            resolved config of the run (checked again on resume)
      rounds.jsonl           one JSON line per finished round (appended, never rewritten)
      state.json             last finished / last released round + accountant state (atomic)
      public_set.jsonl       the public initial set
      samples/round_001.jsonl  samples of round 1 with their noisy scores
      checkpoint/            strategy state (e.g. LoRA adapter and optimizer)
      diagnostics.jsonl      un-noised statistics, NOT part of the release (when enabled)
      diagnostics.log        the run's log (Hydra entry point)

Resume rules: a round's noisy aggregate is written to disk *before* the accountant state that
counts it, and both before any work that uses it. A run restarted on the same directory
continues after the last finished round; a round whose aggregate was already released is
finished from the saved aggregate, so no client is asked twice and no budget is spent twice.
A directory holding a release that ``state.json`` does not account for is refused, and once
anything is released the config keys that define the spend are locked (checked before
``config.yaml`` is written again).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from popri_flwr.config import ConfigError

if TYPE_CHECKING:
    from popri_flwr.config import RunConfig

logger = logging.getLogger(__name__)

#: Config keys that must not change when a run resumes: they define what was spent.
RESUME_LOCKED_KEYS = (
    "seed",
    "privacy",
    "data",
    "strategy",
    "generation.model",
    "embedder.model",
)

#: Accountant settings that must match when a run resumes.
MECHANISM_KEYS = ("noise_multiplier", "sample_rate", "delta", "accounting")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _dump_json(obj: Any) -> str:
    # Keep inf/nan as JSON extensions (Python's json reads them back), e.g. epsilon = inf.
    return json.dumps(obj, default=_json_default, allow_nan=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class RunDirectory:
    """Files of one run. Creating it checks that the directory is writable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"run_dir: cannot write to {self.path} ({err.strerror})") from None
        (self.path / "samples").mkdir(exist_ok=True)
        (self.path / "checkpoint").mkdir(exist_ok=True)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the directory for one run; a second run on it fails at once.

        Two processes resuming one directory would interleave rounds, releases and adapter
        checkpoints (a run killed by signal while its launcher lives on, a benchmark restarted
        over a run that is still going). An advisory ``flock`` on ``run_dir/.lock`` prevents
        that; the OS drops it when the holder exits, however it exits. Where ``fcntl`` does
        not exist (Windows) nothing is locked.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - POSIX only
            yield
            return
        with open(self.path / ".lock", "a+", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise RuntimeError(
                    f"run_dir: {self.path} is in use by another run ({holder}); wait for it to "
                    "end or choose another run_dir"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()  # released: no stale holder in the error message of a later run
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- files ---------------------------------------------------------------------------
    @property
    def rounds_log(self) -> Path:
        return self.path / "rounds.jsonl"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    def samples_path(self, server_round: int) -> Path:
        return self.path / "samples" / f"round_{server_round:03d}.jsonl"

    # --- config and resume guard ---------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def releases_on_disk(self) -> int:
        """The last round whose noisy aggregate is on disk (a saved release or scored samples).

        0 when nothing has been released. Scored samples are rows with a ``noisy_score`` or
        ``noisy_votes``; a release file is ``checkpoint/release_round_NNN.npy``.
        """
        last = 0
        for path in self.checkpoint_dir.glob("release_round_*.npy"):
            m = re.fullmatch(r"release_round_(\d+)\.npy", path.name)
            if m:
                last = max(last, int(m.group(1)))
        for path in (self.path / "samples").glob("round_*.jsonl"):
            m = re.fullmatch(r"round_(\d+)\.jsonl", path.name)
            if m and int(m.group(1)) > last and _first_row_is_scored(path):
                last = int(m.group(1))
        return last

    def accounted_round(self) -> int:
        """The last round that ``state.json`` accounts for (released or finished)."""
        state = self.load_state() or {}
        return max(int(state.get("released_round", 0)), int(state.get("finished_round", 0)))

    def has_released(self) -> bool:
        """Whether anything computed from client data has been released (or accounted)."""
        return self.releases_on_disk() > 0 or self.accounted_round() > 0

    def check_accounted(self) -> None:
        """Refuse a run directory holding releases that ``state.json`` does not account for.

        Starting anyway would ask clients again and spend the budget again (e.g. after
        ``state.json`` was lost or replaced by an older copy).

        Raises
        ------
        ConfigError
            Naming the file and what to do.
        """
        on_disk, accounted = self.releases_on_disk(), self.accounted_round()
        if on_disk > accounted:
            what = (
                "no state.json"
                if not self.state_path.exists()
                else (f"state.json accounts for round {accounted} only")
            )
            raise ConfigError(
                f"run_dir: {self.path} holds the noisy release of round {on_disk} but {what}; "
                "refusing to query clients and spend the privacy budget again (restore "
                "state.json or start a new run_dir)"
            )

    def check_resume(
        self,
        config: Mapping[str, Any],
        resume: bool,
        accountant_state: Mapping[str, Any] | None = None,
    ) -> None:
        """Accept or refuse a (re)start on this directory; writes nothing.

        Once anything has been released, the keys that define what was spent
        (:data:`RESUME_LOCKED_KEYS`) and the mechanism (noise multiplier, sampling rate,
        delta, accounting) must be those of the run being resumed.

        Raises
        ------
        ConfigError
            Naming the first key that differs, or why the directory cannot be resumed.
        """
        self.check_accounted()
        if not self.has_released():
            return
        if not resume:
            raise ConfigError(
                f"run_dir: {self.path} already holds a run that released data; "
                "set resume=true to continue it or choose another run_dir"
            )
        if not self.config_path.exists():
            raise ConfigError(
                f"run_dir: {self.config_path} is missing but the run has released data; "
                "cannot check that the resumed config spends the same way"
            )
        old = yaml.safe_load(self.config_path.read_text()) or {}
        for key in RESUME_LOCKED_KEYS:
            if _get(old, key) != _get(config, key):
                raise ConfigError(
                    f"{key}: differs from the run being resumed in {self.config_path} "
                    f"(was {_get(old, key)!r}, now {_get(config, key)!r})"
                )
        spent = (self.load_state() or {}).get("accountant")
        if spent and accountant_state:
            for key in MECHANISM_KEYS:
                # States written before PLD existed were accounted with RDP.
                was = spent.get(key, "rdp") if key == "accounting" else spent.get(key)
                now = accountant_state.get(key)
                if _normalise(was) != _normalise(now):
                    raise ConfigError(
                        f"privacy: the run being resumed used {key}={was!r}, now {now!r} "
                        "(a different rounds, epsilon or sample_rate changes the calibrated "
                        "noise); resume with the settings it started with"
                    )

    def write_config(self, config: Mapping[str, Any], resume: bool = True) -> None:
        """Check the (re)start with :meth:`check_resume`, then save the resolved config."""
        self.check_resume(config, resume)
        atomic_write_text(self.config_path, yaml.safe_dump(_plain(config), sort_keys=False))

    # --- round log -----------------------------------------------------------------------
    def append_round(self, record: Mapping[str, Any]) -> None:
        """Append one finished round's record (flushed and fsynced)."""
        with open(self.rounds_log, "a", encoding="utf-8") as fh:
            fh.write(_dump_json(dict(record)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_rounds(self) -> list[dict[str, Any]]:
        """All round records; a torn last line (crash while appending) is ignored."""
        if not self.rounds_log.exists():
            return []
        out = []
        for line in self.rounds_log.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("Ignoring a torn line in %s", self.rounds_log)
        return out

    def truncate_rounds(self, finished_round: int) -> None:
        """Drop log lines of rounds after ``finished_round`` (left by a crash before commit)."""
        rows = self.read_rounds()
        keep = [r for r in rows if int(r.get("round", 0)) <= finished_round]
        if len(keep) != len(rows) or (rows and not self.rounds_log.read_text().endswith("\n")):
            self.write_jsonl(self.rounds_log, keep)

    def finished_rounds(self) -> int:
        state = self.load_state()
        return int(state.get("finished_round", 0)) if state else 0

    # --- state ---------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text(encoding="utf-8"))

    def save_state(self, state: Mapping[str, Any]) -> None:
        atomic_write_text(self.state_path, _dump_json(dict(state)))

    # --- arrays and samples --------------------------------------------------------------
    def save_array(self, name: str, array: np.ndarray) -> None:
        path = self.checkpoint_dir / f"{name}.npy"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
        np.save(tmp, array)
        os.replace(tmp, path)

    def load_array(self, name: str) -> np.ndarray | None:
        path = self.checkpoint_dir / f"{name}.npy"
        return np.load(path) if path.exists() else None

    def write_jsonl(self, path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
        atomic_write_text(path, "".join(_dump_json(dict(r)) + "\n" for r in rows))

    @staticmethod
    def read_jsonl(path: Path) -> list[dict[str, Any]]:
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


# --- reading a finished run (the one reader of a run directory's files) -------------------
def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved :class:`RunConfig` a run saved in ``run_dir/config.yaml``.

    Raises
    ------
    ValueError
        ``"<run_dir>: no such directory"``, ``"<run_dir>/config.yaml: missing ..."`` or a bad
        value, prefixed with the file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such directory (expected a run directory)")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{path}: missing; {run_dir} is not a run directory")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    try:
        # The run validated its config when it started; from_mapping alone avoids importing
        # the strategies (and with them Flower).
        from popri_flwr.config import RunConfig, from_mapping

        return from_mapping(RunConfig, data)
    except ConfigError as err:
        raise ValueError(f"{path}: {err}") from None


def find_adapter(run_dir: str | Path) -> tuple[Path, int]:
    """The LoRA adapter of a run's last finished round and that round.

    POPri saves it as ``run_dir/adapter`` (``adapter.old`` while being replaced), with the
    round in ``popri_round.json``; ``state.json`` says which round finished last.

    Raises
    ------
    ValueError
        Naming the run directory, when it holds no adapter of its last finished round.
    """
    run_dir = Path(run_dir)
    state_path = run_dir / "state.json"
    finished = None
    if state_path.is_file():
        finished = int(json.loads(state_path.read_text()).get("finished_round", 0))
    for name in ("adapter", "adapter.old"):
        path = run_dir / name
        marker = path / "popri_round.json"
        if not (path / "adapter_config.json").is_file() or not marker.is_file():
            continue
        round_ = int(json.loads(marker.read_text())["round"])
        if finished is None:
            logger.warning("%s: no state.json; using the adapter of round %d", run_dir, round_)
            return path, round_
        if round_ == finished:
            return path, round_
    if not finished:
        raise ValueError(
            f"{run_dir}: no finished round, so no trained adapter; use the base model "
            "(adapter=False, --no-adapter)"
        )
    raise ValueError(
        f"{run_dir}: no adapter of its last finished round {finished} (adapter/ with "
        "popri_round.json); only POPri runs train one; use adapter=False (--no-adapter)"
    )


def _first_row_is_scored(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        line = fh.readline()
    try:
        row = json.loads(line) if line.strip() else {}
    except json.JSONDecodeError:
        return False
    return row.get("noisy_score") is not None or row.get("noisy_votes") is not None


def _normalise(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _plain(obj: Any) -> Any:
    """YAML-safe copy (inf -> .inf is fine for yaml; tuples -> lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
