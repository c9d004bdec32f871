"""Lightning callbacks that make long multi-node runs safe to interrupt and easy to watch.

- `StepCheckpoint`: step=<N>.ckpt every N optimizer steps and at the end; last.ckpt = newest.
- `StopGuard`: SIGTERM, SIGUSR1 (SLURM), SIGUSR2 (submitit) -> checkpoint and stop at the next batch
  boundary; a non-finite loss -> stop with the step named, no checkpoint written. Both flags
  are reduced over ranks every batch so all ranks take the same branch (one rank stopping
  while the others enter the next all-reduce is a hang).
- `Throughput`: Lightning's ThroughputMonitor on crops, MFU from phenoscale's FLOP count.
- `ProgressLog`: log lines instead of a progress bar (batch jobs, non-terminal stdout).
- `EvalReport`: the online EFAAR report and its figures, to the run dir and the loggers.
- `instantiate_callbacks`: the user's `trainer.callbacks` from config.
- `BatchAudit`: per-rank lines of step and batch checksum (did every rank train, same data?).
"""

from __future__ import annotations

import importlib
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf

from evaluation.callback import EFAARCallback
from evaluation.report import write_outputs
from phenoscale.config import ConfigError
from phenoscale.loggers import log_figure
from phenoscale.run import LAST, RunDir, publish_last


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; training stopped and the last good checkpoint was kept."""


def _all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


class StepCheckpoint(pl.Callback):
    """Atomic step checkpoints (the Trainer's CheckpointIO does the temp + rename)."""

    def __init__(self, run_dir: RunDir, every_n_steps: int, keep: int) -> None:
        self.run_dir = run_dir
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.saved_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_step = trainer.global_step  # a resumed run does not re-save its start

    def save(self, trainer: pl.Trainer) -> None:
        """Collective under DDP: every rank calls it, rank 0 writes."""
        step = trainer.global_step
        if step == self.saved_step:
            return
        path = self.run_dir.step_checkpoint(step)
        trainer.save_checkpoint(path, weights_only=False)  # full state (optimizer, loops): what a resume needs
        if trainer.is_global_zero:
            publish_last(path, self.run_dir.checkpoints / LAST)
            if self.keep:
                for old in self.run_dir.step_checkpoints()[: -self.keep]:
                    old.unlink(missing_ok=True)
        trainer.strategy.barrier("step_checkpoint")
        self.saved_step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # only right after an optimizer step (global_step moved): with gradient accumulation a
        # save between micro-batches would drop their partial gradients yet count their data
        if step > self.saved_step and step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


class StopGuard(pl.Callback):
    """Preemption signals and non-finite losses, agreed on by all ranks at each batch end."""

    # SIGUSR1: SLURM's --signal warning; SIGUSR2: submitit's; SIGTERM: scancel, preemption, k8s
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, checkpoint: StepCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self.stopped_by_signal = False
        self._previous: dict[int, Any] = {}
        self._seen_step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        # only set a flag: saving inside a signal handler could interleave with a collective
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        # after Trainer._run registered its own SIGTERM handler, which would raise without saving
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _loss_of(outputs)
        bad_loss = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        stop, bad = _all_reduce_max([float(self.received is not None), float(bad_loss)], pl_module.device)
        if bad:
            last = self.checkpoint.run_dir.last_checkpoint
            raise NonFiniteLossError(
                f"non-finite loss at step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {batch_idx}){' on this rank' if bad_loss else ' on another rank'}; "
                f"last good checkpoint: {last or 'none yet'}. Lower optim.lr, set "
                "trainer.gradient_clip_val, or try trainer.precision=32-true"
            )
        stepped, self._seen_step = trainer.global_step != self._seen_step, trainer.global_step
        if stop and stepped:  # stop on an optimizer-step boundary (see StepCheckpoint)
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            rank_zero_info(f"received {name}: checkpointing step {trainer.global_step} and stopping")
            self.checkpoint.save(trainer)
            self.stopped_by_signal = True
            trainer.should_stop = True


def _crops(batch: Any) -> int:
    image = batch["image"] if isinstance(batch, dict) else batch[0]
    return int(image.shape[0])


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting crops, with MFU from the model FLOPs phenoscale counts.

    The module's `flops_per_batch` (set by `phenoscale fit` from lightning_modules.flops) feeds
    `train/device/flops_per_sec`; MFU divides it by `peak_flops` when given, else by Lightning's
    table of CUDA/TPU chips (`get_available_flops`), which has no CPUs: there MFU is not logged.
    Rates are rolling means over the last `window` batches.
    """

    def __init__(self, window: int, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self._table_flops: float | None = None
        super().__init__(batch_size_fn=_crops, window_size=window)

    # the parent's setup() stores Lightning's table value here and hands it to its Throughput
    # meters; a configured peak takes precedence without re-implementing setup()
    @property
    def available_flops(self) -> float | None:  # type: ignore[override]
        return self.peak_flops if self.peak_flops is not None else self._table_flops

    @available_flops.setter
    def available_flops(self, value: float | None) -> None:
        self._table_flops = value


class ProgressLog(pl.Callback):
    """Without a progress bar: one line every `every_n_steps` steps (step, epoch, loss, rate, ETA)."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._since = time.perf_counter()
        self._since_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since, self._since_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._since_step or step % self.every_n_steps:
            return
        now = time.perf_counter()
        rate = (step - self._since_step) / max(now - self._since, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        total = trainer.max_steps if trainer.max_steps > 0 else None
        eta = f", ETA {timedelta(seconds=round((total - step) / rate))}" if total and rate > 0 else ""
        rank_zero_info(
            f"[phenoscale] step {step}{f'/{total}' if total else ''} epoch {trainer.current_epoch}"
            f"{f' train/loss {float(loss):.4g}' if loss is not None else ''}, {rate:.3g} steps/s{eta}"
        )
        self._since, self._since_step = now, step


class EvalReport(pl.Callback):
    """After each online EFAAR evaluation: its report in reports/step=<N>/ (metrics.json, report.md,
    figures), and the figures sent to every logger that takes images. Runs on rank 0 (the only
    rank holding the results); list it after the EFAARCallback it reads."""

    def __init__(self, efaar: EFAARCallback, reports: Path) -> None:
        self.efaar = efaar
        self.reports = reports
        self._reported: Any = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self.efaar.last_results  # a new dict after each evaluation
        if not trainer.is_global_zero or not results or results is self._reported:
            return
        self._reported = results
        step = trainer.global_step
        for block, result in results.items():
            out = self.reports / f"step={step:08d}"
            if len(results) > 1:
                out = out / f"block{block}"
            write_outputs(result, out, f"online EFAAR at step {step}")
            prefix = f"{self.efaar.prefix}/" + (f"block{block}/" if len(results) > 1 else "")
            for figure in sorted(out.glob("*.png")):
                for logger in trainer.loggers:
                    log_figure(logger, prefix + figure.stem, figure, step)


def instantiate_callbacks(specs: Any) -> list[pl.Callback]:
    """`trainer.callbacks` entries ({class_path, init_args}) -> callback objects, or a ConfigError
    naming the entry (called before data or model is built)."""
    callbacks = []
    for i, spec in enumerate(specs):
        where = f"trainer.callbacks[{i}] ({spec.class_path})"
        module_name, _, name = spec.class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name) if module_name else None
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{where}: cannot import it ({err})") from None
        if not (isinstance(cls, type) and issubclass(cls, pl.Callback)):
            raise ConfigError(
                f"{where}: not a lightning.pytorch.Callback class; class_path must be 'package.module.ClassName'"
            )
        try:
            callbacks.append(cls(**OmegaConf.to_container(spec.init_args, resolve=True)))
        except TypeError as err:
            raise ConfigError(f"{where}: bad init_args: {err}") from None
    return callbacks


class BatchAudit(pl.Callback):
    """One line per training batch and rank: step, epoch, batch, crops and a pixel checksum.

    Answers "did every rank train?" and "did the resumed run see the same data as an
    uninterrupted one?" from files alone; written line-buffered so a `kill -9` keeps them.
    """

    def __init__(self, directory: Any) -> None:
        self.directory = directory
        self._file: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = open(self.directory / f"rank{trainer.global_rank}.tsv", "a", buffering=1)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        image = batch["image"]
        checksum = int(image.to(torch.int64).sum()) + 7 * int(batch["label"].sum())
        self._file.write(f"{trainer.global_step}\t{trainer.current_epoch}\t{batch_idx}\t{image.shape[0]}\t{checksum}\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
