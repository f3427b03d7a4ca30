"""The comparison table: gap closed, config checks, and a tiny grid with a failing method.

The tiny grid runs the two references for real (zero-shot SmolLM2 samples and the private text,
each scored by the downstream LM) next to a POPri row whose run fails (unknown model): the failed
row must be in the table with its reason, and the rest of the table must still be written.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from popri_flwr.cli.benchmark import load_benchmark_config, main
from popri_flwr.config import ConfigError
from popri_flwr.evaluation.benchmark import (
    BenchmarkConfig,
    finish_rows,
    gap_closed,
    row_key,
    run_benchmark,
    write_results,
)


def test_gap_closed_formula():
    assert gap_closed(0.30, 0.20, 0.40) == pytest.approx(0.5)
    assert gap_closed(0.20, 0.20, 0.40) == 0.0
    assert gap_closed(0.40, 0.20, 0.40) == 1.0
    assert gap_closed(0.10, 0.20, 0.40) == pytest.approx(-0.5)  # worse than no feedback
    assert math.isnan(gap_closed(0.3, 0.2, 0.2))  # references coincide: undefined
    assert math.isnan(gap_closed(float("nan"), 0.2, 0.4))


def test_finish_rows_uses_the_reference_rows():
    rows = [
        {"method": "eps0", "accuracy": 0.1, "top5_accuracy": 0.2},
        {"method": "epsinf", "accuracy": 0.3, "top5_accuracy": 0.6},
        {"method": "popri", "epsilon": 1.0, "accuracy": 0.25, "top5_accuracy": 0.3},
        {"method": "pe", "epsilon": 1.0, "status": "failed: boom"},
    ]
    finish_rows(rows)
    assert [r["gap_closed"] for r in rows[:3]] == pytest.approx([0.0, 1.0, 0.75])
    assert [r["gap_closed_top5"] for r in rows[:3]] == pytest.approx([0.0, 1.0, 0.25])
    assert math.isnan(rows[3]["gap_closed"]) and math.isnan(rows[3]["gap_closed_top5"])


def test_grid_and_row_keys():
    bc = BenchmarkConfig(methods=["popri", "eps0", "epsinf"], epsilons=[1.0, 7.5])
    assert bc.grid() == [("eps0", None), ("epsinf", None), ("popri", 1.0), ("popri", 7.5)]
    assert row_key("popri", 1.0) == "popri_eps1"
    assert row_key("pe", float("inf")) == "pe_epsinf"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["methods=[popri,nope]"], "methods"),
        (["epsilons=[-1]"], "epsilons"),
        (["synthetic_size=0"], "synthetic_size"),
        (["colour=red"], "colour"),
    ],
)
def test_bad_benchmark_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_benchmark_config("tiny", overrides)


def test_cli_bad_preset_is_one_line(capsys):
    assert main(["--preset", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--preset" in err[0] and "tiny" in err[0]


def test_cli_help_lists_every_settable_key(capsys):
    import dataclasses

    from popri_flwr.evaluation.benchmark import BenchmarkConfig
    from popri_flwr.speed.report import SpeedConfig

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in (BenchmarkConfig, SpeedConfig):
        for f in dataclasses.fields(cls):
            if f.name != "name":
                assert f.name in text, f.name


def test_results_table_keeps_failed_rows(tmp_path):
    rows = [
        {"method": "eps0", "epsilon": 0.0, "status": "ok", "accuracy": 0.1, "wall_seconds": 3.0},
        {"method": "popri", "epsilon": 1.0, "status": "failed: popri-run exited with 2"},
    ]
    finish_rows(rows)
    csv_path, md_path = write_results(rows, tmp_path)
    table = list(csv.DictReader(csv_path.open()))
    assert [r["method"] for r in table] == ["eps0", "popri"]
    assert table[1]["status"].startswith("failed") and table[1]["accuracy"] == ""
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| method | epsilon | status | accuracy")
    assert "failed: popri-run exited with 2" in md[3]


def test_tiny_grid_end_to_end(tmp_path):
    bc = load_benchmark_config(
        "tiny",
        [
            f"out_dir={tmp_path / 'bench'}",
            "methods=[eps0,epsinf,popri]",
            "epsilons=[7]",
            "synthetic_size=16",
            "max_eval_texts=24",
            "seeds=2",
            # A run that fails after the config checks: the model does not exist.
            f"method_overrides={{popri: [generation.model={tmp_path / 'no-such-model'}]}}",
        ],
    )
    rows = run_benchmark(bc)
    by = {r["method"]: r for r in rows}
    assert by["eps0"]["status"] == by["epsinf"]["status"] == "ok"
    for ref in ("eps0", "epsinf"):
        assert 0.0 <= by[ref]["accuracy"] <= by[ref]["top5_accuracy"] <= 1.0
        assert by[ref]["top5_accuracy"] > 0.0
        assert by[ref]["fid"] > 0 and 0 <= by[ref]["precision"] <= 1
    assert by["eps0"]["epsilon_spent"] == 0.0 and math.isinf(by["epsinf"]["epsilon_spent"])
    if by["eps0"]["accuracy"] != by["epsinf"]["accuracy"]:
        assert by["eps0"]["gap_closed"] == 0.0 and by["epsinf"]["gap_closed"] == 1.0
    assert by["popri"]["status"].startswith("failed: popri-run exited with 2")
    log = (bc.out / "logs" / "popri_eps7.log").read_text()
    assert "no-such-model" in log  # the run's own one-line error is kept for the user

    out = bc.out
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in table] == ["eps0", "epsinf", "popri"]
    assert (out / "results.md").read_text().count("\n") == 5
    # Two seeds: each reference row is their mean, with its std; every seed is kept.
    by_seed = list(csv.DictReader((out / "results_by_seed.csv").open()))
    assert sorted((r["method"], r["seed"]) for r in by_seed if r["method"] == "eps0") == [
        ("eps0", "0"), ("eps0", "1")]  # fmt: skip
    acc0 = [float(r["accuracy"]) for r in by_seed if r["method"] == "eps0"]
    assert float(table[0]["accuracy"]) == pytest.approx(np.mean(acc0))
    assert float(table[0]["accuracy_std"]) == pytest.approx(np.std(acc0, ddof=1))
    assert table[0]["seeds"] == "2" and (out / "rows" / "eps0_seed1.json").exists()
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # Started again: finished rows are reused (not recomputed), the failed one is retried.
    saved = [json.loads((out / "rows" / f).read_text()) for f in ("eps0.json", "eps0_seed1.json")]
    again = {r["method"]: r for r in run_benchmark(bc)}
    assert again["eps0"]["wall_seconds"] == pytest.approx(
        np.mean([r["wall_seconds"] for r in saved])
    )
    assert again["popri"]["status"].startswith("failed")


def test_cached_rows_are_reused_only_with_the_same_settings(tmp_path):
    from popri_flwr.evaluation.benchmark import run_row

    bc = BenchmarkConfig(out_dir=str(tmp_path), methods=["eps0"], synthetic_size=10)
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    cached = {"method": "eps0", "status": "ok", "accuracy": 0.5, "settings": bc.settings_hash()}
    (rows_dir / "eps0.json").write_text(json.dumps(cached))
    # evaluator=None: anything that is not taken from the cache fails visibly.
    assert run_row(bc, "eps0", None, None)["accuracy"] == 0.5
    other = BenchmarkConfig(out_dir=str(tmp_path), methods=["eps0"], synthetic_size=20)
    assert other.settings_hash() != bc.settings_hash()
    assert run_row(other, "eps0", None, None)["status"].startswith("failed")


def test_epsinf_texts_get_the_synthetic_token_budget():
    """eps-inf trains on private texts cut to generation.truncate_tokens, like every sample."""
    from transformers import AutoTokenizer

    from popri_flwr.evaluation.benchmark import Evaluator, reference_texts
    from popri_flwr.hydra_config import load_config
    from popri_flwr.models.loading import resolve_model_path

    cfg = load_config(["experiment=demo", "data.max_clients=6", "generation.truncate_tokens=8"])
    evaluator = Evaluator(cfg, 10)
    texts = reference_texts("epsinf", cfg, evaluator, 12)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.generation.model))
    private = evaluator.federation.all_train_texts()
    assert len(texts) == 12
    for text in texts:
        assert 0 < len(tok(text, add_special_tokens=False)["input_ids"]) <= 8
        assert any(p.startswith(text) for p in private)  # a prefix, not a rewrite
    assert max(len(p.split()) for p in private) > 8  # the cut did something


def test_rows_of_an_older_scoring_version_are_not_reused(monkeypatch):
    import popri_flwr.evaluation.benchmark as benchmark

    bc = BenchmarkConfig(methods=["eps0"])
    before = bc.settings_hash()
    monkeypatch.setattr(benchmark, "SCORING_VERSION", benchmark.SCORING_VERSION - 1)
    assert bc.settings_hash() != before


# ------------------------------------------------------------------------------ seeds, rows
def test_grid_with_round0_and_per_method_epsilons():
    bc = BenchmarkConfig(
        methods=["eps0", "popri", "popri_round0", "pe"],
        epsilons=[1.0],
        method_epsilons={"popri": [1.0, float("inf")]},
        seeds=2,
    )
    assert bc.grid() == [
        ("eps0", None),
        ("popri", 1.0),
        ("popri", float("inf")),
        ("pe", 1.0),
        ("popri_round0", None),
    ]
    assert row_key("popri", 1.0, 2) == "popri_eps1_seed2" and row_key("eps0", None, 0) == "eps0"
    # Baselines once, the rows that need error bars on every seed.
    fewer = BenchmarkConfig(**{**vars(bc), "method_seeds": {"pe": 1}})
    assert ("pe", 1.0) in fewer.grid(0) and ("pe", 1.0) not in fewer.grid(1)
    assert [r for r in fewer.grid(1) if r[0] != "pe"] == [r for r in bc.grid() if r[0] != "pe"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["method_epsilons={eps0: [1]}"], "method_epsilons"),
        (["method_epsilons={popri: []}"], "method_epsilons.popri"),
        (["seeds=0"], "seeds"),
        (["synthetic_temperature=-0.5"], "synthetic_temperature"),
        (["synthetic_top_p=0"], "synthetic_top_p"),
        (["methods=[eps0,popri_round0]"], "methods"),
        (["seeds=2", "method_seeds={pe: 3}"], "method_seeds.pe"),
        (["method_seeds={nope: 1}"], "method_seeds"),
        (["seeds=2", "method_seeds={eps0: 1}"], "method_seeds.eps0"),
        (
            ["methods=[popri,popri_round0]", "seeds=2", "method_seeds={popri: 1}"],
            "method_seeds.popri_round0",
        ),
    ],
)
def test_bad_seed_and_epsilon_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_benchmark_config("tiny", overrides)


def test_seeds_are_averaged_with_sample_std_and_gap_closed_per_seed(tmp_path):
    from popri_flwr.evaluation.benchmark import aggregate_seeds

    rows = []
    for seed, (a0, ainf, ap) in enumerate([(0.10, 0.30, 0.20), (0.12, 0.32, 0.27)]):
        one = [
            {"method": "eps0", "epsilon": 0.0, "status": "ok", "accuracy": a0, "seed": seed},
            {"method": "epsinf", "epsilon": math.inf, "status": "ok", "accuracy": ainf,
             "seed": seed},
            {"method": "popri", "epsilon": 1.0, "status": "ok", "accuracy": ap, "seed": seed},
        ]  # fmt: skip
        finish_rows(one)
        rows += one
    rows.append({"method": "popri", "epsilon": 1.0, "status": "failed: boom", "seed": 2})
    agg = {r["method"]: r for r in aggregate_seeds(rows)}
    popri = agg["popri"]
    assert popri["accuracy"] == pytest.approx(0.235)
    assert popri["accuracy_std"] == pytest.approx(np.std([0.20, 0.27], ddof=1))
    assert popri["gap_closed"] == pytest.approx((0.5 + 0.75) / 2)  # per seed, then averaged
    assert popri["seeds"] == 2 and "1 of 3 seeds failed" in popri["status"]
    csv_path, md_path = write_results(list(agg.values()), tmp_path)
    table = {r["method"]: r for r in csv.DictReader(csv_path.open())}
    assert float(table["popri"]["accuracy_std"]) == pytest.approx(popri["accuracy_std"])
    assert "0.235 ± 0.0495" in md_path.read_text()


def test_round0_texts_come_from_the_base_model_through_the_popri_run(tmp_path):
    from popri_flwr.config import to_dict
    from popri_flwr.evaluation.benchmark import round0_texts
    from popri_flwr.hydra_config import load_config
    from popri_flwr.run_dir import RunDirectory

    bc = BenchmarkConfig(out_dir=str(tmp_path), methods=["popri", "popri_round0"], epsilons=[7])
    with pytest.raises(RuntimeError, match="no popri run"):
        round0_texts(bc, 0, 2)
    run = RunDirectory(tmp_path / "runs" / "popri_eps7")
    cfg = load_config(["experiment=demo", "generation.max_new_tokens=8", "strategy.shots=1"])
    run.write_config(to_dict(cfg))
    public = ["The nation is strong and our union endures.", "Taxes must be fair to all."]
    run.write_jsonl(run.path / "public_set.jsonl", ({"text": t} for t in public))
    texts = round0_texts(bc, 0, 3)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert not (run.path / "adapter").exists()  # no adapter anywhere: the base model wrote them
    assert round0_texts(bc, 0, 3) == texts  # resumable file, same texts
    # A cooler final sampler (greedy here) writes its own file, and changes the row's hash;
    # leaving it unset keeps the hash of rows cached before the key existed.
    cool = BenchmarkConfig(**{**vars(bc), "synthetic_temperature": 0.0})
    assert cool.settings_hash() != bc.settings_hash()
    greedy = round0_texts(cool, 0, 3)
    assert (run.path / "synthetic_round0_T0.jsonl").exists()
    assert greedy != texts


def test_small_preset_runs_baselines_once_and_the_error_bar_rows_three_times():
    bc = load_benchmark_config("small", [])
    per_seed = [bc.grid(seed) for seed in range(bc.seeds)]
    core = [("eps0", None), ("epsinf", None), ("popri", 1.0), ("popri_round0", None)]
    assert bc.seeds == 3 and all(set(core) <= set(rows) for rows in per_seed)
    baselines = {(m, e) for m in ("pe", "dp_fedavg") for e in (1.0, 7.0)}
    assert baselines <= set(per_seed[0])
    assert not baselines & (set(per_seed[1]) | set(per_seed[2]))


def test_a_stopped_benchmark_stops_its_run_first(tmp_path):
    """SIGTERM to the benchmark: its popri-run child is stopped, not left running."""
    import os
    import signal
    import subprocess
    import sys

    fifo = tmp_path / "child_pid"
    os.mkfifo(fifo)
    # The child (a stand-in for popri-run) reports its pid, then waits on stdin for ever.
    child = f"import os, sys\nopen({str(fifo)!r}, 'w').write(str(os.getpid()))\nsys.stdin.read()\n"
    benchmark = (
        "import sys\n"
        "from popri_flwr.cli.benchmark import exit_on_sigterm\n"
        "from popri_flwr.evaluation.benchmark import run_child\n"
        "with exit_on_sigterm():\n"
        f"    run_child([sys.executable, '-c', {child!r}], {str(tmp_path / 'log')!r}, None)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", benchmark], stdin=subprocess.PIPE)
    try:
        with open(fifo) as fh:  # blocks until the child is running
            child_pid = int(fh.read())
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=120) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # stopped and reaped before the parent left
            os.kill(child_pid, 0)
    finally:
        parent.stdin.close()
        if parent.poll() is None:
            parent.kill()


def test_run_costs_add_up_the_generators_loss_change_only_when_every_round_has_one(tmp_path):
    from popri_flwr.evaluation.benchmark import run_costs
    from popri_flwr.privacy.diagnostics import FILENAME

    def write(changes):
        released = [{"round": r, "epsilon_spent": 0.4 * r, "bytes_down": 100} for r in (1, 2)]
        diag = [{"notice": "DIAGNOSTICS"}] + [
            {"round": r, "bytes_up": 10, "client_seconds": 1.0, **c}
            for r, c in zip((1, 2), changes, strict=True)
        ]
        for name, rows in (("rounds.jsonl", released), (FILENAME, diag)):
            (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in rows))

    write([{"generator_loss_change": -0.01}, {"generator_loss_change": -0.025}])
    costs = run_costs(tmp_path)
    assert costs["generator_loss_change"] == pytest.approx(-0.035)
    assert costs["epsilon_spent"] == pytest.approx(0.8)
    # A round without the measure: no total (a partial sum would understate the change).
    write([{"generator_loss_change": -0.01}, {}])
    assert math.isnan(run_costs(tmp_path)["generator_loss_change"])
    write([{}, {}])
    assert math.isnan(run_costs(tmp_path)["generator_loss_change"])
