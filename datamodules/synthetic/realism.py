"""Realism checks of the synthetic screen against real images: how stains co-localise in cells.

The CA-MAE tokenises every stain on its own and must predict a hidden stain patch from the
others, so how strongly stains co-localise inside cells decides what it can learn. This measure
compares a synthetic site and a real Cell Painting field on the same terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def in_cell_stain_correlation(image: np.ndarray, body_channels: Sequence[int], threshold: float = 0.1) -> np.ndarray:
    """(C, C) Pearson correlations between the channels of `image` (C, H, W), over pixels in cells.

    Each channel is scaled between its 5th and 99.5th percentiles; a pixel is in a cell where the
    mean of the scaled `body_channels` (stains that fill the cytoplasm) exceeds `threshold`. Only
    cell pixels count, because in the background every stain is dark, which would make every pair
    look correlated in a sparse field and less so in a confluent one.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {image.shape}")
    x = image.astype(np.float64)
    low, high = np.percentile(x, [5.0, 99.5], axis=(1, 2), keepdims=True)
    scaled = (x - low) / np.maximum(high - low, 1e-12)
    inside = scaled[list(body_channels)].mean(0) > threshold
    if inside.sum() < 2:
        raise ValueError("no cell pixels: the body channels never exceed the threshold")
    pixels = x[:, inside]
    return np.corrcoef(pixels)
