"""Embed every site of a shard set with a trained model: crop embeddings averaged per site.

Works in one process or under torchrun/srun: the evaluation loader gives each rank its own
sites, per-site sums and crop counts are all-reduced, and rank 0 writes the parquet. Sums (not
means) are reduced so a site whose crops were split over ranks still gets the exact mean.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.distributed as dist
from tqdm import tqdm

import datamodules
from evaluation.embeddings_io import embeddings_frame, write_embeddings
from lightning_modules import hardware
from phenoscale.launch import detect_launch

#: manifest columns that describe storage, not biology: left out of the embeddings parquet
STORAGE_COLUMNS = ("shard", "height", "width", "dtype")


def embed_batch(model: Any, images: torch.Tensor, device: torch.device, bf16: bool,
                pooling: str | None = None, block: int | None = None) -> torch.Tensor:
    """model.embed() of one batch of raw images on `device`, under bfloat16 autocast when `bf16`."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model.embed(images.to(device, non_blocking=True), pooling=pooling, block=block)


@torch.no_grad()
def site_embeddings(model: Any, loader: Any, n_sites: int, device: torch.device,
                    pooling: str | None, block: int | None, progress: bool = True, bf16: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sites, D) sums of crop embeddings and (n_sites,) crop counts seen by this rank."""
    sums: torch.Tensor | None = None
    counts = torch.zeros(n_sites, dtype=torch.float64, device=device)
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc="embed", unit="batch", disable=not progress):
        crops = embed_batch(model, batch["image"], device, bf16, pooling, block).to(torch.float64)
        index = batch["site_index"].to(device, non_blocking=True)
        if sums is None:
            sums = torch.zeros(n_sites, crops.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, index, crops)
        counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    if sums is None:  # no batch on this rank (more ranks than sites): width agreed in embed_model
        sums = torch.zeros(n_sites, 0, dtype=torch.float64, device=device)
    return sums, counts


def embedding_device() -> torch.device:
    """This rank's GPU where there is one (LOCAL_RANK under a launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", detect_launch().local_rank)
    return torch.device("cpu")


def embed_model(model: Any, data_cfg: Any, out: str | os.PathLike, pooling: str | None = None,
                 block: int | None = None, seed: int = 0, precision: str = "32") -> Path | None:
    """Write OUT (parquet: manifest metadata + `embedding`); returns OUT on rank 0, else None.

    `model`: anything with embed() (see lightning_modules.load_pretrained); `precision`: "32", "bf16"
    (bfloat16 autocast) or "auto", resolved for this rank's device by `lightning_modules.hardware`.
    TVN whitens with the controls' covariance and so amplifies bf16 rounding along low-variance
    directions (docs/runs.md): check bf16 embeddings against a float32 run.
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
        sums, counts = site_embeddings(model, datamodule.eval_dataloader(), manifest.height, device,
                                       pooling, block, progress=env.global_rank == 0, bf16=bf16)
        if dist.is_initialized():
            width = torch.tensor([sums.shape[1]], device=device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            if sums.shape[1] < int(width):
                sums = torch.zeros(manifest.height, int(width), dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            dist.all_reduce(counts)
            if own_group:
                dist.barrier()  # no rank tears its gloo group down while another still uses it
    finally:
        if own_group:
            dist.destroy_process_group()  # a live gloo group at interpreter exit can abort
    if env.global_rank != 0:
        return None
    missing = int((counts == 0).sum())
    if missing == manifest.height:
        raise ValueError("the evaluation loader yielded no batches: are the shards empty?")
    if missing:
        raise RuntimeError(f"{missing} of {manifest.height} sites got no crop embedding; "
                           "the evaluation loader must visit every site")
    means = (sums / counts[:, None]).to(torch.float32).cpu().numpy()
    metadata = manifest.drop([c for c in STORAGE_COLUMNS if c in manifest.columns])
    return write_embeddings(embeddings_frame(metadata, means), out)
