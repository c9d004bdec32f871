"""build_module: typed configs -> the LightningModule of the configured family."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from omegaconf import DictConfig

from lightning_modules.base import PhenoModule
from lightning_modules.config import ModelConfig, OptimConfig, family_name, plain_dict
from lightning_modules.families import get_family


def as_plain_dict(cfg: Any, schema: type) -> dict[str, Any]:
    """Dataclass, DictConfig or dict -> a validated plain dict of `schema`'s fields."""
    cfg = plain_dict(cfg)
    unknown = set(cfg) - set(schema.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown {schema.__name__} keys {sorted(unknown)}; allowed: {sorted(schema.__dataclass_fields__)}"
        )
    return asdict(schema(**cfg))


def build_module(
    model_cfg: ModelConfig | DictConfig | dict,
    optim_cfg: OptimConfig | DictConfig | dict,
    *,
    in_chans: int,
    num_classes: int = 0,
    total_steps: int = 1,
) -> PhenoModule:
    """The LightningModule of the registered family `model_cfg.family`, ready for a Trainer.

    Only the family name is read here: the model config is validated by PhenoModule.__init__
    (`model_config_dict`), as it must be when a checkpoint rebuilds the module.
    """
    model = plain_dict(model_cfg)
    optim = as_plain_dict(optim_cfg, OptimConfig)
    return get_family(family_name(model)).module(
        model, optim, in_chans=in_chans, num_classes=num_classes, total_steps=total_steps
    )
