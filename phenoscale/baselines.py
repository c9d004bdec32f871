"""Reference embedders every learned model is read against.

Image statistics answer "how much of the recall does a model get from intensity alone?"; a
randomly initialised encoder answers "how much comes from the architecture, not the training?".
Both expose the same `embed(images, pooling, block)` as the LightningModules, so they go through
exactly the same embedding, alignment and scoring path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class ImageStatistics(nn.Module):
    """Per-channel intensity statistics: mean, std and five quantiles of each channel (7·C dims)."""

    @torch.no_grad()
    def embed(self, images: Tensor, pooling: str | None = None, block: int | None = None) -> Tensor:
        """Raw integer images (B, C, H, W) -> (B, 7·C), channel by channel; the statistics pool the
        whole image, so only the default pooling ('mean') applies and there are no blocks."""
        if pooling not in (None, "mean"):
            raise ValueError(f"image statistics pool the whole image; pooling must be None or 'mean', got {pooling!r}")
        if block is not None:
            raise ValueError("image statistics have no blocks")
        scale = float(torch.iinfo(images.dtype).max) if not images.is_floating_point() else 1.0
        pixels = images.flatten(2).float() / scale  # (B, C, H·W)
        # nearest-rank quantiles from one sort (torch.quantile refuses inputs over 2**24 values)
        ranks = torch.tensor(QUANTILES, device=pixels.device) * (pixels.shape[-1] - 1)
        quantiles = pixels.sort(dim=-1).values[..., ranks.round().long()]
        stats = [pixels.mean(-1, keepdim=True), pixels.std(-1, keepdim=True), quantiles]
        return torch.cat(stats, dim=-1).flatten(1)
