"""Backbones in timm's registry: the Recursion ViT flavour, its channel-agnostic twin, any timm CNN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model
from timm.models.densenet import DenseNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

import lightning_modules  # noqa: F401  (registers the backbones)
from lightning_modules.backbones import RECURSION_BACKBONES, SinCosViT, constructor_keywords, sincos_2d_embedding
from lightning_modules.blocks import RecursionParallelBlock
from tiny_models import TINY_VIT, synthetic_crops, tiny_module

TINY = dict(TINY_VIT, img_size=32, patch_size=8)


def numpy_sincos(dim: int, grid: int) -> np.ndarray:
    """Independent 2-D sin-cos table (the OpenPhenom layout): D/4 each of sin_h, cos_h, sin_w, cos_w."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows = []
    for i in range(grid):
        for j in range(grid):
            rows.append(np.concatenate([np.sin(i * omega), np.cos(i * omega), np.sin(j * omega), np.cos(j * omega)]))
    return np.concatenate([np.zeros((1, dim)), np.array(rows)])


def test_all_paper_backbones_are_registered_in_timm():
    names = [
        f"{ca}vit_{size}_patch{p}_256" for ca in ("", "ca_") for size in ("small", "base", "large") for p in (16, 8)
    ]
    assert sorted(RECURSION_BACKBONES) == sorted(names)
    assert all(timm.is_model(n) for n in names)


def test_recursion_vit_flavour():
    vit = timm.create_model("vit_small_patch16_256", in_chans=6, **TINY)
    assert isinstance(vit, VisionTransformer)
    assert all(type(b) is RecursionParallelBlock for b in vit.blocks)  # the bf16-friendly block, not timm's
    block = vit.blocks[0]
    assert block.in_proj.bias is None  # qkv_bias=False (the MLP bias lives in mlp_bias)
    assert isinstance(block.q_norm, torch.nn.LayerNorm) and isinstance(block.k_norm, torch.nn.LayerNorm)
    torch.testing.assert_close(block.ls.gamma, torch.full((32,), 1e-4))
    assert isinstance(vit.norm, torch.nn.Identity) and isinstance(vit.fc_norm, torch.nn.LayerNorm)
    assert vit.global_pool == "avg" and vit.cls_token is not None
    assert not vit.pos_embed.requires_grad
    np.testing.assert_allclose(vit.pos_embed[0].numpy(), numpy_sincos(32, 4), atol=1e-6)
    assert vit(torch.randn(2, 6, 32, 32)).shape == (2, 32)


def test_sincos_table_is_tiled_per_channel_with_zero_cls():
    table = sincos_2d_embedding(64, grid=4, repeats=3)[0]
    assert table.shape == (1 + 3 * 16, 64)
    assert torch.all(table[0] == 0)
    torch.testing.assert_close(table[1:17], table[17:33])
    torch.testing.assert_close(table[1:17], table[33:49])


def test_channel_agnostic_patch_embed_is_one_projection_per_channel():
    vit = timm.create_model("ca_vit_small_patch16_256", max_in_chans=11, **TINY)
    assert vit.patch_embed.proj.weight.shape == (32, 1, 8, 8)
    images = synthetic_crops(2).float()
    tokens = vit.patch_embed(images)
    # independent: each channel through the shared conv, tokens channel by channel, row-major
    expected = torch.cat(
        [
            F.conv2d(images[:, c : c + 1], vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=8)
            .flatten(2)
            .transpose(1, 2)
            for c in range(6)
        ],
        dim=1,
    )
    torch.testing.assert_close(tokens, expected)
    assert vit.pos_embed.shape == (1, 1 + 11 * 16, 32)


@pytest.mark.parametrize("chans", [1, 3, 6, 11])
def test_channel_agnostic_vit_takes_any_channel_count_up_to_max(chans):
    vit = timm.create_model("ca_vit_small_patch16_256", max_in_chans=11, **TINY)
    assert vit(torch.randn(2, chans, 32, 32)).shape == (2, 32)


def test_channel_agnostic_vit_rejects_more_than_max_channels():
    vit = timm.create_model("ca_vit_small_patch16_256", max_in_chans=11, **TINY)
    with pytest.raises(ValueError, match="max_in_chans=11"):
        vit(torch.randn(1, 12, 32, 32))


TINY_CNNS = {
    "resnet18": {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8},
    "densenet121": {"growth_rate": 8, "block_config": (1, 1, 1, 1)},
}


@pytest.mark.parametrize("name,stem", [("resnet18", "conv1"), ("densenet121", "features.conv0")])
def test_any_timm_cnn_is_a_wsl_backbone_with_channels_from_the_data(name, stem):
    module = tiny_module(
        "wsl", in_chans=5, num_classes=3, backbone=name, backbone_kwargs=TINY_CNNS[name], patch_size=None
    )
    assert module.backbone.get_submodule(stem).weight.shape[1] == 5
    images = torch.zeros(2, 5, 32, 32, dtype=torch.uint8) + torch.arange(32, dtype=torch.uint8)
    assert module.embed(images).shape == (2, 16)


def test_constructor_keywords_follow_kwargs_to_the_class_that_takes_them():
    vit = constructor_keywords(SinCosViT)  # SinCosViT(**kwargs) -> VisionTransformer(img_size, ...)
    assert vit is not None and {"img_size", "drop_path_rate", "patch_size"} <= vit
    assert "drop_path_rate" in constructor_keywords(ResNet) and "img_size" not in constructor_keywords(ResNet)
    assert not {"img_size", "drop_path_rate"} & constructor_keywords(DenseNet)


def test_crop_size_and_drop_path_reach_the_backbones_that_take_them():
    vit = tiny_module("mae", drop_path=0.2).encoder.vit_backbone
    assert vit.patch_embed.img_size == (32, 32)
    assert vit.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)  # timm's linear drop-path schedule
    resnet = tiny_module(
        "wsl", num_classes=3, backbone="resnet18", backbone_kwargs=TINY_CNNS["resnet18"], patch_size=None, drop_path=0.2
    ).backbone
    assert resnet.layer4[0].drop_path.drop_prob == pytest.approx(0.2)
    tiny_module(
        "wsl",
        num_classes=3,
        backbone="densenet121",
        backbone_kwargs=TINY_CNNS["densenet121"],
        patch_size=None,
        drop_path=0.2,
    )  # DenseNet takes neither: not offered, so no TypeError


@register_model
def phenoscale_test_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The README's how-to: one registered factory, then the name works everywhere."""
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=0)
    return build_model_with_cfg(VisionTransformer, "phenoscale_test_tiny_vit", pretrained, **dict(args, **kwargs))


def test_a_new_backbone_needs_only_a_registered_factory():
    module = tiny_module("wsl", in_chans=4, num_classes=3, backbone="phenoscale_test_tiny_vit", backbone_kwargs={})
    assert module.backbone.embed_dim == 24 and module.backbone.patch_embed.proj.weight.shape[1] == 4
    loss = module.compute_losses(
        {"image": torch.randint(0, 255, (4, 4, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1, 2, -1])}
    )["loss"]
    assert math.isfinite(loss.item())


def test_unknown_backbone_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not_a_model.*not a registered timm model"):
        tiny_module("wsl", num_classes=3, backbone="not_a_model")
