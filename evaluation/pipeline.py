"""run_efaar: Filter -> Align -> Aggregate -> Relate -> benchmarks, for the callback, CLI and demo.

Every benchmark that cannot be computed on the given data (too few genes, no annotated pair in
the map, no replicates, a single experiment) is reported with value None and a reason, never
as 0, so a broken evaluation cannot pass for a bad model.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl

from evaluation.aggregate import aggregate
from evaluation.align import align
from evaluation.annotations import annotations_dir, load_clusters, load_sources, pairs_in_map
from evaluation.benchmarks.clusters import CLUSTER_SCHEMA, cluster_benchmark
from evaluation.benchmarks.generalisation import GENERALISATION_SCHEMA, batch_generalisation
from evaluation.benchmarks.oracle import oracle_recall, truth_relationships
from evaluation.benchmarks.perturbation import consistency, magnitude
from evaluation.benchmarks.recall import RECALL_SCHEMA, known_relationship_recall
from evaluation.benchmarks.retrieval import average_precision, mean_average_precision
from evaluation.config import EvalConfig
from evaluation.embeddings_io import EMBEDDING_COLUMN, embedding_matrix
from evaluation.filter import control_mask, drop_nonfinite

log = logging.getLogger(__name__)
SIGNIFICANCE = 0.05
METRIC_SCHEMA = {"alignment": pl.String, "benchmark": pl.String, "metric": pl.String,
                 "value": pl.Float64, "reason": pl.String}


@dataclass
class EvalResult:
    """Everything one evaluation produced, as polars frames (long format, `alignment` column)."""

    metrics: pl.DataFrame  # METRIC_SCHEMA: one scalar per (alignment, metric), value None + reason if not computable
    recall: pl.DataFrame
    perturbations: pl.DataFrame  # per perturbation: consistency, energy distance, p-values
    clusters: pl.DataFrame
    retrieval: pl.DataFrame
    generalisation: pl.DataFrame
    oracle: Optional[pl.DataFrame]
    n_dropped: int
    primary_alignment: str
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # alignment -> (genes, profiles)

    def summary(self) -> dict[str, Optional[float]]:
        """Flat metric names -> values: the primary alignment unprefixed, others as `<alignment>/<metric>`."""
        out = {}
        for row in self.metrics.iter_rows(named=True):
            prefix = "" if row["alignment"] in (self.primary_alignment, None) else f"{row['alignment']}/"
            out[prefix + row["metric"]] = row["value"]
        return out


def _metric(rows: list, alignment: Optional[str], benchmark: str, metric: str,
            value: Optional[float], reason: Optional[str] = None) -> None:
    if value is None and reason is None:
        reason = "not computable"
    rows.append((alignment, benchmark, metric, None if value is None else float(value), reason))


def _share_significant(p_values: pl.Series) -> tuple[Optional[float], Optional[str]]:
    valid = p_values.drop_nulls()
    if len(valid) == 0:
        return None, "no perturbation had enough replicates and a control null"
    return float((valid <= SIGNIFICANCE).mean()), None


def _attempt(rows: list, alignment: str, benchmark: str, fn: Callable[[], pl.DataFrame]) -> Optional[pl.DataFrame]:
    """Run a benchmark; a data problem (ValueError) becomes a None metric with its reason."""
    try:
        return fn()
    except ValueError as err:
        log.warning("%s (%s) not computed: %s", benchmark, alignment, err)
        _metric(rows, alignment, benchmark, benchmark, None, str(err))
        return None


def _recall_metrics(rows: list, alignment: Optional[str], recall: pl.DataFrame, prefix: str = "") -> None:
    first = recall.filter(pl.col("threshold_low") == recall["threshold_low"].min()) if len(recall) else recall
    for r in first.iter_rows(named=True):
        _metric(rows, alignment, "recall", f"{prefix}recall_{r['source']}", r["recall"], r["reason"])
    valid = first["recall"].drop_nulls() if len(first) else pl.Series([], dtype=pl.Float64)
    _metric(rows, alignment, "recall", f"{prefix}recall_mean", valid.mean() if len(valid) else None,
            None if len(valid) else "no annotation source could be scored")


def run_efaar(embeddings: pl.DataFrame | pl.LazyFrame, cfg: EvalConfig) -> EvalResult:
    """Evaluate one embeddings frame (layout of evaluation.embeddings_io) under every alignment in cfg."""
    frame = embeddings.collect() if isinstance(embeddings, pl.LazyFrame) else embeddings
    features = embedding_matrix(frame)
    metadata = frame.drop(EMBEDDING_COLUMN)
    metadata, features, n_dropped = drop_nonfinite(metadata, features)
    is_control = control_mask(metadata, cfg.control_column, cfg.control_label, cfg.perturbation_column)
    for column in filter(None, [cfg.perturbation_column, cfg.batch_column]):
        if column not in metadata.columns:
            raise KeyError(f"column '{column}' missing from embeddings; columns are {metadata.columns}")
    labels = metadata.get_column(cfg.perturbation_column).cast(pl.String).to_numpy()
    batches = metadata.get_column(cfg.batch_column).to_numpy() if cfg.batch_column else None
    wanted = set(cfg.benchmarks)
    sources = load_sources(cfg.annotations) if "recall" in wanted else {}
    clusters = _load_clusters(cfg.clusters) if "clusters" in wanted and cfg.clusters else None
    thresholds = [tuple(t) for t in cfg.thresholds]

    rows: list = []
    _metric(rows, None, "filter", "n_dropped_nonfinite", n_dropped)
    recall, per_pert, cluster_frames, retrieval, maps = [], [], [], [], {}
    for method in cfg.alignment:
        aligned = align(method, features, is_control, batches)
        if "consistency" in wanted:
            c = consistency(labels, aligned, is_control, cfg.n_null, cfg.seed)
            _metric(rows, method, "consistency", "consistency", *_share_significant(c["p_value"]))
            _metric(rows, method, "consistency", "consistency_mean_cosine", c["consistency"].mean())
            per_pert.append(c.rename({"p_value": "consistency_p"}).with_columns(alignment=pl.lit(method)))
        if "magnitude" in wanted:
            m = magnitude(labels, aligned, is_control, n_null=max(cfg.n_null // 5, 20), seed=cfg.seed)
            _metric(rows, method, "magnitude", "magnitude", *_share_significant(m["p_value"]))
            per_pert.append(m.rename({"p_value": "magnitude_p"}).with_columns(alignment=pl.lit(method)))
        if "map" in wanted:
            ap = _attempt(rows, method, "map", lambda: average_precision(labels, aligned, reference=is_control))
            if ap is not None:
                scores = mean_average_precision(ap, cfg.map_null_size, cfg.seed)
                mean = scores["mean_average_precision"].mean() if len(scores) else None
                _metric(rows, method, "map", "map_mean", mean,
                        None if len(scores) else "no perturbation has two replicates")
                _metric(rows, method, "map", "map_significant_fraction",
                        *_share_significant(scores["p_value"]) if len(scores) else (None, "no scores"))
                retrieval.append(scores.with_columns(alignment=pl.lit(method)))
        genes_frame, profiles = aggregate(labels, aligned, is_control, cfg.aggregation)
        genes = genes_frame["perturbation"].to_numpy()
        maps[method] = (genes, profiles)
        if sources:
            pairs = {name: pairs_in_map(rels, genes) for name, rels in sources.items()}
            r = known_relationship_recall(genes, profiles, pairs, thresholds, cfg.min_genes)
            _recall_metrics(rows, method, r)
            recall.append(r.with_columns(alignment=pl.lit(method)))
        if clusters is not None:
            cl = cluster_benchmark(genes, profiles, clusters, cfg.cluster_min_genes)
            _metric(rows, method, "clusters", "cluster_significant_fraction",
                    float((cl["ks_pvalue"] <= SIGNIFICANCE).mean()) if len(cl) else None,
                    None if len(cl) else f"no complex has >= {cfg.cluster_min_genes} genes in the map")
            cluster_frames.append(cl.with_columns(alignment=pl.lit(method)))

    generalisation = pl.DataFrame(schema=GENERALISATION_SCHEMA)
    if "generalisation" in wanted:
        generalisation = _generalisation(rows, metadata, cfg, labels, features, is_control, batches)
    oracle = None
    if cfg.truth_dir:
        truth = {"truth": truth_relationships(cfg.truth_dir), **sources}
        oracle = oracle_recall(cfg.truth_dir, truth, thresholds, cfg.min_genes)
        _recall_metrics(rows, None, oracle, prefix="oracle_")
    return EvalResult(
        metrics=pl.DataFrame(rows, schema=METRIC_SCHEMA, orient="row"),
        recall=_concat(recall, {**RECALL_SCHEMA, "alignment": pl.String}),
        perturbations=_concat(per_pert, None),
        clusters=_concat(cluster_frames, {**CLUSTER_SCHEMA, "alignment": pl.String}),
        retrieval=_concat(retrieval, None),
        generalisation=generalisation,
        oracle=oracle,
        n_dropped=n_dropped,
        primary_alignment=cfg.alignment[0],
        maps=maps,
    )


def _concat(frames: list[pl.DataFrame], schema) -> pl.DataFrame:
    if frames:
        return pl.concat(frames, how="diagonal_relaxed")
    return pl.DataFrame(schema=schema) if schema else pl.DataFrame()


def _load_clusters(spec: str) -> dict[str, list[str]]:
    path = Path(spec)
    return load_clusters(path if path.exists() else annotations_dir() / spec)


def _generalisation(rows, metadata, cfg, labels, features, is_control, batches) -> pl.DataFrame:
    if cfg.experiment_column not in metadata.columns:
        _metric(rows, None, "generalisation", "knn_accuracy", None, f"no column '{cfg.experiment_column}'")
        return pl.DataFrame(schema=GENERALISATION_SCHEMA)
    experiments = metadata.get_column(cfg.experiment_column).cast(pl.String).to_numpy()
    if len(np.unique(experiments)) < 2:
        reason = f"a single {cfg.experiment_column}; nothing to hold out"
        for method in dict.fromkeys(["none", *cfg.alignment]):
            _metric(rows, method, "generalisation", "knn_accuracy", None, reason)
        return pl.DataFrame(schema=GENERALISATION_SCHEMA)
    result = batch_generalisation(labels, features, is_control, experiments, cfg.alignment, batches, cfg.knn_k)
    for method in dict.fromkeys(["none", *cfg.alignment]):
        accuracies = result.filter(pl.col("alignment") == method)
        weighted = (accuracies["accuracy"] * accuracies["n_test"]).sum()
        value = weighted / accuracies["n_test"].sum() if len(accuracies) else None
        _metric(rows, method, "generalisation", "knn_accuracy", value,
                None if len(accuracies) else "no held-out well has a perturbation seen elsewhere")
    return result
