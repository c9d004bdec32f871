"""`phenoscale export`: checkpoint -> safetensors + config.json + card, read back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import polars as pl
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from lightning_modules import CAMAEModule, load_pretrained
from lightning_modules.export import CONFIG, WEIGHTS, read_export_config
from phenoscale.cli import main as cli
from phenoscale.config import load_config
from run_helpers import write_real_shards
from tiny_models import real_crops, tiny_module


def save_checkpoint(module: L.LightningModule, path: Path) -> Path:
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def run_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as `phenoscale fit` leaves it: config.yaml, checkpoints/last.ckpt, a report."""
    root = tmp_path_factory.mktemp("run")
    shards = write_real_shards(shared_data, root / "shards", sites=8, size=64)
    cfg = load_config(None, [f"data.train_shards={shards}", "data.crop_size=32"])
    OmegaConf.save(cfg, root / "config.yaml")
    (root / "checkpoints").mkdir()
    torch.manual_seed(0)
    save_checkpoint(tiny_module("camae"), root / "checkpoints/last.ckpt")
    (root / "reports/screen").mkdir(parents=True)
    (root / "reports/screen/metrics.json").write_text(json.dumps({"summary": {"recall": 0.25, "consistency": 0.5}}))
    return root


@pytest.mark.parametrize("encoder_only", [False, True])
def test_export_round_trip_is_bit_identical(run_dir, shared_data, tmp_path, encoder_only):
    checkpoint = run_dir / "checkpoints/last.ckpt"
    args = ["export", str(checkpoint), str(tmp_path / "out")] + (["--encoder-only"] if encoder_only else [])
    assert cli(args) == 0
    with safe_open(tmp_path / "out" / WEIGHTS, "pt") as weights:  # real safetensors, not a pickle
        keys = set(weights.keys())
        assert weights.metadata() == {"format": "phenoscale"}
    assert any(k.startswith("decoder.") for k in keys) != encoder_only
    images = real_crops(shared_data, 3)
    exported, original = load_pretrained(tmp_path / "out"), load_pretrained(checkpoint)
    assert isinstance(exported, CAMAEModule) and exported.model_cfg == original.model_cfg
    for pooling in ("mean", "channelwise"):
        assert torch.equal(exported.embed(images, pooling=pooling), original.embed(images, pooling=pooling))
    if encoder_only:
        with pytest.raises(RuntimeError, match="encoder-only: 'encoder_decoder_proj'"):
            exported(images)


def test_config_and_card_say_what_the_run_knows(run_dir, tmp_path):
    assert cli(["export", str(run_dir / "checkpoints/last.ckpt"), str(tmp_path)]) == 0
    config = read_export_config(tmp_path)
    assert config["channels"] == ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]
    assert config["crop_size"] == 32 and config["mlp_bias_layout"] == "fixed"
    assert config["embedding"] == {"pooling": "mean", "block": None}
    assert config["model_cfg"]["family"] == "camae" and config["standardisation"]["eps"] == 1e-5
    card = (tmp_path / "README.md").read_text()
    assert "- sites: 8" in card and "| recall | 0.2500 |" in card and "Brightfield, ER, AGP" in card


def test_embed_cli_on_an_export_equals_the_checkpoint(run_dir, tmp_path):
    shards = run_dir / "shards"
    assert cli(["export", str(run_dir / "checkpoints/last.ckpt"), str(tmp_path / "out")]) == 0
    for source, out in ((run_dir / "checkpoints/last.ckpt", "ckpt.parquet"), (tmp_path / "out", "export.parquet")):
        assert cli(["embed", str(source), str(shards), str(tmp_path / out), "--num-workers", "0"]) == 0
    ckpt, export = pl.read_parquet(tmp_path / "ckpt.parquet"), pl.read_parquet(tmp_path / "export.parquet")
    assert ckpt.height == 8 and ckpt.equals(export)


def test_openphenom_export_keeps_the_legacy_layout(shared_data, tmp_path):
    """Re-exporting an OpenPhenom-format file records the layout its weights need."""
    from test_pretrained import random_openphenom_checkpoint

    random_openphenom_checkpoint(shared_data, tmp_path / "model.safetensors", values=False)
    assert cli(["export", str(tmp_path / "model.safetensors"), str(tmp_path / "out"), "--encoder-only"]) == 0
    config = read_export_config(tmp_path / "out")
    assert config["mlp_bias_layout"] == config["model_cfg"]["mlp_bias_layout"] == "legacy"
    assert load_pretrained(tmp_path / "out").model_cfg.mlp_bias_layout == "legacy"


def test_edited_or_foreign_configs_are_clear_errors(run_dir, tmp_path):
    assert cli(["export", str(run_dir / "checkpoints/last.ckpt"), str(tmp_path)]) == 0
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**config, "mlp_bias_layout": "legacy"}))
    with pytest.raises(ValueError, match=r"contradicts its model_cfg: mlp_bias_layout='legacy'"):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"architectures": ["Something"]}))
    with pytest.raises(ValueError, match="not an OpenPhenom/maes_microscopy config"):
        load_pretrained(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="neither a phenoscale export nor OpenPhenom's model.safetensors"):
        load_pretrained(tmp_path)
