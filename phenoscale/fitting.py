"""`phenoscale fit` / `train.py`: config -> launcher check -> run dir -> Trainer.fit, resumable.

The order matters: everything that can be wrong with the request (config keys and types,
launcher topology, an existing run that would be overwritten) is checked before shards are
opened or a model is built, so a 64-GPU job fails in seconds, not after queueing and warm-up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import OmegaConf

import datamodules
import lightning_modules
from evaluation.callback import EFAARCallback
from phenoscale.callbacks import BatchAudit, StepCheckpoint, StopGuard, Throughput
from phenoscale.config import BatchPlan, ConfigError, plan_batch, require_complete, save_config, to_yaml
from phenoscale.launch import LaunchEnv, LaunchMismatchError, detect_launch, resolve_topology
from phenoscale.run import AtomicCheckpointIO, RunDir


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    global_step: int
    preempted: bool  # stopped by SIGTERM/SIGUSR1 after checkpointing; rerun to resume
    resumed_from: Path | None


def resolve_accelerator(configured: str, env: LaunchEnv) -> str:
    """`fabric run --accelerator X` and the config must agree ('auto' takes the launcher's)."""
    if env.accelerator is None or configured == env.accelerator:
        return configured
    if configured == "auto":
        return env.accelerator
    raise LaunchMismatchError(
        f"trainer.accelerator={configured!r} but fabric run was given --accelerator "
        f"{env.accelerator}; set one of them to match"
    )


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []


def _record_config(cfg: Any, run_dir: RunDir, resuming: bool) -> None:
    """Save config.yaml; on resume, keep the previous one and say what changed."""
    if resuming and run_dir.config.is_file():
        old = OmegaConf.to_container(OmegaConf.load(run_dir.config))
        new = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
        changed = [k for k in _changed_keys(old, new) if not k.startswith("scaling.")]
        if changed:
            rank_zero_warn(f"resuming {run_dir.root} with a changed config: {', '.join(changed)} "
                           "(previous config kept as config.previous.yaml)")
            os.replace(run_dir.config, run_dir.root / "config.previous.yaml")
    save_config(cfg, run_dir.config)


def build_trainer(cfg: Any, env: LaunchEnv, run_dir: RunDir, devices: int, num_nodes: int,
                  datamodule: datamodules.ShardDataModule) -> tuple[pl.Trainer, StopGuard]:
    """The Trainer with atomic checkpoints, preemption handling, loggers and progress."""
    t = cfg.trainer
    checkpoint = StepCheckpoint(run_dir, t.checkpoint_every_n_steps, t.keep_checkpoints)
    guard = StopGuard(checkpoint)
    callbacks: list[pl.Callback] = [
        guard,  # first: a non-finite loss must stop before the checkpoint callback runs
        checkpoint,
        Throughput(t.log_every_n_steps),
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps // 10)),
        datamodules.StreamEpochCallback(datamodule),
    ]
    if t.audit_batches:
        callbacks.append(BatchAudit(run_dir.logs / "batches"))
    if t.evaluate:  # EFAAR on data.eval_shards (default: the training shards) every eval.every_n_epochs
        callbacks.append(EFAARCallback(datamodule, OmegaConf.to_object(cfg.eval)))
    version = run_dir.next_attempt()
    plugins: list[Any] = [AtomicCheckpointIO()]
    if env.launcher == "slurm":
        # we checkpoint and stop on SIGUSR1/SIGTERM ourselves; Lightning's auto-requeue would
        # write a second (non-atomic) hpc checkpoint and call scontrol behind the user's back
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = pl.Trainer(
        accelerator=resolve_accelerator(t.accelerator, env),
        devices=devices,
        num_nodes=num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        enable_checkpointing=False,  # StepCheckpoint does it, atomically
        default_root_dir=str(run_dir.root),
        logger=[CSVLogger(run_dir.logs, name="csv", version=version),
                TensorBoardLogger(run_dir.logs, name="tensorboard", version=version,
                                  default_hp_metric=False)],
        callbacks=callbacks,
        plugins=plugins,
    )
    return trainer, guard


def fit(cfg: Any, environ: dict[str, str] | None = None) -> FitResult:
    """Train `cfg` (a validated config from `load_config`) in cfg.run.run_dir; resume if possible."""
    require_complete(cfg)
    env = detect_launch(environ)
    devices, num_nodes = resolve_topology(cfg.trainer.devices, cfg.trainer.num_nodes, env)
    run_dir = RunDir(cfg.run.run_dir)
    last = run_dir.last_checkpoint
    if last is not None and not cfg.run.resume:
        raise ConfigError(f"{run_dir.root} already holds {last}; pass run.resume=true to continue "
                          "it or choose another run.run_dir (runs are never overwritten)")
    plan = plan_batch(cfg, cfg.data.batch_size, devices, num_nodes)
    rank_zero_info(f"[phenoscale] {env.launcher} launch, world size {env.world_size}: "
                   f"{devices} devices x {num_nodes} nodes; {plan.describe()}")
    pl.seed_everything(cfg.run.seed, workers=True)
    if env.launcher == "slurm":
        # code that reads the torchrun convention before the process group exists (the data
        # module's per-rank step count) sees the right rank and world under srun as well
        os.environ.setdefault("RANK", str(env.global_rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))

    if env.global_rank == 0:
        run_dir.create()
        _record_config(cfg, run_dir, resuming=last is not None)

    datamodule = datamodules.build_datamodule(OmegaConf.to_object(cfg.data), seed=cfg.run.seed)
    trainer, guard = build_trainer(cfg, env, run_dir, devices, num_nodes, datamodule)
    steps = _total_steps(cfg, datamodule)
    optim = OmegaConf.merge(cfg.optim, {"lr": plan.lr})
    module = lightning_modules.build_module(
        cfg.model, optim, in_chans=datamodule.in_chans, num_classes=datamodule.num_classes,
        total_steps=steps,
    )
    # identical initial weights on every rank (above), then a rank-specific stream for what the
    # model draws during training (MAE masks, drop-path): N ranks should not mask alike
    torch.manual_seed(cfg.run.seed + 1_000_003 * trainer.global_rank)
    _log_plan(trainer, plan)
    if last is not None:
        rank_zero_info(f"[phenoscale] resuming from {last}")
    # our own run directory's checkpoint: it holds loop/data state beyond tensors, so full unpickling
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last else None, weights_only=False)
    if guard.stopped_by_signal:
        rank_zero_info(f"[phenoscale] stopped at step {trainer.global_step} after a preemption "
                       f"signal; checkpoint saved. Rerun the same command to resume.")
    return FitResult(run_dir.root, trainer.global_step, guard.stopped_by_signal, last)


def _total_steps(cfg: Any, datamodule: Any) -> int:
    """Optimizer steps of the whole run (the LR schedule's length)."""
    if cfg.trainer.max_steps > 0:
        return int(cfg.trainer.max_steps)
    per_epoch = datamodule.steps_per_epoch // cfg.trainer.accumulate_grad_batches
    return max(1, per_epoch * int(cfg.trainer.max_epochs))


def _log_plan(trainer: pl.Trainer, plan: BatchPlan) -> None:
    for logger in trainer.loggers:
        logger.log_hyperparams({"effective_batch_size": plan.effective, "lr": plan.lr,
                                "lr_rule": plan.rule, "world_size": plan.devices * plan.num_nodes})
