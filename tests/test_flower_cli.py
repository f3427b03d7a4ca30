"""The same app through Flower's own tooling: `flwr run .` (simulation) and a real deployment.

Both start real Flower processes on loopback and judge success by the run's status
(`flwr ls --format json`), never by `flwr run`'s exit code (it is 0 even if the ServerApp
crashes), and by the run directory the ServerApp wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

BIN = Path(sys.executable).parent
OVERRIDES = (
    "data.max_clients={n} simulation.num_supernodes={n} privacy.sample_rate={q} "
    "privacy.epsilon=50 strategy.num_prompts=2 strategy.samples_per_prompt=3 "
    "strategy.reject_rank=1 public_set.size=4 public_set.max_new_tokens=24 "
    "generation.max_new_tokens=12 dpo.per_device_batch_size=2 evaluation.max_eval_texts=40"
)


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _run_status(connection: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(BIN / "flwr"), "ls", connection, "--format", "json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    runs = json.loads(out.stdout)["runs"]
    assert len(runs) == 1, out.stdout
    return runs[0]["status"]


def _flwr_run(connection: str, run_config: str, env: dict, extra: list[str]) -> str:
    proc = subprocess.run(
        [str(BIN / "flwr"), "run", ".", connection, "--stream", "--run-config", run_config, *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.stdout + proc.stderr


def _check_run_dir(out: Path) -> None:
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]
    assert 0 < rounds[0]["epsilon_spent"] <= 50 and rounds[0]["differentially_private"]
    assert not {k for k in rounds[0] if k.startswith("clients_")}
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def _kill_processes_of(flwr_home: Path) -> None:
    """End the processes this test started (they carry its FLWR_HOME), and no others."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)


def test_flwr_run_simulation(tmp_path):
    env, out = _env(tmp_path / "flwr_home"), tmp_path / "run"
    run_config = (
        f"experiment='demo' num-server-rounds=1 output-dir='{out}' "
        f"overrides='{OVERRIDES.format(n=8, q=0.5)} diagnostics=true'"
    )
    try:
        log = _flwr_run(
            "local",
            run_config,
            env,
            ["--federation-config", "num-supernodes=8 client-resources-num-cpus=1"],
        )
        status = _run_status("local", env)
    finally:
        # `flwr run` leaves a detached local SuperLink (and its workers) behind: stop them.
        _kill_processes_of(tmp_path / "flwr_home")
    assert status == "finished:completed", log[-3000:]
    _check_run_dir(out)
    (diag,) = [json.loads(x) for x in (out / "diagnostics.jsonl").read_text().splitlines()[1:]]
    assert 1 <= diag["clients_accepted"] <= 8  # asked for: diagnostics=true


def test_deployment_superlink_and_supernodes_on_loopback(tmp_path):
    home, out, n = tmp_path / "flwr_home", tmp_path / "run", 3
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = _env(home)
    procs = [
        subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(tmp_path / "state.db"),
            ],
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=open(tmp_path / "superlink.log", "w"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        for i in range(n):
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions={n}",
                    ],
                    cwd=tmp_path,
                    env=env,
                    start_new_session=True,
                    stdout=open(tmp_path / f"node{i}.log", "w"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                )
            )
        # The strategy itself waits until all n nodes are registered before sampling.
        run_config = (
            f"experiment='demo' num-server-rounds=1 output-dir='{out}' "
            f"overrides='{OVERRIDES.format(n=n, q=1.0)}'"
        )
        deadline = time.monotonic() + 60
        while True:  # the SuperLink needs a moment to accept connections
            log = _flwr_run("deploy", run_config, env, [])
            if "Successfully started run" in log or time.monotonic() > deadline:
                break
            time.sleep(2)
        status = _run_status("deploy", env)
        assert status == "finished:completed", log[-3000:]
        _check_run_dir(out)
        # A deployment keeps no diagnostics unless asked: nothing un-noised in the run dir.
        assert not (out / "diagnostics.jsonl").exists()
    finally:
        for p in reversed(procs):
            _kill_group(p)
        _kill_processes_of(home)
