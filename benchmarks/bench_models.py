"""CA-MAE ViT-S/16 (OpenPhenom settings) on 6x256x256 crops: training step and embedding speed.

Throughput is reported as crops/s and as MFU = counted model FLOP/s (FlopCounterMode, forward +
backward at mask 0.75) divided by the GEMM peak measured in the same run, in the same dtype, on
the same threads, so that CPU contention from other processes hits numerator and denominator
alike. Which precisions run is the hardware's decision (lightning_modules.hardware): on a CPU
with native bf16, training in fp32 and under bf16 autocast (MatmulAttention of
lightning_modules/blocks.py) and embed() under bf16 autocast (the blocked bf16 attention there);
on any other CPU, fp32 training and fp32 embed() only, since emulated bf16 would measure nothing
a user should run. FLOPs are counted as SDPA's, in float32: the same matmuls of the model, not
the backward's recomputation. Peak memory is the max RSS of a fresh child process doing training
steps at batch 8 in the lowest precision that ran (fp32 in another child is the same-run baseline).

Reference (issue 3, the public implementation on this machine at batch 8): bf16 training MFU
0.48 (1.14 crops/s), fp32 0.41 crops/s (MFU 0.77), bf16 embedding MFU 0.27, 5.9 GB peak.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.harness import Measurement, best_time, run_isolated
from lightning_modules import build_module, embedding_flops_per_crop, training_flops_per_crop
from lightning_modules.cpu_tuning import keep_freed_memory_for_reuse
from lightning_modules.hardware import numerics
from phenoscale.config import load_config

BATCH = 8
GEMM_SIDE = 4096
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper" / "camae_vit_s16_openphenom.yaml"
TARGETS = {"train_bf16_mfu": 0.60, "embed_bf16_mfu": 0.55, "peak_memory_gb": 5.9}
REFERENCE = {
    "train_bf16_mfu": 0.48,
    "train_bf16_crops_per_s": 1.14,
    "train_fp32_crops_per_s": 0.41,
    "train_fp32_mfu": 0.77,
    "embed_bf16_mfu": 0.27,
    "peak_memory_gb": 5.9,
}


def paper_module(config: Path, in_chans: int = 6) -> torch.nn.Module:
    """The model of a configs/paper/*.yaml file, as `phenoscale fit` builds it (validated config)."""
    cfg = load_config(config)
    return build_module(cfg.model, cfg.optim, in_chans=in_chans, total_steps=1000)


def openphenom_module() -> torch.nn.Module:
    return paper_module(CONFIG)


def gemm_peak_flops(dtype: torch.dtype) -> float:
    """FLOP/s of one large square matmul: the attainable peak of this machine right now."""
    a = torch.randn(GEMM_SIDE, GEMM_SIDE, dtype=dtype)
    b = torch.randn(GEMM_SIDE, GEMM_SIDE, dtype=dtype)
    return 2 * GEMM_SIDE**3 / best_time(lambda: a @ b, repeats=3)


def crops(batch: int = BATCH) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 6, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def train_step_fn(module, optimizer, images: torch.Tensor, bf16: bool):
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.compute_losses({"image": images})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


PEAK_MEMORY_CHILD = """
import torch
torch.set_num_threads({threads})
from benchmarks.bench_models import openphenom_module, crops, train_step_fn
from lightning_modules.cpu_tuning import keep_freed_memory_for_reuse
keep_freed_memory_for_reuse()
module = openphenom_module()
optimizer = module.configure_optimizers()["optimizer"]
train_step_fn(module, optimizer, crops(), bf16={bf16})()  # the first step allocates the optimiser state too
"""


def child_peak_memory_gb(threads: int, bf16: bool) -> float:
    """Peak resident memory of a fresh process running one training step at batch 8."""
    return run_isolated(PEAK_MEMORY_CHILD.format(threads=threads, bf16=bf16))["peak_gb"]


def run() -> list[Measurement]:
    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    keep_freed_memory_for_reuse()  # as PhenoModule.setup does for CPU training
    torch.manual_seed(0)
    module = openphenom_module()
    train_flops = training_flops_per_crop(module, batch_size=BATCH)
    embed_flops = embedding_flops_per_crop(module, batch_size=BATCH)
    optimizer = module.configure_optimizers()["optimizer"]
    images = crops()
    # bf16 rows only where the CPU multiplies bf16 natively: emulated, one step would take many minutes
    choice = numerics("cpu")
    bf16_too = choice.native_bf16
    names = ("fp32", "bf16") if bf16_too else ("fp32",)
    embed_name = names[-1]  # the hardware's embedding precision
    results: dict[str, float] = {}
    for name in names:
        bf16 = name == "bf16"
        peak = gemm_peak_flops(torch.bfloat16 if bf16 else torch.float32)
        seconds = best_time(train_step_fn(module, optimizer, images, bf16), repeats=2 if bf16 else 1)
        results[f"peak_{name}"] = peak
        results[f"train_{name}_crops_per_s"] = BATCH / seconds
    module.eval()

    def embed() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=embed_name == "bf16"), torch.inference_mode():
            module.embed(images)

    seconds = best_time(embed, repeats=2)
    results["embed_per_s"] = BATCH / seconds
    memory = {name: child_peak_memory_gb(threads, name == "bf16") for name in names}

    common = {
        "batch": BATCH,
        "threads": threads,
        "train_gflops_per_crop": train_flops / 1e9,
        "embed_gflops_per_crop": embed_flops / 1e9,
        "numerics": choice.describe(),
        **{f"gemm_peak_{name}_tflops": results[f"peak_{name}"] / 1e12 for name in names},
        "note": "GEMM peak measured in the same run under the same (shared, contended) CPU load",
    }

    def gemm_bound(kind: str, name: str, value: float, unit: str, precision: str, flops: float, extra: dict):
        return Measurement.against_gemm_peak(
            name,
            value,
            unit,
            peak=results[f"peak_{precision}"],
            flops_per_item=flops,
            baseline_name=f"GEMM-bound {unit} ({precision} matmul peak / model FLOPs per crop)",
            target_mfu=TARGETS.get(f"{kind}_{precision}_mfu"),
            extra={**common, **extra},
        )

    out = [
        gemm_bound(
            "train",
            f"train_step_{name}",
            results[f"train_{name}_crops_per_s"],
            "crops/s",
            name,
            train_flops,
            {
                "reference_mfu": REFERENCE[f"train_{name}_mfu"],
                "reference_crops_per_s": REFERENCE[f"train_{name}_crops_per_s"],
            },
        )
        for name in names
    ]
    out.append(
        gemm_bound(
            "embed",
            f"embed_{embed_name}",
            results["embed_per_s"],
            "embeddings/s",
            embed_name,
            embed_flops,
            {"reference_mfu": REFERENCE.get(f"embed_{embed_name}_mfu")},
        )
    )
    low = names[-1]
    out.append(
        Measurement(
            name=f"train_peak_memory_{low}",
            value=memory[low],
            unit="GB",
            baseline_name="fp32 training, same batch, child process" if bf16_too else None,
            baseline_value=memory["fp32"] if bf16_too else None,
            ratio=memory["fp32"] / memory[low] if bf16_too else None,
            target=f"<= {TARGETS['peak_memory_gb']} GB (reference, bf16)" if bf16_too else None,
            met=memory[low] <= TARGETS["peak_memory_gb"] if bf16_too else None,
            extra=common,
        )
    )
    return out
