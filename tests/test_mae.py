"""MAE: masking, losses, self-standardisation, forward/backward and a tiny overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embed_contract import EmbedContract
from lightning_modules import OptimConfig, self_standardize
from lightning_modules.decoders import unshuffle_with_mask_tokens
from lightning_modules.losses import mae_loss, masked_token_mean, norm_pix, per_token_fourier_l1
from lightning_modules.tokens import gather_tokens, patchify, random_token_mask, unpatchify
from tiny_models import real_crops, synthetic_crops, tiny_module


def test_self_standardize_matches_instance_norm_on_real_uint16(shared_data):
    images = real_crops(shared_data, 4)
    expected = torch.nn.InstanceNorm2d(6, affine=False, eps=1e-5)(images.to(torch.float32) / 65535.0)
    torch.testing.assert_close(self_standardize(images), expected, atol=1e-4, rtol=1e-4)
    eight_bit = real_crops(shared_data, 4, dtype=torch.uint8)
    expected8 = torch.nn.InstanceNorm2d(6, affine=False, eps=1e-5)(eight_bit.float() / 255.0)
    torch.testing.assert_close(self_standardize(eight_bit), expected8, atol=1e-4, rtol=1e-4)


def test_self_standardize_rejects_float_input():
    with pytest.raises(TypeError, match="raw integer pixels"):
        self_standardize(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75, 0.9])
def test_masking_keeps_int_L_times_1_minus_r_and_unshuffles_exactly(ratio):
    batch, length, dim = 3, 37, 4
    mask = random_token_mask(batch, length, ratio, torch.device("cpu"), torch.Generator().manual_seed(1))
    n_keep = int(length * (1 - ratio))
    assert mask.keep.shape == (batch, n_keep)
    assert torch.all(mask.mask.sum(1) == length - n_keep)
    tokens = torch.arange(batch * length * dim, dtype=torch.float32).reshape(batch, length, dim)
    visible = torch.cat([torch.full((batch, 1, dim), -1.0), gather_tokens(tokens, mask.keep)], dim=1)  # CLS first
    mask_token = torch.full((1, 1, dim), -7.0)
    restored = unshuffle_with_mask_tokens(visible, mask_token, mask.restore)
    assert restored.shape == (batch, 1 + length, dim)
    assert torch.all(restored[:, 0] == -1)
    hidden = mask.mask.bool()
    torch.testing.assert_close(restored[:, 1:][~hidden], tokens[~hidden])  # visible tokens back in place
    assert torch.all(restored[:, 1:][hidden] == -7)  # mask tokens exactly where hidden


def test_encoder_sees_cls_plus_kept_tokens():
    module = tiny_module("mae", mask_ratio=0.75)
    latent, mask = module.encoder.forward_masked(self_standardize(synthetic_crops(2)), 0.75)
    assert latent.shape == (2, 1 + int(16 * 0.25), 32)
    assert mask.mask.shape == (2, 16)


def test_patchify_layouts_and_roundtrip():
    images = torch.randn(2, 3, 16, 16)
    ca = patchify(images, 8, channel_agnostic=True)
    assert ca.shape == (2, 3 * 4, 64)
    torch.testing.assert_close(ca[0, 4 + 1], images[0, 1, 0:8, 8:16].flatten())  # channel 1, patch (0, 1)
    plain = patchify(images, 8, channel_agnostic=False)
    torch.testing.assert_close(plain[0, 2].reshape(8, 8, 3), images[0, :, 8:16, 0:8].permute(1, 2, 0))
    for tokens, agnostic in ((ca, True), (plain, False)):
        torch.testing.assert_close(unpatchify(tokens, 8, 3, agnostic), images)


def test_loss_ignores_predictions_on_visible_tokens():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 64, requires_grad=True), torch.randn(2, 16, 64)
    mask = (torch.rand(2, 16) > 0.5).float()
    loss, mse, fourier = mae_loss(pred, target, mask, patch=8, fourier_alpha=0.01)
    loss.backward()
    assert torch.all(pred.grad[mask == 0] == 0) and pred.grad[mask == 1].abs().sum() > 0
    changed = pred.detach().clone()
    changed[mask == 0] += 100.0
    torch.testing.assert_close(mae_loss(changed, target, mask, 8, 0.01)[0], loss.detach())
    expected_mse = ((pred.detach() - target) ** 2).mean(-1)[mask == 1].mean()
    torch.testing.assert_close(mse.detach(), expected_mse)
    torch.testing.assert_close(loss.detach(), 0.99 * mse.detach() + 0.01 * fourier.detach())


@pytest.mark.parametrize("chans", [1, 6])
def test_fourier_term_matches_numpy_fft(chans):
    torch.manual_seed(0)
    patch = 8
    pred, target = torch.randn(2, 5, patch * patch * chans), torch.randn(2, 5, patch * patch * chans)
    ours = per_token_fourier_l1(pred, target, patch).numpy()
    p = pred.numpy().reshape(2, 5, patch, patch, chans)
    t = target.numpy().reshape(2, 5, patch, patch, chans)
    expected = np.abs(np.abs(np.fft.fft2(p, axes=(2, 3))) - np.abs(np.fft.fft2(t, axes=(2, 3)))).mean(axis=(2, 3, 4))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_norm_pix_standardises_each_token():
    target = norm_pix(torch.randn(2, 4, 64) * 5 + 3)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(-1), torch.ones(2, 4), atol=1e-3, rtol=0)


def test_spatial_masking_hides_a_position_in_every_channel():
    chans, positions, ratio = 6, 16, 0.75
    mask = random_token_mask(
        4,
        chans * positions,
        ratio,
        torch.device("cpu"),
        torch.Generator().manual_seed(2),
        channels=chans,
        mode="spatial",
    )
    per_channel = mask.mask.reshape(4, chans, positions)
    assert torch.all(per_channel == per_channel[:, :1])  # the same positions hidden in every channel
    assert torch.all(per_channel[:, 0].sum(1) == positions * ratio)
    with pytest.raises(ValueError, match="do not split"):
        random_token_mask(1, 10, 0.5, torch.device("cpu"), channels=3, mode="spatial")
    with pytest.raises(ValueError, match="mask mode must be one of"):  # a typo is not joint masking
        random_token_mask(1, 12, 0.5, torch.device("cpu"), channels=3, mode="spacial")


def test_channel_masking_hides_one_whole_channel_and_keeps_the_budget():
    chans, positions, ratio, batch = 6, 16, 0.75, 64
    mask = random_token_mask(
        batch,
        chans * positions,
        ratio,
        torch.device("cpu"),
        torch.Generator().manual_seed(3),
        channels=chans,
        mode="channel",
    )
    per_channel = mask.mask.reshape(batch, chans, positions)
    fully_hidden = (per_channel == 1).all(dim=2)
    assert torch.all(fully_hidden.sum(1) >= 1)  # at least one stain entirely hidden per image
    assert len(set(fully_hidden.float().argmax(1).tolist())) > 1  # which one varies between images
    assert torch.all(mask.mask.sum(1) == chans * positions - int(chans * positions * (1 - ratio)))
    visible = torch.gather(mask.mask, 1, mask.keep)
    assert torch.all(visible == 0)
    with pytest.raises(ValueError, match="keeps more tokens"):
        random_token_mask(1, 12, 0.1, torch.device("cpu"), channels=3, mode="channel")


def test_norm_pix_eps_keeps_background_tokens_quiet():
    """A flat background token (std 0.05) stays near its own scale under a 0.1 variance floor,
    while a textured token (std 1) is still standardised; MAE's 1e-6 turns both to unit std."""
    background, texture = torch.randn(1, 1, 4096) * 0.05, torch.randn(1, 1, 4096)
    tokens = torch.cat([background, texture], dim=1)
    floored, plain = norm_pix(tokens, eps=0.1).std(-1)[0], norm_pix(tokens).std(-1)[0]
    assert floored[0].item() == pytest.approx(0.05 / (0.05**2 + 0.1) ** 0.5, rel=0.05)
    assert floored[1].item() == pytest.approx(1 / 1.1**0.5, rel=0.05)
    torch.testing.assert_close(plain, torch.ones(2), atol=1e-3, rtol=0)


def test_masked_token_mean_counts_only_hidden_tokens():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert masked_token_mean(per_token, torch.tensor([[0.0, 1.0, 0.0, 1.0]])).item() == pytest.approx(3.0)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_forward_backward(norm_pix_loss):
    module = tiny_module("mae", norm_pix=norm_pix_loss)
    losses = module.compute_losses({"image": synthetic_crops(4)})
    assert set(losses) == {"loss", "mse", "fourier"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all(module.get_parameter(n).grad is not None for n in trainable)
    assert not module.encoder.vit_backbone.pos_embed.requires_grad
    assert module.embed(synthetic_crops(3)).shape == (3, 32)
    with pytest.raises(ValueError, match="channel-agnostic"):
        module.embed(synthetic_crops(1), pooling="channelwise")


@pytest.mark.slow
def test_tiny_mae_overfits_a_fixed_batch(shared_data):
    torch.manual_seed(0)
    steps = 150
    module = tiny_module(
        "mae",
        total_steps=steps,
        decoder_dim=64,
        backbone_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 4},
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.0, schedule="cosine", warmup_fraction=0.05),
    )
    images = real_crops(shared_data, 8)  # the loss threshold is set on the real field
    optim = module.configure_optimizers()
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    losses = []
    for _ in range(steps):
        pred, target, mask = module(images, generator=torch.Generator().manual_seed(0))  # the same mask each step
        loss = mae_loss(pred, target, mask.mask, module.patch_size, module.family_cfg.fourier_alpha)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) <= 0.2 * losses[0], (losses[0], losses[-10:])


class TestMAEEmbed(EmbedContract):
    poolings = {None: 32, "mean": 32, "cls": 32}
    rejected_poolings = ("max", "channelwise")
    blocks = (None, 0, 1, -1, -2)
    bad_blocks = (2, -3)

    def make_embedder(self):
        return tiny_module("mae")
