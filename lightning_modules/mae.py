"""Masked autoencoders on timm ViTs: MAEModule (all channels per token) and CAMAEModule.

The encoder runs the timm backbone through its public forward_features / forward_intermediates;
nothing of the ViT is re-implemented. Submodule names (`encoder.vit_backbone`, `decoder`,
`encoder_decoder_proj`, `decoder_pred`) are those of the public OpenPhenom checkpoint.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightning_modules.backbones import is_channel_agnostic
from lightning_modules.base import PhenoModule
from lightning_modules.config import CAMAEConfig, MAEConfig
from lightning_modules.decoders import CAMAEDecoder, DecoderBlocks, MAEDecoder
from lightning_modules.families import register_family
from lightning_modules.losses import mae_loss, norm_pix
from lightning_modules.standardize import self_standardize
from lightning_modules.tokens import TokenMask, gather_tokens, patchify, random_token_mask


def _legacy(config: type) -> dict[str, str]:
    """Flat model.<key> names of the masked autoencoders' settings: the same names as the fields."""
    return {f: f for f in config.__dataclass_fields__}


class VisibleTokens(nn.Module):
    """Keeps the prefix tokens and the patch tokens at `keep`: the MAE mask, in the ViT's `patch_drop` slot.

    timm's ViT applies `patch_drop` between the position embedding and `norm_pre` + blocks in both
    forward_features and forward_intermediates, so placing the mask there runs the public forward
    on the visible tokens only, instead of a copy of timm's position-embedding code. With no
    `keep` set (embedding, or outside `MaskedEncoder.forward_masked`) it passes every token on.
    """

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.keep: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.keep is None:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        return torch.cat([prefix, gather_tokens(patches, self.keep)], dim=1)


class MaskedEncoder(nn.Module):
    """A timm VisionTransformer run on a random subset of its patch tokens (CLS always kept)."""

    def __init__(self, vit_backbone: VisionTransformer) -> None:
        super().__init__()
        if not isinstance(vit_backbone, VisionTransformer):
            raise TypeError(f"MAE encoders need a timm VisionTransformer, got {type(vit_backbone).__name__}")
        vit_backbone.patch_drop = VisibleTokens(int(vit_backbone.num_prefix_tokens))  # MAE masking replaces it
        self.vit_backbone = vit_backbone

    @property
    def embed_dim(self) -> int:
        return int(self.vit_backbone.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit_backbone.num_prefix_tokens)

    def forward_masked(
        self,
        images: Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        channels: int = 1,
        mask_mode: str = "joint",
    ) -> tuple[Tensor, TokenMask]:
        """Encode the visible tokens: (B, prefix + K, D) after the final norm, and the mask used.

        `channels` is 1 for MAE tokens and C for the channel-by-channel tokens of a CA ViT.
        """
        vit = self.vit_backbone
        mask = random_token_mask(
            images.shape[0],
            channels * vit.patch_embed.num_patches,
            mask_ratio,
            images.device,
            generator,
            channels,
            mask_mode,
        )
        vit.patch_drop.keep = mask.keep
        try:
            return vit.forward_features(images), mask
        finally:
            vit.patch_drop.keep = None

    def forward_blocks(self, images: Tensor, last_block: int) -> tuple[Tensor, Tensor]:
        """(prefix (B, P, D), patch tokens (B, L, D)) after blocks[0..last_block], no final norm
        (the OpenPhenom embedding layer)."""
        has_prefix = self.num_prefix_tokens > 0  # without prefix tokens timm returns the patch tokens alone
        [taken] = self.vit_backbone.forward_intermediates(
            images,
            indices=[last_block],
            return_prefix_tokens=has_prefix,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        patches, prefix = taken if has_prefix else (taken, taken[:, :0])
        return prefix, patches


class MaskedAutoencoderModule(PhenoModule):
    """Shared training and embedding logic of MAE and CA-MAE; subclasses pick the decoder."""

    channel_agnostic: bool = False
    embedding_submodules = ("encoder",)

    def build_layers(self) -> None:
        cfg = self.family_cfg
        extra = {"max_in_chans": cfg.max_in_chans} if self.channel_agnostic else {}
        backbone = self.create_backbone(**extra)
        if is_channel_agnostic(backbone) != self.channel_agnostic:
            kind = "a channel-agnostic (ca_vit_*)" if self.channel_agnostic else "a per-image (not ca_*)"
            raise ValueError(
                f"{type(self).__name__} needs {kind} backbone, got model.backbone={self.model_cfg.backbone!r}"
            )
        # the pooled head (fc_norm/head) is used by neither the MAE loss nor the embedding; frozen,
        # so DDP sees no parameter without a gradient (its keys stay for checkpoint compatibility)
        for head in (backbone.fc_norm, backbone.head):
            head.requires_grad_(False)
        self.encoder = MaskedEncoder(backbone)
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        self.grid = int(backbone.patch_embed.grid_size[0])
        self.decoder = self.build_decoder()
        self.encoder_decoder_proj = nn.Linear(self.encoder.embed_dim, cfg.decoder_dim)
        pixels_per_token = self.patch_size**2 * (1 if self.channel_agnostic else self.in_chans)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, pixels_per_token)

    def build_decoder(self) -> nn.Module:
        raise NotImplementedError

    def decoder_blocks(self) -> DecoderBlocks:
        """The model.<family> decoder settings, as the decoders take them."""
        cfg = self.family_cfg
        return DecoderBlocks(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, TokenMask]:
        """Raw images -> (pixel predictions (B, L, P), standardised pixel targets (B, L, P), mask)."""
        x = self_standardize(images)
        cfg = self.family_cfg
        channels = x.shape[1] if self.channel_agnostic else 1
        mask_mode = cfg.mask_mode if self.channel_agnostic else "joint"  # an MAE token holds every channel
        latent, mask = self.encoder.forward_masked(x, cfg.mask_ratio, generator, channels, mask_mode)
        decoded = self.decoder(self.encoder_decoder_proj(latent), mask.restore)
        pred = self.decoder_pred(decoded[:, self.encoder.num_prefix_tokens :])
        target = patchify(x, self.patch_size, self.channel_agnostic)
        if cfg.norm_pix:
            target = norm_pix(target, cfg.norm_pix_eps)
        return pred, target, mask

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pred, target, mask = self(batch["image"])
        loss, mse, fourier = mae_loss(pred, target, mask.mask, self.patch_size, self.family_cfg.fourier_alpha)
        return {"loss": loss, "mse": mse, "fourier": fourier}

    @property
    def num_blocks(self) -> int:
        return len(self.encoder.vit_backbone.blocks)

    @property
    def trunk(self) -> nn.Module:
        return self.encoder

    @torch.no_grad()
    def embed(self, images: Tensor, pooling: str | None = None, block: int | None = None) -> Tensor:
        """Mean of patch tokens ('mean'), class token ('cls') or per-channel means concatenated
        ('channelwise', CA only) of block `block`'s output without final norm (default: last)."""
        pooling = pooling or self.model_cfg.embed_pooling
        prefix, patches = self.encoder.forward_blocks(self_standardize(images), self.resolve_block(block))
        if pooling == "mean":
            out = patches.mean(dim=1)
        elif pooling == "cls":
            if prefix.shape[1] == 0:
                raise ValueError("pooling='cls' needs a backbone with a class token")
            out = prefix[:, 0]
        elif pooling == "channelwise":
            if not self.channel_agnostic:
                raise ValueError("pooling='channelwise' needs a channel-agnostic model (CAMAEModule)")
            out = patches.reshape(patches.shape[0], images.shape[1], -1, patches.shape[-1]).mean(dim=2).flatten(1)
        else:
            raise ValueError(f"pooling must be 'mean', 'cls' or 'channelwise', got {pooling!r}")
        return out.float()


@register_family(
    "mae", config=MAEConfig, label="MAE", colour="#3b75af", self_supervised=True, legacy_keys=_legacy(MAEConfig)
)
class MAEModule(MaskedAutoencoderModule):
    """MAE: every token holds all channels of a patch; ViT decoder (reference MAEDecoder)."""

    def build_decoder(self) -> nn.Module:
        return MAEDecoder(self.grid * self.grid, self.grid, self.decoder_blocks())


@register_family(
    "camae",
    config=CAMAEConfig,
    label="CA-MAE",
    colour="#2e8b57",
    self_supervised=True,
    legacy_keys=_legacy(CAMAEConfig),
)
class CAMAEModule(MaskedAutoencoderModule):
    """Channel-agnostic MAE: one token per channel-patch; CAMAEDecoder with one stack per channel.

    Trains on exactly `in_chans` channels (one decoder stack each); embeds any number and order
    of channels up to `max_in_chans`.
    """

    channel_agnostic = True

    def build_decoder(self) -> nn.Module:
        return CAMAEDecoder(
            self.in_chans,
            self.grid * self.grid,
            self.grid,
            self.decoder_blocks(),
            cross_attention_heads=self.family_cfg.cross_attention_heads,
        )
