"""The experiment config: each package's typed settings composed, merged and checked up front.

Merge order: structured defaults (the dataclasses) -> experiment YAML -> command-line dotlist
overrides. Everything is checked by OmegaConf against the dataclasses while merging, so a typo
or a wrong type fails in a second, before data or model is built, with a message that names the
key and lists what that section allows (multi-node jobs that die after 10 minutes of queueing
because of `trainer.max_step` are the failure this prevents).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from datamodules.atomic import write_text_atomic
from datamodules.config import DataConfig
from evaluation.config import EvalConfig
from lightning_modules.config import (
    ModelConfig,
    OptimConfig,
    migrate_legacy_keys,
    model_config_dict,
    without_other_sections,
)
from lightning_modules.families import get_family
from lightning_modules.hardware import TRAIN_PRECISIONS


class LRRule(str, Enum):
    """How the learning rate follows the effective batch size (lr = base_lr x factor)."""

    none = "none"  # factor 1: the config's lr is used as is
    linear = "linear"  # factor effective / base (Goyal et al.; SGD-style)
    sqrt = "sqrt"  # factor sqrt(effective / base) (common for Adam/Lion-type optimisers)


LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")

#: TrainerConfig fields handed to lightning.Trainer as they are, under the same name
TRAINER_PASSTHROUGH = (
    "max_steps",
    "max_epochs",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "log_every_n_steps",
    "deterministic",
)

#: lightning.Trainer arguments phenoscale sets itself (from the keys of TrainerConfig of the same
#: name, or because the run directory, checkpoints and output depend on them): not for trainer.extra
OWNED_TRAINER_ARGS = (
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    *TRAINER_PASSTHROUGH,
    "num_sanity_val_steps",
    "enable_checkpointing",
    "default_root_dir",
    "logger",
    "callbacks",
    "plugins",
    "enable_progress_bar",
    "enable_model_summary",
    "enable_autolog_hparams",
)


@dataclass
class WandbConfig:
    """Weights & Biases (`pip install phenoscale[wandb]`); a resumed run continues the same W&B run."""

    project: str = "phenoscale"
    entity: Optional[str] = None  # team or user; None: the logged-in default
    offline: bool = False  # write under <run_dir>/logs/wandb, `wandb sync` later (as WANDB_MODE=offline)
    tags: list[str] = field(default_factory=list)


@dataclass
class MLflowConfig:
    """MLflow (`pip install phenoscale[mlflow]`); a resumed run continues the same MLflow run."""

    experiment: str = "phenoscale"
    # None: $MLFLOW_TRACKING_URI if set, else a file store in <run_dir>/logs/mlflow (no server needed)
    tracking_uri: Optional[str] = None


@dataclass
class CallbackConfig:
    """A Lightning callback by import path, Lightning CLI's convention: `class_path(**init_args)`."""

    class_path: str = MISSING  # e.g. lightning.pytorch.callbacks.DeviceStatsMonitor
    init_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    """Lightning Trainer settings. devices/num_nodes 'auto' = what the launcher started."""

    max_steps: int = 1000  # optimizer steps; -1 = run max_epochs
    max_epochs: Optional[int] = None
    precision: str = "auto"  # auto: bf16-mixed where the device has native bf16, else 32-true (docs/hardware.md)
    accelerator: str = "auto"
    devices: str = "auto"  # 'auto' or processes per node; must match the launcher
    num_nodes: str = "auto"  # 'auto' or node count; must match the launcher
    strategy: str = "auto"  # "auto": ddp when world size > 1 (gloo on CPU, nccl on GPU)
    compile: bool = False  # torch.compile the LightningModule (GPU users; the first steps compile)
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    keep_checkpoints: int = 2  # step checkpoints kept besides last.ckpt; 0 keeps all
    evaluate: bool = False  # EFAAR on data.eval_shards every eval.every_n_epochs during fit
    deterministic: bool = False
    audit_batches: bool = False  # logs/batches/rank<r>.tsv: step, epoch, batch, crops, checksum
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])  # of LOGGERS
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    callbacks: list[CallbackConfig] = field(default_factory=list)  # run after phenoscale's own
    extra: dict[str, Any] = field(default_factory=dict)  # other lightning.Trainer arguments, checked by name
    # None: a bar refreshed every log_every_n_steps // 10 steps when stdout is a terminal, otherwise
    # none and a log line every log_every_n_steps (SLURM logs stay readable); 0: never a bar
    progress_bar_refresh_rate: Optional[int] = None
    # per-device peak FLOP/s for MFU; None: Lightning's table of CUDA/TPU chips. A CPU has no such
    # entry (its peak depends on cores, vector width and clock), so CPU runs log no MFU unless set
    peak_flops: Optional[float] = None


@dataclass
class ScalingConfig:
    """Batch and learning-rate scaling with world size, explicit so a 64-GPU run is not a surprise.

    effective_batch_size and lr are DERIVED by `phenoscale fit` (per-device batch x devices x
    num_nodes x accumulate_grad_batches; optim.lr x rule factor) and saved in the run's
    config.yaml; leave them unset in experiment files.
    """

    lr_rule: LRRule = LRRule.none
    base_batch_size: int = 256  # effective batch size at which optim.lr was tuned
    effective_batch_size: Optional[int] = None  # derived
    lr: Optional[float] = None  # derived: the learning rate actually used


@dataclass
class RunConfig:
    """Where the run lives and how it starts."""

    name: str = "run"
    run_dir: str = "runs/${run.name}"
    seed: int = 0
    resume: bool = True  # restart in an existing run_dir continues from checkpoints/last.ckpt


@dataclass
class ExperimentConfig:
    """One experiment: what to train on, what to train, how, and how to judge it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the source and what is allowed."""


def _type_name(tp: Any) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "")


def schema(family: str = ModelConfig.family) -> DictConfig:
    """The structured defaults, with the registered family's own section added as `model.<family>`.

    Only the configured family's section exists (load_config drops other families' sections, so
    one file may configure several); a misspelt section or key fails at load.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    with open_dict(cfg.model):
        cfg.model[family] = OmegaConf.structured(get_family(family).config)
    return cfg


def allowed_keys(section: str, family: str = ModelConfig.family) -> str:
    """'key: type = default' for every key of `section` ('' = top level) of the schema."""
    node = schema(family)
    if section:
        node = OmegaConf.select(node, section, throw_on_missing=False)
    cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if cls is None or not dataclasses.is_dataclass(cls):
        return "(free-form section)"
    lines = []
    for f in dataclasses.fields(cls):
        default = node._get_node(f.name)._value() if f.name in node else None
        if isinstance(default, DictConfig):
            shown = "{...}"
        elif isinstance(default, Enum):
            shown = f"{default.value!r} (one of {', '.join(m.value for m in type(default))})"
        else:
            shown = repr(default)
        lines.append(f"  {f.name}: {_type_name(f.type)} = {shown}")
    return "\n".join(lines)


def _friendly(err: OmegaConfBaseException, source: str, family: str) -> ConfigError:
    key = err.full_key or err.key or ""
    section = key.rsplit(".", 1)[0] if "." in str(key) else ""
    where = f"section '{section}'" if section else "the top level"
    if isinstance(err, (KeyError, AttributeError)) or "not in" in str(err.msg):
        what = f"unknown key '{key}'"
    else:
        what = f"bad value for '{key}': {str(err.msg).splitlines()[0]}"
    return ConfigError(f"{source}: {what}.\nAllowed keys of {where}:\n{allowed_keys(section, family)}")


def load_config(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Defaults <- YAML file(s), in order <- dotlist overrides (`trainer.max_steps=10`), validated.

    Several files layer like the overrides do (e.g. a paper model file, then a data/site file).
    Returns a typed (structured) DictConfig posing as ExperimentConfig: attribute access and
    assignment are checked against the schema from here on too.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    layers: list[tuple[str, DictConfig]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {err}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. trainer.max_steps=100")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    # the family decides which model.<family> section the schema has: the last layer that names it
    family = next(
        (f for _, layer in reversed(layers) if (f := OmegaConf.select(layer, "model.family")) is not None),
        ModelConfig.family,
    )
    try:
        cfg = schema(family)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for source, layer in layers:
        if isinstance(layer.get("model"), DictConfig):
            model = migrate_legacy_keys(OmegaConf.to_container(layer.model), family, source)
            layer.model = OmegaConf.create(without_other_sections(model, family))
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _friendly(err, source, family) from None
    _check_values(cfg)
    return cfg  # type: ignore[return-value]


def split_cli_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """`CONFIG... key=value...` from the command line -> (YAML files in order, overrides).

    An existing file is a config layer; anything else must be key=value.
    """
    files, overrides = [], []
    for item in items:
        if os.path.isfile(item):
            files.append(item)
        elif "=" in item:
            overrides.append(item)
        else:
            raise ConfigError(f"{item!r} is neither a config file nor a key=value override")
    return files, overrides


def _check_values(cfg: Any) -> None:
    """Range checks OmegaConf's types cannot express."""
    t = cfg.trainer
    if t.precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r}: allowed are {', '.join(TRAIN_PRECISIONS)}")
    if t.max_steps == -1 and t.max_epochs is None:
        raise ConfigError("trainer.max_steps=-1 needs trainer.max_epochs (otherwise it never stops)")
    for name in ("accumulate_grad_batches", "log_every_n_steps", "checkpoint_every_n_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"trainer.{name}={getattr(t, name)}: must be >= 1")
    unknown = [name for name in t.loggers if name not in LOGGERS]
    if unknown or len(set(t.loggers)) != len(t.loggers):
        raise ConfigError(f"trainer.loggers={list(t.loggers)}: each at most once, of {', '.join(LOGGERS)}")
    if t.progress_bar_refresh_rate is not None and t.progress_bar_refresh_rate < 0:
        raise ConfigError(f"trainer.progress_bar_refresh_rate={t.progress_bar_refresh_rate}: must be >= 0")
    if t.peak_flops is not None and t.peak_flops <= 0:
        raise ConfigError(f"trainer.peak_flops={t.peak_flops}: must be > 0 (FLOP/s of one device)")
    check_trainer_extra(t.extra)
    if cfg.scaling.base_batch_size < 1:
        raise ConfigError(f"scaling.base_batch_size={cfg.scaling.base_batch_size}: must be >= 1")
    for section in cfg:
        if OmegaConf.missing_keys(cfg[section]):
            continue  # `phenoscale config` may show '???'; fit demands them (require_complete)
        if section == "model":  # the shared settings and the family's own section, each by its dataclass
            try:
                model_config_dict(cfg.model)
            except (ValueError, TypeError) as err:
                raise ConfigError(str(err)) from None
            continue
        try:
            # builds the dataclass: each package's __post_init__ checks run now, not at build time
            OmegaConf.to_object(cfg[section])
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot resolve '{err.full_key}': {err.msg}") from None
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from None


def check_trainer_extra(extra: Any) -> None:
    """trainer.extra must name lightning.Trainer arguments that phenoscale does not set itself.

    Checked against the installed Trainer's signature, so a typo fails here, not after queueing.
    Lightning is imported only when extra is used (`phenoscale config` stays fast).
    """
    if not extra:
        return
    import inspect

    import lightning.pytorch as pl

    accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    allowed = sorted(accepted - set(OWNED_TRAINER_ARGS))
    own = {f.name for f in dataclasses.fields(TrainerConfig)}
    for key in extra:
        if key in OWNED_TRAINER_ARGS:
            hint = f"set trainer.{key} instead" if key in own else "phenoscale sets it itself"
            raise ConfigError(f"trainer.extra.{key}: {hint}.\nAllowed keys of trainer.extra: {', '.join(allowed)}")
        if key not in accepted:
            raise ConfigError(
                f"trainer.extra.{key}: not an argument of lightning.Trainer "
                f"{pl.__version__}.\nAllowed keys of trainer.extra: {', '.join(allowed)}"
            )


def require_complete(cfg: Any) -> None:
    """Mandatory values ('???' in the defaults) must be set before a run starts."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing mandatory values: {', '.join(missing)} (set them in the "
            "experiment YAML or as key=value overrides)"
        )


@dataclass(frozen=True)
class BatchPlan:
    """The derived batch and learning-rate numbers of one launch."""

    per_device: int
    devices: int
    num_nodes: int
    accumulate: int
    effective: int
    base_batch_size: int
    rule: str
    base_lr: float
    lr: float

    def describe(self) -> str:
        factor = self.lr / self.base_lr if self.base_lr else 1.0
        return (
            f"effective batch {self.effective} = {self.per_device} per device x {self.devices} "
            f"devices x {self.num_nodes} nodes x {self.accumulate} accumulation; "
            f"lr {self.lr:.4g} = {self.base_lr:.4g} x {factor:.4g} ({self.rule} rule, base batch "
            f"{self.base_batch_size})"
        )


def plan_batch(cfg: Any, per_device: int, devices: int, num_nodes: int) -> BatchPlan:
    """Effective batch and scaled lr; writes both into cfg.scaling (the saved config shows them)."""
    accumulate = cfg.trainer.accumulate_grad_batches
    effective = per_device * devices * num_nodes * accumulate
    rule = LRRule(cfg.scaling.lr_rule)
    ratio = effective / cfg.scaling.base_batch_size
    factor = {LRRule.none: 1.0, LRRule.linear: ratio, LRRule.sqrt: math.sqrt(ratio)}[rule]
    plan = BatchPlan(
        per_device,
        devices,
        num_nodes,
        accumulate,
        effective,
        cfg.scaling.base_batch_size,
        rule.value,
        float(cfg.optim.lr),
        float(cfg.optim.lr) * factor,
    )
    for name, derived in (("effective_batch_size", plan.effective), ("lr", plan.lr)):
        given = cfg.scaling[name]
        if given is not None and not math.isclose(float(given), float(derived), rel_tol=1e-6):
            # a config.yaml saved by a run on another topology: recompute, but say so
            warnings.warn(
                f"scaling.{name}={given} is derived, not an input; using {derived} ({plan.describe()})", stacklevel=2
            )
    cfg.scaling.effective_batch_size = plan.effective
    cfg.scaling.lr = plan.lr
    return plan


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (interpolations replaced by their values)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (a crash never leaves half a config.yaml)."""
    write_text_atomic(path, to_yaml(cfg), fsync=True)
