"""The package's own app through Flower's tooling: `flwr run .` and a real deployment.

Both start real Flower processes on loopback (tests/flower_processes.py) and judge success by
the run's status and by the run directory the ServerApp wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO
from flower_processes import (
    deployment,
    flower_env,
    flwr_run,
    flwr_run_deployed,
    kill_processes_of,
    run_status,
)

OVERRIDES = (
    "data.max_clients={n} simulation.num_supernodes={n} privacy.sample_rate={q} "
    "privacy.epsilon=50 strategy.num_prompts=2 strategy.samples_per_prompt=3 "
    "strategy.reject_rank=1 public_set.size=4 public_set.max_new_tokens=24 "
    "generation.max_new_tokens=12 dpo.per_device_batch_size=2 evaluation.max_eval_texts=40"
)


def _check_run_dir(out: Path) -> None:
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]
    assert 0 < rounds[0]["epsilon_spent"] <= 50 and rounds[0]["differentially_private"]
    assert not {k for k in rounds[0] if k.startswith("clients_")}
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_flwr_run_simulation(tmp_path):
    env, out = flower_env(tmp_path / "flwr_home"), tmp_path / "run"
    run_config = (
        f"experiment='demo' num-server-rounds=1 output-dir='{out}' "
        f"overrides='{OVERRIDES.format(n=4, q=1.0)} diagnostics=true'"
    )
    try:
        federation = ["--federation-config", "num-supernodes=4 client-resources-num-cpus=1"]
        log = flwr_run(REPO, "local", run_config, env, federation)
        status = run_status(REPO, "local", env)
    finally:
        # `flwr run` leaves a detached local SuperLink (and its workers) behind: stop them.
        kill_processes_of(tmp_path / "flwr_home")
    assert status == "finished:completed", log[-3000:]
    _check_run_dir(out)
    (diag,) = [json.loads(x) for x in (out / "diagnostics.jsonl").read_text().splitlines()[1:]]
    # Asked for: diagnostics=true. q = 1, so every client replies (at q < 1 a round may
    # sample no one: 8 clients at q = 0.5 did, once in 256 runs, and the test flaked).
    assert diag["clients_sampled"] == diag["clients_accepted"] == 4


def test_deployment_superlink_and_supernodes_on_loopback(tmp_path):
    out, n = tmp_path / "run", 2
    nodes = [f"partition-id={i} num-partitions={n}" for i in range(n)]
    with deployment(tmp_path, nodes) as env:
        # The strategy itself waits until all n nodes are registered before sampling.
        run_config = (
            f"experiment='demo' num-server-rounds=1 output-dir='{out}' "
            f"overrides='{OVERRIDES.format(n=n, q=1.0)}'"
        )
        log = flwr_run_deployed(REPO, run_config, env)
        status = run_status(REPO, "deploy", env)
    assert status == "finished:completed", log[-3000:]
    _check_run_dir(out)
    # A deployment keeps no diagnostics unless asked: nothing un-noised in the run dir.
    assert not (out / "diagnostics.jsonl").exists()


def test_two_supernodes_serving_one_client_are_refused(tmp_path):
    out = tmp_path / "run"
    nodes = ["partition-id=0 num-partitions=2", "partition-id=0 num-partitions=2"]
    with deployment(tmp_path, nodes) as env:
        run_config = (
            f"experiment='demo' num-server-rounds=1 output-dir='{out}' "
            f"overrides='{OVERRIDES.format(n=2, q=1.0)}'"
        )
        log = flwr_run_deployed(REPO, run_config, env)
        status = run_status(REPO, "deploy", env)
    assert status.startswith("finished:failed"), status
    assert "both serve client 'partition-0'" in log, log[-3000:]
    assert not (out / "rounds.jsonl").exists() and not (out / "state.json").exists()
