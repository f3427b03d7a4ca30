# Two commands: `make demo` (set up + run the POPri demo), `make test` (set up + run the tests).
SHELL := /bin/bash
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_DEDUP_LOGS := 0

.PHONY: setup demo test lint
setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/popri-run experiment=demo $(ARGS)

test: setup
	.venv/bin/python -m pytest -q $(ARGS)

lint: setup
	.venv/bin/ruff check popri_flwr tests && .venv/bin/ruff format --check popri_flwr tests
