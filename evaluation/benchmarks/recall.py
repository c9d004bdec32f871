"""Known-relationship recall with the EXACT null of all gene pairs, streamed in two passes.

efaar_benchmarking defines, for a map of N genes, the null as all M = N(N-1)/2 upper-triangle
cosines and, for every annotated pair q, ranks r_right = #null <= q and r_left = #null < q;
q is recalled when r_right / M <= low or r_left / M >= high. That is equivalent to two order
statistics of the null: with K = max{k : k/M <= low} and L = min{l : l/M >= high} (the same
float64 divisions), q is recalled iff q < s_(K+1) or q > s_(L). So the null never needs to be
held: pass 1 streams the similarity blocks into a 65,536-bin histogram (and reads the query
pairs' values from the same blocks, bit-identical to the null's), which locates the bin of each
needed order statistic; pass 2 streams again, counts values below each bin and keeps only the
values inside it, from which the order statistic is selected exactly. No approximation: the
result equals efaar's on the same float32 similarities. Memory is O(N*D + block + bin contents).
"""
from __future__ import annotations

import numpy as np
import polars as pl
import torch

from evaluation.relate import l2_normalised, upper_triangle_blocks

THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))
MIN_GENES = 20
N_BINS = 65536
HIST_RANGE = (-1.01, 1.01)  # cosines of float32 unit vectors may exceed 1 by rounding
EDGE_MARGIN = 1e-6  # larger than any rounding difference between torch's binning and numpy's comparisons

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
    l = int(np.ceil(high * n_null))
    while l - 1 >= 0 and (l - 1) / n_null >= high:
        l -= 1
    while l < n_null and l / n_null < high:
        l += 1
    return k + 1, max(l, 1)


def _histogram(values: np.ndarray) -> np.ndarray:
    """Bin counts; each call has <= 2**24 values so torch's float32 counts are exact integers."""
    t = torch.from_numpy(np.ascontiguousarray(values).reshape(-1))
    counts = [
        torch.histc(t[s : s + 2**24], bins=N_BINS, min=HIST_RANGE[0], max=HIST_RANGE[1]).to(torch.int64)
        for s in range(0, len(t), 2**24)
    ]
    return torch.stack(counts).sum(0).numpy() if counts else np.zeros(N_BINS, np.int64)


def _bin_window(b: int) -> tuple[float, float]:
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / N_BINS
    return HIST_RANGE[0] + b * width - EDGE_MARGIN, HIST_RANGE[0] + (b + 1) * width + EDGE_MARGIN


def null_order_statistics(
    unit: np.ndarray, ranks: list[int], query_pairs: np.ndarray, block_elements: int | None = None
) -> tuple[dict[int, float], np.ndarray]:
    """Exact 1-based order statistics of the upper-triangle cosines of `unit`, and the query values.

    `query_pairs` (n, 2) holds map rows i < j; its values come from the same blocks as the null.
    """
    kwargs = {} if block_elements is None else {"block_elements": block_elements}
    order = np.argsort(query_pairs[:, 0], kind="stable")
    qi, qj = query_pairs[order, 0], query_pairs[order, 1]
    query_values = np.empty(len(order), np.float32)
    hist = np.zeros(N_BINS, np.int64)
    for start, block in upper_triangle_blocks(unit, desc="recall null, pass 1/2", **kwargs):
        b = block.shape[0]
        lower = block[:, :b][np.tril_indices(b)]
        hist += _histogram(block) - _histogram(lower)
        lo, hi = np.searchsorted(qi, [start, start + b])
        query_values[order[lo:hi]] = block[qi[lo:hi] - start, qj[lo:hi] - start]
    cumulative = np.cumsum(hist)
    windows = sorted({int(np.searchsorted(cumulative, k)) for k in ranks})
    bounds = [_bin_window(w) for w in windows]
    below = np.zeros(len(windows), np.int64)
    inside: list[list[np.ndarray]] = [[] for _ in windows]
    for start, block in upper_triangle_blocks(unit, desc="recall null, pass 2/2", **kwargs):
        b = block.shape[0]
        lower_mask = np.tri(b, dtype=bool)
        for w, (lo, hi) in enumerate(bounds):
            below[w] += np.count_nonzero(block < lo) - np.count_nonzero((block[:, :b] < lo) & lower_mask)
            r, c = np.nonzero((block >= lo) & (block <= hi))
            keep = c > r
            inside[w].append(block[r[keep], c[keep]])
    selected = {}
    for w, (lo, hi) in enumerate(bounds):
        values = np.sort(np.concatenate(inside[w]))
        for k in ranks:
            position = k - below[w] - 1
            if 0 <= position < len(values) and int(np.searchsorted(cumulative, k)) == windows[w]:
                selected[k] = float(values[position])
    missing = set(ranks) - set(selected)
    if missing:
        raise RuntimeError(f"order statistics {sorted(missing)} not located; histogram and selection disagree")
    return selected, query_values


def _unavailable(sources: list[str], thresholds, reason: str, n_pairs: dict[str, int], n_null: int) -> pl.DataFrame:
    rows = [
        {"source": s, "threshold_low": lo, "threshold_high": hi, "recall": None,
         "random_baseline": lo + 1 - hi, "n_pairs": n_pairs.get(s, 0), "n_null": n_null,
         "null_low": None, "null_high": None, "reason": reason}
        for s in sources for lo, hi in thresholds
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
        return _unavailable(list(pairs_by_source), thresholds,
                            f"map has {n} perturbations; at least {min_genes} are needed", n_pairs, n_null)
    ranks = sorted({r for lo, hi in thresholds for r in rank_cutoffs(n_null, lo, hi)})
    all_pairs = np.concatenate([p for p in pairs_by_source.values()] + [np.zeros((0, 2), np.int64)])
    stats, values = null_order_statistics(l2_normalised(profiles), ranks, all_pairs.astype(np.int64), block_elements)
    frames, offset = [], 0
    for source, pairs in pairs_by_source.items():
        q = values[offset : offset + len(pairs)]
        offset += len(pairs)
        if len(q) == 0:
            frames.append(_unavailable([source], thresholds,
                                       "no annotated pair has both genes in the map", n_pairs, n_null))
            continue
        rows = []
        for lo, hi in thresholds:
            k_low, l_high = rank_cutoffs(n_null, lo, hi)
            recalled = (q < stats[k_low]) | (q > stats[l_high])
            rows.append({"source": source, "threshold_low": lo, "threshold_high": hi,
                         "recall": float(recalled.mean()), "random_baseline": lo + 1 - hi,
                         "n_pairs": len(q), "n_null": n_null, "null_low": stats[k_low],
                         "null_high": stats[l_high], "reason": None})
        frames.append(pl.DataFrame(rows, schema=RECALL_SCHEMA))
    return pl.concat(frames) if frames else pl.DataFrame(schema=RECALL_SCHEMA)
