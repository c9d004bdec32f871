"""DataConfig: every knob of the data pipeline, OmegaConf-friendly (see docs/data.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING


@dataclass
class DataConfig:
    # where: a shard directory (holding manifest.parquet), a glob or brace pattern of its tar files,
    # or URLs: http(s)://, s3://, gs://, az:// (the `remote` extra), pipe:CMD (docs/data.md)
    train_shards: str = MISSING
    eval_shards: Optional[str] = None  # None: the training shards
    manifest: Optional[str] = None  # None: manifest.parquet beside the shards (same directory or URL prefix)
    io_timeout: float = 60.0  # seconds per connect/read of a remote shard before a retry
    io_retries: int = 5  # reopenings (exponential backoff) of a failing remote shard before the run stops
    io_read_ahead_mb: int = 64  # MB fetched ahead of the reader per remote shard in flight (two per worker; 0: none)
    # what a batch is
    crop_size: int = 256
    crops_per_site: int = 4  # random crops per decoded site (amortises the decode); divides batch_size
    batch_size: int = 64  # crops per rank per step (training and evaluation)
    steps_per_epoch: Optional[int] = None  # None: each site visited ~once per epoch across all ranks
    # augmentation and channels
    augment: bool = True  # random flips + 90-degree rotations
    channels: Optional[list[str]] = None  # stain names to keep, in this order (None: all, as stored)
    channel_permute: bool = False  # shuffle channel order per crop (channel-agnostic training)
    in_chans: Optional[int] = None  # channels the model expects: a mismatch is an error before training
    # labels (weakly supervised training)
    label_key: str = "perturbation"
    # streaming
    shuffle_buffer: int = 64  # sites held per worker for shuffling across shard boundaries
    num_workers: int = 4
    prefetch_factor: int = 2
    pin_memory: Optional[bool] = None  # page-locked batches for fast host-to-GPU copies; None: when CUDA is available
    verify_shards: bool = True  # check every shard's tar index against the manifest at setup
    # writing: the default shard size of converters (`phenoscale shards --max-shard-mb`)
    max_shard_mb: int = 512
