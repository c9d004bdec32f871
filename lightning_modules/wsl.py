"""Weakly supervised learning (WSL): a classifier on perturbation labels whose neck is the embedding.

The RxRx1-winning recipe: any timm backbone with the data's channels in its stem, average pool,
neck BN1d -> Linear -> ReLU -> BN1d -> Linear -> BN1d, trained with ArcFace mixed with a plain
softmax cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.base import PhenoModule
from lightning_modules.config import WSLConfig
from lightning_modules.families import register_family
from lightning_modules.losses import ArcFaceHead
from lightning_modules.standardize import self_standardize

UNLABELLED = -1


def embedding_neck(in_features: int, hidden: int, out: int) -> nn.Sequential:
    """BN1d -> Linear -> ReLU -> BN1d -> Linear -> BN1d; its output is the WSL embedding."""
    return nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Linear(hidden, out),
        nn.BatchNorm1d(out),
    )


@register_family(
    "wsl",
    config=WSLConfig,
    label="WSL",
    colour="#c0504d",
    legacy_keys={
        "wsl_hidden_dim": "hidden_dim",
        "wsl_embed_dim": "embed_dim",
        **{k: k for k in ("arcface_scale", "arcface_margin", "arcface_weight")},
    },
)
class WSLModule(PhenoModule):
    """Perturbation classifier on any timm backbone; `embed()` returns the neck output."""

    embedding_submodules = ("backbone", "neck")

    def build_layers(self) -> None:
        num_classes = self.num_classes
        if num_classes < 2:
            raise ValueError(f"WSLModule needs num_classes >= 2 perturbation labels, got {num_classes}")
        cfg = self.family_cfg
        self.backbone = self.create_backbone()
        self.neck = embedding_neck(self.backbone.num_features, cfg.hidden_dim, cfg.embed_dim)
        self.classifier = nn.Linear(cfg.embed_dim, num_classes)
        self.arcface = ArcFaceHead(cfg.embed_dim, num_classes, cfg.arcface_scale, cfg.arcface_margin)

    def forward(self, images: Tensor) -> Tensor:
        """Raw images -> neck embedding (B, model.wsl.embed_dim)."""
        return self.neck(self.backbone(self_standardize(images)))

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        labels = batch["label"]
        embedding = self(batch["image"])
        logits = self.classifier(embedding).float()
        # means over labelled samples only; a batch without labels gives 0 (not NaN) and keeps
        # the graph, so DDP ranks still all run backward
        n_labelled = (labels != UNLABELLED).sum().clamp_min(1)

        def labelled_ce(class_logits: Tensor) -> Tensor:
            return F.cross_entropy(class_logits, labels, ignore_index=UNLABELLED, reduction="sum") / n_labelled

        ce = labelled_ce(logits)
        arcface = labelled_ce(self.arcface(embedding, labels))
        weight = self.family_cfg.arcface_weight
        acc = (logits.argmax(dim=1) == labels).sum() / n_labelled
        return {"loss": (1 - weight) * ce + weight * arcface, "ce": ce, "arcface": arcface, "acc": acc}

    @property
    def trunk(self) -> nn.Module:
        return self.backbone

    @property
    def num_blocks(self) -> int:
        """One embedding layer: the neck (block 0 / -1 / None)."""
        return 1

    @torch.no_grad()
    def embed(self, images: Tensor, pooling: str | None = None, block: int | None = None) -> Tensor:
        """Neck output (B, model.wsl.embed_dim) as float32; the backbone's own pool feeds the neck."""
        if pooling not in (None, "mean"):
            raise ValueError(f"WSLModule embeds its neck output; pooling must be None or 'mean', got {pooling!r}")
        self.resolve_block(block)
        return self(images).float()
