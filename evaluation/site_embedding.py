"""Site embeddings of one rank: the single embedding pass behind `phenoscale embed` and the
EFAAR callback.

Each rank embeds only the sites its evaluation loader gives it (a contiguous block of manifest
rows) and keeps float64 sums over the span of rows it sees: allocated once at that span when it is
known (the evaluation stream's `rows`), else grown by doubling (at most twice
that), so memory per rank is O(its sites x D), not O(all sites x D); the ranks' results are then
combined by whoever needs them: `phenoscale embed` writes one parquet part per rank and
concatenates the parts in manifest order (phenoscale/embedding.py), the callback gathers the
parts to rank 0 in one collective.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from evaluation.embeddings_io import embeddings_frame


def embed_batch(
    model: Any,
    images: torch.Tensor,
    device: torch.device,
    bf16: bool,
    pooling: str | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """model.embed() of one batch of raw images on `device`, under bfloat16 autocast when `bf16`."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model.embed(images.to(device, non_blocking=True), pooling=pooling, block=block)


@dataclass
class SiteSums:
    """Crop-embedding sums and crop counts of some sites: `rows` (manifest rows, ascending, unique),
    `sums[block]` (len(rows), D) float64 and `counts` (len(rows),). Sums, not means, so that parts
    of one site (split over batches or ranks) combine into the exact mean."""

    rows: torch.Tensor
    sums: dict[int | None, torch.Tensor]
    counts: torch.Tensor

    @staticmethod
    def combine(parts: list[SiteSums]) -> SiteSums:
        """One SiteSums of all `parts`, rows seen in several parts added up."""
        parts = [p for p in parts if len(p.rows)]
        if not parts:
            return SiteSums(torch.zeros(0, dtype=torch.int64), {}, torch.zeros(0, dtype=torch.float64))
        rows, inverse = torch.unique(torch.cat([p.rows for p in parts]), return_inverse=True)

        def add(values: list[torch.Tensor]) -> torch.Tensor:
            stacked = torch.cat(values)
            return torch.zeros((len(rows), *stacked.shape[1:]), dtype=torch.float64).index_add_(0, inverse, stacked)

        return SiteSums(
            rows, {b: add([p.sums[b] for p in parts]) for b in parts[0].sums}, add([p.counts for p in parts])
        )

    def means(self, block: int | None = None) -> np.ndarray:
        """(len(rows), D) float32 mean crop embedding of each site."""
        return (self.sums[block] / self.counts[:, None]).to(torch.float32).numpy()


class _DenseSums:
    """Float64 sums and counts over a dense range of manifest rows: sized once from `expected`
    when the loader's rows are known, grown by doubling to cover any row outside it.

    One buffer for the whole pass rather than a small tensor kept per batch: kept tensors land in
    the holes a batch's freed activations leave in glibc's heap, so the heap cannot reuse those
    holes for the next batch and grows by about a batch's activations each time.
    """

    def __init__(self, expected: range | None = None) -> None:
        self.expected = expected  # the rows the loader will give, when known: the first allocation's span
        self.base = 0
        self.sums: dict[int | None, torch.Tensor] = {}
        self.counts = torch.zeros(0, dtype=torch.float64)

    def add(self, rows: torch.Tensor, crops: dict[int | None, torch.Tensor]) -> None:
        """Add crop embeddings `crops[block]` (len(rows), D) to the sums of their sites `rows`."""
        if not len(rows):
            return
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if not len(self.counts):
            if self.expected:
                lo, hi = min(lo, self.expected.start), max(hi, self.expected.stop)
            self.base = lo
        if lo < self.base or hi - self.base > len(self.counts):
            self._grow(min(lo, self.base), max(hi, self.base + len(self.counts)), crops)
        at = rows - self.base
        for b, values in crops.items():
            self.sums[b].index_add_(0, at, values.double())
        self.counts.index_add_(0, at, torch.ones(len(at), dtype=torch.float64))

    def _grow(self, lo: int, hi: int, like: dict[int | None, torch.Tensor]) -> None:
        size = max(hi - lo, 2 * len(self.counts))
        shift = self.base - lo

        def moved(old: torch.Tensor, width: tuple[int, ...]) -> torch.Tensor:
            new = torch.zeros((size, *width), dtype=torch.float64)
            new[shift : shift + len(old)] = old
            return new

        self.sums = {b: moved(self.sums.get(b, v.new_zeros(0, *v.shape[1:])), v.shape[1:]) for b, v in like.items()}
        self.counts = moved(self.counts, ())
        self.base = lo

    def result(self) -> SiteSums:
        seen = torch.nonzero(self.counts).flatten()
        if len(seen) == len(self.counts):  # every row of the buffer seen (a sized one, usually): no copy
            return SiteSums(seen + self.base, self.sums, self.counts)
        return SiteSums(seen + self.base, {b: s[seen] for b, s in self.sums.items()}, self.counts[seen])


@torch.no_grad()
def rank_site_sums(
    model: Any,
    loader: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    pooling: str | None = None,
    blocks: list[int | None] | None = None,
    bf16: bool = False,
    progress: bool = True,
    rows: range | None = None,
) -> SiteSums:
    """SiteSums of the sites `loader` gives this rank, for each of `blocks` (default: [None]).

    Memory follows the range of manifest rows this rank sees (a contiguous block), not the manifest;
    the manifest rows the loader will give, when known, size the sums once at exactly that: `rows`,
    else the `rows` range its dataset announces (a phenoscale EvalStream does), else grown as seen.
    """
    blocks = blocks or [None]
    if rows is None:
        rows = getattr(getattr(loader, "dataset", None), "rows", None)
    acc = _DenseSums(rows if isinstance(rows, range) else None)
    total = len(loader) if hasattr(loader, "__len__") else None
    # disable=None: no bar when stderr is not a terminal (a batch job's log), like the training bar
    bar_off = None if progress else True
    for batch in tqdm(loader, total=total, desc="embed", unit="batch", disable=bar_off, leave=False):
        crops = {b: embed_batch(model, batch["image"], device, bf16, pooling, b).cpu() for b in blocks}
        acc.add(batch["site_index"].to(torch.int64), crops)
    return acc.result()


def part_frame(
    manifest: pl.DataFrame, sites: SiteSums, block: int | None = None, drop: tuple[str, ...] = ()
) -> pl.DataFrame:
    """The embeddings parquet rows of `sites`: manifest metadata (less `drop`) + `embedding`."""
    metadata = manifest[sites.rows.numpy()].drop([c for c in drop if c in manifest.columns])
    return embeddings_frame(metadata, sites.means(block))
