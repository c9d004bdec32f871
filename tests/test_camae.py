"""CA-MAE: decoder semantics, channel-agnostic embeddings, training on CPU (fp32 and bf16-mixed)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from embed_contract import EmbedContract
from lightning_modules import CAMAEModule, OptimConfig, self_standardize
from lightning_modules.decoders import CAMAEDecoder, DecoderBlocks, unshuffle_with_mask_tokens
from tiny_models import synthetic_crops, tiny_module


def reference_decoder_loop(decoder: CAMAEDecoder, x: torch.Tensor) -> torch.Tensor:
    """maes_microscopy's CAMAEDecoder.forward written as that reference does it: a loop over channels,
    each channel's queries cross-attending to all tokens with explicit softmax attention."""
    table = torch.cat(
        [decoder.placeholder] + [t.repeat(1, decoder.tokens_per_modality, 1) for t in decoder.modality_tokens], dim=1
    )
    x = x + decoder.pos_embeddings + table
    patches = x[:, 1:]
    attn = decoder.cross_attention
    heads, width = attn.num_heads, patches.shape[-1]
    outputs = []
    for m, stack in enumerate(decoder.decoders):
        queries = decoder.query_norm(
            patches[:, m * decoder.tokens_per_modality : (m + 1) * decoder.tokens_per_modality]
        )
        context = decoder.context_norm(patches)
        q = attn.q(queries).unflatten(-1, (heads, -1)).transpose(1, 2)
        k, v = attn.kv(context).unflatten(-1, (2, heads, -1)).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(-1)
        out = attn.proj((weights @ v).transpose(1, 2).flatten(2))
        out = out + decoder.mlp(decoder.out_norm(out))
        outputs.append(stack(out))
    return torch.cat([x[:, :1]] + outputs, dim=1)


def test_batched_cross_attention_decoder_equals_per_channel_loop():
    torch.manual_seed(0)
    decoder = CAMAEDecoder(
        num_modalities=3, tokens_per_modality=4, grid=2, blocks=DecoderBlocks(embed_dim=32, depth=2, num_heads=4)
    )
    for token in decoder.modality_tokens:  # zero-initialised in training; random here to test the tiling
        torch.nn.init.normal_(token)
    visible = torch.randn(2, 1 + 5, 32)
    restore = torch.stack([torch.randperm(12) for _ in range(2)])
    expected = reference_decoder_loop(decoder, unshuffle_with_mask_tokens(visible, decoder.mask_token, restore))
    torch.testing.assert_close(decoder(visible, restore), expected, atol=1e-5, rtol=1e-5)


def test_camae_forward_backward():
    module = tiny_module("camae")
    losses = module.compute_losses({"image": synthetic_crops(4)})
    assert torch.isfinite(losses["loss"]) and losses["fourier"] > 0
    losses["loss"].backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert module.decoder_pred.out_features == 8 * 8  # one channel per token


def test_camae_training_needs_the_decoder_channel_count():
    module = tiny_module("camae", in_chans=6)
    with pytest.raises(ValueError, match="built for 6 channels, got 3"):
        module.compute_losses({"image": synthetic_crops(2)[:, :3]})


def test_camae_embedding_is_invariant_to_channel_order():
    torch.manual_seed(0)
    module = tiny_module("camae").eval()
    images = synthetic_crops(3)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    torch.testing.assert_close(module.embed(images[:, perm]), module.embed(images), atol=1e-5, rtol=1e-4)
    # channelwise embeddings permute with the channels instead
    per_channel = module.embed(images, pooling="channelwise").reshape(3, 6, 32)
    permuted = module.embed(images[:, perm], pooling="channelwise").reshape(3, 6, 32)
    torch.testing.assert_close(permuted, per_channel[:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(per_channel.mean(1), module.embed(images), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chans", range(3, 12))
def test_camae_embeds_3_to_11_channels(chans):
    module = tiny_module("camae", in_chans=6, max_in_chans=11).eval()
    images = torch.randint(0, 255, (2, chans, 32, 32), dtype=torch.uint8)
    assert module.embed(images).shape == (2, 32)
    assert module.embed(images, pooling="channelwise").shape == (2, 32 * chans)


def test_embed_block_and_pooling_choices():
    module = tiny_module("camae").eval()
    images = synthetic_crops(2)
    assert module.num_blocks == 2
    vit = module.encoder.vit_backbone
    seen = []  # the tokens entering block 0: patch + position embedding, CLS first
    hook = vit.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    vit.forward_features(self_standardize(images))
    hook.remove()
    first = vit.blocks[0](seen[0])
    torch.testing.assert_close(module.embed(images, block=0), first[:, 1:].mean(1))
    torch.testing.assert_close(module.embed(images, pooling="cls", block=0), first[:, 0])
    last = vit.blocks[1](first)
    torch.testing.assert_close(module.embed(images), last[:, 1:].mean(1))  # no final norm (OpenPhenom)
    torch.testing.assert_close(module.embed(images, block=-1), module.embed(images))
    with pytest.raises(ValueError, match="out of range"):
        module.embed(images, block=2)
    with pytest.raises(ValueError, match="pooling must be"):
        module.embed(images, pooling="max")
    assert module.embed(images).dtype == torch.float32


def test_camae_trains_with_lightning_in_bf16_mixed_on_cpu(tmp_path):
    torch.manual_seed(0)
    module = tiny_module("camae", total_steps=4, optim=OptimConfig(name="lion", lr=1e-4))
    images = synthetic_crops(8, dtype=torch.uint8)
    loader = torch.utils.data.DataLoader([{"image": img, "label": torch.tensor(-1)} for img in images], batch_size=4)
    before = module.decoder_pred.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=4,
        precision="bf16-mixed",
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert {"train/loss", "train/mse", "train/fourier"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(before, module.decoder_pred.weight)
    assert module.decoder_pred.weight.dtype == torch.float32  # mixed precision keeps fp32 master weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.embed(images[:2]).dtype == torch.float32


def test_load_from_lightning_checkpoint_rebuilds_the_module(tmp_path):
    module = tiny_module("camae")
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = CAMAEModule.load_from_checkpoint(tmp_path / "m.ckpt")
    images = synthetic_crops(2)
    assert torch.equal(loaded.eval().embed(images), module.eval().embed(images))


class TestCAMAEEmbed(EmbedContract):
    poolings = {None: 32, "mean": 32, "cls": 32, "channelwise": 32 * 6}
    blocks = (None, 0, 1, -1, -2)
    bad_blocks = (2, -3)
    channel_order_invariant = True  # no channel embedding; one position table repeated per channel
    per_channel = {"channelwise": 32}

    def make_embedder(self):
        return tiny_module("camae")
