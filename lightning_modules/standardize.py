"""Self-standardisation: the papers' only preprocessing, done in the model so loaders ship raw ints.

One function serves training (input and reconstruction target) and embedding, so the two can
never drift apart.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

#: Divisor per accepted pixel dtype: the dtype's maximum ("x / 255" of the papers for uint8).
DTYPE_MAX: dict[torch.dtype, float] = {torch.uint8: 255.0, torch.uint16: 65535.0}

INSTANCE_NORM_EPS = 1e-5


def self_standardize(images: Tensor) -> Tensor:
    """Raw integer images (B, C, H, W) -> float32, each image's channels to zero mean, unit std.

    Divide by the dtype's maximum, then InstanceNorm2d without affine (biased variance, eps 1e-5),
    exactly as the reference `SelfStandardize`. Computed in float32 even under autocast: the
    statistics of 65k-pixel channels lose precision in bf16.
    """
    if images.dtype not in DTYPE_MAX:
        raise TypeError(
            f"images must be raw integer pixels of dtype {sorted(str(d) for d in DTYPE_MAX)}, "
            f"got {images.dtype}; loaders ship the acquired bit depth, the model scales it"
        )
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    device = images.device.type
    no_autocast = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
    with no_autocast:
        x = images.to(torch.float32) / DTYPE_MAX[images.dtype]
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + INSTANCE_NORM_EPS)
