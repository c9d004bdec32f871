"""Typed settings of the models and their optimisation (OmegaConf structured-config friendly).

`phenoscale/config.py` composes these; YAML under configs/ overrides them field by field.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_modules.families import family_names, get_family

POOLINGS = ("mean", "cls", "channelwise")
OPTIMIZERS = ("lion", "adamw")
SCHEDULES = ("onecycle", "cosine")
MASK_MODES = ("joint", "spatial", "channel")
#: How a parallel block without qkv bias applies its MLP bias (timm issue #2653, fixed 2026-01-20):
#: "fixed" adds it to the MLP features; "legacy" adds cat(zeros(3D), mlp_bias) to the whole fused
#: projection [mlp, q, k, v], as every timm before the fix did (OpenPhenom was trained that way)
MLP_BIAS_LAYOUTS = ("fixed", "legacy")


def check_one_of(key: str, value: object, choices: tuple[str, ...]) -> None:
    """Refuse a setting outside its choices, naming the key, so a typo fails at load and not mid-run."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")


def check_fraction(key: str, value: float, *, one_allowed: bool = False) -> None:
    """Refuse a share outside [0, 1) (or [0, 1] when 1 is meaningful, e.g. a loss weight), naming the key."""
    if not (0.0 <= value <= 1.0 if one_allowed else 0.0 <= value < 1.0):
        raise ValueError(f"{key} must be in [0, {'1]' if one_allowed else '1)'}, got {value}")


@dataclass
class ModelConfig:
    """What network to build and how it embeds: the settings every family shares.

    What only one family uses lives in that family's own section, `model.<family>` (MAEConfig,
    CAMAEConfig, WSLConfig below, or a registered plugin's dataclass); `model_config_dict`
    validates both parts together.
    """

    family: str = "camae"  # a registered family (lightning_modules.families): mae | camae | wsl | ...
    # any timm name; camae needs a channel-agnostic one (ca_vit_*), mae a ViT (vit_*_256 here)
    backbone: str = "ca_vit_small_patch16_256"
    # extra timm.create_model kwargs (e.g. embed_dim/depth/num_heads for tiny test models)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 256  # crop side the model sees
    patch_size: Optional[int] = None  # None: the backbone's own
    drop_path: float = 0.1
    # Recursion parallel blocks: the MLP-bias layout the weights were trained with (MLP_BIAS_LAYOUTS);
    # new training uses "fixed", OpenPhenom files load as "legacy"
    mlp_bias_layout: str = "fixed"
    # embed() defaults
    embed_pooling: str = "mean"
    embed_block: Optional[int] = None  # None: last block (MAE) / neck (WSL)

    def __post_init__(self) -> None:
        get_family(self.family)  # raises, listing the registered families
        check_one_of("model.embed_pooling", self.embed_pooling, POOLINGS)
        check_one_of("model.mlp_bias_layout", self.mlp_bias_layout, MLP_BIAS_LAYOUTS)


@dataclass
class MAEConfig:
    """model.mae: masked-autoencoder pre-training (also the base of model.camae)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    fourier_alpha: float = 0.01  # loss = (1-a)·masked MSE + a·Fourier L1
    norm_pix: bool = False
    # variance floor of norm_pix: MAE's 1e-6 suits natural images; in self-standardised microscopy
    # many single-channel patches are background (std ~0.05) that 1e-6 blows up to unit-variance noise
    norm_pix_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_fraction("model.*.mask_ratio", self.mask_ratio)
        check_fraction("model.*.fourier_alpha", self.fourier_alpha)


@dataclass
class CAMAEConfig(MAEConfig):
    """model.camae: the channel-agnostic MAE's settings on top of the MAE's."""

    max_in_chans: int = 11  # most channels accepted at inference
    # "joint" hides channel-patches independently (the reference); "spatial" hides a position
    # in every channel at once, so a hidden patch cannot be copied from another stain at the same place;
    # "channel" also hides one whole stain per image, to be predicted from the others (ChA-MAEViT)
    mask_mode: str = "joint"
    # the shared cross-attention; the reference fixes 8 heads (no weight depends on it), which
    # at a narrow decoder (32 dims: 4 per head) runs SDPA at a fraction of its speed on CPU
    cross_attention_heads: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_of("model.camae.mask_mode", self.mask_mode, MASK_MODES)


@dataclass
class WSLConfig:
    """model.wsl: the weakly supervised classifier's neck and loss."""

    hidden_dim: int = 1024  # the neck's inner width (backbone features -> hidden -> embedding)
    embed_dim: int = 512  # the embedding embed() returns, what the classifier and ArcFace heads see
    arcface_scale: float = 30.0  # s: the logits' scale on the unit sphere
    arcface_margin: float = 0.5  # m (radians) added to the true class's angle
    arcface_weight: float = 0.5  # loss = (1-w)·CE(softmax head) + w·CE(ArcFace logits)

    def __post_init__(self) -> None:
        # outside [0, 1] one of the two cross-entropies would be maximised instead of minimised
        check_fraction("model.wsl.arcface_weight", self.arcface_weight, one_allowed=True)


def plain_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass, DictConfig (resolved) or mapping as a plain dict, not yet validated."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if is_dataclass(cfg):
        return asdict(cfg)
    return dict(cfg)


def family_name(cfg: dict[str, Any]) -> str:
    """The family a plain model config names; ModelConfig's default when it names none."""
    return cfg.get("family", ModelConfig.family)


def migrate_legacy_keys(cfg: dict[str, Any], family: str | None = None, source: str = "model config") -> dict[str, Any]:
    """Flat keys from before the per-family sections (`model.mask_ratio`) -> `model.<family>.<key>`.

    Kept for one release so old YAML files and checkpoints still load; each moved key warns
    with its new name (a FutureWarning: shown to users by default). A flat key of another family
    (e.g. `wsl_hidden_dim` in an MAE config, harmless when configs were flat) is dropped with a warning.
    """
    family = get_family(family or family_name(cfg))
    every_legacy = {key for f in (get_family(n) for n in family_names()) for key in f.legacy_keys}
    moved = {key for key in cfg if key in every_legacy}
    if not moved:
        return cfg
    out = {k: v for k, v in cfg.items() if k not in moved}
    section = dict(out.get(family.name) or {})
    for key in sorted(moved):
        if key in family.legacy_keys:
            new = family.legacy_keys[key]
            section.setdefault(new, cfg[key])
            warnings.warn(
                f"{source}: model.{key} is deprecated, use model.{family.name}.{new}", FutureWarning, stacklevel=3
            )
        else:
            warnings.warn(
                f"{source}: model.{key} is not a setting of family {family.name!r}; ignored",
                FutureWarning,
                stacklevel=3,
            )
    out[family.name] = section
    return out


def without_other_sections(cfg: dict[str, Any], family: str | None = None) -> dict[str, Any]:
    """`cfg` without the sections of registered families other than its own."""
    family = family or family_name(cfg)
    return {k: v for k, v in cfg.items() if k == family or k not in family_names()}


def model_config_dict(cfg: Any) -> dict[str, Any]:
    """ModelConfig, DictConfig or dict (with its `model.<family>` section) -> a validated plain dict.

    The section of the configured family is checked by the family's own dataclass; sections of
    other registered families are dropped (one file may configure several families, as
    configs/experiments/tiny.yaml does); an unknown key fails naming what is allowed.
    """
    raw = without_other_sections(migrate_legacy_keys(plain_dict(cfg)))
    family = get_family(family_name(raw))
    shared = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(raw) - shared - {family.name})
    if unknown:
        raise ValueError(
            f"unknown ModelConfig keys {unknown}; allowed: {sorted(shared)} and the section {family.name!r}"
        )
    section = dict(raw.get(family.name) or {})
    allowed = {f.name for f in fields(family.config)}
    if set(section) - allowed:
        raise ValueError(
            f"unknown model.{family.name} keys {sorted(set(section) - allowed)}; allowed: {sorted(allowed)}"
        )
    common = asdict(ModelConfig(**{k: v for k, v in raw.items() if k in shared}))
    return {**common, family.name: asdict(family.config(**section))}


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (reference: Lion, 1e-4, wd 0.05, OneCycle cos, 10%)."""

    name: str = "lion"  # lion | adamw
    lr: float = 1e-4
    weight_decay: float = 0.05  # never applied to norms, biases, tokens and position embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: str = "onecycle"  # onecycle | cosine (linear warmup then cosine)
    warmup_fraction: float = 0.1  # OneCycle pct_start / cosine warmup share of total steps
    min_lr_ratio: float = 0.0  # cosine: final lr = lr·min_lr_ratio
    # Applied in configure_gradient_clipping unless the Trainer sets its own gradient_clip_val.
    gradient_clip_val: Optional[float] = 1.0

    def __post_init__(self) -> None:
        check_one_of("optim.name", self.name, OPTIMIZERS)
        check_one_of("optim.schedule", self.schedule, SCHEDULES)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must hold two values, got {list(self.betas)}")
        check_fraction("optim.warmup_fraction", self.warmup_fraction)
