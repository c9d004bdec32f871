"""The one place that decides, per device, which precision and attention kernels to use.

bf16 pays only where the hardware multiplies bf16 natively: CUDA GPUs with bf16 units (Ampere and
later) and x86 CPUs with AVX-512 BF16 or AMX. An AVX2-only CPU has neither; torch and oneDNN then
emulate every bf16 product in float32 code with conversions around it, which is far slower than
float32 itself (docs/hardware.md has the measurements). So `auto` means bf16 only there, an explicit
bf16 request on other hardware still runs but warns once, and the CPU-only bf16 attention kernels
of `lightning_modules.blocks` run only on CPUs that multiply bf16 natively.

The CPU's answer follows `torch.backends.cpu.get_cpu_capability()`, so `ATEN_CPU_CAPABILITY=avx2`
(torch's own switch) also turns phenoscale's bf16 choices off on an AVX-512 machine.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from lightning_modules.config import check_one_of

AUTO = "auto"
#: embed() numerics: float32, bfloat16 autocast, or the hardware's choice
EMBED_PRECISIONS = (AUTO, "32", "bf16")
#: training numerics: the hardware's choice, or what Lightning accepts for `precision`
#: (lightning.fabric.connector._PRECISION_INPUT_STR and its aliases)
TRAIN_PRECISIONS = (
    AUTO,
    "64-true",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "transformer-engine",
    "transformer-engine-float16",
    "64",
    "32",
    "16",
    "bf16",
)
_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def cpu_capability() -> str:
    """torch's CPU kernel level: 'AVX512', 'AVX2', 'DEFAULT', 'SVE256', ... (ATEN_CPU_CAPABILITY caps it)."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def _cpu_has_bf16_units() -> bool:
    """AVX-512 BF16 (vdpbf16ps) or AMX tiles, as torch's cpuinfo reports them."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_has_native_bf16() -> bool:
    """True where this CPU multiplies bf16 in hardware and torch runs its AVX-512 kernels.

    Non-x86 CPUs answer False (float32): their bf16 paths are untested here.
    """
    return cpu_capability().startswith("AVX512") and _cpu_has_bf16_units()


def has_native_bf16(device_type: str) -> bool:
    """Does `device_type` ('cpu', 'cuda', ...) multiply bf16 natively?"""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return cpu_has_native_bf16()
    return False


def accelerator_device_type(accelerator: str) -> str:
    """The torch device type a Lightning `accelerator` trains on ('auto': CUDA when available)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "auto":
        return "cpu"
    return accelerator


def use_cpu_bf16_kernels(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a bf16 tensor on `device_type` takes the CPU-only bf16 attention kernels."""
    return device_type == "cpu" and dtype == torch.bfloat16 and cpu_has_native_bf16()


@dataclass(frozen=True)
class Numerics:
    """What one device computes in when asked for `auto`, and why (printed by fit, embed, bench)."""

    device_type: str
    native_bf16: bool
    train_precision: str  # a Lightning precision string
    embed_precision: str  # one of EMBED_PRECISIONS other than auto

    def describe(self) -> str:
        capability = f"{cpu_capability()}, " if self.device_type == "cpu" else ""
        bf16 = "native" if self.native_bf16 else "no native"
        return (
            f"{self.device_type} ({capability}{bf16} bf16): training {self.train_precision}, "
            f"embedding {self.embed_precision}"
        )


def numerics(device_type: str) -> Numerics:
    """The hardware's choice for `device_type`: bf16 where it is native, float32 elsewhere."""
    native = has_native_bf16(device_type)
    return Numerics(device_type, native, "bf16-mixed" if native else "32-true", "bf16" if native else "32")


@functools.cache
def _warn_emulated(device_type: str) -> None:
    """Once per process and device type: the first explicit bf16 request says what it will cost."""
    where = f"this CPU ({cpu_capability()})" if device_type == "cpu" else device_type
    warnings.warn(
        f"bf16 precision on {where}, which has no native bf16: bf16 products are emulated and much "
        "slower than float32. Use precision 'auto' (float32 here) unless you need bf16 numerics.",
        RuntimeWarning,
        stacklevel=3,
    )


def canonical_train_precision(precision: str) -> str:
    """Lightning's own spelling: '32' -> '32-true', 'bf16' -> 'bf16-mixed', ..."""
    return _ALIASES.get(precision, precision)


def resolve_train_precision(requested: str, device_type: str) -> str:
    """Lightning precision for training on `device_type`: `auto` -> `numerics`; bf16 and fp16 are checked."""
    if requested not in TRAIN_PRECISIONS:
        raise ValueError(f"precision {requested!r}: allowed are {', '.join(TRAIN_PRECISIONS)}")
    precision = numerics(device_type).train_precision if requested == AUTO else canonical_train_precision(requested)
    if precision.startswith("bf16") and not has_native_bf16(device_type):
        _warn_emulated(device_type)
    if precision == "16-mixed" and device_type != "cuda":
        raise ValueError(
            f"precision {requested!r} needs a CUDA GPU (fp16 autocast with a grad scaler); on "
            f"{device_type} use 'auto', '32-true' or 'bf16-mixed'"
        )
    return precision


def resolve_embed_precision(requested: str, device_type: str) -> str:
    """'32' or 'bf16' for an embedding pass on `device_type` (`auto` -> `numerics`)."""
    check_embed_precision(requested)
    if requested == AUTO:
        return numerics(device_type).embed_precision
    if requested == "bf16" and not has_native_bf16(device_type):
        _warn_emulated(device_type)
    return requested


def check_embed_precision(precision: str) -> None:
    """Raise ValueError unless `precision` is one of EMBED_PRECISIONS (callers check before loading weights)."""
    check_one_of("precision", precision, EMBED_PRECISIONS)


def configure_device(device_type: str) -> None:
    """Process-wide settings for work on `device_type`: TF32 tensor cores for float32 matmuls on CUDA
    (the papers' GPUs train bf16-mixed; what stays float32 there, e.g. an fp32 embedding pass,
    should not run on the slow non-tensor-core path)."""
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")
