"""The model-family registry: a family added from outside the package runs end to end; the
per-family config sections are validated, and the flat keys of older configs still load."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import datamodules
import lightning_modules
from lightning_modules import PhenoModule, build_module, load_pretrained, register_family
from lightning_modules.config import model_config_dict
from lightning_modules.standardize import self_standardize
from phenoscale.cli import main
from phenoscale.config import ConfigError, load_config
from phenoscale.demo import label
from phenoscale.embedding import embed_model
from phenoscale.workflow import eval_data_config
from run_helpers import TINY


@dataclass
class PoolConfig:
    """model.pool: the toy family's own section."""

    width: int = 8


@register_family("pool", config=PoolConfig, label="pooled linear", colour="#000000")
class PooledLinear(PhenoModule):
    """A toy family: per-channel means through one linear layer, trained to reconstruct them.
    The least a family declares for embedding: one layer, which is all its trunk is."""

    num_blocks = 1
    trunk = property(lambda self: self.encode)

    def build_layers(self) -> None:
        self.encode = nn.Linear(self.in_chans, self.family_cfg.width)
        self.decode = nn.Linear(self.family_cfg.width, self.in_chans)

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        means = self_standardize(batch["image"]).mean(dim=(2, 3)) + batch["image"].float().mean(dim=(2, 3)) / 255
        loss = nn.functional.mse_loss(self.decode(self.encode(means)), means)
        return {"loss": loss}

    @torch.no_grad()
    def embed(self, images: Tensor, pooling: str | None = None, block: int | None = None) -> Tensor:
        self.resolve_block(block)
        return self.encode(images.float().mean(dim=(2, 3)) / 255).float()


def test_a_family_registered_outside_the_package_fits_loads_and_embeds(screen: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert "pool" in lightning_modules.family_names() and label("pool") == "pooled linear"
    assert (
        main(
            [
                "fit",
                str(TINY),
                f"data.train_shards={screen / 'shards'}",
                f"run.run_dir={run_dir}",
                "data.num_workers=0",
                "trainer.max_steps=3",
                "model.family=pool",
                "model.pool.width=5",
            ]
        )
        == 0
    )
    saved = OmegaConf.load(run_dir / "config.yaml")
    # the saved config holds the toy family's section and none of the other families' (tiny.yaml has three)
    assert saved.model.pool.width == 5 and not {"mae", "camae", "wsl"} & set(saved.model)
    module = load_pretrained(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(module, PooledLinear) and module.encode.out_features == 5
    frame = pl.read_parquet(embed_model(module, eval_data_config(screen / "shards", 32), tmp_path / "pool.parquet"))
    assert frame["embedding"].dtype.size == 5 and frame.height == datamodules.read_manifest(screen / "shards").height


def test_registering_a_taken_name_with_another_class_fails() -> None:
    with pytest.raises(ValueError, match="already registered by .*MAEModule"):
        register_family("mae", config=PoolConfig, label="x")(type("OtherMAE", (PhenoModule,), {}))


def test_a_section_is_validated_by_its_family_dataclass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"(?s)model\.mae\.mask_ration.*Allowed keys.*mask_ratio"):
        load_config(TINY, ["model.family=mae", "model.mae.mask_ration=0.5"])
    with pytest.raises(ConfigError, match=r"model\.camae\.mask_mode must be one of"):
        load_config(TINY, ["model.camae.mask_mode=rows"])
    with pytest.raises(ConfigError, match="unknown model.family .*; registered: mae, camae, wsl"):
        load_config(TINY, ["model.family=vit"])
    # another family's section is ignored, so one file serves every family (tiny.yaml)
    cfg = load_config(TINY, ["model.family=wsl"])
    assert cfg.model.wsl.embed_dim == 16 and "camae" not in cfg.model


def test_flat_keys_of_older_configs_move_to_the_family_section_with_a_warning(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  family: wsl\n  wsl_embed_dim: 24\n  mask_ratio: 0.5\n")
    with pytest.warns(FutureWarning, match="model.wsl_embed_dim is deprecated, use model.wsl.embed_dim"):
        cfg = load_config(old)
    assert cfg.model.wsl.embed_dim == 24 and "mask_ratio" not in cfg.model


def test_a_checkpoint_with_flat_hyperparameters_rebuilds_the_same_module() -> None:
    sectioned = model_config_dict(
        {
            "family": "mae",
            "img_size": 32,
            "patch_size": 8,
            "drop_path": 0.0,
            "backbone": "vit_small_patch16_256",
            "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
            "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "mask_ratio": 0.6},
        }
    )
    flat = {k: v for k, v in sectioned.items() if k != "mae"} | sectioned["mae"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = build_module(flat, {"name": "adamw"}, in_chans=3)
    new = build_module(sectioned, {"name": "adamw"}, in_chans=3)
    assert old.family_cfg == new.family_cfg and old.family_cfg.mask_ratio == 0.6
    assert old.hparams["model_cfg"] == sectioned  # saved in the new layout


def test_plugins_named_in_the_environment_are_imported_before_the_cli_parses(tmp_path: Path) -> None:
    (tmp_path / "my_plugin.py").write_text(
        "from datamodules.converters import Converter, register_converter\n"
        "register_converter(Converter('mylayout', lambda src, channel_map=None: None, 'my layout'))\n"
    )
    env = {
        **os.environ,
        "PHENOSCALE_PLUGINS": "my_plugin",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    shown = subprocess.run(
        [sys.executable, "-m", "phenoscale", "shards", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "mylayout" in shown
    env["PHENOSCALE_PLUGINS"] = "no_such_plugin"
    failed = subprocess.run(
        [sys.executable, "-m", "phenoscale", "shards", "--help"], env=env, capture_output=True, text=True
    )
    assert failed.returncode != 0 and "phenoscale plugin 'no_such_plugin'" in failed.stderr
