"""Known-relationship recall with the EXACT null of all gene pairs, in one streamed pass.

efaar_benchmarking defines, for a map of N genes, the null as all M = N(N-1)/2 upper-triangle
cosines and, for every annotated pair q, ranks r_right = #null <= q and r_left = #null < q;
q is recalled when r_right / M <= low or r_left / M >= high. That is equivalent to two order
statistics of the null: with K = max{k : k/M <= low} and L = min{l : l/M >= high} (the same
float64 divisions), q is recalled iff q < s_(K+1) or q > s_(L). So the null never needs to be
held: 256 independent 128 x 128 grids of pairs between random genes (one batched matmul)
bracket each needed order statistic in a narrow value window (+-8 measured standard errors);
one streamed pass over the similarity blocks then counts the null values below each window,
keeps the few inside it, and reads the query pairs' values from the same blocks (bit-identical
to the null's). The order statistic is selected
exactly from the window; if a window ever missed, a histogram pass
relocates it. No approximation: the result equals efaar's on the same float32 similarities.
Memory is O(N*D + one block + window contents); nulls up to 2**24 pairs are simply held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import polars as pl

from evaluation.annotations import load_sources, pairs_in_map
from evaluation.benchmarks.registry import Benchmark, BenchmarkInput, register_benchmark
from evaluation.relate import l2_normalised, upper_triangle_blocks

THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))
MIN_GENES = 20
N_BINS = 65536
HIST_RANGE = (-1.01, 1.01)  # cosines of float32 unit vectors may exceed 1 by rounding
EDGE_MARGIN = 1e-6  # larger than any rounding difference between locator values and the exact pass
SMALL_NULL = 2**24  # nulls up to this many pairs (64 MB) are held whole in the exact pass
SAMPLE_SIDE = 128  # the locating sample: SAMPLE_GROUPS grids of 128 x 128 gene pairs ...
SAMPLE_GROUPS = 256  # ... (4M values from one batched matmul), whose spread measures the error
WINDOW_SE = 8.0
log = logging.getLogger(__name__)

RECALL_SCHEMA = {
    "source": pl.String,
    "threshold_low": pl.Float64,
    "threshold_high": pl.Float64,
    "recall": pl.Float64,
    "random_baseline": pl.Float64,
    "n_pairs": pl.Int64,
    "n_null": pl.Int64,
    "null_low": pl.Float64,
    "null_high": pl.Float64,
    "reason": pl.String,
}


def rank_cutoffs(n_null: int, low: float, high: float) -> tuple[int, int]:
    """(K + 1, L): 1-based order statistics bounding the two tails, with efaar's float64 divisions."""
    k = int(np.floor(low * n_null))
    while k + 1 <= n_null and (k + 1) / n_null <= low:
        k += 1
    while k > 0 and k / n_null > low:
        k -= 1
    upper = int(np.ceil(high * n_null))
    while upper - 1 >= 0 and (upper - 1) / n_null >= high:
        upper -= 1
    while upper < n_null and upper / n_null < high:
        upper += 1
    return k + 1, max(upper, 1)


def _histogram(values: np.ndarray) -> np.ndarray:
    """Exact int64 counts in N_BINS equal bins over HIST_RANGE (the windows add EDGE_MARGIN)."""
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / N_BINS
    bins = np.clip(((values.reshape(-1) - HIST_RANGE[0]) / width).astype(np.int64), 0, N_BINS - 1)
    return np.bincount(bins, minlength=N_BINS)


def _histogram_windows(unit: np.ndarray, ranks: list[int], **kwargs) -> dict[int, tuple[float, float]]:
    """Fallback locator: one streamed pass into a fine histogram; each rank's window is its bin."""
    hist = np.zeros(N_BINS, np.int64)
    for _, block in upper_triangle_blocks(unit, desc="recall null, locating pass", **kwargs):
        b = block.shape[0]
        hist += _histogram(block) - _histogram(block[:, :b][np.tril_indices(b)])
    cumulative = np.cumsum(hist)
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / N_BINS
    windows = {}
    for k in ranks:
        b = int(np.searchsorted(cumulative, k))
        windows[k] = (HIST_RANGE[0] + b * width - EDGE_MARGIN, HIST_RANGE[0] + (b + 1) * width + EDGE_MARGIN)
    return windows


def _sample_windows(unit: np.ndarray, ranks: list[int], n_null: int, seed: int = 0) -> dict[int, tuple[float, float]]:
    """Cheap locator: value windows that contain each order statistic with overwhelming probability.

    The sample is SAMPLE_GROUPS independent grids, each SAMPLE_SIDE random genes x SAMPLE_SIDE
    other random genes, computed as one batched matmul (a pair-by-pair gather of as many values
    costs as much as the whole exact pass). Pairs of one grid share genes, so the binomial error
    of a sample quantile would be too optimistic; the error is measured instead, as the spread of
    the quantile over the independent grids. Windows are the pooled quantile +- WINDOW_SE of that
    error; the selection pass verifies containment and falls back to the histogram locator if
    ever needed, so exactness never depends on the sample.
    """
    rng = np.random.default_rng(seed)
    n = len(unit)
    side = min(SAMPLE_SIDE, n // 2)
    genes = np.stack([rng.choice(n, 2 * side, replace=False) for _ in range(SAMPLE_GROUPS)])
    grids = np.matmul(unit[genes[:, :side]], unit[genes[:, side:]].transpose(0, 2, 1)).reshape(SAMPLE_GROUPS, -1)
    fractions = np.array([k / n_null for k in ranks])
    centre = np.quantile(grids, fractions)
    spread = np.quantile(grids, fractions, axis=1).std(axis=1) / np.sqrt(SAMPLE_GROUPS)
    return {
        k: (float(c - WINDOW_SE * e) - EDGE_MARGIN, float(c + WINDOW_SE * e) + EDGE_MARGIN)
        for k, c, e in zip(ranks, centre, spread)
    }


def _select_pass(
    unit: np.ndarray, windows: dict[int, tuple[float, float]], query_pairs: np.ndarray | None, **kwargs
) -> tuple[dict[int, float], np.ndarray | None]:
    """One streamed pass: per window, count null values below it and keep those inside it; read the
    query pairs' values from the same blocks. Returns the order statistics it could pin down.

    Each block is touched only twice: the values up to the highest lower-tail window and from the
    lowest upper-tail window are extracted (~20% of a block at the usual thresholds), and the
    per-window counting and selection run on those tails. Pairs j <= i of the block's leading
    square are set to NaN first, which every comparison rejects.
    """
    n = len(unit)
    n_null = n * (n - 1) // 2
    bounds = sorted(set(windows.values()))
    is_low = {bd: any(k / n_null < 0.5 for k, w in windows.items() if w == bd) for bd in bounds}
    low_edge = max((hi for (lo, hi) in bounds if is_low[(lo, hi)]), default=None)
    high_edge = min((lo for (lo, hi) in bounds if not is_low[(lo, hi)]), default=None)
    below = np.zeros(len(bounds), np.int64)
    inside: list[list[np.ndarray]] = [[] for _ in bounds]
    query_values = None
    if query_pairs is not None:
        order = np.argsort(query_pairs[:, 0], kind="stable")
        qi, qj = query_pairs[order, 0], query_pairs[order, 1]
        query_values = np.empty(len(order), np.float32)
    for start, block in upper_triangle_blocks(unit, desc="recall null, exact pass", **kwargs):
        b = block.shape[0]
        if query_values is not None:
            lo_q, hi_q = np.searchsorted(qi, [start, start + b])
            query_values[order[lo_q:hi_q]] = block[qi[lo_q:hi_q] - start, qj[lo_q:hi_q] - start]
        block[:, :b][np.tri(b, dtype=bool)] = np.nan
        n_valid = block.size - b * (b + 1) // 2
        flat = block.reshape(-1)  # np.compress below: faster than boolean indexing on these sizes
        low_tail = np.compress(flat <= low_edge, flat) if low_edge is not None else None
        high_tail = np.compress(flat >= high_edge, flat) if high_edge is not None else None
        for w, (lo, hi) in enumerate(bounds):
            if is_low[(lo, hi)]:
                below[w] += np.count_nonzero(low_tail < lo)
                inside[w].append(np.compress((low_tail >= lo) & (low_tail <= hi), low_tail))
            else:
                below[w] += n_valid - np.count_nonzero(high_tail >= lo)
                inside[w].append(np.compress((high_tail >= lo) & (high_tail <= hi), high_tail))
    selected = {}
    for k, window in windows.items():
        w = bounds.index(window)
        values = np.concatenate(inside[w])
        position = k - below[w] - 1
        if 0 <= position < len(values):
            selected[k] = float(np.partition(values, position)[position])
    return selected, query_values


def null_order_statistics(
    unit: np.ndarray, ranks: list[int], query_pairs: np.ndarray, block_elements: int | None = None
) -> tuple[dict[int, float], np.ndarray]:
    """Exact 1-based order statistics of the upper-triangle cosines of `unit`, and the query values.

    `query_pairs` (n, 2) holds map rows i < j; its values come from the same blocks as the null.
    Small nulls are held whole; large ones are located by a pair sample and selected exactly in
    one streamed pass (a histogram pass is added only if the sample ever misplaced a window).
    """
    kwargs = {} if block_elements is None else {"block_elements": block_elements}
    n = len(unit)
    n_null = n * (n - 1) // 2
    if n_null <= SMALL_NULL:
        windows = {k: (-np.inf, np.inf) for k in ranks}
    else:
        windows = _sample_windows(unit, ranks, n_null)
    selected, query_values = _select_pass(unit, windows, query_pairs, **kwargs)
    missing = [k for k in ranks if k not in selected]
    if missing:
        log.warning("sampled windows missed order statistics %s; running the histogram locator", missing)
        retry, _ = _select_pass(unit, _histogram_windows(unit, missing, **kwargs), None, **kwargs)
        selected.update(retry)
    if set(ranks) - set(selected):
        raise RuntimeError(f"order statistics {sorted(set(ranks) - set(selected))} not located")
    return selected, query_values


def _unavailable(sources: list[str], thresholds, reason: str, n_pairs: dict[str, int], n_null: int) -> pl.DataFrame:
    rows = [
        {
            "source": s,
            "threshold_low": lo,
            "threshold_high": hi,
            "recall": None,
            "random_baseline": lo + 1 - hi,
            "n_pairs": n_pairs.get(s, 0),
            "n_null": n_null,
            "null_low": None,
            "null_high": None,
            "reason": reason,
        }
        for s in sources
        for lo, hi in thresholds
    ]
    return pl.DataFrame(rows, schema=RECALL_SCHEMA)


def known_relationship_recall(
    genes: np.ndarray,
    profiles: np.ndarray,
    pairs_by_source: dict[str, np.ndarray],
    thresholds=THRESHOLDS,
    min_genes: int = MIN_GENES,
    block_elements: int | None = None,
) -> pl.DataFrame:
    """Recall per source and threshold pair (RECALL_SCHEMA); null recall + reason when not computable.

    `pairs_by_source` maps a source name to its (n, 2) map rows i < j (annotations.pairs_in_map).
    """
    thresholds = [(min(t), max(t)) for t in thresholds]
    n = len(genes)
    n_null = n * (n - 1) // 2
    n_pairs = {s: len(p) for s, p in pairs_by_source.items()}
    if n < min_genes:
        return _unavailable(
            list(pairs_by_source),
            thresholds,
            f"map has {n} perturbations; at least {min_genes} are needed",
            n_pairs,
            n_null,
        )
    ranks = sorted({r for lo, hi in thresholds for r in rank_cutoffs(n_null, lo, hi)})
    all_pairs = np.concatenate([p for p in pairs_by_source.values()] + [np.zeros((0, 2), np.int64)])
    stats, values = null_order_statistics(l2_normalised(profiles), ranks, all_pairs.astype(np.int64), block_elements)
    frames, offset = [], 0
    for source, pairs in pairs_by_source.items():
        q = values[offset : offset + len(pairs)]
        offset += len(pairs)
        if len(q) == 0:
            frames.append(
                _unavailable([source], thresholds, "no annotated pair has both genes in the map", n_pairs, n_null)
            )
            continue
        rows = []
        for lo, hi in thresholds:
            k_low, l_high = rank_cutoffs(n_null, lo, hi)
            recalled = (q < stats[k_low]) | (q > stats[l_high])
            rows.append(
                {
                    "source": source,
                    "threshold_low": lo,
                    "threshold_high": hi,
                    "recall": float(recalled.mean()),
                    "random_baseline": lo + 1 - hi,
                    "n_pairs": len(q),
                    "n_null": n_null,
                    "null_low": stats[k_low],
                    "null_high": stats[l_high],
                    "reason": None,
                }
            )
        frames.append(pl.DataFrame(rows, schema=RECALL_SCHEMA))
    return pl.concat(frames) if frames else pl.DataFrame(schema=RECALL_SCHEMA)


def report_recall(metric: Callable[..., None], recall: pl.DataFrame, prefix: str = "") -> None:
    """Recall per source at the first threshold pair, and their mean, as scalars (`prefix`: e.g. 'oracle_')."""
    first = recall.filter(pl.col("threshold_low") == recall["threshold_low"].min()) if len(recall) else recall
    for r in first.iter_rows(named=True):
        metric(f"{prefix}recall_{r['source']}", r["recall"], r["reason"])
    valid = first["recall"].drop_nulls() if len(first) else pl.Series([], dtype=pl.Float64)
    metric(
        f"{prefix}recall_mean",
        valid.mean() if len(valid) else None,
        None if len(valid) else "no annotation source could be scored",
    )


def _run(given: BenchmarkInput) -> pl.DataFrame | None:
    if not given.prepared:
        return None
    pairs = {name: pairs_in_map(rels, given.genes) for name, rels in given.prepared.items()}
    recall = known_relationship_recall(
        given.genes, given.profiles, pairs, [tuple(t) for t in given.cfg.thresholds], given.cfg.min_genes
    )
    report_recall(given.metric, recall)
    return recall


register_benchmark(
    Benchmark("recall", _run, table="recall", schema=RECALL_SCHEMA, prepare=lambda cfg: load_sources(cfg.annotations))
)
