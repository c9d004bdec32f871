"""Retrieval mAP in copairs' definition, vectorised over row blocks of the similarity matrix.

For each query profile, candidates are ranked by cosine (descending); positives are the other
profiles with the same label, negatives the profiles with another label (or, with `reference`,
only the reference/control profiles, JUMP's phenotypic-activity setting). As in copairs, ties
rank positives first. AP = mean over positives of precision at their rank. Instead of sorting
every row, the rank of the m-th best positive is m + #negatives scoring strictly higher, counted
by comparison, vectorised over all (query, positive) pairs of a block of queries.
mAP per label = mean AP of its profiles; p-value as copairs: per profile a null of random APs
with the same (n_pos, n_total), averaged over the label's profiles, p = (#null > mAP + 1)/(size+1).
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from evaluation.aggregate import group_rows
from evaluation.benchmarks.perturbation import share_significant
from evaluation.benchmarks.registry import Benchmark, BenchmarkInput, register_benchmark
from evaluation.relate import block_rows, cosine, l2_normalised

log = logging.getLogger(__name__)


def _per_query_ap(query_of_pair: np.ndarray, pos_sims: np.ndarray, higher: np.ndarray) -> np.ndarray:
    """AP per query from its (positive similarity, #negatives strictly higher) pairs.

    Sorting each query's positives by descending similarity, the m-th sits at rank m + higher_m.
    """
    order = np.lexsort((-pos_sims, query_of_pair))
    q, h = query_of_pair[order], higher[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    m = np.arange(len(q)) - np.repeat(starts, np.diff(np.r_[starts, len(q)])) + 1
    sizes = np.diff(np.r_[starts, len(q)])
    return np.add.reduceat(m / (m + h), starts) / sizes


def average_precision(
    labels: np.ndarray, features: np.ndarray, reference: np.ndarray | None = None, desc: str | None = None
) -> pl.DataFrame:
    """Per query profile: `row`, `label`, `average_precision`, `n_pos_pairs`, `n_total_pairs`.

    Queries are all profiles (or, with a `reference` mask, the non-reference ones) that have at
    least one positive. Work is vectorised over (query, positive) pairs; with a reference only the
    query-vs-reference block is computed, not the full similarity matrix.
    """
    labels = np.asarray(labels)
    unit = l2_normalised(features)
    n = len(unit)
    queries = np.ones(n, bool) if reference is None else ~reference
    ref_rows = None if reference is None else np.flatnonzero(reference)
    uniq, order, bounds = group_rows(labels)
    codes = np.empty(n, np.int64)
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        codes[order[a:b]] = g
    members = [m[queries[m]] for m in (order[a:b] for a, b in zip(bounds[:-1], bounds[1:]))]
    group_size = np.array([len(m) for m in members])
    query_rows = np.flatnonzero(queries & (group_size[codes] > 1))
    n_cols = n if reference is None else len(ref_rows)
    out_ap = []
    for s in tqdm(range(0, len(query_rows), block_rows(n_cols)), desc=desc, disable=desc is None, leave=False):
        chunk = query_rows[s : s + block_rows(n_cols)]
        sims = cosine(unit[chunk], unit if reference is None else unit[ref_rows])
        pair_r = np.repeat(np.arange(len(chunk)), group_size[codes[chunk]])
        pair_p = np.concatenate([members[codes[i]] for i in chunk])
        keep = pair_p != chunk[pair_r]
        pair_r, pair_p = pair_r[keep], pair_p[keep]
        if reference is None:
            pos_sims = sims[pair_r, pair_p].copy()
            sims[pair_r, pair_p] = -np.inf  # positives and self are not negatives
            sims[np.arange(len(chunk)), chunk] = -np.inf
        else:
            pos_sims = np.einsum("ij,ij->i", unit[chunk[pair_r]], unit[pair_p])
        higher = np.empty(len(pair_r), np.int64)
        step = max(1, 2**24 // max(n_cols, 1))
        for a in range(0, len(pair_r), step):
            higher[a : a + step] = (sims[pair_r[a : a + step]] > pos_sims[a : a + step, None]).sum(axis=1)
        out_ap.append(_per_query_ap(pair_r, pos_sims, higher))
    n_pos = group_size[codes[query_rows]] - 1
    n_neg = (n - group_size[codes[query_rows]]) if reference is None else np.full(len(query_rows), n_cols)
    return pl.DataFrame(
        {
            "row": query_rows.astype(np.int64),
            "label": labels[query_rows].astype(str),
            "average_precision": np.concatenate(out_ap) if out_ap else np.zeros(0),
            "n_pos_pairs": n_pos.astype(np.int64),
            "n_total_pairs": (n_pos + n_neg).astype(np.int64),
        }
    )


def random_ap(n_pos: int, n_total: int, null_size: int, rng: np.random.Generator) -> np.ndarray:
    """APs of `null_size` random rankings with n_pos positives among n_total."""
    ranks = np.sort(np.stack([rng.choice(n_total, n_pos, replace=False) for _ in range(null_size)]), axis=1) + 1
    return (np.arange(1, n_pos + 1) / ranks).mean(axis=1)


def mean_average_precision(ap: pl.DataFrame, null_size: int = 10000, seed: int = 0) -> pl.DataFrame:
    """Per label: `mean_average_precision` and its permutation `p_value` (copairs' procedure)."""
    rng = np.random.default_rng(seed)
    configs = ap.select("n_pos_pairs", "n_total_pairs").unique(maintain_order=True)
    nulls = {(p, t): random_ap(p, t, null_size, rng) for p, t in configs.iter_rows()}
    rows = []
    for (label,), group in ap.group_by("label", maintain_order=True):
        score = float(group["average_precision"].mean())
        null = np.mean([nulls[c] for c in group.select("n_pos_pairs", "n_total_pairs").iter_rows()], axis=0)
        rows.append((label, len(group), score, float(((null > score).sum() + 1) / (null_size + 1))))
    return pl.DataFrame(
        rows,
        schema={
            "label": pl.String,
            "n_profiles": pl.Int64,
            "mean_average_precision": pl.Float64,
            "p_value": pl.Float64,
        },
        orient="row",
    ).sort("label")


def _run(given: BenchmarkInput) -> pl.DataFrame | None:
    try:
        ap = average_precision(given.labels, given.features, reference=given.is_control)
    except ValueError as err:  # the data cannot support it: a None metric with the reason, not a crash
        log.warning("map (%s) not computed: %s", given.alignment, err)
        given.metric("map", None, str(err))
        return None
    scores = mean_average_precision(ap, given.cfg.map_null_size, given.cfg.seed)
    given.metric(
        "map_mean",
        scores["mean_average_precision"].mean() if len(scores) else None,
        None if len(scores) else "no perturbation has two replicates",
    )
    given.metric(
        "map_significant_fraction", *share_significant(scores["p_value"]) if len(scores) else (None, "no scores")
    )
    return scores


register_benchmark(Benchmark("map", _run, table="retrieval"))
