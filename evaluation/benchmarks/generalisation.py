"""Batch generalisation (RxRx1's question): classify perturbations in an experiment never seen.

Leave-one-experiment-out k-nearest-neighbour classification (FAISS exact inner product on unit
vectors) of non-control wells, for each alignment: an embedding that encodes biology rather than
batch gets the label right in a new experiment, and alignment should help, not hurt.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from evaluation.align import align
from evaluation.benchmarks.registry import Benchmark, BenchmarkInput, register_benchmark
from evaluation.relate import knn, l2_normalised

GENERALISATION_SCHEMA = {
    "alignment": pl.String,
    "held_out": pl.String,
    "accuracy": pl.Float64,
    "n_test": pl.Int64,
    "n_classes": pl.Int64,
}


def knn_predict(train_codes: np.ndarray, neighbours: np.ndarray, k: int) -> np.ndarray:
    """Majority label of each row's k neighbours; ties go to the label of the nearer neighbour."""
    votes = train_codes[neighbours[:, :k]]
    if k == 1:
        return votes[:, 0]
    counts = np.zeros((len(votes), train_codes.max() + 1))
    weights = 1.0 + 1e-3 * (k - np.arange(k)) / k  # rank-based tie-break, never outweighs a vote
    np.add.at(counts, (np.repeat(np.arange(len(votes)), k), votes.ravel()), np.tile(weights, len(votes)))
    return counts.argmax(axis=1)


def held_out_accuracy(
    labels: np.ndarray, features: np.ndarray, is_control: np.ndarray, experiments: np.ndarray, k: int = 1
) -> pl.DataFrame:
    """Accuracy per held-out experiment (alignment column left empty for the caller)."""
    keep = ~is_control
    labels, experiments = np.asarray(labels)[keep], np.asarray(experiments)[keep].astype(str)
    unit = l2_normalised(features[keep])
    _, codes = np.unique(labels, return_inverse=True)
    rows = []
    for held_out in np.unique(experiments):
        test, train = experiments == held_out, experiments != held_out
        seen = np.isin(codes, codes[train])
        test &= seen
        if not test.any() or train.sum() < k:
            continue
        _, neighbours = knn(unit[train], unit[test], k)
        predicted = knn_predict(codes[train], neighbours, k)
        rows.append(
            (
                None,
                held_out,
                float((predicted == codes[test]).mean()),
                int(test.sum()),
                int(len(np.unique(codes[test]))),
            )
        )
    return pl.DataFrame(rows, schema=GENERALISATION_SCHEMA, orient="row")


def batch_generalisation(
    labels: np.ndarray,
    features: np.ndarray,
    is_control: np.ndarray,
    experiments: np.ndarray,
    alignments: list[str],
    batches: np.ndarray | None,
    k: int = 1,
) -> pl.DataFrame:
    """held_out_accuracy for `none` and each alignment (aligned with `batches`)."""
    frames = []
    for method in dict.fromkeys(["none", *alignments]):
        aligned = align(method, features, is_control, batches)
        frames.append(
            held_out_accuracy(labels, aligned, is_control, experiments, k).with_columns(alignment=pl.lit(method))
        )
    return pl.concat(frames)


def _run(given: BenchmarkInput) -> pl.DataFrame:
    cfg, methods = given.cfg, list(dict.fromkeys(["none", *given.cfg.alignment]))
    if cfg.experiment_column not in given.metadata.columns:
        given.metric("knn_accuracy", None, f"no column '{cfg.experiment_column}'")
        return pl.DataFrame(schema=GENERALISATION_SCHEMA)
    experiments = given.metadata.get_column(cfg.experiment_column).cast(pl.String).to_numpy()
    if len(np.unique(experiments)) < 2:
        for method in methods:
            given.metric("knn_accuracy", None, f"a single {cfg.experiment_column}; nothing to hold out", method)
        return pl.DataFrame(schema=GENERALISATION_SCHEMA)
    result = batch_generalisation(
        given.labels, given.features, given.is_control, experiments, cfg.alignment, given.batches, cfg.knn_k
    )
    for method in methods:
        accuracies = result.filter(pl.col("alignment") == method)
        weighted = (accuracies["accuracy"] * accuracies["n_test"]).sum()
        given.metric(
            "knn_accuracy",
            weighted / accuracies["n_test"].sum() if len(accuracies) else None,
            None if len(accuracies) else "no held-out well has a perturbation seen elsewhere",
            method,
        )
    return result


register_benchmark(
    Benchmark("generalisation", _run, table="generalisation", schema=GENERALISATION_SCHEMA, per_alignment=False)
)
