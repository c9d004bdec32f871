"""Embed raw microscope images without writing shards: `phenoscale.embed_images`, `embed --images`.

Inference users hold folders of TIFFs, not shards. The images are described by the converters'
site tables (a CellProfiler-style CSV, a Phenix folder, multi-channel/OME-TIFF stacks), decoded
by the converters' `read_site` in a thread pool (the TIFF codecs release the GIL), tiled by the
evaluation loader's `tile_crops`, and embedded and averaged per site by the shard path's
`site_embeddings`, grouping sites into batches as the evaluation loader does: the same crops,
the same batches, hence the embeddings of `phenoscale embed` on shards of the same images.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

import lightning_modules
from datamodules.converters.common import FILES, PLANES, check_site_table, read_site, site_tasks
from datamodules.converters.folder import folder_sites
from datamodules.converters.jump import PHENIX_NAME, jump_sites
from datamodules.converters.stacks import SUFFIXES, stack_sites
from datamodules.transforms import tile_crops
from evaluation.embeddings_io import embeddings_frame
from lightning_modules import hardware
from phenoscale.embedding import embedding_device, site_embeddings

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")


def image_sites(images: Any, channel_map: dict[int, str] | None = None) -> pl.DataFrame:
    """A converters' site table for `images`: a site table itself, a CSV/TSV/parquet with
    FileName_<Stain> columns, a folder of Phenix TIFFs (channel map from --channel-map or its
    load_data table), a folder or list of multi-channel TIFF / OME-TIFF stacks."""
    if isinstance(images, pl.DataFrame):
        check_site_table(images, "image table")
        return images
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            if channel_map:
                raise ValueError(
                    "--channel-map does not apply to a site table: stains are its FileName_<Stain> columns"
                )
            return folder_sites(path)
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            return stack_sites([path], channel_map)
        if path.is_dir():
            if any(PHENIX_NAME.search(p.name) for p in path.iterdir()):
                return jump_sites(path, channel_map)
            return stack_sites(path, channel_map)
        raise ValueError(f"images {str(path)!r}: no such file or folder")
    if isinstance(images, Iterable):
        return stack_sites(list(images), channel_map)
    raise TypeError(f"images must be a site table, a path or a list of paths, got {type(images).__name__}")


def _decoded(tasks: list[tuple], workers: int, progress: bool) -> Iterator[tuple[np.ndarray, list[str]]]:
    """read_site of every task, in order, at most 2 x workers sites ahead of the consumer."""
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(total=len(tasks), desc="embed images", unit="site", disable=None if progress else True) as bar,
    ):
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(read_site, task))
            if len(pending) >= 2 * max(1, workers):
                yield pending.popleft().result()
                bar.update()
        while pending:
            yield pending.popleft().result()
            bar.update()


def channel_indices(key: str, names: list[str], channels: Sequence[str] | None, n_channels: int) -> np.ndarray | None:
    """Indices of `channels` (stain names, in order) in a site's `names`; None keeps all."""
    if channels is None:
        if n_channels and len(names) != n_channels:
            raise ValueError(
                f"site {key!r} has {len(names)} channels {names}; the model takes {n_channels} "
                "(choose them with channels=/--channels)"
            )
        return None
    missing = [c for c in channels if c not in names]
    if missing:
        raise ValueError(f"site {key!r} lacks channels {missing} (has {names})")
    return np.array([names.index(c) for c in channels])


def crop_batches(
    sites: pl.DataFrame,
    crop_size: int,
    batch_size: int,
    *,
    channels: Sequence[str] | None,
    n_channels: int,
    workers: int,
    allow_missing: bool,
    progress: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """{"image", "site_index"} batches of the evaluation loader's shape: each site's tiles, whole
    sites per batch, batch_size // tiles-per-site sites a batch."""
    crops: list[np.ndarray] = []
    index: list[np.ndarray] = []
    sites_per_batch = None
    keys = sites["key"].to_list()
    for row, (image, names) in enumerate(_decoded(site_tasks(sites, allow_missing), workers, progress)):
        if image.shape[1] < crop_size or image.shape[2] < crop_size:
            raise ValueError(
                f"site {keys[row]!r}: image {image.shape[1]}x{image.shape[2]} is smaller than "
                f"the model's {crop_size}px crop"
            )
        tiles = tile_crops(image, crop_size, channel_indices(keys[row], names, channels, n_channels))
        sites_per_batch = sites_per_batch or max(1, batch_size // len(tiles))
        crops.append(tiles)
        index.append(np.full(len(tiles), row, dtype=np.int64))
        if len(crops) == sites_per_batch:
            yield {
                "image": torch.from_numpy(np.concatenate(crops)),
                "site_index": torch.from_numpy(np.concatenate(index)),
            }
            crops, index = [], []
    if crops:
        yield {"image": torch.from_numpy(np.concatenate(crops)), "site_index": torch.from_numpy(np.concatenate(index))}


def embed_images(
    model: Any,
    images: Any,
    *,
    channel_map: dict[int, str] | None = None,
    channels: Sequence[str] | None = None,
    pooling: str | None = None,
    block: int | None = None,
    batch_size: int = 64,
    workers: int = 4,
    precision: str = "32",
    allow_missing: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """Embeddings of raw images, one row per site, in the embeddings layout (ARCHITECTURE.md).

    model: a module with embed(), or anything `load_pretrained` takes (a checkpoint, an export
    folder, hf://org/repo). images: see `image_sites`. channels: stains to embed, in order (default:
    a phenoscale export's recorded channels, else every channel as read). Sites are tiled into
    the model's crop size (model_cfg.img_size), crops self-standardised by the model, and the
    crop embeddings averaged per site, as `phenoscale embed` does on shards.
    """
    if not hasattr(model, "embed"):
        model = lightning_modules.load_pretrained(model)
    hardware.check_embed_precision(precision)
    sites = image_sites(images, channel_map)
    device = embedding_device()
    bf16 = hardware.resolve_embed_precision(precision, device.type) == "bf16"
    hardware.configure_device(device.type)
    model = model.to(device).eval()
    channels = channels if channels is not None else getattr(model, "channel_names", None)
    n_channels = 0 if getattr(model, "channel_agnostic", False) else int(getattr(model, "in_chans", 0))
    batches = crop_batches(
        sites,
        int(model.model_cfg.img_size),
        batch_size,
        channels=channels,
        n_channels=n_channels,
        workers=workers,
        allow_missing=allow_missing,
        progress=progress,
    )
    sums, counts = site_embeddings(model, batches, sites.height, device, pooling, block, progress=False, bf16=bf16)
    means = (sums / counts[:, None]).to(torch.float32).cpu().numpy()
    return embeddings_frame(sites.drop(FILES, PLANES, strict=False), means)
