"""Paper configs build (on the meta device) with the papers' sizes; FLOPs table; optimisation rules."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from lightning_modules import OptimConfig, build_module, training_flops_per_crop
from lightning_modules.optim import build_scheduler, parameter_groups
from phenoscale.config import load_config
from tiny_models import bare_trainer, synthetic_crops, tiny_module

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"

#: nominal encoder parameters (learned; the fixed sin-cos table is not a learned parameter)
ENCODER_PARAMS = {"small": 22e6, "base": 86e6, "large": 304e6}


def load_paper_config(path: Path) -> tuple[DictConfig, DictConfig]:
    cfg = load_config(path)
    return cfg.model, cfg.optim


def build_on_meta(path: Path):
    model, optim = load_paper_config(path)
    with torch.device("meta"):
        return build_module(model, optim, in_chans=6, num_classes=1139, total_steps=1000)


def millions(module: torch.nn.Module, exclude: str | None = None) -> float:
    return sum(p.numel() for n, p in module.named_parameters() if not (exclude and exclude in n)) / 1e6


PAPER_CONFIGS = sorted(PAPER.glob("*.yaml"))


def test_every_paper_model_has_a_config():
    names = {p.stem for p in PAPER_CONFIGS}
    assert names == {
        "mae_vit_s16",
        "mae_vit_b16",
        "mae_vit_b8",
        "mae_vit_l16",
        "mae_vit_l8",
        "camae_vit_s16_openphenom",
        "camae_vit_b16",
        "camae_vit_l16",
        "wsl_densenet161",
        "wsl_vit_b16",
    }


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_builds_with_the_papers_sizes(path):
    module = build_on_meta(path)
    cfg = module.model_cfg
    if cfg.family == "wsl":
        backbone = module.backbone
        expected = {"densenet161": 26.5, "vit_base_patch16_256": 86.0}[cfg.backbone]
        assert millions(backbone, exclude="pos_embed") == pytest.approx(expected, rel=0.02)
        return
    size = re.search(r"vit_(small|base|large)_", cfg.backbone).group(1)
    encoder = module.encoder.vit_backbone
    if cfg.backbone == "ca_vit_small_patch16_256":
        # single-channel patch projection: 21.4M learned, 22.46M with the 11-channel sin-cos table,
        # the public checkpoint's figure (checked exactly below)
        assert millions(encoder) == pytest.approx(22.46, abs=0.005)
    else:
        assert millions(encoder, exclude="pos_embed") * 1e6 == pytest.approx(ENCODER_PARAMS[size], rel=0.02)
    assert not encoder.pos_embed.requires_grad


def test_openphenom_config_is_178M_with_a_22_46M_encoder():
    module = build_on_meta(PAPER / "camae_vit_s16_openphenom.yaml")
    assert round(millions(module), 1) == 178.0
    assert round(millions(module.encoder), 2) == 22.46


def test_docs_table_matches_counted_parameters_and_flops():
    """docs/models.md carries params and training GFLOPs per crop; they must be what the code counts."""
    table = (REPO / "docs" / "models.md").read_text()
    for path in PAPER_CONFIGS:
        module = build_on_meta(path)
        row = next((line for line in table.splitlines() if line.startswith(f"| {path.stem} ")), None)
        assert row is not None, f"docs/models.md has no row for {path.stem}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(millions(module), abs=0.051), path.stem
        assert float(cells[5]) == pytest.approx(training_flops_per_crop(module) / 1e9, rel=0.002), path.stem


def test_training_flops_grow_as_expected():
    s16 = training_flops_per_crop(build_on_meta(PAPER / "mae_vit_s16.yaml"))
    b16 = training_flops_per_crop(build_on_meta(PAPER / "mae_vit_b16.yaml"))
    b8 = training_flops_per_crop(build_on_meta(PAPER / "mae_vit_b8.yaml"))
    assert s16 < b16 < b8
    # the encoder sees 4x the tokens at patch 8: about 4x the encoder GEMMs (attention grows faster)
    assert 3.5 < b8 / b16 < 6


def test_no_weight_decay_on_norms_biases_tokens_and_embeddings():
    module = tiny_module("camae")
    plain, decayed = parameter_groups(module, 0.05)
    names = {id(p): n for n, p in module.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert "encoder.vit_backbone.blocks.0.in_proj.weight" in decayed_names
    assert "encoder.vit_backbone.patch_embed.proj.weight" in decayed_names
    for name in (
        "encoder.vit_backbone.cls_token",
        "decoder.mask_token",
        "decoder.modality_tokens.0",
        "encoder.vit_backbone.blocks.0.in_norm.weight",
        "encoder.vit_backbone.blocks.0.ls.gamma",
        "encoder.vit_backbone.blocks.0.mlp_bias",
        "decoder_pred.bias",
    ):
        assert name in plain_names, name
    frozen = {"encoder.vit_backbone.pos_embed", "decoder.pos_embeddings", "decoder.placeholder"}
    assert not frozen & (decayed_names | plain_names)


@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_optimizers_and_schedules(name):
    module = tiny_module(
        "mae", optim=OptimConfig(name=name, lr=1e-3, schedule="cosine", warmup_fraction=0.1), total_steps=100
    )
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer).__name__ == {"lion": "Lion", "adamw": "AdamW"}[name]
    lrs = []
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-3, schedule="cosine", warmup_fraction=0.1), 100)
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup over 10 steps
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay
    onecycle = build_scheduler(optimizer, OptimConfig(lr=1e-3, schedule="onecycle", warmup_fraction=0.1), 100)
    peak = []
    for _ in range(100):
        peak.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        onecycle.step()
    # torch's OneCycle peaks after pct_start·total - 1 steps
    assert max(range(100), key=peak.__getitem__) == 9 and max(peak) == pytest.approx(1e-3)


def test_gradient_clipping_uses_the_optim_config():
    module = tiny_module("wsl", num_classes=4, optim=OptimConfig(name="adamw", lr=1e-3, gradient_clip_val=1e-6))
    norms = []

    class RecordNorm(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            norms.append(torch.norm(torch.stack([p.grad.norm() for p in pl_module.parameters() if p.grad is not None])))

    images = synthetic_crops(4)
    loader = torch.utils.data.DataLoader(
        [{"image": i, "label": torch.tensor(k % 4)} for k, i in enumerate(images)], batch_size=4
    )
    bare_trainer(max_steps=1, callbacks=[RecordNorm()]).fit(module, loader)
    assert norms[0].item() <= 1e-6 * 1.01
