"""Optimiser and schedule from an OptimConfig: Lion or AdamW, OneCycle or warmup + cosine."""
from __future__ import annotations

import math

import torch
from timm.optim import Lion
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from lightning_modules.config import OptimConfig

#: Parameter-name fragments that never get weight decay (learned tokens and embeddings).
NO_DECAY_NAMES = ("token", "pos_embed", "embeddings")


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay only on matrices/kernels: not norms, biases, LayerScale, tokens, embeddings."""
    return param.ndim > 1 and not any(fragment in name for fragment in NO_DECAY_NAMES)


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups (decayed, not decayed) of the trainable parameters."""
    decayed, plain = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (decayed if decays(name, param) else plain).append(param)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


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
        return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                          pct_start=cfg.warmup_fraction, anneal_strategy="cos")
    warmup = int(cfg.warmup_fraction * total_steps)
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup, cfg.min_lr_ratio))
