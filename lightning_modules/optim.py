"""Optimiser and schedule from an OptimConfig: Lion or AdamW, OneCycle or warmup + cosine."""

from __future__ import annotations

import math

import torch
from timm.optim import Lion, param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from lightning_modules.config import OptimConfig

#: Names (fnmatch patterns, timm's convention) of matrices that never get weight decay: learned
#: tokens and embeddings. Vectors (norms, biases, LayerScale) never get it either.
NO_DECAY_PATTERNS = ("*token*", "*pos_embed*", "*embeddings*")


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """timm's optimiser groups of the trainable parameters: not decayed, then decayed (a group
    with no parameters is left out)."""
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=NO_DECAY_PATTERNS)


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(module, cfg.weight_decay)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """lr multiplier: linear warmup from ~0 to 1, then cosine down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LRScheduler:
    """A per-step schedule over `total_steps` optimiser steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 to build the {cfg.schedule} schedule, got {total_steps}")
    if cfg.schedule == "onecycle":
        # as the reference: OneCycleLR, cosine annealing (it also cycles beta1 0.85 <-> 0.95)
        return OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_fraction, anneal_strategy="cos"
        )
    warmup = int(cfg.warmup_fraction * total_steps)
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup, cfg.min_lr_ratio))
