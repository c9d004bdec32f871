"""evaluation: embeddings -> biology (EFAAR: Embed, Filter, Align, Aggregate, Relate) and benchmarks.

Knows nothing of lightning_modules beyond a model's `embed(images, pooling=..., block=...)`.
"""

from __future__ import annotations

from typing import Any

from evaluation.config import EvalConfig
from evaluation.embeddings_io import embedding_matrix, embeddings_frame, read_embeddings, write_embeddings
from evaluation.pipeline import EvalResult, run_efaar

__all__ = [
    "EFAARCallback",
    "EvalConfig",
    "EvalResult",
    "embedding_matrix",
    "embeddings_frame",
    "read_embeddings",
    "run_efaar",
    "write_embeddings",
]


def __getattr__(name: str) -> Any:
    """EFAARCallback imports Lightning; load it only when asked for, keeping `import evaluation` light."""
    if name == "EFAARCallback":
        from evaluation.callback import EFAARCallback

        return EFAARCallback
    raise AttributeError(f"module 'evaluation' has no attribute '{name}'")
