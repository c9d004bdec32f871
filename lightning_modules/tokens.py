"""Images <-> per-patch pixel tokens, and the MAE random token masking.

Token pixel layouts follow the reference `flatten_images` so a public checkpoint's `decoder_pred`
rows mean the same pixels here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
    side = int(round(per_image ** 0.5))
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


def random_token_mask(batch: int, length: int, ratio: float, device: torch.device,
                      generator: torch.Generator | None = None, tied_channels: int = 1) -> TokenMask:
    """Uniform random masking, independent per sample, over all `length` tokens jointly.

    tied_channels=C (channel-by-channel tokens, C blocks of length/C) draws one score per spatial
    position shared by its C tokens, so a position is hidden or visible in every channel at once
    (when length·(1-ratio) is a multiple of C).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if length % tied_channels:
        raise ValueError(f"{length} tokens do not split into {tied_channels} channels")
    n_keep = int(length * (1 - ratio))
    noise = torch.rand(batch, length // tied_channels, device=device, generator=generator).repeat(1, tied_channels)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :n_keep] = 0
    return TokenMask(keep=shuffle[:, :n_keep], restore=restore, mask=torch.gather(mask, 1, restore))


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (B, L, D) at index (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
