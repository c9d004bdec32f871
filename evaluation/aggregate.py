"""Aggregate: one profile per perturbation (mean or median of its wells), controls removed."""

from __future__ import annotations

import numpy as np
import polars as pl

AGGREGATIONS = ("mean", "median")


def group_rows(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted unique labels, row order grouping equal labels, start offset of each group + end)."""
    uniq, codes = np.unique(labels, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniq) + 1))
    return uniq, order, bounds


def aggregate(
    perturbations: np.ndarray, features: np.ndarray, is_control: np.ndarray, method: str = "mean"
) -> tuple[pl.DataFrame, np.ndarray]:
    """Per-perturbation profiles, sorted by perturbation name (as efaar's pandas groupby).

    Returns (frame with `perturbation` and `n_wells`, (P, D) float32 matrix). Controls are removed
    because the map relates perturbations to each other, and controls are the reference, not a gene.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{method}'; allowed: {', '.join(AGGREGATIONS)}")
    keep = ~is_control
    labels, feats = np.asarray(perturbations)[keep], features[keep]
    if len(labels) == 0:
        raise ValueError("no non-control rows to aggregate")
    uniq, order, bounds = group_rows(labels)
    sizes = np.diff(bounds)
    if method == "mean":
        sums = np.add.reduceat(feats[order].astype(np.float64), bounds[:-1], axis=0)
        profiles = (sums / sizes[:, None]).astype(np.float32)
    else:
        ordered = feats[order]
        profiles = np.stack([np.median(ordered[a:b], axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
        profiles = profiles.astype(np.float32)
    frame = pl.DataFrame({"perturbation": uniq.astype(str), "n_wells": sizes.astype(np.int64)})
    return frame, profiles
