"""Typed settings of the models and their optimisation (OmegaConf structured-config friendly).

`phenoscale/config.py` composes these; YAML under configs/ overrides them field by field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

FAMILIES = ("mae", "camae", "wsl")
POOLINGS = ("mean", "cls", "channelwise")
OPTIMIZERS = ("lion", "adamw")
SCHEDULES = ("onecycle", "cosine")
MASK_MODES = ("joint", "spatial", "channel")
#: How a parallel block without qkv bias applies its MLP bias (timm issue #2653, fixed 2026-01-20):
#: "fixed" adds it to the MLP features; "legacy" adds cat(zeros(3D), mlp_bias) to the whole fused
#: projection [mlp, q, k, v], as every timm before the fix did (OpenPhenom was trained that way)
MLP_BIAS_LAYOUTS = ("fixed", "legacy")


@dataclass
class ModelConfig:
    """What network to build and how it learns and embeds."""

    family: str = "camae"  # mae | camae | wsl
    # any timm name; camae needs a channel-agnostic one (ca_vit_*), mae a ViT (vit_*_256 here)
    backbone: str = "ca_vit_small_patch16_256"
    # extra timm.create_model kwargs (e.g. embed_dim/depth/num_heads for tiny test models)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 256  # crop side the model sees
    patch_size: Optional[int] = None  # None: the backbone's own
    max_in_chans: int = 11  # channel-agnostic models: most channels accepted at inference
    drop_path: float = 0.1
    # Recursion parallel blocks: the MLP-bias layout the weights were trained with (MLP_BIAS_LAYOUTS);
    # new training uses "fixed", OpenPhenom files load as "legacy"
    mlp_bias_layout: str = "fixed"
    # MAE / CA-MAE
    mask_ratio: float = 0.75
    # CA-MAE: "joint" hides channel-patches independently (the reference); "spatial" hides a position
    # in every channel at once, so a hidden patch cannot be copied from another stain at the same place;
    # "channel" also hides one whole stain per image, to be predicted from the others (ChA-MAEViT)
    # (MAE tokens already hold every channel of a position: all modes are the same there)
    mask_mode: str = "joint"
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    # CA-MAE's shared cross-attention; the reference fixes 8 heads (no weight depends on it), which
    # at a narrow decoder (32 dims: 4 per head) runs SDPA at a fraction of its speed on CPU
    cross_attention_heads: int = 8
    fourier_alpha: float = 0.01  # loss = (1-a)·masked MSE + a·Fourier L1
    norm_pix: bool = False
    # variance floor of norm_pix: MAE's 1e-6 suits natural images; in self-standardised microscopy
    # many single-channel patches are background (std ~0.05) that 1e-6 blows up to unit-variance noise
    norm_pix_eps: float = 1e-6
    # WSL
    wsl_hidden_dim: int = 1024
    wsl_embed_dim: int = 512
    arcface_scale: float = 30.0
    arcface_margin: float = 0.5
    arcface_weight: float = 0.5  # loss = (1-w)·CE(softmax head) + w·CE(ArcFace logits)
    # embed() defaults
    embed_pooling: str = "mean"
    embed_block: Optional[int] = None  # None: last block (MAE) / neck (WSL)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.embed_pooling not in POOLINGS:
            raise ValueError(f"model.embed_pooling must be one of {POOLINGS}, got {self.embed_pooling!r}")
        if self.mlp_bias_layout not in MLP_BIAS_LAYOUTS:
            raise ValueError(f"model.mlp_bias_layout must be one of {MLP_BIAS_LAYOUTS}, got {self.mlp_bias_layout!r}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"model.mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.fourier_alpha < 1.0:
            raise ValueError(f"model.fourier_alpha must be in [0, 1), got {self.fourier_alpha}")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (reference: Lion, 1e-4, wd 0.05, OneCycle cos, 10%)."""

    name: str = "lion"  # lion | adamw
    lr: float = 1e-4
    weight_decay: float = 0.05  # never applied to norms, biases, tokens and position embeddings
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: str = "onecycle"  # onecycle | cosine (linear warmup then cosine)
    warmup_fraction: float = 0.1  # OneCycle pct_start / cosine warmup share of total steps
    min_lr_ratio: float = 0.0  # cosine: final lr = lr·min_lr_ratio
    # Applied in configure_gradient_clipping unless the Trainer sets its own gradient_clip_val.
    gradient_clip_val: Optional[float] = 1.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must hold two values, got {list(self.betas)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
