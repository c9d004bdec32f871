"""Crops and augmentations on raw integer site images (numpy, C x H x W), before any float cast.

Working on uint8/uint16 keeps host memory traffic 4x (2x) below float32, and every operation
here is a view or one copy into a preallocated batch, so a worker core produces thousands of
256x256 crops per second. Several crops per decoded site amortise the decode.
"""

from __future__ import annotations

import numpy as np


def random_crop_origins(height: int, width: int, size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` uniformly random top-left corners (n, 2) of size x size crops inside a height x width image."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} exceeds the image ({height} x {width})")
    return np.stack([rng.integers(0, height - size + 1, n), rng.integers(0, width - size + 1, n)], axis=1)


def dihedral(crop: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 flips/90-degree rotations of a C x h x w crop, as a view (code in 0..7).

    Bit 1 flips columns, bit 2 flips rows, bit 4 transposes (applied last); the 8 combinations
    are the 8 symmetries of the square. Microscopy fields have no canonical orientation, so all 8
    are label-preserving.
    """
    if code & 1:
        crop = crop[:, :, ::-1]
    if code & 2:
        crop = crop[:, ::-1, :]
    return crop.transpose(0, 2, 1) if code & 4 else crop


def copy_dihedral(window: np.ndarray, code: int, out: np.ndarray) -> None:
    """out[...] = dihedral(window, code), fast.

    numpy copies a transposed view element by element with a cache-hostile write pattern; copying
    it in strips of 64 bytes' worth of rows keeps the writes in cache (docs/data.md, Throughput).
    """
    oriented = dihedral(window, code & 3)
    if not code & 4:
        np.copyto(out, oriented)
        return
    strip = max(8, 64 // window.itemsize)
    for i in range(0, oriented.shape[1], strip):
        np.copyto(out[:, :, i : i + strip], oriented[:, i : i + strip, :].transpose(0, 2, 1))


def fill_random_crops(
    image: np.ndarray,
    out: np.ndarray,
    rng: np.random.Generator,
    *,
    augment: bool = True,
    channels: np.ndarray | None = None,
    permute: bool = False,
) -> None:
    """Write len(out) random crops of `image` into `out` (n, C', size, size), in place.

    channels: indices of the channels to keep, in order (None: all). permute: shuffle the kept
    channels independently per crop (for channel-agnostic models that must not rely on order).
    """
    n, _, size, _ = out.shape
    origins = random_crop_origins(image.shape[1], image.shape[2], size, n, rng)
    codes = rng.integers(0, 8, n) if augment else np.zeros(n, dtype=np.int64)
    base = np.arange(image.shape[0]) if channels is None else np.asarray(channels)
    select = channels is not None or permute  # else a plain slice: a view, no gather
    for i, ((top, left), code) in enumerate(zip(origins, codes)):
        window = image[:, top : top + size, left : left + size]
        if select:
            window = window[rng.permutation(base) if permute else base]
        copy_dihedral(window, int(code), out[i])


def tile_origins(height: int, width: int, size: int) -> np.ndarray:
    """Top-left corners of the non-overlapping size x size grid covering the image centre.

    The grid is floor(H/size) x floor(W/size); the leftover border is split evenly on both sides
    (1080 px with 256 px crops: 4 tiles from pixel 28). Row-major order.
    """
    rows, cols = height // size, width // size
    if rows == 0 or cols == 0:
        raise ValueError(f"crop size {size} exceeds the image ({height} x {width})")
    top0, left0 = (height - rows * size) // 2, (width - cols * size) // 2
    grid = np.stack(np.meshgrid(np.arange(rows) * size + top0, np.arange(cols) * size + left0, indexing="ij"), -1)
    return grid.reshape(-1, 2)


def tile_crops(image: np.ndarray, size: int, channels: np.ndarray | None = None) -> np.ndarray:
    """All non-overlapping size x size tiles of a site, (n_tiles, C', size, size), for inference."""
    if channels is not None:
        image = image[np.asarray(channels)]
    origins = tile_origins(image.shape[1], image.shape[2], size)
    out = np.empty((len(origins), image.shape[0], size, size), dtype=image.dtype)
    for i, (top, left) in enumerate(origins):
        out[i] = image[:, top : top + size, left : left + size]
    return out
