"""What the run machinery costs: training steps and checkpoint writes against bare Lightning.

1. Steps per CPU-second of the tiny CA-MAE on real-pixel shards (the worst case: the smaller the step,
   the larger any per-step overhead) with phenoscale's Trainer (batch-boundary
   all-reduce for preemption / non-finite flags, throughput, LR monitor, CSV + TensorBoard
   loggers, progress bar) against a bare `lightning.Trainer` (no callbacks, no loggers) on the
   same DataModule and model. Target: >= 0.95 of bare speed.
2. Writing a ViT-S-sized checkpoint (22M float32 parameters, ~88 MB) with AtomicCheckpointIO
   (temp file, fsync, rename) against Lightning's TorchCheckpointIO (in place, no fsync).
   Target: atomicity costs at most 2x.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf

import datamodules
import lightning_modules
from benchmarks.harness import Measurement, best_time
from phenoscale.config import load_config
from phenoscale.fitting import build_trainer, choose_device
from phenoscale.launch import detect_launch
from phenoscale.run import AtomicCheckpointIO, RunDir

REPO = Path(__file__).resolve().parents[1]
STEPS, WARMUP = 40, 5


def _real_shards(out: Path) -> Path:
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from run_helpers import write_real_shards  # the tests' real-pixel shards (../shared field)

    shared = Path(os.environ.get("PHENOSCALE_SHARED", REPO.parent / "shared"))
    return write_real_shards(shared / "data", out / "shards", sites=64, size=64)


class _StepClock(pl.Callback):
    """CPU time of this process (all its threads) from the end of step WARMUP to the last step.

    CPU time, not wall time: the overhead measured is CPU work, and on a shared machine wall
    time swings 2x between identical runs (measured here), burying a few-percent difference.
    """

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP:
            self.start = time.process_time()
        self.end = time.process_time()


def _steps_per_second(trainer: pl.Trainer, cfg, datamodule) -> float:
    module = lightning_modules.build_module(
        cfg.model, cfg.optim, in_chans=datamodule.in_chans, num_classes=datamodule.num_classes, total_steps=STEPS
    )
    clock = _StepClock()
    trainer.callbacks.append(clock)
    trainer.fit(module, datamodule=datamodule)
    return (trainer.global_step - WARMUP) / (clock.end - clock.start)


def bench_steps(tmp: Path) -> Measurement:
    shards = _real_shards(tmp)
    cfg = load_config(
        REPO / "configs" / "experiments" / "tiny.yaml",
        [
            f"data.train_shards={shards}",
            "data.num_workers=0",
            f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=5",
            f"trainer.checkpoint_every_n_steps={10 * STEPS}",
        ],
    )
    rates = {"bare": [], "phenoscale": []}
    for repeat in range(3):  # interleaved, best of 3: the machine is shared
        datamodule = datamodules.build_datamodule(OmegaConf.to_object(cfg.data), seed=0)
        bare = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=STEPS,
            logger=False,
            callbacks=[],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        rates["bare"].append(_steps_per_second(bare, cfg, datamodule))
        run_dir = RunDir(tmp / f"run{repeat}").create()
        datamodule = datamodules.build_datamodule(OmegaConf.to_object(cfg.data), seed=0)
        env = detect_launch()
        ours, _ = build_trainer(cfg, env, run_dir, 1, 1, datamodule, choose_device(cfg.trainer, env), [])
        rates["phenoscale"].append(_steps_per_second(ours, cfg, datamodule))
    bare_rate, our_rate = max(rates["bare"]), max(rates["phenoscale"])
    return Measurement.versus(
        "train_steps_per_cpu_s_phenoscale_trainer",
        our_rate,
        "steps/CPU-s",
        "bare lightning.Trainer",
        bare_rate,
        at_least=0.95,
        of="bare",
        extra={
            "model": "tiny.yaml CA-MAE (width 32, 2 blocks, 32px crops)",
            "steps": STEPS,
            "batch": cfg.data.batch_size,
            "all_rates": rates,
        },
    )


def bench_checkpoint(tmp: Path) -> Measurement:
    generator = torch.Generator().manual_seed(0)
    state = {
        "state_dict": {f"block{i}.weight": torch.randn(1_000_000, generator=generator) for i in range(22)},
        "global_step": 1,
    }
    atomic, plain = AtomicCheckpointIO(), TorchCheckpointIO()
    t_atomic = best_time(lambda: atomic.save_checkpoint(state, tmp / "atomic.ckpt"), repeats=3)
    t_plain = best_time(lambda: plain.save_checkpoint(state, tmp / "plain.ckpt"), repeats=3)
    return Measurement.versus(
        "checkpoint_write_s_atomic",
        t_atomic,
        "s",
        "TorchCheckpointIO (in place)",
        t_plain,
        at_least=0.5,
        of="(atomicity at most 2x)",
        lower_is_better=True,
        extra={"megabytes": round((tmp / "atomic.ckpt").stat().st_size / 2**20, 1)},
    )


def run() -> list[Measurement]:
    torch.set_num_threads(1)  # one thread: no OpenMP spin-waiting inflating CPU time under contention
    with tempfile.TemporaryDirectory(prefix="bench_runs_") as tmp:
        return [bench_checkpoint(Path(tmp)), bench_steps(Path(tmp))]
