"""MAE reconstruction losses and the ArcFace margin head of the WSL models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Σ(loss·mask)/Σ(mask): the mean over hidden tokens only (predictions on visible ones ignored)."""
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def norm_pix(target: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise each target token over its own pixels (MAE's norm_pix_loss)."""
    var, mean = torch.var_mean(target, dim=-1, keepdim=True, correction=1)
    return (target - mean) / (var + eps).sqrt()


def per_token_mse(pred: Tensor, target: Tensor) -> Tensor:
    """(B, L, P) -> (B, L): squared error averaged over a token's pixels."""
    return (pred - target).square().mean(dim=-1)


def per_token_fourier_l1(pred: Tensor, target: Tensor, patch: int) -> Tensor:
    """(B, L, p²·c) -> (B, L): L1 between |FFT2| magnitudes of each p x p patch, pixel-averaged.

    Each token is its own 2-D patch (per channel), so the FFT never straddles tokens; the
    reference FourierLoss instead views the whole token sequence as one image and its radial
    variant references an undefined `num_bins`.
    """
    batch, length, pixels = pred.shape
    chans = pixels // (patch * patch)

    def magnitude(tokens: Tensor) -> Tensor:
        # patchify order inside a token is (row, col[, channel]); the FFT runs over (row, col)
        grid = tokens.float().reshape(batch, length, patch, patch, chans)
        return torch.fft.fft2(grid, dim=(2, 3)).abs()

    return (magnitude(pred) - magnitude(target)).abs().flatten(2).mean(dim=-1)


def mae_loss(
    pred: Tensor, target: Tensor, mask: Tensor, patch: int, fourier_alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(1-α)·masked MSE + α·masked Fourier L1; returns (loss, mse, fourier)."""
    mse = masked_token_mean(per_token_mse(pred.float(), target), mask)
    if fourier_alpha == 0:
        return mse, mse, torch.zeros_like(mse)
    fourier = masked_token_mean(per_token_fourier_l1(pred, target, patch), mask)
    return (1 - fourier_alpha) * mse + fourier_alpha * fourier, mse, fourier


class ArcFaceHead(nn.Module):
    """Additive angular margin logits (ArcFace): s·cos(θ_y + m) for the true class, s·cos θ else.

    Labels < 0 (unlabelled samples) get no margin; the caller's cross-entropy ignores them.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0, margin: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin
        # past θ = π - m, cos(θ + m) stops decreasing; fall back to the linear penalty of insightface
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def forward(self, embedding: Tensor, labels: Tensor) -> Tensor:
        cosine = F.linear(F.normalize(embedding.float()), F.normalize(self.weight.float()))
        sine = (1.0 - cosine.square()).clamp_min(1e-7).sqrt()
        with_margin = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
        with_margin = torch.where(cosine > self.threshold, with_margin, cosine - self.fallback)
        is_target = F.one_hot(labels.clamp_min(0), cosine.shape[1]).bool() & (labels >= 0).unsqueeze(1)
        return self.scale * torch.where(is_target, with_margin, cosine)
