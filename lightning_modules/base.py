"""What every phenoscale LightningModule shares: configs as hyperparameters, optimisation, embed()."""

from __future__ import annotations

from typing import Any

import lightning as L
import timm
import torch
from torch import Tensor

from lightning_modules.backbones import constructor_keywords
from lightning_modules.blocks import set_mlp_bias_layout
from lightning_modules.config import ModelConfig, OptimConfig, model_config_dict
from lightning_modules.cpu_tuning import keep_freed_memory_for_reuse
from lightning_modules.families import get_family
from lightning_modules.optim import build_optimizer, build_scheduler


class PhenoModule(L.LightningModule):
    """Base of every model family's module (MAEModule, CAMAEModule, WSLModule, plugins).

    The constructor takes plain dicts (not dataclasses) so `save_hyperparameters()` writes a
    checkpoint that rebuilds with `Module.load_from_checkpoint(path)` and safe (weights-only)
    unpickling. Subclasses are registered with `lightning_modules.families.register_family`,
    which sets `family`, and create their layers in `build_layers` rather than overriding
    `__init__`, so this one signature is what every checkpoint of every family is rebuilt with.
    """

    family: str = ""  # set by register_family

    def __init__(
        self,
        model_cfg: dict[str, Any],
        optim_cfg: dict[str, Any],
        in_chans: int,
        num_classes: int = 0,
        total_steps: int = 1,
    ) -> None:
        super().__init__()
        model_cfg = model_config_dict(model_cfg)  # checkpoints from before the per-family sections, too
        self.save_hyperparameters(
            {
                "model_cfg": model_cfg,
                "optim_cfg": optim_cfg,
                "in_chans": in_chans,
                "num_classes": num_classes,
                "total_steps": total_steps,
            }
        )
        family = model_cfg["family"]
        if family != self.family:
            raise ValueError(f"{type(self).__name__} is family {self.family!r}, got model.family={family!r}")
        self.model_cfg = ModelConfig(**{k: v for k, v in model_cfg.items() if k != family})
        #: the family's own section (model.<family>), as its registered dataclass
        self.family_cfg = get_family(family).config(**model_cfg[family])
        self.optim_cfg = OptimConfig(**optim_cfg)
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.total_steps = total_steps
        self.build_layers()

    def build_layers(self) -> None:
        """Create the family's layers (and check what it needs) from the configs set above.

        A no-op here, not abstract, so that a plugin family which still overrides `__init__`
        and builds its layers after `super().__init__(...)` keeps working.
        """

    def create_backbone(self, **overrides: Any) -> torch.nn.Module:
        """timm.create_model(model.backbone) with the data's channels and no classifier head.

        The crop size and drop-path rate are passed only to backbones whose constructor takes them
        (CNNs have no position grid; DenseNet no drop path). timm's factories take `**kwargs`, so
        the constructor is read from the class of a meta-device build (no memory, no weights).
        """
        cfg = self.model_cfg
        if not timm.is_model(cfg.backbone):
            raise ValueError(
                f"model.backbone {cfg.backbone!r} is not a registered timm model "
                "(import lightning_modules registers the papers' ViTs)"
            )
        kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": self.in_chans, **cfg.backbone_kwargs, **overrides}
        if cfg.patch_size is not None:
            kwargs.setdefault("patch_size", cfg.patch_size)
        with torch.device("meta"):
            accepted = constructor_keywords(type(timm.create_model(cfg.backbone, **kwargs)))
        optional = {
            name: value
            for name, value in {"img_size": cfg.img_size, "drop_path_rate": cfg.drop_path}.items()
            if accepted is None or name in accepted
        }
        return set_mlp_bias_layout(timm.create_model(cfg.backbone, **optional, **kwargs), cfg.mlp_bias_layout)

    def setup(self, stage: str) -> None:
        """On CPU, stop glibc from handing step buffers back to the kernel (see cpu_tuning)."""
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()

    # --- embeddings -------------------------------------------------------------------------
    #: the child modules embed() uses: what an --encoder-only export keeps (lightning_modules.export)
    embedding_submodules: tuple[str, ...] = ()
    #: stains in channel order the weights were trained on, when known (an export's config.json)
    channel_names: list[str] | None = None

    @property
    def trunk(self) -> torch.nn.Module:
        """The part that embeds (an MAE's encoder, a classifier's backbone): what `plan` counts."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        """How many layers `embed(block=i)` accepts (i in [0, num_blocks), negatives from the end)."""
        raise NotImplementedError

    def embed(self, images: Tensor, pooling: str | None = None, block: int | None = None) -> Tensor:
        """Raw integer images (B, C, H, W) -> float32 embeddings (B, D); see ARCHITECTURE.md."""
        raise NotImplementedError

    def resolve_block(self, block: int | None) -> int:
        """Validate an embed() block index; None -> the configured default (last block)."""
        block = self.model_cfg.embed_block if block is None else block
        if block is None:
            return self.num_blocks - 1
        if not -self.num_blocks <= block < self.num_blocks:
            raise ValueError(f"block {block} out of range for a model with {self.num_blocks} blocks")
        return block % self.num_blocks

    # --- optimisation -----------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"loss": total, <term>: value, ...} for one training batch; no logging (used by flops)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        batch_size = batch["image"].shape[0]
        terms = {f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}
        self.log_dict(terms, on_step=True, batch_size=batch_size)
        self.log("train/loss", losses["loss"].detach(), on_step=True, prog_bar=True, batch_size=batch_size)
        return losses["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the Trainer's gradient_clip_val if it sets one, else by optim.gradient_clip_val."""
        value = gradient_clip_val if gradient_clip_val is not None else self.optim_cfg.gradient_clip_val
        if value:
            self.clip_gradients(
                optimizer, gradient_clip_val=value, gradient_clip_algorithm=gradient_clip_algorithm or "norm"
            )
