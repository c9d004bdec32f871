"""WSL: ArcFace against its formula, unlabelled samples ignored, training on two backbones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embed_contract import EmbedContract
from lightning_modules import OptimConfig, self_standardize
from lightning_modules.losses import ArcFaceHead
from tiny_models import TINY_CNN, bare_trainer, synthetic_crops, tiny_module

BACKBONES = {"resnet": TINY_CNN, "vit": dict(backbone="vit_small_patch16_256")}  # a tiny CNN and ViT, by timm name


def test_arcface_logits_follow_the_formula():
    torch.manual_seed(0)
    head = ArcFaceHead(8, 5, scale=30.0, margin=0.5)
    embedding, labels = torch.randn(4, 8), torch.tensor([0, 3, -1, 4])
    logits = head(embedding, labels).detach().numpy()
    e = embedding.numpy() / np.linalg.norm(embedding.numpy(), axis=1, keepdims=True)
    w = head.weight.detach().numpy() / np.linalg.norm(head.weight.detach().numpy(), axis=1, keepdims=True)
    cosine = e @ w.T
    expected = 30.0 * cosine
    for row, label in enumerate(labels.tolist()):
        if label >= 0:
            theta = math.acos(cosine[row, label])
            margin_ok = theta + 0.5 < math.pi
            expected[row, label] = 30.0 * (
                math.cos(theta + 0.5) if margin_ok else cosine[row, label] - math.sin(math.pi - 0.5) * 0.5
            )
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_unlabelled_samples_do_not_contribute():
    torch.manual_seed(0)
    module = tiny_module("wsl", num_classes=4).eval()  # eval: BatchNorm independent of batch makeup
    images = synthetic_crops(6)
    labels = torch.tensor([0, 1, -1, 3, -1, 2])
    mixed = module.compute_losses({"image": images, "label": labels})
    keep = labels >= 0
    labelled_only = module.compute_losses({"image": images[keep], "label": labels[keep]})
    for key in ("loss", "ce", "arcface", "acc"):
        torch.testing.assert_close(mixed[key], labelled_only[key])
    none = module.compute_losses({"image": images[:2], "label": torch.tensor([-1, -1])})
    assert none["loss"].item() == 0.0 and none["loss"].requires_grad


def test_loss_mixes_ce_and_arcface():
    module = tiny_module("wsl", num_classes=4, arcface_weight=0.25).eval()
    losses = module.compute_losses({"image": synthetic_crops(4), "label": torch.tensor([0, 1, 2, 3])})
    torch.testing.assert_close(losses["loss"], 0.75 * losses["ce"] + 0.25 * losses["arcface"])


def test_wsl_embed_is_the_neck_output():
    module = tiny_module("wsl", num_classes=4).eval()
    images = synthetic_crops(3)
    neck_input = module.backbone(self_standardize(images))
    torch.testing.assert_close(module.embed(images), module.neck(neck_input))
    assert module.embed(images).shape == (3, 16)
    assert isinstance(module.neck[-1], torch.nn.BatchNorm1d)
    with pytest.raises(ValueError, match="neck output"):
        module.embed(images, pooling="cls")
    with pytest.raises(ValueError, match="out of range"):
        module.embed(images, block=3)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_wsl_trains_on_backbone(tmp_path, kind):
    torch.manual_seed(0)
    steps = 30
    module = tiny_module(
        "wsl",
        num_classes=4,
        total_steps=steps,
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.0, schedule="cosine"),
        **BACKBONES[kind],
    )
    images = synthetic_crops(8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, -1])
    data = [{"image": img, "label": lab} for img, lab in zip(images, labels)]
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    first = module.compute_losses({"image": images, "label": labels})["loss"].item()
    trainer = bare_trainer(max_steps=steps, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/ce", "train/arcface", "train/acc"} <= set(metrics)
    assert metrics["train/loss"].item() < 0.5 * first
    assert metrics["train/acc"].item() == 1.0
    assert (
        F.cosine_similarity(module.eval().embed(images[:1]), module.embed(images[4:5])).item()
        > F.cosine_similarity(module.embed(images[:1]), module.embed(images[1:2])).item()
    )


class TestWSLEmbed(EmbedContract):
    poolings = {None: 16, "mean": 16}
    rejected_poolings = ("max", "cls", "channelwise")
    blocks = (None, 0, -1)
    bad_blocks = (1, -2)

    def make_embedder(self):
        return tiny_module("wsl", num_classes=5)
