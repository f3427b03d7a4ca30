"""Shared test set-up: offline, quiet Flower, and one model cache for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

# Set before anything imports flwr / transformers.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The dequantized SmolLM2 copy is shared by all tests (first build ~30 s).
os.environ.setdefault("POPRI_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "models"))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
