"""Retrieval mAP in copairs' definition, vectorised over row blocks of the similarity matrix.

For each query profile, candidates are ranked by cosine (descending); positives are the other
profiles with the same label, negatives the profiles with another label (or, with `reference`,
only the reference/control profiles, JUMP's phenotypic-activity setting). As in copairs, ties
rank positives first. AP = mean over positives of precision at their rank. Instead of sorting
every row, the rank of the m-th best positive is m + #negatives scoring strictly higher, counted
by comparison (small groups) or by one sort of the row (large groups).
mAP per label = mean AP of its profiles; p-value as copairs: per profile a null of random APs
with the same (n_pos, n_total), averaged over the label's profiles, p = (#null > mAP + 1)/(size+1).
"""
from __future__ import annotations

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from evaluation.aggregate import group_rows
from evaluation.relate import block_rows, cosine, l2_normalised

SORT_ABOVE = 32  # positives per query above which one row sort beats pairwise comparisons


def _ap_of_row(sims: np.ndarray, candidates: np.ndarray, positives: np.ndarray) -> tuple[float, int, int]:
    """AP of one query given its similarity row, candidate mask and positive indices."""
    pos = np.sort(sims[positives])[::-1]
    cand = sims[candidates]
    if len(pos) > SORT_ABOVE:
        cand = np.sort(cand)
        greater_all = len(cand) - np.searchsorted(cand, pos, side="right")
    else:
        greater_all = (cand[None, :] > pos[:, None]).sum(axis=1)
    ascending = pos[::-1]
    greater_pos = len(pos) - np.searchsorted(ascending, pos, side="right")
    ranks = np.arange(1, len(pos) + 1) + (greater_all - greater_pos)
    return float(np.mean(np.arange(1, len(pos) + 1) / ranks)), len(pos), int(candidates.sum())


def average_precision(
    labels: np.ndarray, features: np.ndarray, reference: np.ndarray | None = None, desc: str | None = None
) -> pl.DataFrame:
    """Per query profile: `row`, `label`, `average_precision`, `n_pos_pairs`, `n_total_pairs`.

    Queries are all profiles (or, with a `reference` mask, the non-reference ones) that have at
    least one positive.
    """
    labels = np.asarray(labels)
    unit = l2_normalised(features)
    n = len(unit)
    queries = np.ones(n, bool) if reference is None else ~reference
    uniq, order, bounds = group_rows(labels)
    codes = np.empty(n, np.int64)
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        codes[order[a:b]] = g
    members = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    rows_out, ap, n_pos, n_total = [], [], [], []
    step = block_rows(n)
    query_rows = np.flatnonzero(queries)
    for s in tqdm(range(0, len(query_rows), step), desc=desc, disable=desc is None, leave=False):
        chunk = query_rows[s : s + step]
        sims = cosine(unit[chunk], unit)
        for r, i in enumerate(chunk):
            positives = members[codes[i]]
            positives = positives[(positives != i) & queries[positives]]
            if len(positives) == 0:
                continue
            candidates = (codes != codes[i]) if reference is None else reference.copy()
            candidates[positives] = True
            a, p, t = _ap_of_row(sims[r], candidates, positives)
            rows_out.append(i), ap.append(a), n_pos.append(p), n_total.append(t)
    return pl.DataFrame({
        "row": np.array(rows_out, np.int64), "label": labels[np.array(rows_out, np.int64)].astype(str),
        "average_precision": np.array(ap), "n_pos_pairs": np.array(n_pos, np.int64),
        "n_total_pairs": np.array(n_total, np.int64),
    })


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
    return pl.DataFrame(rows, schema={"label": pl.String, "n_profiles": pl.Int64,
                                      "mean_average_precision": pl.Float64, "p_value": pl.Float64},
                        orient="row").sort("label")
