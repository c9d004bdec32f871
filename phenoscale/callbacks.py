"""Lightning callbacks that make long multi-node runs safe to interrupt and easy to watch.

- `StepCheckpoint`: step=<N>.ckpt every N optimizer steps and at the end; last.ckpt = newest.
- `StopGuard`: SIGTERM/SIGUSR1 (SLURM preemption) -> checkpoint and stop at the next batch
  boundary; a non-finite loss -> stop with the step named, no checkpoint written. Both flags
  are reduced over ranks every batch so all ranks take the same branch (one rank stopping
  while the others enter the next all-reduce is a hang).
- `Throughput`: crops/s and samples seen, summed over ranks, logged every log interval.
- `BatchAudit`: per-rank lines of step and batch checksum (did every rank train, same data?).
"""
from __future__ import annotations

import signal
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from phenoscale.run import LAST, RunDir, publish_last


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; training stopped and the last good checkpoint was kept."""


def _all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
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
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            publish_last(path, self.run_dir.checkpoints / LAST)
            if self.keep:
                for old in self.run_dir.step_checkpoints()[:-self.keep]:
                    old.unlink(missing_ok=True)
        trainer.strategy.barrier("step_checkpoint")
        self.saved_step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # only right after an optimizer step (global_step moved): with gradient accumulation a
        # save between micro-batches would drop their partial gradients yet count their data
        if step > self.saved_step and step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


class StopGuard(pl.Callback):
    """Preemption signals and non-finite losses, agreed on by all ranks at each batch end."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = _loss_of(outputs)
        bad_loss = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        stop, bad = _all_reduce_max([float(self.received is not None), float(bad_loss)],
                                    pl_module.device)
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


class Throughput(pl.Callback):
    """crops/s (all ranks) and total crops seen, logged every `log_every_n_steps`."""

    def __init__(self, log_every_n_steps: int) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.samples_seen = 0
        self._crops = 0
        self._since = time.perf_counter()
        self._logged_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = int(state_dict["samples_seen"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.perf_counter()
        self._logged_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        self._crops += int(image.shape[0])
        step = trainer.global_step
        if step == self._logged_step or step % self.log_every_n_steps:
            return
        (crops,) = _all_reduce_sum([float(self._crops)], pl_module.device)
        now = time.perf_counter()
        self.samples_seen += int(crops)
        metrics = {"throughput/crops_per_s": crops / max(now - self._since, 1e-9),
                   "throughput/samples_seen": float(self.samples_seen)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._crops, self._since, self._logged_step = 0, now, step


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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        image = batch["image"]
        checksum = int(image.to(torch.int64).sum()) + 7 * int(batch["label"].sum())
        self._file.write(f"{trainer.global_step}\t{trainer.current_epoch}\t{batch_idx}\t"
                         f"{image.shape[0]}\t{checksum}\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
