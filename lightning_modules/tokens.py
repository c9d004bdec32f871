"""Images <-> per-patch pixel tokens, and the MAE random token masking.

Token pixel layouts follow the reference `flatten_images` so a public checkpoint's `decoder_pred`
rows mean the same pixels here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_modules.config import MASK_MODES, check_fraction, check_one_of


def patchify(images: Tensor, patch: int, channel_agnostic: bool) -> Tensor:
    """(B, C, H, W) -> pixel tokens.

    channel_agnostic: (B, C·h·w, p²), tokens channel by channel (the CA encoder's order);
    otherwise (B, h·w, p²·C) with pixels (row, col, channel) inside a token.
    """
    batch, chans, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not divisible by patch size {patch}")
    h, w = height // patch, width // patch
    x = images.reshape(batch, chans, h, patch, w, patch)
    if channel_agnostic:
        return x.permute(0, 1, 2, 4, 3, 5).reshape(batch, chans * h * w, patch * patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, h * w, patch * patch * chans)


def unpatchify(tokens: Tensor, patch: int, chans: int, channel_agnostic: bool) -> Tensor:
    """Inverse of `patchify` for square images: pixel tokens -> (B, C, H, W)."""
    batch = tokens.shape[0]
    per_image = tokens.shape[1] // chans if channel_agnostic else tokens.shape[1]
    side = int(round(per_image**0.5))
    if side * side != per_image:
        raise ValueError(f"{per_image} tokens per channel do not form a square grid")
    if channel_agnostic:
        x = tokens.reshape(batch, chans, side, side, patch, patch).permute(0, 1, 2, 4, 3, 5)
    else:
        x = tokens.reshape(batch, side, side, patch, patch, chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, chans, side * patch, side * patch)


@dataclass
class TokenMask:
    """One random masking of L tokens per sample.

    keep: (B, K) indices of visible tokens, K = int(L·(1 - ratio)).
    restore: (B, L) permutation putting [visible, masked] back into the original order.
    mask: (B, L) float, 1 where the token was hidden (where the loss applies).
    """

    keep: Tensor
    restore: Tensor
    mask: Tensor


def random_token_mask(
    batch: int,
    length: int,
    ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    channels: int = 1,
    mode: str = "joint",
) -> TokenMask:
    """Random masking, independent per sample, keeping int(length·(1 - ratio)) tokens.

    For channel-by-channel tokens (`channels`=C blocks of length/C; 1 for MAE tokens, where all
    modes are the same), `mode` says what is hidden together:
    "joint": every token on its own, uniformly (the reference CA-MAE);
    "spatial": a position in all channels at once (when length·(1-ratio) is a multiple of C);
    "channel": one whole random channel per sample, the rest uniformly (ChA-MAEViT's channel
    masking, with C >= 2 and ratio >= 1/C), so that a stain must be predicted from the others.
    """
    check_fraction("mask ratio", ratio)
    check_one_of("mask mode", mode, MASK_MODES)
    if length % channels:
        raise ValueError(f"{length} tokens do not split into {channels} channels")
    n_keep = int(length * (1 - ratio))
    if mode == "spatial":
        noise = torch.rand(batch, length // channels, device=device, generator=generator).repeat(1, channels)
    else:
        noise = torch.rand(batch, length, device=device, generator=generator)
    if mode == "channel" and channels > 1:
        if n_keep > length - length // channels:
            raise ValueError(f"mask ratio {ratio} keeps more tokens than {channels - 1} of {channels} channels hold")
        hidden = torch.randint(channels, (batch, 1), device=device, generator=generator)
        channel_of = torch.arange(length, device=device) // (length // channels)
        noise = noise + (channel_of == hidden).to(noise.dtype)  # scores above 1 sort last: hidden
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :n_keep] = 0
    return TokenMask(keep=shuffle[:, :n_keep], restore=restore, mask=torch.gather(mask, 1, restore))


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (B, L, D) at index (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
