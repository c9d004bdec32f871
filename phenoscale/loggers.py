"""The experiment loggers of a fit, chosen by `trainer.loggers`, and what every run sends them.

csv and tensorboard write under <run_dir>/logs/<name>/attempt_<k>/ (one version per launch);
wandb and mlflow are optional extras (`pip install phenoscale[wandb]` / `phenoscale[mlflow]`)
whose run ids are kept in <run_dir>/logs/logger_ids.json, so a resumed launch appends to the
same W&B / MLflow run instead of starting a new one. Every logger receives the resolved config
as hyper-parameters; figures go to those that take images (TensorBoard, W&B, MLflow).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from PIL import Image

from datamodules.atomic import write_text_atomic
from phenoscale.config import ConfigError
from phenoscale.run import RunDir

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> module it needs (= the pip extra's name)


def _require(name: str) -> None:
    try:
        __import__(EXTRAS[name])
    except ImportError:
        raise ConfigError(
            f"trainer.loggers has {name!r} but the {EXTRAS[name]} package is not installed: "
            f"pip install 'phenoscale[{name}]'"
        ) from None


def check_available(names: list[str]) -> None:
    """Fail before anything is built when a chosen logger's package is missing."""
    for name in names:
        if name in EXTRAS:
            _require(name)


def _read_ids(run_dir: RunDir) -> dict[str, str]:
    return json.loads(run_dir.logger_ids.read_text()) if run_dir.logger_ids.is_file() else {}


def _mlflow_uri(cfg: Any, run_dir: RunDir) -> str:
    uri = cfg.trainer.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # MLflow 3 refuses its file store unless asked; a store inside the run dir is our default,
    # chosen so that a run needs no server and moves with its directory
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir.logs / "mlflow").resolve().as_uri()


def build_loggers(cfg: Any, run_dir: RunDir, version: str, rank_zero: bool) -> list[Logger]:
    """The loggers of `cfg.trainer.loggers`, W&B / MLflow resuming the run ids saved in run_dir."""
    names = list(cfg.trainer.loggers)
    check_available(names)
    ids = _read_ids(run_dir)
    loggers: list[Logger] = []
    for name in names:
        if name == "csv":
            loggers.append(CSVLogger(run_dir.logs, name="csv", version=version))
        elif name == "tensorboard":
            loggers.append(
                TensorBoardLogger(run_dir.logs, name="tensorboard", version=version, default_hp_metric=False)
            )
        elif name == "wandb":
            w = cfg.trainer.wandb
            ids.setdefault("wandb", secrets.token_hex(4))  # W&B accepts a run id chosen up front
            loggers.append(
                WandbLogger(
                    name=cfg.run.name,
                    project=w.project,
                    entity=w.entity,
                    save_dir=str(run_dir.logs),
                    offline=w.offline,
                    tags=list(w.tags),
                    id=ids["wandb"],
                    resume="allow",
                )
            )
        elif name == "mlflow":
            m = cfg.trainer.mlflow
            logger = MLFlowLogger(
                experiment_name=m.experiment,
                run_name=cfg.run.name,
                tracking_uri=_mlflow_uri(cfg, run_dir),
                run_id=ids.get("mlflow"),
            )
            if rank_zero:
                ids["mlflow"] = logger.run_id  # MLflow assigns it when the run is created
            loggers.append(logger)
    if rank_zero and ids and ids != _read_ids(run_dir):
        write_text_atomic(run_dir.logger_ids, json.dumps(ids, indent=2))
    return loggers


@rank_zero_only
def log_config(loggers: list[Logger], cfg: Any, derived: dict[str, Any]) -> None:
    """The resolved config (every section) plus the launch's derived numbers, as hyper-parameters."""
    params = {**OmegaConf.to_container(cfg, resolve=True), **derived}
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            # MLflow params are write-once: a resume logs only the keys the run lacks (a changed
            # value is named by fit's warning and kept in config.previous.yaml)
            known = logger.experiment.get_run(logger.run_id).data.params
            logger.log_hyperparams({k: v for k, v in _flatten_dict(_convert_params(params)).items() if k not in known})
        else:
            logger.log_hyperparams(params)


@rank_zero_only
def finish(loggers: list[Logger]) -> None:
    """End this launch's W&B run (Lightning leaves it open: a second fit in the same process, a demo
    or a test, would otherwise log into it); MLflow runs are ended by Lightning's finalize."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def log_figure(logger: Logger, name: str, path: Path, step: int) -> bool:
    """Send one PNG to `logger` if it takes images; returns whether it did."""
    if isinstance(logger, TensorBoardLogger):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        logger.experiment.add_image(name, pixels, step, dataformats="HWC")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=name, images=[str(path)], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=f"figures/step={step:08d}")
    else:
        return False
    return True
