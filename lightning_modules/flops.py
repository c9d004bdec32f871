"""Model FLOPs per crop, counted by torch's FlopCounterMode (matmuls, convolutions, attention).

Works on real or meta-device modules (`with torch.device("meta"): build_module(...)`), so a
ViT-L/8 plan costs no memory. These are the "model FLOPs" of MFU: recomputation is not counted.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop, sdpa_flop_count

from lightning_modules.base import PhenoModule


# torch counts the CUDA attention kernels but not the CPU flash kernel SDPA dispatches to on
# CPU, so a real-device count on CPU missed all attention FLOPs (meta-device counts had them).
# Count them as model FLOPs: forward 2 products, backward 4 (the kernel's recomputation of
# the scores is not model work), exactly what the math decomposition on meta tensors counts.
def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(sdpa_flop)
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)(_cpu_attention_backward)


def _example_batch(module: PhenoModule, batch_size: int) -> dict[str, torch.Tensor]:
    device = next(module.parameters()).device
    side = module.model_cfg.img_size
    return {
        "image": torch.zeros(batch_size, module.in_chans, side, side, dtype=torch.uint8, device=device),
        "label": torch.zeros(batch_size, dtype=torch.long, device=device),
    }


def training_flops_per_crop(module: PhenoModule, batch_size: int = 2) -> float:
    """Forward + backward FLOPs of one training step, divided by the crops in the batch."""
    batch = _example_batch(module, batch_size)
    counter = FlopCounterMode(display=False)
    with counter:
        module.compute_losses(batch)["loss"].backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def embedding_flops_per_crop(module: PhenoModule, batch_size: int = 2, **embed_kwargs: object) -> float:
    """FLOPs of `module.embed()` per crop (inference, no backward)."""
    batch = _example_batch(module, batch_size)
    counter = FlopCounterMode(display=False)
    with counter:
        module.embed(batch["image"], **embed_kwargs)
    return counter.get_total_flops() / batch_size
