"""Models of phenoscale: MAE, CA-MAE and WSL LightningModules on timm-registered backbones.

Importing the package registers the papers' ViTs in timm (`vit_{small,base,large}_patch{16,8}_256`
and their channel-agnostic twins `ca_vit_*`).
"""

from lightning_modules import backbones  # noqa: F401  (registers the backbones in timm)
from lightning_modules.base import PhenoModule
from lightning_modules.build import build_module
from lightning_modules.config import CAMAEConfig, MAEConfig, ModelConfig, OptimConfig, WSLConfig
from lightning_modules.families import Family, family_names, get_family, register_family
from lightning_modules.flops import embedding_flops_per_crop, training_flops_per_crop
from lightning_modules.mae import CAMAEModule, MAEModule
from lightning_modules.pretrained import load_pretrained
from lightning_modules.standardize import self_standardize
from lightning_modules.wsl import WSLModule

__all__ = [
    "PhenoModule",
    "MAEModule",
    "CAMAEModule",
    "WSLModule",
    "ModelConfig",
    "OptimConfig",
    "build_module",
    "MAEConfig",
    "CAMAEConfig",
    "WSLConfig",
    "Family",
    "register_family",
    "get_family",
    "family_names",
    "load_pretrained",
    "training_flops_per_crop",
    "embedding_flops_per_crop",
    "self_standardize",
]
