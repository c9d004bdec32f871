"""CORUM cluster benchmark: are genes of one complex closer to each other than to the rest?

As efaar_benchmarking.cluster_benchmark: complexes with >= min_genes genes in the map; the
within-complex cosines (upper triangle) against complex-vs-rest cosines, two-sample KS test.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from scipy.stats import ks_2samp

from evaluation.annotations import annotations_dir, load_clusters
from evaluation.benchmarks.registry import SIGNIFICANCE, Benchmark, BenchmarkInput, register_benchmark
from evaluation.relate import cosine, l2_normalised

if TYPE_CHECKING:
    from evaluation.config import EvalConfig

MIN_CLUSTER_GENES = 10
CLUSTER_SCHEMA = {
    "cluster": pl.String,
    "n_genes": pl.Int64,
    "within_mean": pl.Float64,
    "between_mean": pl.Float64,
    "ks_stat": pl.Float64,
    "ks_pvalue": pl.Float64,
}


def cluster_benchmark(
    genes: np.ndarray, profiles: np.ndarray, clusters: dict[str, list[str]], min_genes: int = MIN_CLUSTER_GENES
) -> pl.DataFrame:
    """One row per complex with >= min_genes genes in the map (CLUSTER_SCHEMA)."""
    unit = l2_normalised(profiles)
    row_of = {g: i for i, g in enumerate(np.asarray(genes).astype(str))}
    rows = []
    for name, members in clusters.items():
        idx = np.array(sorted({row_of[g] for g in members if g in row_of}), dtype=np.int64)
        if len(idx) < min_genes:
            continue
        inside = np.zeros(len(unit), bool)
        inside[idx] = True
        sims = cosine(unit[idx], unit).astype(np.float64)
        within = sims[:, idx][np.triu_indices(len(idx), 1)]
        between = sims[:, ~inside].ravel()
        ks = ks_2samp(within, between)
        rows.append((name, len(idx), within.mean(), between.mean(), float(ks.statistic), float(ks.pvalue)))
    return pl.DataFrame(rows, schema=CLUSTER_SCHEMA, orient="row")


def _load(cfg: EvalConfig) -> dict[str, list[str]] | None:
    """The complexes of `eval.clusters`: a path, or a file name in the annotations directory; None: skip."""
    if not cfg.clusters:
        return None
    path = Path(cfg.clusters)
    return load_clusters(path if path.exists() else annotations_dir() / cfg.clusters)


def _run(given: BenchmarkInput) -> pl.DataFrame | None:
    if given.prepared is None:
        return None
    cl = cluster_benchmark(given.genes, given.profiles, given.prepared, given.cfg.cluster_min_genes)
    given.metric(
        "cluster_significant_fraction",
        float((cl["ks_pvalue"] <= SIGNIFICANCE).mean()) if len(cl) else None,
        None if len(cl) else f"no complex has >= {given.cfg.cluster_min_genes} genes in the map",
    )
    return cl


register_benchmark(Benchmark("clusters", _run, table="clusters", schema=CLUSTER_SCHEMA, prepare=_load))
