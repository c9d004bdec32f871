"""Compute plans and scaling grids: counted FLOPs, the arithmetic of GPU-hours, grid validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_modules
from phenoscale.cli import main
from phenoscale.config import ConfigError, load_config
from phenoscale.grid import cell_layers, cells, load_grid, steps_for
from phenoscale.plan import GPU_PEAK_FLOPS, Hardware, SiteFormat, crops_of, model_size, plan_row

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "experiments" / "tiny.yaml"


def test_meta_plan_matches_a_real_model() -> None:
    """Parameters and FLOPs counted on the meta device equal those of the real module."""
    cfg = load_config(TINY, ["data.train_shards=unused"])
    params, encoder, flops = model_size(cfg.model, cfg.optim, in_chans=6, num_classes=10)
    real = lightning_modules.build_module(cfg.model, cfg.optim, in_chans=6, num_classes=10)
    assert params == sum(p.numel() for p in real.parameters())
    assert encoder == sum(p.numel() for p in real.encoder.parameters())
    assert flops == pytest.approx(lightning_modules.training_flops_per_crop(real), rel=1e-9)


def test_halving_the_patch_roughly_quadruples_encoder_flops() -> None:
    """ViT-B/8 sees 4x the tokens of ViT-B/16: its training FLOPs per crop grow at least 4x."""
    b16 = load_config(REPO / "configs/paper/mae_vit_b16.yaml", ["data.train_shards=unused"])
    b8 = load_config(REPO / "configs/paper/mae_vit_b8.yaml", ["data.train_shards=unused"])
    _, enc16, f16 = model_size(b16.model, b16.optim, 6, 2)
    _, enc8, f8 = model_size(b8.model, b8.optim, 6, 2)
    assert enc8 == pytest.approx(enc16, rel=0.02)  # same encoder, only the patch differs
    assert f8 / f16 > 4.0


def test_plan_row_arithmetic() -> None:
    hw, site = Hardware("a100", gpus=16, mfu=0.5), SiteFormat(6, 512, 1, 4)
    row = plan_row("x", 100, 50, 2e9, 1e8, hw, site, loader_crops_per_core=1000.0)
    sustained = GPU_PEAK_FLOPS["a100"] * 0.5
    assert row["gpu_hours"] == pytest.approx(2e9 * 1e8 / sustained / 3600)
    assert row["wall_hours"] == pytest.approx(row["gpu_hours"] / 16)
    assert row["crops_per_s_per_gpu"] == pytest.approx(sustained / 2e9)
    assert row["loader_cores_per_gpu"] == pytest.approx(sustained / 2e9 / 1000)
    assert row["storage_MB_per_s_per_gpu"] == pytest.approx(sustained / 2e9 / 4 * 6 * 512 * 512 / 1e6)
    doubled = plan_row("x", 100, 50, 2e9, 1e8, Hardware("a100", 16, 1.0), site, 1000.0)
    assert doubled["gpu_hours"] == pytest.approx(row["gpu_hours"] / 2)


@pytest.mark.parametrize("text,value", [("3.5B", 3.5e9), ("20k", 2e4), ("1e6", 1e6), (12, 12.0)])
def test_crops_of(text: object, value: float) -> None:
    assert crops_of(text) == value


def test_bad_hardware_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown GPU"):
        Hardware("tpu9")
    with pytest.raises(ValueError, match="mfu"):
        Hardware("h100", mfu=1.5)


def test_paper_grid_cells_and_layers() -> None:
    grid = load_grid(REPO / "configs/scaling/paper.yaml")
    all_cells = cells(grid)
    assert len(all_cells) == len(grid.models) * len(grid.crops)
    assert [c.index for c in all_cells] == list(range(len(all_cells)))
    first = all_cells[0]
    assert cell_layers(grid, first) == [grid.base, first.model.config]
    cfg = load_config(cell_layers(grid, first), ["data.train_shards=unused"])
    assert cfg.data.crop_size == 256 and cfg.model.family == first.model.family
    assert steps_for(1e9, 16384) == 61036


def test_grid_typo_fails_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "grid.yaml"
    bad.write_text(f"models: [{{name: a, family: mae, size: S, config: {TINY}}}]\ncrops: [10]\ncropz: [1]\n")
    with pytest.raises(ConfigError, match="cropz"):
        load_grid(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("models: [{name: a, family: mae, size: S, config: nowhere.yaml}]\ncrops: [10]\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_grid(missing)


def test_plan_command_prints_every_cell(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--grid", str(REPO / "configs/scaling/paper.yaml"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    grid = load_grid(REPO / "configs/scaling/paper.yaml")
    for model in grid.models:
        assert out.count(f"| {model.name} @") == len(grid.crops)
    assert "8 x h100" in out


def test_meta_device_build_allocates_nothing() -> None:
    """A ViT-L/8 plan must not touch real memory: every parameter stays on the meta device."""
    cfg = load_config(REPO / "configs/paper/mae_vit_l8.yaml", ["data.train_shards=unused"])
    with torch.device("meta"):
        module = lightning_modules.build_module(cfg.model, cfg.optim, in_chans=6)
    assert all(p.is_meta for p in module.parameters())
