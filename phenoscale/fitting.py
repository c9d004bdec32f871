"""`phenoscale fit` / `train.py`: config -> launcher check -> run dir -> Trainer.fit, resumable.

The order matters: everything that can be wrong with the request (config keys and types,
launcher topology, an existing run that would be overwritten) is checked before shards are
opened or a model is built, so a 64-GPU job fails in seconds, not after queueing and warm-up.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import OmegaConf

import datamodules
import lightning_modules
from evaluation.callback import EFAARCallback
from lightning_modules import hardware
from phenoscale import output
from phenoscale.callbacks import (
    BatchAudit,
    EvalReport,
    ProgressLog,
    StepCheckpoint,
    StopGuard,
    Throughput,
    instantiate_callbacks,
)
from phenoscale.config import TRAINER_PASSTHROUGH, ConfigError, plan_batch, require_complete, save_config, to_yaml
from phenoscale.launch import (
    NO_LAUNCHER,
    LaunchEnv,
    LaunchMismatchError,
    cluster_plugins,
    detect_launch,
    resolve_topology,
)
from phenoscale.loggers import build_loggers, check_available, log_config
from phenoscale.loggers import finish as finish_loggers
from phenoscale.plan import model_size
from phenoscale.run import AtomicCheckpointIO, RunDir


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    global_step: int
    preempted: bool  # stopped by SIGTERM/SIGUSR1/SIGUSR2 after checkpointing; rerun to resume
    resumed_from: Path | None


#: strategies that start processes themselves: under a launcher that already started them, they would
#: start a second set (or, for dp, run one process over all GPUs)
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "dp")


def agree_with_launcher(name: str, configured: str, launched: str | None) -> str:
    """`fabric run --<name> X` and trainer.<name> must agree ('auto' in the config takes the launcher's)."""
    if launched is None or configured == launched:
        return configured
    if configured == "auto":
        return launched
    raise LaunchMismatchError(
        f"trainer.{name}={configured!r} but fabric run was given --{name} {launched}; "
        "set one of them to match (or the config's to auto)"
    )


@dataclass(frozen=True)
class DeviceChoice:
    """Accelerator, precision and strategy of a fit: launcher and config reconciled, then the hardware's say."""

    accelerator: str
    device_type: str  # 'cpu', 'cuda', ...: where the training step runs
    precision: str  # Lightning's canonical precision string
    strategy: str


def choose_device(t: Any, env: LaunchEnv) -> DeviceChoice:
    """trainer.{accelerator,precision,strategy} against `fabric run`'s flags, `auto` resolved by
    `lightning_modules.hardware`; raises before anything is built."""
    accelerator = agree_with_launcher("accelerator", t.accelerator, env.accelerator)
    device_type = hardware.accelerator_device_type(accelerator)
    launched = hardware.canonical_train_precision(env.precision) if env.precision else None
    requested = agree_with_launcher("precision", hardware.canonical_train_precision(t.precision), launched)
    try:
        precision = hardware.resolve_train_precision(requested, device_type)
    except ValueError as err:
        raise ConfigError(f"trainer.precision: {err}") from None
    strategy = agree_with_launcher("strategy", t.strategy, env.strategy)
    if env.launcher != NO_LAUNCHER and strategy in SPAWNING_STRATEGIES:
        raise LaunchMismatchError(
            f"trainer.strategy={strategy!r} starts its own processes, but {env.launcher} "
            "already started them: use ddp (or auto)"
        )
    return DeviceChoice(accelerator, device_type, precision, strategy)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            k
            for key in sorted(set(old) | set(new))
            for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [prefix.rstrip(".")] if old != new else []


def _record_config(cfg: Any, run_dir: RunDir, resuming: bool) -> None:
    """Save config.yaml; on resume, keep the previous one and say what changed."""
    if resuming and run_dir.config.is_file():
        old = OmegaConf.to_container(OmegaConf.load(run_dir.config))
        new = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
        changed = [k for k in _changed_keys(old, new) if not k.startswith("scaling.")]
        if changed:
            rank_zero_warn(
                f"resuming {run_dir.root} with a changed config: {', '.join(changed)} "
                "(previous config kept as config.previous.yaml)"
            )
            os.replace(run_dir.config, run_dir.root / "config.previous.yaml")
    save_config(cfg, run_dir.config)


def progress_bar_refresh_rate(t: Any) -> int:
    """trainer.progress_bar_refresh_rate, or the default: a bar on a terminal, none in a log file
    (a batch job's stdout) or under `phenoscale --quiet`; 0 = no bar."""
    if t.progress_bar_refresh_rate is not None:
        return int(t.progress_bar_refresh_rate)
    if output.is_quiet() or not sys.stdout.isatty():
        return 0
    return max(1, t.log_every_n_steps // 10)


def build_trainer(
    cfg: Any,
    env: LaunchEnv,
    run_dir: RunDir,
    devices: int,
    num_nodes: int,
    datamodule: datamodules.ShardDataModule,
    choice: DeviceChoice,
    user_callbacks: list[pl.Callback],
) -> tuple[pl.Trainer, StopGuard]:
    """The Trainer with atomic checkpoints, preemption handling, loggers and progress; the user's
    callbacks run after phenoscale's own, trainer.extra is passed through as checked by the config."""
    t = cfg.trainer
    checkpoint = StepCheckpoint(run_dir, t.checkpoint_every_n_steps, t.keep_checkpoints)
    guard = StopGuard(checkpoint)
    refresh = progress_bar_refresh_rate(t)
    # the audit line of a batch is written before any checkpoint that includes the batch, so a
    # kill -9 between the two never leaves a checkpoint ahead of the audit
    audit = [BatchAudit(run_dir.logs / "batches")] if t.audit_batches else []
    callbacks: list[pl.Callback] = [
        *audit,
        guard,  # before the checkpoint callback: a non-finite loss must stop before it saves
        checkpoint,
        # rates over one logging interval of batches (+1: n intervals need n + 1 timestamps)
        Throughput(window=t.log_every_n_steps * t.accumulate_grad_batches + 1, peak_flops=t.peak_flops),
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(refresh_rate=refresh) if refresh else ProgressLog(t.log_every_n_steps),
        datamodules.StreamEpochCallback(datamodule),
    ]
    if t.evaluate:  # EFAAR on data.eval_shards (default: the training shards) every eval.every_n_epochs
        efaar = EFAARCallback(datamodule, OmegaConf.to_object(cfg.eval))
        callbacks += [efaar, EvalReport(efaar, run_dir.reports)]
    version = run_dir.next_attempt()
    plugins: list[Any] = [AtomicCheckpointIO(), *cluster_plugins(env)]
    trainer = pl.Trainer(
        accelerator=choice.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=choice.strategy,
        precision=choice.precision,
        num_sanity_val_steps=0,
        enable_checkpointing=False,  # StepCheckpoint does it, atomically
        enable_progress_bar=bool(refresh),
        enable_model_summary=False,  # its FLOPs column needs an example input; fit logs counted FLOPs instead
        enable_autolog_hparams=False,  # fit logs the whole resolved config instead of the module's arguments
        default_root_dir=str(run_dir.root),
        logger=build_loggers(cfg, run_dir, version, rank_zero=env.global_rank == 0),
        callbacks=callbacks + user_callbacks,
        plugins=plugins,
        **{name: getattr(t, name) for name in TRAINER_PASSTHROUGH},
        **OmegaConf.to_container(t.extra, resolve=True),
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
        raise ConfigError(
            f"{run_dir.root} already holds {last}; pass run.resume=true to continue "
            "it or choose another run.run_dir (runs are never overwritten)"
        )
    choice = choose_device(cfg.trainer, env)
    check_available(list(cfg.trainer.loggers))
    user_callbacks = instantiate_callbacks(cfg.trainer.callbacks)
    plan = plan_batch(cfg, cfg.data.batch_size, devices, num_nodes)
    rank_zero_info(
        f"[phenoscale] {env.launcher} launch, world size {env.world_size}: "
        f"{devices} devices x {num_nodes} nodes; {plan.describe()}"
    )
    rank_zero_info(
        f"[phenoscale] precision {choice.precision} on {choice.device_type} "
        f"(trainer.precision={cfg.trainer.precision}; {hardware.numerics(choice.device_type).describe()})"
    )
    hardware.configure_device(choice.device_type)
    pl.seed_everything(cfg.run.seed, workers=True)
    if env.is_distributed:
        # code that reads the torchrun convention before the process group exists (the data
        # module's per-rank step count) sees the right rank and world under srun (or any
        # launcher that does not export it) as well; torchrun and fabric run already set both
        os.environ.setdefault("RANK", str(env.global_rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))

    if env.global_rank == 0:
        run_dir.create()
        _record_config(cfg, run_dir, resuming=last is not None)

    datamodule = datamodules.build_datamodule(OmegaConf.to_object(cfg.data), seed=cfg.run.seed)
    trainer, guard = build_trainer(cfg, env, run_dir, devices, num_nodes, datamodule, choice, user_callbacks)
    steps = _total_steps(cfg, datamodule)
    optim = OmegaConf.merge(cfg.optim, {"lr": plan.lr})
    module = lightning_modules.build_module(
        cfg.model,
        optim,
        in_chans=datamodule.in_chans,
        num_classes=datamodule.num_classes,
        total_steps=steps,
    )
    params, encoder_params, flops_per_crop = model_size(cfg.model, optim, datamodule.in_chans, datamodule.num_classes)
    module.flops_per_batch = flops_per_crop * cfg.data.batch_size  # read by the Throughput callback
    rank_zero_info(
        f"[phenoscale] {type(module).__name__}: {params / 1e6:.3g} M parameters "
        f"({encoder_params / 1e6:.3g} M embedding trunk), {flops_per_crop / 1e9:.3g} GFLOPs "
        f"per training crop (forward + backward); {_mfu_basis(cfg.trainer, choice)}"
    )
    # identical initial weights on every rank (above), then a rank-specific stream for what the
    # model draws during training (MAE masks, drop-path): N ranks should not mask alike
    torch.manual_seed(cfg.run.seed + 1_000_003 * trainer.global_rank)
    log_config(
        trainer.loggers,
        cfg,
        {
            "effective_batch_size": plan.effective,
            "lr": plan.lr,
            "lr_rule": plan.rule,
            "world_size": plan.devices * plan.num_nodes,
            "precision": choice.precision,
            "device_type": choice.device_type,
            "flops_per_crop": flops_per_crop,
            "in_chans": datamodule.in_chans,
            "num_classes": datamodule.num_classes,
            "total_steps": steps,
        },
    )
    if last is not None:
        rank_zero_info(f"[phenoscale] resuming from {last}")
    if cfg.trainer.compile:  # Lightning unwraps the compiled module for checkpoints and hooks
        module = torch.compile(module)
    # our own run directory's checkpoint: it holds loop/data state beyond tensors, so full unpickling
    with warnings.catch_warnings():
        # Lightning warns about any IterableDataset with a __len__; ours splits the stream over
        # ranks and workers itself (datamodules/streaming.py), so its length is exact
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        # Lightning's CombinedLoader builds torch's deprecated LeafSpec at every fit; nothing a user
        # can change, so only that message from only that Lightning module is silenced
        warnings.filterwarnings(
            "ignore",
            message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            category=FutureWarning,
            module=r"lightning\.pytorch\.utilities\._pytree",
        )
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last else None, weights_only=False)
        finally:
            finish_loggers(trainer.loggers)
    if guard.stopped_by_signal:
        rank_zero_info(
            f"[phenoscale] stopped at step {trainer.global_step} after a preemption "
            f"signal; checkpoint saved. Rerun the same command to resume."
        )
    return FitResult(run_dir.root, trainer.global_step, guard.stopped_by_signal, last)


def _total_steps(cfg: Any, datamodule: Any) -> int:
    """Optimizer steps of the whole run (the LR schedule's length)."""
    if cfg.trainer.max_steps > 0:
        return int(cfg.trainer.max_steps)
    per_epoch = datamodule.steps_per_epoch // cfg.trainer.accumulate_grad_batches
    return max(1, per_epoch * int(cfg.trainer.max_epochs))


def _mfu_basis(t: Any, choice: DeviceChoice) -> str:
    """Which peak MFU is measured against, said once at start (a CPU has no table entry)."""
    if t.peak_flops is not None:
        return f"MFU against trainer.peak_flops={t.peak_flops:.3g} FLOP/s per device"
    if choice.device_type == "cpu":
        return (
            "no MFU: Lightning knows no peak FLOP/s for CPUs; set trainer.peak_flops (FLOP/s per "
            "process, e.g. from a large-matmul benchmark) to log it"
        )
    return "MFU against Lightning's peak FLOP/s table for this device"
