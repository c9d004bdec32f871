"""`make gpu-check`: the CUDA tests, then bf16-mixed speed of the paper models on this GPU.

1. `pytest -m gpu` (tests/test_gpu.py): every family's bf16-mixed / 16-mixed step and bf16
   embedding against float32, a Lightning bf16-mixed fit, a one-process NCCL embed.
2. The dense bf16 peak of this GPU, measured here with a large GEMM (not taken from a datasheet).
3. A bf16-mixed training step (autocast, float32 master weights, the config's Lion step, as
   Lightning's `bf16-mixed` runs it) of the OpenPhenom CA-MAE ViT-S/16 and the MAE ViT-L/8 at
   batch 64, and an embedding pass (bf16 autocast, inference mode) of each: crops/s, peak memory and
   MFU = counted model FLOP/s / measured peak.

Prints a table and writes benchmarks/results/gpu.json. Exits 2 without a CUDA GPU, 1 when a test
or a target fails. `python -m benchmarks.gpu_check --compile` times torch.compile'd modules too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_models import paper_module
from benchmarks.harness import Measurement, write_results
from lightning_modules import embedding_flops_per_crop, training_flops_per_crop
from lightning_modules.hardware import configure_device

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "CA-MAE ViT-S/16 (OpenPhenom)": REPO / "configs/paper/camae_vit_s16_openphenom.yaml",
    "MAE ViT-L/8": REPO / "configs/paper/mae_vit_l8.yaml",
}
BATCH = 64
CHANNELS = 6
GEMM_SIDE = 8192
TARGETS = {"train_mfu": 0.40, "embed_mfu": 0.50}


def cuda_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median seconds of one `fn()` on the GPU (CUDA events around each call, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def bf16_gemm_peak() -> float:
    """Dense bf16 FLOP/s of a GEMM_SIDE³ matmul on this GPU, now."""
    a, b = (torch.randn(GEMM_SIDE, GEMM_SIDE, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * GEMM_SIDE**3 / cuda_seconds(lambda: a @ b, repeats=20, warmup=5)


def measure(name: str, config: Path, peak: float, compile_module: bool) -> dict[str, Any]:
    """Training and embedding speed of one paper model at BATCH crops on the GPU."""
    # hand the previous model's cached blocks back: its module, optimizer and the compiled
    # closures over them are only gone once its measure() returned
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    module = paper_module(config, in_chans=CHANNELS).cuda()
    train_flops = training_flops_per_crop(module, batch_size=2)
    embed_flops = embedding_flops_per_crop(module, batch_size=2)
    optimizer = module.configure_optimizers()["optimizer"]
    side = module.model_cfg.img_size
    images = torch.randint(0, 65535, (BATCH, CHANNELS, side, side), device="cuda").to(torch.uint16)
    losses = torch.compile(module.compute_losses) if compile_module else module.compute_losses

    def train_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = losses({"image": images})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    train_s = cuda_seconds(train_step, repeats=10)
    train_memory = torch.cuda.max_memory_allocated() / 2**30
    module.eval()
    embed = torch.compile(module.embed) if compile_module else module.embed

    def embed_pass() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.inference_mode():
            embed(images)

    torch.cuda.reset_peak_memory_stats()
    embed_s = cuda_seconds(embed_pass, repeats=10)
    embed_memory = torch.cuda.max_memory_allocated() / 2**30
    return {
        "model": name,
        "config": str(config.relative_to(REPO)),
        "batch": BATCH,
        "compiled": compile_module,
        "train_crops_per_s": BATCH / train_s,
        "train_peak_memory_gb": train_memory,
        "train_mfu": train_flops * BATCH / train_s / peak,
        "train_gflops_per_crop": train_flops / 1e9,
        "embed_crops_per_s": BATCH / embed_s,
        "embed_peak_memory_gb": embed_memory,
        "embed_mfu": embed_flops * BATCH / embed_s / peak,
        "embed_gflops_per_crop": embed_flops / 1e9,
    }


def run_gpu_tests() -> int:
    """pytest -m gpu in a child process; its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], cwd=REPO, check=False
    ).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd modules")
    parser.add_argument("--skip-tests", action="store_true", help="timings only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "make gpu-check needs a CUDA GPU; none is visible here (torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        return 2
    tests = None if args.skip_tests else run_gpu_tests()
    configure_device("cuda")
    peak = bf16_gemm_peak()
    print(f"{torch.cuda.get_device_name()}: dense bf16 GEMM peak {peak / 1e12:.0f} TFLOP/s ({GEMM_SIDE}³)")
    rows = [
        measure(name, config, peak, compiled)
        for name, config in MODELS.items()
        for compiled in ([False, True] if args.compile else [False])
    ]
    print(
        "| model | compiled | train crops/s | train MFU | train peak GB | embed crops/s | embed MFU "
        "| embed peak GB |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['compiled']} | {r['train_crops_per_s']:.0f} | {r['train_mfu']:.2f} "
            f"| {r['train_peak_memory_gb']:.1f} | {r['embed_crops_per_s']:.0f} | {r['embed_mfu']:.2f} "
            f"| {r['embed_peak_memory_gb']:.1f} |"
        )
    measurements = [measurement for r in rows for measurement in as_measurements(r, peak)]
    path = write_results("gpu", measurements)
    for m in measurements:
        print(f"   {m.name}: MFU {m.ratio:.2f}  target: {m.target}  met: {m.met}")
    print(f"pytest -m gpu exit code: {tests}; written {path}")
    return 0 if tests in (0, None) and all(m.met for m in measurements) else 1


def as_measurements(row: dict[str, Any], peak: float) -> list[Measurement]:
    """One results row for training and one for embedding, MFU against the measured peak."""
    label = f"{row['model']}{' compiled' if row['compiled'] else ''}, batch {row['batch']}"
    out = []
    for kind, what in (("train", "bf16-mixed training step"), ("embed", "bf16 embedding")):
        flops = row[f"{kind}_gflops_per_crop"] * 1e9
        out.append(
            Measurement.against_gemm_peak(
                f"{label}: {what}",
                row[f"{kind}_crops_per_s"],
                "crops/s",
                peak=peak,
                flops_per_item=flops,
                baseline_name="GEMM-bound crops/s (measured dense bf16 GEMM peak / model FLOPs per crop)",
                target_mfu=TARGETS[kind + "_mfu"],
                extra={**row, "gemm_peak_bf16_tflops": peak / 1e12},
            )
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
