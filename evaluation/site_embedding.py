"""Site embeddings of one rank: the single embedding pass behind `phenoscale embed` and the
EFAAR callback.

Each rank embeds only the sites its evaluation loader gives it (a contiguous block of manifest
rows) and keeps float64 sums for those sites alone, so memory per rank is O(its sites x D), not
O(all sites x D); the ranks' results are then combined by whoever needs them: `phenoscale embed`
writes one parquet part per rank and concatenates the parts in manifest order
(phenoscale/embedding.py), the callback gathers the parts to rank 0 in one collective.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from evaluation.embeddings_io import embeddings_frame


def embed_batch(model: Any, images: torch.Tensor, device: torch.device, bf16: bool,
                pooling: str | None = None, block: int | None = None) -> torch.Tensor:
    """model.embed() of one batch of raw images on `device`, under bfloat16 autocast when `bf16`."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model.embed(images.to(device, non_blocking=True), pooling=pooling, block=block)


@torch.no_grad()
def rank_site_means(model: Any, loader: Iterable[dict[str, torch.Tensor]], device: torch.device,
                    pooling: str | None = None, blocks: Optional[list[Optional[int]]] = None, bf16: bool = False,
                    progress: bool = True) -> tuple[np.ndarray, dict[Optional[int], np.ndarray]]:
    """(manifest rows seen, ascending; block -> (rows, D) float32 mean crop embedding per row).

    Crops of one site may come in several batches: per-batch sums are kept per site (float64)
    and combined at the end, so memory follows the sites this rank saw, not the manifest.
    """
    blocks = blocks or [None]
    rows: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    sums: dict[Optional[int], list[torch.Tensor]] = {b: [] for b in blocks}
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc="embed", unit="batch", disable=not progress, leave=False):
        site, inverse = torch.unique(batch["site_index"].to(torch.int64), return_inverse=True)
        rows.append(site)
        for b in blocks:
            crops = embed_batch(model, batch["image"], device, bf16, pooling, b).double().cpu()
            sums[b].append(torch.zeros(len(site), crops.shape[1], dtype=torch.float64).index_add_(0, inverse, crops))
        counts.append(torch.bincount(inverse, minlength=len(site)).double()[:, None])
    if not rows:
        return np.zeros(0, dtype=np.int64), {}
    site, inverse = torch.unique(torch.cat(rows), return_inverse=True)
    crops = _combine(counts, inverse, len(site))
    means = {b: (_combine(parts, inverse, len(site)) / crops).float().numpy() for b, parts in sums.items()}
    return site.numpy(), means


def _combine(parts: list[torch.Tensor], inverse: torch.Tensor, n: int) -> torch.Tensor:
    """Sum per-batch rows that belong to the same site (`inverse`: each row's site position)."""
    stacked = torch.cat(parts)
    return torch.zeros(n, stacked.shape[1], dtype=torch.float64).index_add_(0, inverse, stacked)


def part_frame(manifest: pl.DataFrame, rows: np.ndarray, means: np.ndarray,
               drop: tuple[str, ...] = ()) -> pl.DataFrame:
    """The embeddings parquet rows of one rank: manifest metadata (less `drop`) + `embedding`."""
    metadata = manifest[rows].drop([c for c in drop if c in manifest.columns])
    return embeddings_frame(metadata, means)
