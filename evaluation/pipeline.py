"""run_efaar: Filter -> Align -> Aggregate -> Relate -> benchmarks, for the callback, CLI and demo.

Every benchmark that cannot be computed on the given data (too few genes, no annotated pair in
the map, no replicates, a single experiment) is reported with value None and a reason, never
as 0, so a broken evaluation cannot pass for a bad model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from evaluation.aggregate import aggregate
from evaluation.align import align
from evaluation.benchmarks.oracle import oracle_recall, truth_relationships
from evaluation.benchmarks.recall import report_recall
from evaluation.benchmarks.registry import BenchmarkInput, MetricRow, benchmark_names, get_benchmark
from evaluation.config import EvalConfig
from evaluation.embeddings_io import EMBEDDING_COLUMN, embedding_matrix
from evaluation.filter import control_mask, drop_nonfinite

METRIC_SCHEMA = {
    "alignment": pl.String,
    "benchmark": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "reason": pl.String,
}


@dataclass
class EvalResult:
    """Everything one evaluation produced, as polars frames (long format, `alignment` column)."""

    metrics: pl.DataFrame  # METRIC_SCHEMA: one scalar per (alignment, metric), value None + reason if not computable
    tables: dict[str, pl.DataFrame]  # each benchmark's frames under its registered table name
    oracle: pl.DataFrame | None
    n_dropped: int
    primary_alignment: str
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # alignment -> (genes, profiles)

    def table(self, name: str) -> pl.DataFrame:
        """A benchmark table by name; empty, with its benchmark's schema where it has one, if not run."""
        if name in self.tables:
            return self.tables[name]
        for benchmark in map(get_benchmark, benchmark_names()):
            if benchmark.table == name and benchmark.schema is not None:
                extra = {"alignment": pl.String} if benchmark.per_alignment else {}
                return pl.DataFrame(schema={**benchmark.schema, **extra})
        return pl.DataFrame()

    # the built-in benchmarks' tables, by the names reports and the demo read
    recall = property(lambda self: self.table("recall"))
    perturbations = property(lambda self: self.table("perturbations"))  # consistency, energy distance, p-values
    clusters = property(lambda self: self.table("clusters"))
    retrieval = property(lambda self: self.table("retrieval"))
    generalisation = property(lambda self: self.table("generalisation"))

    def summary(self) -> dict[str, float | None]:
        """Flat metric names -> values: the primary alignment unprefixed, others as `<alignment>/<metric>`."""
        out = {}
        for row in self.metrics.iter_rows(named=True):
            prefix = "" if row["alignment"] in (self.primary_alignment, None) else f"{row['alignment']}/"
            out[prefix + row["metric"]] = row["value"]
        return out


def run_efaar(embeddings: pl.DataFrame | pl.LazyFrame, cfg: EvalConfig) -> EvalResult:
    """Evaluate one embeddings frame (layout of evaluation.embeddings_io) under every alignment in cfg.

    Per alignment: align, aggregate into a map, then every requested benchmark that runs per
    alignment; then the run-once benchmarks on the unaligned features; then the oracle.
    """
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
    # registry order, whatever the order asked for, so every report lists the benchmarks alike
    # (EvalConfig has already refused unregistered names)
    wanted = [get_benchmark(name) for name in benchmark_names() if name in cfg.benchmarks]
    prepared = {b.name: b.prepare(cfg) if b.prepare else None for b in wanted}

    rows: list[MetricRow] = [(None, "filter", "n_dropped_nonfinite", float(n_dropped), None)]
    frames: dict[str, list[pl.DataFrame]] = {}
    maps = {}

    def run(benchmark, alignment: str | None, aligned: np.ndarray, genes=None, profiles=None) -> None:
        given = BenchmarkInput(
            benchmark.name,
            cfg,
            alignment,
            labels,
            aligned,
            is_control,
            batches,
            metadata,
            genes,
            profiles,
            prepared[benchmark.name],
            rows,
        )
        out = benchmark.run(given)
        if out is not None:
            if alignment is not None and "alignment" not in out.columns:
                out = out.with_columns(alignment=pl.lit(alignment))
            frames.setdefault(benchmark.table, []).append(out)

    for method in cfg.alignment:
        aligned = align(method, features, is_control, batches)
        genes_frame, profiles = aggregate(labels, aligned, is_control, cfg.aggregation)
        genes = genes_frame["perturbation"].to_numpy()
        maps[method] = (genes, profiles)
        for benchmark in (b for b in wanted if b.per_alignment):
            run(benchmark, method, aligned, genes, profiles)
    for benchmark in (b for b in wanted if not b.per_alignment):
        run(benchmark, None, features)
    oracle = None
    if cfg.truth_dir:
        truth = {"truth": truth_relationships(cfg.truth_dir), **(prepared.get("recall") or {})}
        oracle = oracle_recall(cfg.truth_dir, truth, [tuple(t) for t in cfg.thresholds], cfg.min_genes)
        report_recall(
            lambda name, value, reason=None: rows.append((None, "recall", name, value, reason)),
            oracle,
            prefix="oracle_",
        )
    tables = {name: _concat(parts) for name, parts in frames.items()}
    return EvalResult(
        metrics=pl.DataFrame(rows, schema=METRIC_SCHEMA, orient="row"),
        tables=tables,
        oracle=oracle,
        n_dropped=n_dropped,
        primary_alignment=cfg.alignment[0],
        maps=maps,
    )


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(frames, how="diagonal_relaxed")
