"""POPri on an existing multi-node Ray cluster (``+simulation.init_args.address=HOST:PORT``).

A real cluster on this machine, joined over TCP as separate machines would be: a head node
with no CPUs, so that nothing but drivers can use it, and a worker node with 2 CPUs. A tiny
``popri-run`` connects to the head; the server side (generation, DPO) runs in that driver
process, and every client actor must be placed on the worker node. Afterwards the cluster's
actor table says where the actors ran, and the cluster is still up: the run's ``ray.shutdown``
only disconnected.

Only processes this module started are stopped (their process groups), never ``ray stop``,
which would kill every Ray instance on the machine. The cluster keeps its files in its own
temporary directory, so a plain ``ray.init()`` elsewhere never finds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tiny_run import TINY

from popri_flwr.hydra_config import load_config
from popri_flwr.simulation import backend_config

REPO = Path(__file__).resolve().parents[1]
WORKER_CPUS = 2


# --- ray.init arguments -------------------------------------------------------------------


def test_a_local_run_starts_its_own_ray_with_every_cpu(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init = backend_config(load_config(["experiment=demo"]))["init_args"]
    # "local": a new instance even where `ray start` left a cluster running.
    assert init["address"] == "local" and init["num_cpus"] == (os.cpu_count() or 1)
    assert init["include_dashboard"] is False


@pytest.mark.parametrize("address", ["10.0.0.1:6379", "auto", "ray://10.0.0.1:10001"])
def test_a_cluster_address_sends_no_resources(monkeypatch, address):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(["experiment=demo", f"+simulation.init_args.address={address}"])
    init = backend_config(cfg)["init_args"]
    # Ray refuses num_cpus / num_gpus when it connects: the nodes declared their own.
    assert init["address"] == address and not {"num_cpus", "num_gpus"} & set(init)


def test_ray_address_in_the_environment_joins_that_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    init = backend_config(load_config(["experiment=demo"]))["init_args"]
    assert "address" not in init and "num_cpus" not in init  # ray.init reads $RAY_ADDRESS


def test_init_args_written_by_the_user_win(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(["experiment=demo", "+simulation.init_args.num_cpus=1"])
    assert backend_config(cfg)["init_args"]["num_cpus"] == 1


# --- a real two-node cluster ----------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # multi-node is opt-in on macOS
    return env


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _ray_start(args: list[str], log: Path, groups: list[int]) -> None:
    """``ray start ARGS`` in a new session; its daemons stay in process group ``pid``."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )
    groups.append(proc.pid)
    if proc.wait(timeout=120) != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{_tail(log)}")


def _stop(groups: list[int]) -> None:
    """SIGTERM the process groups, SIGKILL what is left after 3 s (gcs_server, raylet)."""
    import psutil

    def members() -> list[psutil.Process]:
        procs = []
        for proc in psutil.process_iter(["status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) in groups:
                    procs.append(proc)
            except (OSError, psutil.Error):
                continue
        return procs

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        _, alive = psutil.wait_procs(members(), timeout=3)
        if not alive:
            return


def _cluster_state(address: str, wait_for_nodes: int = 0, timeout: float = 60) -> dict:
    """Nodes and actors of the cluster, read by a separate short-lived driver."""
    proc = subprocess.run(
        [sys.executable, __file__, address, str(wait_for_nodes), str(timeout)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=timeout + 60,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster():
    """``HOST:PORT`` of a head node (0 CPUs) with one worker node (2 CPUs) joined."""
    # Short: Ray's unix sockets live under it (path limit ~107 characters).
    temp = Path(tempfile.mkdtemp(prefix="popri-ray-"))
    gcs, client, dashboard, head_agent, worker_agent = _free_ports(5)
    address = f"127.0.0.1:{gcs}"
    # Two nodes on one host: every fixed default port (10001, 8265, 52365) is set apart, the
    # rest are chosen by the OS (worker ports 0..0: any free port).
    common = [
        "--num-gpus=0",
        "--object-store-memory=200000000",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    groups: list[int] = []
    try:
        head = [
            "--head",
            f"--port={gcs}",
            "--num-cpus=0",  # no client actor fits on the head
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            f"--ray-client-server-port={client}",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={head_agent}",
        ]
        _ray_start(head + common, temp / "head.log", groups)
        worker = [
            f"--address={address}",
            f"--num-cpus={WORKER_CPUS}",
            f"--dashboard-agent-listen-port={worker_agent}",
            "--include-log-monitor=false",  # one per host is enough (the head's)
        ]
        _ray_start(worker + common, temp / "worker.log", groups)
        state = _cluster_state(address, wait_for_nodes=2)
        assert len(state["nodes"]) == 2, state
        yield address, temp
    finally:
        _stop(groups)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_run_joins_the_cluster_and_its_clients_run_on_the_worker_node(cluster):
    address, temp = cluster
    run_dir = temp / "run"
    log = temp / "popri-run.log"
    overrides = [*TINY, "rounds=1", f"run_dir={run_dir}"]
    with log.open("w") as out:  # the documented command line, exactly
        proc = subprocess.run(
            [sys.executable, "-m", "popri_flwr.cli.run", *overrides]
            + [f"+simulation.init_args.address={address}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=REPO,
            timeout=600,
        )
    assert proc.returncode == 0, _tail(log, 80)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["pairs"] >= 1

    state = _cluster_state(address)
    # Still two live nodes: the run's ray.shutdown() disconnected, it stopped nothing.
    assert len(state["nodes"]) == 2, state
    (head,) = [n for n in state["nodes"] if n["head"]]
    (worker,) = [n for n in state["nodes"] if not n["head"]]
    assert head["cpus"] == 0 and worker["cpus"] == WORKER_CPUS
    clients = [a for a in state["actors"] if a["class"] == "ClientAppActor"]
    # Flower sized its pool from the cluster: (0 + 2 CPUs) / client_num_cpus 1 = 2 actors.
    assert len(clients) == WORKER_CPUS
    assert {a["node"] for a in clients} == {worker["id"]}


def _print_cluster_state(address: str, wait_for_nodes: int, timeout: float) -> None:
    """Driver of :func:`_cluster_state`: one JSON line with live nodes and all actors."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            if len(nodes) >= wait_for_nodes or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # The actor table keeps finished actors (Flower terminates its pool at the end).
        actors = ray._private.state.actors()  # no public API without the full dashboard
        print(
            json.dumps(
                {
                    "nodes": [
                        {
                            "id": n["NodeID"],
                            "head": "node:__internal_head__" in n["Resources"],
                            "cpus": n["Resources"].get("CPU", 0),
                        }
                        for n in nodes
                    ],
                    "actors": [
                        {"class": a["ActorClassName"], "node": a["Address"]["NodeID"]}
                        for a in actors.values()
                    ],
                }
            )
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    _print_cluster_state(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
