"""Relate: cosine similarity as FAISS inner products of L2-normalised vectors, in row blocks.

A genome-wide map has N ~ 20,000-100,000 perturbations: the N x N matrix (40 GB at 100k) never
exists; consumers stream `upper_triangle_blocks` and keep only what they need.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np
from tqdm.auto import tqdm

BLOCK_ELEMENTS = 2**24  # ~64 MB of float32 similarities per block


def l2_normalised(x: np.ndarray) -> np.ndarray:
    """Contiguous float32 copy with unit rows (zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Inner products of already-normalised rows: (len(a), len(b)) float32 via FAISS."""
    return faiss.pairwise_distances(a, b, metric=faiss.METRIC_INNER_PRODUCT)


def block_rows(n: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per block so that a block of n columns holds about `block_elements` values."""
    return int(max(1, min(n, block_elements // max(n, 1))))


def upper_triangle_blocks(
    unit: np.ndarray, block_elements: int = BLOCK_ELEMENTS, desc: str | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, S) with S = unit[start:stop] @ unit[start:].T for consecutive row blocks.

    Pair (i, j), i < j, sits at S[i - start, j - start]; the entries with j <= i are not part of
    the upper triangle and are left to the caller (see `upper_values`). The same float32 kernel
    produces every value, so a pair read here equals the same pair anywhere else bit for bit.
    """
    n = len(unit)
    rows = block_rows(n, block_elements)
    starts = range(0, n, rows)
    for start in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 4, leave=False):
        yield start, cosine(unit[start : start + rows], unit[start:])


def upper_values(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The strict-upper-triangle values of a block from `upper_triangle_blocks`: (triangle, rest).

    Returned as two arrays (the square's triangle, and the rectangle right of the square) to
    avoid copying the rectangle.
    """
    b = block.shape[0]
    square = block[:, :b]
    return square[np.triu_indices(b, 1)], block[:, b:]


def knn(train_unit: np.ndarray, query_unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours with a FAISS flat inner-product index: (similarities, indices)."""
    index = faiss.IndexFlatIP(train_unit.shape[1])
    index.add(train_unit)
    return index.search(query_unit, k)
