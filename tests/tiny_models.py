"""Tiny CPU model configs and real image crops shared by the model tests (test_backbones, test_mae, ...)."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamodules.synthetic.design import design_screen, preset
from datamodules.synthetic.screen import render_sites
from lightning_modules import ModelConfig, OptimConfig, build_module
from real_field import pediatric_field

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
#: model-config overrides for a tiny timm CNN (ResNet-18 layout, 1 block per stage, narrow)
TINY_CNN = dict(
    backbone="resnet18",
    patch_size=None,
    backbone_kwargs={"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8},
)


#: the tiny settings of each family's own section (model.<family>)
TINY_SECTIONS = {
    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "camae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "wsl": {"hidden_dim": 32, "embed_dim": 16},
}


def tiny_model_cfg(family: str, **overrides: object) -> dict:
    """32x32 crops, 8x8 patches, width 32: a few ms per step on one core.

    `overrides` may name shared ModelConfig fields or fields of the family's own section.
    """
    backbone = {"camae": "ca_vit_small_patch16_256"}.get(family, "vit_small_patch16_256")
    shared = dict(
        family=family, backbone=backbone, backbone_kwargs=dict(TINY_VIT), img_size=32, patch_size=8, drop_path=0.0
    )
    section = dict(TINY_SECTIONS.get(family, {}))
    for key, value in overrides.items():
        (shared if key in ModelConfig.__dataclass_fields__ else section)[key] = value
    return {**shared, family: section}


def tiny_module(
    family: str,
    in_chans: int = 6,
    num_classes: int = 0,
    total_steps: int = 100,
    optim: OptimConfig | None = None,
    **overrides: object,
):
    return build_module(
        tiny_model_cfg(family, **overrides),
        optim or OptimConfig(name="adamw", lr=1e-3),
        in_chans=in_chans,
        num_classes=num_classes,
        total_steps=total_steps,
    )


def bare_trainer(**overrides: object) -> L.Trainer:
    """A CPU Trainer without a run's extras (logger, checkpoints, progress bar, model summary):
    enough to drive a module's training steps in a test."""
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**settings, **overrides})


def real_crops(shared_data: Path, n: int, size: int = 32, dtype: torch.dtype = torch.uint16) -> torch.Tensor:
    """n non-overlapping size x size crops (n, 6, size, size) of the real field, in its uint16 (or uint8)."""
    field = pediatric_field(shared_data)[:, 256:, 256:]  # the well-populated centre of the field
    per_row = field.shape[2] // size
    crops = [
        field[:, (i // per_row) * size : (i // per_row + 1) * size, (i % per_row) * size : (i % per_row + 1) * size]
        for i in range(n)
    ]
    stacked = torch.from_numpy(np.stack(crops).astype(np.int32))
    if dtype == torch.uint8:
        return (stacked // 257).to(torch.uint8)
    return stacked.to(torch.uint16)


@functools.cache
def _synthetic_sites(dtype: str, sites: int = 16) -> np.ndarray:
    """The first sites (sites, 6, 64, 64) of the project's tiny synthetic screen, rendered once per process."""
    return np.stack(list(itertools.islice(render_sites(design_screen(preset("tiny", dtype=dtype))), sites)))


def synthetic_crops(n: int, size: int = 32, dtype: torch.dtype = torch.uint16) -> torch.Tensor:
    """n crops (n, 6, size, size) of rendered synthetic cells, for tests whose property holds for
    any cell image: they run where the real data (real_crops) is absent."""
    sites = _synthetic_sites("uint16" if dtype == torch.uint16 else "uint8")
    per_site = (sites.shape[-1] // size) ** 2
    if n > len(sites) * per_site:
        raise ValueError(f"{n} crops of {size} px asked; the synthetic sites hold {len(sites) * per_site}")
    crops = [
        sites[i // per_site, :, r * size : (r + 1) * size, c * size : (c + 1) * size]
        for i in range(n)
        for r, c in [divmod(i % per_site, sites.shape[-1] // size)]
    ]
    return torch.from_numpy(np.stack(crops).astype(np.int32)).to(dtype)
