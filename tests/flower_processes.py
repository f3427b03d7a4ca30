"""Real Flower processes for tests: `flwr run`, a SuperLink and SuperNodes on loopback.

Success is judged by the run's status (`flwr ls --format json`), never by `flwr run`'s exit
code (it is 0 even if the ServerApp crashes). Every process a test starts carries the test's
own FLWR_HOME in its environment; :func:`kill_processes_of` ends exactly those.
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
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def flower_env(flwr_home: Path) -> dict[str, str]:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_status(app_dir: Path, connection: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(BIN / "flwr"), "ls", connection, "--format", "json"],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    runs = json.loads(out.stdout)["runs"]
    assert len(runs) == 1, out.stdout
    return runs[0]["status"]


def flwr_run(app_dir: Path, connection: str, run_config: str, env: dict, extra=()) -> str:
    config = ["--run-config", run_config] if run_config else []
    proc = subprocess.run(
        [str(BIN / "flwr"), "run", ".", connection, "--stream", *config, *extra],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.stdout + proc.stderr


def kill_processes_of(flwr_home: Path) -> None:
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


@contextlib.contextmanager
def deployment(tmp_path: Path, node_configs: list[str]) -> Iterator[dict[str, str]]:
    """A SuperLink and one SuperNode per node config on loopback; yields the environment.

    ``$FLWR_HOME/config.toml`` gets a connection named ``deploy``. Everything started is
    ended on exit.
    """
    home = tmp_path / "flwr_home"
    home.mkdir(exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(home)
    link = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1"]
    link += ["--port", str(port), "--database", str(tmp_path / "state.db")]
    logs = []
    try:
        logs.append(open(tmp_path / "superlink.log", "w"))  # noqa: SIM115 - lives with the process
        subprocess.Popen(link, cwd=tmp_path, env=env, start_new_session=True, stdout=logs[-1],
                         stderr=subprocess.STDOUT)  # fmt: skip
        for i, node_config in enumerate(node_configs):
            node = [str(BIN / "flower-supernode"), "--insecure", "--superlink"]
            node += [f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config", node_config]
            logs.append(open(tmp_path / f"node{i}.log", "w"))  # noqa: SIM115
            subprocess.Popen(node, cwd=tmp_path, env=env, start_new_session=True,
                             stdout=logs[-1], stderr=subprocess.STDOUT)  # fmt: skip
        yield env
    finally:
        kill_processes_of(home)
        for log in logs:
            log.close()


def flwr_run_deployed(app_dir: Path, run_config: str, env: dict[str, str]) -> str:
    """`flwr run` on the ``deploy`` connection, retried while the SuperLink starts."""
    deadline = time.monotonic() + 60
    while True:
        log = flwr_run(app_dir, "deploy", run_config, env)
        if "Successfully started run" in log or time.monotonic() > deadline:
            return log
        time.sleep(2)
