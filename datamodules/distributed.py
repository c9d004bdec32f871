"""Rank and world size, wherever the data code runs (trainer process, plain script, launcher env)."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1).

    The process group wins because under Lightning DDP it is the truth; the environment covers
    torchrun/srun before the group exists (e.g. when building loaders in a launcher script).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
