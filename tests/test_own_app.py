"""The README's "use it in your own Flower app" snippets, run as a user would run them.

The two code blocks marked ``<!-- snippet: FILE -->`` in README.md are written, unchanged, into
a fresh Flower app (with its own pyproject.toml and one data file per client), which is then
run with `flwr run` on the simulation engine and on a SuperLink whose SuperNodes each read
their own file (`--node-config "data-path='...'"`). Judged by the run's status and run directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO
from flower_processes import (
    deployment,
    flower_env,
    flwr_run,
    flwr_run_deployed,
    kill_processes_of,
    run_status,
)

from popri_flwr.data import load_sotu

N = 3
PYPROJECT = """\
[project]
name = "my-popri-app"
version = "1.0.0"
dependencies = ["popri-flwr"]

[tool.flwr.app]
publisher = "me"

[tool.flwr.app.components]
serverapp = "server_app:app"
clientapp = "client_app:app"

[tool.flwr.app.config]
num-server-rounds = 1
num-clients = {n}
run-dir = "{run_dir}"
data-dir = "{data_dir}"
epsilon = 50.0
sample-rate = 1.0
num-prompts = 2
max-new-tokens = 12
description = "a paragraph from a US presidential State of the Union address"
"""


def readme_snippets() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    found = re.findall(r"<!-- snippet: (\S+) -->\n```python\n(.*?)```", text, flags=re.S)
    return dict(found)


@pytest.fixture
def app_dir(tmp_path) -> Path:
    app = tmp_path / "app"
    data = tmp_path / "data"
    app.mkdir()
    data.mkdir()
    snippets = readme_snippets()
    assert set(snippets) == {"server_app.py", "client_app.py"}
    for name, code in snippets.items():
        (app / name).write_text(code)
    fed = load_sotu(client_key="fileid", max_clients=N, max_texts_per_client=4, seed=0)
    for i, client in enumerate(fed.client_ids):
        (data / f"client_{i}.txt").write_text("\n\n".join(fed.train_texts(client)))
    (app / "pyproject.toml").write_text(
        PYPROJECT.format(n=N, run_dir=tmp_path / "run", data_dir=data)
    )
    return app


def _check(run: Path) -> None:
    rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["differentially_private"]
    assert rounds[0]["pairs"] >= 1 and rounds[0]["dpo_steps"] >= 1
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert not (run / "diagnostics.jsonl").exists()  # off by default outside popri-run


def test_own_app_on_the_simulation_engine(app_dir, tmp_path):
    home = tmp_path / "flwr_home"
    env = flower_env(home)
    try:
        federation = ["--federation-config", f"num-supernodes={N} client-resources-num-cpus=1"]
        log = flwr_run(app_dir, "local", "", env, federation)
        status = run_status(app_dir, "local", env)
    finally:
        kill_processes_of(home)
    assert status == "finished:completed", log[-3000:]
    _check(tmp_path / "run")


def test_own_app_with_supernodes_reading_their_own_files(app_dir, tmp_path):
    data = tmp_path / "data"
    nodes = [f"data-path='{data / f'client_{i}.txt'}'" for i in range(N)]  # TOML: quoted
    with deployment(tmp_path, nodes) as env:
        log = flwr_run_deployed(app_dir, "", env)
        status = run_status(app_dir, "deploy", env)
    assert status == "finished:completed", log[-3000:]
    _check(tmp_path / "run")
