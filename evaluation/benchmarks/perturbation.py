"""Perturbation consistency (replicate cosine) and magnitude (energy distance), with control nulls.

efaar_benchmarking draws its null from negative-control *perturbations* (e.g. unexpressed genes).
Imaging screens usually have one control label (EMPTY_control, non-targeting), so the null here
is the same statistic on random sets of control wells of the same size as the perturbation's
replicate set: every perturbation is compared with controls that had the same number of chances.
The statistics themselves are efaar's: mean pairwise cosine between replicates (p = 1 -
searchsorted_left(null, x)/len), and 2 x geomloss' energy loss = the V-statistic energy distance
2E|X-Y| - E|X-X'| - E|Y-Y'| (p = 1 - searchsorted_right(null, x)/len).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from scipy.spatial.distance import cdist

from evaluation.aggregate import group_rows
from evaluation.benchmarks.registry import SIGNIFICANCE, Benchmark, BenchmarkInput, register_benchmark
from evaluation.relate import l2_normalised

MIN_CONSISTENCY_REPLICATES = 2
MIN_MAGNITUDE_REPLICATES = 5  # efaar's pert_signal_magnitude_metric returns NaN below 5


def mean_pairwise_cosine(unit: np.ndarray) -> float:
    """Mean cosine over distinct pairs of unit rows: (|sum u|^2 - n) / (n(n-1)), O(nD) not O(n^2 D)."""
    n = len(unit)
    total = unit.astype(np.float64).sum(axis=0)
    return float((total @ total - (unit.astype(np.float64) ** 2).sum()) / (n * (n - 1)))


def _mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance; squared distances clamped at 1e-8 exactly as geomloss does."""
    return float(np.sqrt(np.maximum(cdist(a, b, "sqeuclidean"), 1e-8)).mean())


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """2E|X-Y| - E|X-X'| - E|Y-Y'| with self-pairs included (geomloss SamplesLoss('energy') x 2)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 2 * _mean_distance(a, b) - _mean_distance(a, a) - _mean_distance(b, b)


def _control_sets(n_controls: int, size: int, n_null: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.choice(n_controls, size, replace=False) for _ in range(n_null)]


@dataclass(frozen=True)
class _Statistic:
    """A per-perturbation statistic tested against a control null: its output column, the fewest
    replicates it is defined for, and the searchsorted side of its efaar original's p-value."""

    column: str
    min_replicates: int
    side: Literal["left", "right"]
    of: Callable[[np.ndarray], float]


def _against_control_null(
    statistic: _Statistic,
    perturbations: np.ndarray,
    treated: np.ndarray,
    null_pool: np.ndarray,
    n_null: int,
    rng: np.random.Generator,
) -> pl.DataFrame:
    """Per treated perturbation: its replicate count, `statistic.of(its rows)` and a p-value.

    The null for n replicates is the sorted statistic on `n_null` random sets of n rows of
    `null_pool` (the control wells; none when there are fewer than n); it is drawn once per
    replicate count, in order of first use, so every perturbation with n replicates is compared
    with the same null. p = 1 - searchsorted_side(null, x)/len (module docstring).
    """

    def null_of(n: int) -> np.ndarray | None:
        if n > len(null_pool):
            return None
        return np.sort([statistic.of(null_pool[s]) for s in _control_sets(len(null_pool), n, n_null, rng)])

    uniq, order, bounds = group_rows(perturbations)
    treated = treated[order]
    nulls: dict[int, np.ndarray | None] = {}
    rows = []
    for name, a, b in zip(uniq, bounds[:-1], bounds[1:]):
        n = int(b - a)
        if n < statistic.min_replicates:
            rows.append((str(name), n, None, None))
            continue
        if n not in nulls:
            nulls[n] = null_of(n)
        stat = statistic.of(treated[a:b])
        null = nulls[n]
        p = None if null is None else float(1 - np.searchsorted(null, stat, side=statistic.side) / len(null))
        rows.append((str(name), n, stat, p))
    return pl.DataFrame(
        rows,
        schema={"perturbation": pl.String, "n_wells": pl.Int64, statistic.column: pl.Float64, "p_value": pl.Float64},
        orient="row",
    )


def consistency(
    perturbations: np.ndarray, features: np.ndarray, is_control: np.ndarray, n_null: int = 1000, seed: int = 0
) -> pl.DataFrame:
    """Per perturbation: `consistency` (mean replicate cosine) and `p_value` against the control null."""
    unit = l2_normalised(features)
    names = np.asarray(perturbations)[~is_control]
    statistic = _Statistic("consistency", MIN_CONSISTENCY_REPLICATES, "left", mean_pairwise_cosine)
    rng = np.random.default_rng(seed)
    return _against_control_null(statistic, names, unit[~is_control], unit[is_control], n_null, rng)


def magnitude(
    perturbations: np.ndarray,
    features: np.ndarray,
    is_control: np.ndarray,
    max_controls: int = 1000,
    n_null: int = 200,
    seed: int = 0,
) -> pl.DataFrame:
    """Per perturbation: `energy_distance` to <= max_controls control wells and its `p_value`.

    Null sets are drawn from the controls left out of the reference sample when there are enough,
    so a null set is not compared with itself.
    """
    rng = np.random.default_rng(seed)
    features = np.asarray(features, np.float64)
    controls = features[is_control]
    pick = rng.permutation(len(controls))
    reference = controls[pick[:max_controls]]
    pool = controls[pick[max_controls:]] if len(controls) - max_controls >= 2 * MIN_MAGNITUDE_REPLICATES else controls

    reference_spread = _mean_distance(reference, reference)  # E|Y-Y'|: the same for every set compared

    def to_reference(rows: np.ndarray) -> float:  # energy_distance(rows, reference)
        return 2 * _mean_distance(rows, reference) - _mean_distance(rows, rows) - reference_spread

    names = np.asarray(perturbations)[~is_control]
    statistic = _Statistic("energy_distance", MIN_MAGNITUDE_REPLICATES, "right", to_reference)
    return _against_control_null(statistic, names, features[~is_control], pool, n_null, rng)


def share_significant(p_values: pl.Series) -> tuple[float | None, str | None]:
    """Fraction of perturbations with p <= SIGNIFICANCE, or None and why."""
    valid = p_values.drop_nulls()
    if len(valid) == 0:
        return None, "no perturbation had enough replicates and a control null"
    return float((valid <= SIGNIFICANCE).mean()), None


def _consistency(given: BenchmarkInput) -> pl.DataFrame:
    c = consistency(given.labels, given.features, given.is_control, given.cfg.n_null, given.cfg.seed)
    given.metric("consistency", *share_significant(c["p_value"]))
    given.metric("consistency_mean_cosine", c["consistency"].mean())
    return c.rename({"p_value": "consistency_p"})


def _magnitude(given: BenchmarkInput) -> pl.DataFrame:
    m = magnitude(
        given.labels, given.features, given.is_control, n_null=max(given.cfg.n_null // 5, 20), seed=given.cfg.seed
    )
    given.metric("magnitude", *share_significant(m["p_value"]))
    return m.rename({"p_value": "magnitude_p"})


register_benchmark(Benchmark("consistency", _consistency, table="perturbations"))
register_benchmark(Benchmark("magnitude", _magnitude, table="perturbations"))
