"""Compute plan of a training run: counted FLOPs -> GPU-hours -> what the data path must sustain.

A cluster run of a ViT-L/8 on billions of crops is booked in GPU-hours and fails for want of
loader cores or storage bandwidth more often than for want of GPUs; this puts all three numbers
side by side before anything is queued. FLOPs are counted by torch's FlopCounterMode on a model
built on the meta device (no memory, no guessing); the GPU peak is the vendor's dense
bf16/fp16 tensor-core figure and the MFU is the user's stated assumption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

import lightning_modules

# dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s
GPU_PEAK_FLOPS: dict[str, float] = {
    "v100": 125e12,
    "a10g": 70e12,
    "a100": 312e12,
    "l40s": 362e12,
    "h100": 989e12,
    "h200": 989e12,
    "b200": 2250e12,
}

LOADER_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "loader.json"
# crops/s per loader core assumed when no `make bench` result exists yet: the loader benchmark's
# own target (docs/data.md, Throughput), so an unmeasured plan is never optimistic about the data path
DEFAULT_LOADER_CROPS_PER_CORE = 1000.0


@dataclass(frozen=True)
class Hardware:
    """The accelerators a plan is made for."""

    gpu: str = "h100"
    gpus: int = 8
    mfu: float = 0.4

    def __post_init__(self) -> None:
        if self.gpu not in GPU_PEAK_FLOPS:
            raise ValueError(f"unknown GPU {self.gpu!r}; known: {', '.join(GPU_PEAK_FLOPS)}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.gpus < 1:
            raise ValueError(f"gpus must be >= 1, got {self.gpus}")


@dataclass(frozen=True)
class SiteFormat:
    """How the training images are stored: what one decoded site costs in storage reads."""

    channels: int = 6
    side: int = 2048
    bytes_per_pixel: int = 2  # uint16 kept at acquired depth
    crops_per_site: int = 4

    @property
    def bytes_per_site(self) -> int:
        return self.channels * self.side * self.side * self.bytes_per_pixel


def measured_loader_rate() -> tuple[float, str]:
    """Crops/s per loader core from `make bench` if it was run here, else the documented default."""
    if LOADER_RESULTS.is_file():
        data = json.loads(LOADER_RESULTS.read_text())
        for m in data.get("measurements", []):
            if m.get("unit", "").startswith("crops/s"):
                return float(m["value"]), f"measured by make bench on {data['machine']['cpu']}"
    return DEFAULT_LOADER_CROPS_PER_CORE, "default (run `make bench` to measure this machine)"


def model_size(model_cfg: object, optim_cfg: object, in_chans: int, num_classes: int) -> tuple[int, int, float]:
    """(parameters, encoder parameters, training FLOPs per crop) of a model built on the meta device."""
    with torch.device("meta"):
        module = lightning_modules.build_module(
            model_cfg, optim_cfg, in_chans=in_chans, num_classes=num_classes, total_steps=1
        )
    params = sum(p.numel() for p in module.parameters())
    encoder = sum(p.numel() for p in module.trunk.parameters())  # the part that embeds
    return params, encoder, lightning_modules.training_flops_per_crop(module)


def plan_row(
    name: str,
    params: int,
    encoder_params: int,
    flops_per_crop: float,
    crops: float,
    hw: Hardware,
    site: SiteFormat,
    loader_crops_per_core: float,
) -> dict[str, float | str | int]:
    """Every number of one plan line, derived from the counted FLOPs and the stated assumptions."""
    total_flops = flops_per_crop * crops
    sustained = GPU_PEAK_FLOPS[hw.gpu] * hw.mfu  # FLOP/s per GPU
    gpu_hours = total_flops / sustained / 3600
    crops_per_gpu = sustained / flops_per_crop
    sites_per_gpu = crops_per_gpu / site.crops_per_site
    return {
        "run": name,
        "params_M": params / 1e6,
        "encoder_params_M": encoder_params / 1e6,
        "train_GFLOPs_per_crop": flops_per_crop / 1e9,
        "crops": crops,
        "total_EFLOPs": total_flops / 1e18,
        "gpu": hw.gpu,
        "mfu": hw.mfu,
        "gpu_hours": gpu_hours,
        "wall_hours": gpu_hours / hw.gpus,
        "gpus": hw.gpus,
        "crops_per_s_per_gpu": crops_per_gpu,
        "loader_cores_per_gpu": crops_per_gpu / loader_crops_per_core,
        "storage_MB_per_s_per_gpu": sites_per_gpu * site.bytes_per_site / 1e6,
        "storage_GB_per_s_total": sites_per_gpu * site.bytes_per_site * hw.gpus / 1e9,
    }


PLAN_COLUMNS = {
    "run": "run",
    "params_M": "params (M)",
    "encoder_params_M": "encoder (M)",
    "train_GFLOPs_per_crop": "train GFLOPs/crop",
    "crops": "crops",
    "total_EFLOPs": "total EFLOPs",
    "gpu_hours": "GPU-hours",
    "wall_hours": "wall hours",
    "crops_per_s_per_gpu": "crops/s/GPU",
    "loader_cores_per_gpu": "loader cores/GPU",
    "storage_MB_per_s_per_gpu": "storage MB/s/GPU",
}


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value >= 1e6:
            return f"{value:.3g}"
        return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"
    return str(value)


def markdown_table(plan: pl.DataFrame) -> str:
    """The plan as a markdown table with the columns people book clusters by."""
    cols = [c for c in PLAN_COLUMNS if c in plan.columns]
    lines = ["| " + " | ".join(PLAN_COLUMNS[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in plan.select(cols).iter_rows():
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def assumptions(hw: Hardware, site: SiteFormat, loader_rate: float, loader_source: str) -> str:
    return (
        f"{hw.gpus} x {hw.gpu} at {hw.mfu:.0%} MFU of {GPU_PEAK_FLOPS[hw.gpu] / 1e12:.0f} TFLOP/s "
        f"(dense bf16); sites {site.channels}x{site.side}x{site.side} at {site.bytes_per_pixel} B/px "
        f"({site.bytes_per_site / 1e6:.1f} MB), {site.crops_per_site} crops per decoded site; "
        f"loader {loader_rate:,.0f} crops/s per core ({loader_source})"
    )


def crops_of(value: float | int | str) -> float:
    """'3.5e9', 3500000000 or '3.5B' -> a float number of crops."""
    if isinstance(value, str):
        text = value.strip().upper()
        scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1:], None)
        return float(text[:-1]) * scale if scale else float(text)
    return float(value)
