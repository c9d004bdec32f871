"""Embeddings on disk: one parquet layout shared by `phenoscale embed`, the callback and the CLI.

Layout (docs/ARCHITECTURE.md): metadata columns (`experiment, plate, well, perturbation,
is_control, ...`) plus one column `embedding` of dtype `pl.Array(pl.Float32, D)`. A fixed-width
array column (not a list) lets polars hand the values to numpy as one contiguous (N, D) buffer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from datamodules.atomic import atomic_write

EMBEDDING_COLUMN = "embedding"


def embeddings_frame(metadata: pl.DataFrame, features: np.ndarray) -> pl.DataFrame:
    """Attach an (N, D) matrix to N metadata rows as the `embedding` Array(Float32, D) column."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != metadata.height:
        raise ValueError(f"features must be (N, D) with N = {metadata.height} metadata rows, got {features.shape}")
    column = pl.Series(EMBEDDING_COLUMN, features, dtype=pl.Array(pl.Float32, features.shape[1]))
    return metadata.drop(EMBEDDING_COLUMN, strict=False).with_columns(column)


def embedding_dim(df: pl.DataFrame | pl.LazyFrame) -> int:
    """D of the `embedding` column; raises a clear error when the column is missing or not an Array."""
    schema = df.collect_schema() if isinstance(df, pl.LazyFrame) else df.schema
    if EMBEDDING_COLUMN not in schema:
        raise KeyError(f"no '{EMBEDDING_COLUMN}' column; columns are {list(schema.names())}")
    dtype = schema[EMBEDDING_COLUMN]
    if not isinstance(dtype, pl.Array):
        raise TypeError(f"'{EMBEDDING_COLUMN}' must be pl.Array(pl.Float32, D), got {dtype}")
    return dtype.size


def embedding_matrix(df: pl.DataFrame) -> np.ndarray:
    """The (N, D) float32 matrix of `embedding`, a zero-copy view when the column is one chunk."""
    dim = embedding_dim(df)
    values = df.get_column(EMBEDDING_COLUMN).cast(pl.Array(pl.Float32, dim)).rechunk()
    if values.null_count():
        raise ValueError(f"{values.null_count()} rows have a null '{EMBEDDING_COLUMN}'")
    return values.to_numpy().reshape(-1, dim)


def write_embeddings(df: pl.DataFrame, path: str | Path) -> Path:
    """Write atomically (temp file in the same directory, then rename): readers never see half a file."""
    embedding_dim(df)
    return atomic_write(path, df.write_parquet)


def read_embeddings(path: str | Path) -> pl.LazyFrame:
    """Lazy scan, so that callers select columns/rows before anything is read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embeddings file not found: {path}")
    lazy = pl.scan_parquet(path)
    embedding_dim(lazy)
    return lazy
