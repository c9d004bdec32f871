"""Align: remove batch effects using the negative controls, matching efaar_benchmarking (docs/evaluation.md).

Every alignment here is affine per batch, so it is computed from control *moments* (means and
covariances, D x D) and then applied with ONE matrix product per batch: the N x D data is read
twice (moments, product) instead of once per step. Statistics are float64; the final product
runs in the input dtype. Conventions follow efaar_benchmarking 1.0 / scikit-learn exactly:
StandardScaler (population std, zero std -> 1), PCA via eigen-decomposition of the control
covariance with sklearn's `svd_flip` sign rule (largest |loading| of each component positive),
CORAL with the sample covariance (ddof=1) + 0.5 I raised to the power -1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

ALIGNMENTS = ("none", "centerscale", "pca_centerscale", "tvn")
CORAL_RIDGE = 0.5


@dataclass
class _Moments:
    """Count, mean and population covariance of a set of rows."""

    n: int
    mean: np.ndarray
    cov: np.ndarray


def _moments(x: np.ndarray) -> _Moments:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    xc = x64 - mean
    return _Moments(len(x), mean, xc.T @ xc / len(x))


def _pooled(parts: list[_Moments]) -> _Moments:
    """Moments of the union of row sets, from the moments of its parts."""
    n = sum(p.n for p in parts)
    mean = sum(p.n * p.mean for p in parts) / n
    cov = sum(p.n * (p.cov + np.outer(p.mean - mean, p.mean - mean)) for p in parts) / n
    return _Moments(n, mean, cov)


def _scale(var: np.ndarray) -> np.ndarray:
    """1/std as StandardScaler does it: a zero (or numerically zero) std leaves the feature unscaled."""
    std = np.sqrt(np.maximum(var, 0.0))
    return 1.0 / np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)


def _pca_components(cov: np.ndarray, n_samples: int) -> np.ndarray:
    """Principal axes (k, D), descending variance, sklearn sign convention, k = min(n_samples, D)."""
    eigval, eigvec = np.linalg.eigh(cov)
    components = eigvec[:, ::-1].T[: min(n_samples, cov.shape[0])]
    rows = np.arange(len(components))
    signs = np.sign(components[rows, np.abs(components).argmax(axis=1)])
    return components * signs[:, None]


def _batch_slices(batches: np.ndarray | None, n: int) -> list[tuple[object, np.ndarray]]:
    """(label, row indices) per batch in order of first appearance; one batch when None.

    polars groups the labels by hashing (numpy's unique would sort 10^5 strings).
    """
    if batches is None:
        return [(None, np.arange(n))]
    grouped = (
        pl.DataFrame({"batch": pl.Series(np.asarray(batches))})
        .with_row_index("row")
        .group_by("batch", maintain_order=True)
        .agg("row")
    )
    rows = grouped.get_column("row")
    return [(label, rows[i].to_numpy().astype(np.int64)) for i, label in enumerate(grouped.get_column("batch"))]


def _control_moments(x: np.ndarray, is_control: np.ndarray, groups) -> list[_Moments]:
    moments = []
    for label, rows in groups:
        ctrl = rows[is_control[rows]]
        if len(ctrl) < 2:
            where = "" if label is None else f" in batch '{label}'"
            raise ValueError(f"alignment needs at least 2 control rows{where}, found {len(ctrl)}")
        moments.append(_moments(x[ctrl]))
    return moments


def _apply(x: np.ndarray, groups, maps: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """out[rows] = x[rows] @ A + c for each batch's (A, c)."""
    out_dtype = np.float64 if x.dtype == np.float64 else np.float32
    out = np.empty((len(x), maps[0][0].shape[1]), out_dtype)
    for (_, rows), (a, c) in zip(groups, maps):
        out[rows] = x[rows] @ a.astype(out_dtype) + c.astype(out_dtype)
    return out


def _affine_stats(m: _Moments, a: np.ndarray, c: np.ndarray) -> _Moments:
    """Moments of x @ a + c given the moments of x."""
    return _Moments(m.n, m.mean @ a + c, a.T @ m.cov @ a)


def _centerscale_map(m: _Moments) -> tuple[np.ndarray, np.ndarray]:
    s = _scale(np.diag(m.cov))
    return np.diag(s), -m.mean * s


def _compose(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]):
    (a1, c1), (a2, c2) = first, second
    return a1 @ a2, c1 @ a2 + c2


def centerscale_on_controls(x: np.ndarray, is_control: np.ndarray, batches: np.ndarray | None = None) -> np.ndarray:
    """Standardise every batch with the mean and std of its own control rows."""
    groups = _batch_slices(batches, len(x))
    maps = [_centerscale_map(m) for m in _control_moments(x, is_control, groups)]
    return _apply(x, groups, maps)


def tvn(x: np.ndarray, is_control: np.ndarray, batches: np.ndarray | None = None) -> np.ndarray:
    """Typical variation normalisation, as efaar_benchmarking.efaar.tvn_on_controls.

    centre-scale on all controls -> PCA fitted on controls -> centre-scale on controls ->
    per batch CORAL: emb_b @ (cov(ctrl_b) + 0.5 I)^(-1/2). Without batches, no CORAL step.
    """
    groups = _batch_slices(batches, len(x))
    per_batch = _control_moments(x, is_control, groups)
    pooled = _pooled(per_batch)
    step1 = _centerscale_map(pooled)
    z1 = _affine_stats(pooled, *step1)
    components = _pca_components(z1.cov, pooled.n)
    step2 = (components.T, -z1.mean @ components.T)
    z2 = _affine_stats(z1, *step2)
    global_map = _compose(_compose(step1, step2), _centerscale_map(z2))
    if batches is None:
        return _apply(x, groups, [global_map])
    maps = []
    for m in per_batch:
        zb = _affine_stats(m, *global_map)
        eigval, eigvec = np.linalg.eigh(zb.cov * m.n / (m.n - 1) + CORAL_RIDGE * np.eye(len(zb.cov)))
        whiten = (eigvec / np.sqrt(eigval)) @ eigvec.T
        maps.append(_compose(global_map, (whiten, np.zeros(len(whiten)))))
    return _apply(x, groups, maps)


def pca_centerscale(x: np.ndarray, is_control: np.ndarray, batches: np.ndarray | None = None) -> np.ndarray:
    """PCA then centre-scale on controls per batch (the other alignment common in the literature).

    The PCA (all components, so no information is dropped) is fitted on ALL rows after a global
    standardisation, so that the axes describe the whole screen rather than only the controls.
    """
    groups = _batch_slices(batches, len(x))
    everything = _pooled([_moments(x[rows]) for _, rows in groups])
    step1 = _centerscale_map(everything)
    z1 = _affine_stats(everything, *step1)
    components = _pca_components(z1.cov, everything.n)
    global_map = _compose(step1, (components.T, -z1.mean @ components.T))
    maps = [
        _compose(global_map, _centerscale_map(_affine_stats(m, *global_map)))
        for m in _control_moments(x, is_control, groups)
    ]
    return _apply(x, groups, maps)


def align(method: str, x: np.ndarray, is_control: np.ndarray, batches: np.ndarray | None = None) -> np.ndarray:
    """Dispatch on the alignment name (one of ALIGNMENTS)."""
    if method == "none":
        return x
    if method == "centerscale":
        return centerscale_on_controls(x, is_control, batches)
    if method == "pca_centerscale":
        return pca_centerscale(x, is_control, batches)
    if method == "tvn":
        return tvn(x, is_control, batches)
    raise ValueError(f"unknown alignment '{method}'; allowed: {', '.join(ALIGNMENTS)}")
