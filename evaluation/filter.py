"""Filter: the rows EFAAR can use. Non-finite embeddings are dropped and counted, never imputed."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

log = logging.getLogger(__name__)


def drop_nonfinite(metadata: pl.DataFrame, features: np.ndarray) -> tuple[pl.DataFrame, np.ndarray, int]:
    """Rows whose embedding has any NaN/inf removed; returns (metadata, features, n_dropped).

    A diverged model produces NaN embeddings; silently averaging them would poison every
    perturbation they touch, so they are removed and the count is reported with the metrics.
    """
    finite = np.isfinite(features).all(axis=1)
    n_dropped = int((~finite).sum())
    if n_dropped == 0:
        return metadata, features, 0
    if n_dropped == len(finite):
        raise ValueError(f"all {n_dropped} embeddings contain NaN or inf values; nothing to evaluate")
    log.warning("dropped %d of %d embeddings with NaN/inf values", n_dropped, len(finite))
    return metadata.filter(pl.Series(finite)), features[finite], n_dropped


def control_mask(
    metadata: pl.DataFrame, control_column: str, control_label: str | None, perturbation_column: str
) -> np.ndarray:
    """Boolean mask of negative-control rows.

    With `control_label` the controls are the rows whose perturbation equals it (e.g.
    `EMPTY_control`); otherwise the boolean `control_column` (`is_control`) decides. Every
    alignment and null depends on controls, so having none is an error, not a silent no-op.
    """
    if control_label is not None:
        if perturbation_column not in metadata.columns:
            raise KeyError(f"perturbation column '{perturbation_column}' missing; columns are {metadata.columns}")
        mask = (metadata.get_column(perturbation_column) == control_label).to_numpy()
        if not mask.any():
            some = metadata.get_column(perturbation_column).unique().head(10).to_list()
            raise ValueError(
                f"control label '{control_label}' not found in column '{perturbation_column}' (values include {some})"
            )
        return mask
    if control_column not in metadata.columns:
        raise KeyError(
            f"control column '{control_column}' missing (columns: {metadata.columns}); "
            "set control_column or control_label"
        )
    mask = metadata.get_column(control_column).cast(pl.Boolean).fill_null(False).to_numpy()
    if not mask.any():
        raise ValueError(f"no control rows: column '{control_column}' is never true")
    return mask
