"""Embed every site of a shard set with a trained model: crop embeddings averaged per site.

Works in one process or under torchrun/srun. Each rank embeds its own contiguous block of the
manifest's sites (evaluation.site_embedding, the pass the EFAAR callback uses too) and writes
its own parquet part atomically (OUT.parts/rank00001-of-00004.parquet); after a barrier, rank 0
(or a later `phenoscale embed --merge`) concatenates the parts in rank order, which is manifest
order, as a polars stream, checks every site is there once, and removes the parts. Memory per
rank is O(its sites x D), and nothing is all-reduced: at RxRx3 scale the old n_sites x D
float64 buffer on every rank was tens of GB. The parts must be on a filesystem every rank sees.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.distributed as dist

import datamodules
from datamodules.atomic import atomic_write
from evaluation.embeddings_io import write_embeddings
from evaluation.site_embedding import SiteSums, embed_batch, part_frame, rank_site_sums
from lightning_modules import hardware
from phenoscale.launch import detect_launch

__all__ = ["embed_batch", "embed_model", "embedding_device", "merge_parts", "site_embeddings"]

#: manifest columns that describe storage, not biology: left out of the embeddings parquet
STORAGE_COLUMNS = ("shard", "height", "width", "dtype")
_PART = re.compile(r"rank(\d{5})-of-(\d{5})\.parquet")


def site_embeddings(
    model: Any,
    loader: Any,
    n_sites: int,
    device: torch.device,
    pooling: str | None,
    block: int | None,
    progress: bool = True,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sites, D) sums of crop embeddings and (n_sites,) crop counts seen by this rank.

    The dense form of `rank_site_sums` for callers that want whole-manifest tensors; embed_model
    does not use it, as its size is the manifest's, not the rank's.
    """
    sites = rank_site_sums(model, loader, device, pooling, [block], bf16, progress)
    width = sites.sums[block].shape[1] if len(sites.rows) else 0
    sums = torch.zeros(n_sites, width, dtype=torch.float64)
    counts = torch.zeros(n_sites, dtype=torch.float64)
    if len(sites.rows):
        sums[sites.rows], counts[sites.rows] = sites.sums[block], sites.counts
    return sums.to(device), counts.to(device)


def embedding_device() -> torch.device:
    """This rank's GPU where there is one (LOCAL_RANK under a launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", detect_launch().local_rank)
    return torch.device("cpu")


def parts_directory(out: str | os.PathLike) -> Path:
    """Where the ranks' parts of OUT go: OUT.parts/ beside it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def embed_model(
    model: Any,
    data_cfg: Any,
    out: str | os.PathLike,
    pooling: str | None = None,
    block: int | None = None,
    seed: int = 0,
    precision: str = "32",
    merge: bool = True,
) -> Path | None:
    """Write OUT (parquet: manifest metadata + `embedding`); returns OUT on rank 0, else None.

    `model`: anything with embed() (see lightning_modules.load_pretrained); `precision`: "32", "bf16"
    (bfloat16 autocast) or "auto", resolved for this rank's device by `lightning_modules.hardware`.
    TVN whitens with the controls' covariance and so amplifies bf16 rounding along low-variance
    directions (docs/runs.md): check bf16 embeddings against a float32 run. `merge=False` leaves
    the parts in OUT.parts/ for a later `merge_parts` (ranks run as separate jobs); returns None.
    """
    env = detect_launch()
    device = embedding_device()
    bf16 = hardware.resolve_embed_precision(precision, device.type) == "bf16"
    hardware.configure_device(device.type)
    own_group = env.world_size > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        model = model.to(device).eval()
        datamodule = datamodules.build_datamodule(data_cfg, seed=seed)
        manifest: pl.DataFrame = datamodule.manifest
        sites = rank_site_sums(
            model, datamodule.eval_dataloader(), device, pooling, [block], bf16, progress=env.global_rank == 0
        )
        write_part(out, manifest, sites, block, env.global_rank, env.world_size)
        if dist.is_initialized():
            dist.barrier()  # every part is on disk before rank 0 reads them
    finally:
        if own_group:
            dist.destroy_process_group()  # a live gloo group at interpreter exit can abort
    if env.global_rank != 0 or not merge:
        return None
    return merge_parts(out, manifest)


def write_part(
    out: str | os.PathLike, manifest: pl.DataFrame, sites: SiteSums, block: int | None, rank: int, world: int
) -> Path:
    """This rank's rows of OUT as OUT.parts/rank<r>-of-<w>.parquet (none if it saw no site)."""
    path = parts_directory(out) / f"rank{rank:05d}-of-{world:05d}.parquet"
    if not len(sites.rows):
        path.unlink(missing_ok=True)  # a stale part of an earlier run must not be merged
        return path
    return write_embeddings(part_frame(manifest, sites, block, STORAGE_COLUMNS), path)


def merge_parts(out: str | os.PathLike, manifest: pl.DataFrame) -> Path:
    """Concatenate OUT.parts/ into OUT (streamed, atomic), check it is every site of `manifest`
    once in manifest order, and remove the parts. Raises naming what is missing."""
    directory = parts_directory(out)
    parts = sorted(directory.glob("rank*-of-*.parquet")) if directory.is_dir() else []
    worlds = {_PART.fullmatch(p.name).group(2) for p in parts if _PART.fullmatch(p.name)}
    if len(worlds) > 1:
        raise ValueError(f"{directory} mixes parts of runs with {sorted(worlds)} ranks; delete the stale ones")
    if not parts:
        raise ValueError("the evaluation loader yielded no batches: are the shards empty?")
    lazy = pl.scan_parquet(parts)  # rank order = manifest order (contiguous blocks of rows)
    keys = lazy.select("key").collect()["key"]
    if not keys.equals(manifest["key"]):
        missing = manifest.height - keys.n_unique()
        if missing:
            raise RuntimeError(
                f"{missing} of {manifest.height} sites got no crop embedding in {directory}; "
                "the evaluation loader must visit every site and every rank must write its part "
                "where rank 0 can read it"
            )
        raise RuntimeError(f"the parts in {directory} are not in manifest order")
    atomic_write(out, lambda tmp: lazy.sink_parquet(tmp))
    shutil.rmtree(directory)
    return Path(out)
