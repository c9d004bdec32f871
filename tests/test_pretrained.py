"""Public OpenPhenom checkpoints (format from ../shared/data/formats) and phenoscale checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_modules import CAMAEModule, load_pretrained
from tiny_models import real_crops, tiny_module


def openphenom_shapes(shared_data: Path) -> dict[str, tuple[int, ...]]:
    lines = (shared_data / "formats/openphenom_state_dict.tsv").read_text().splitlines()[1:]
    shapes = {}
    for line in lines:
        key, shape, _ = line.split("\t")
        shapes[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return shapes


def random_openphenom_checkpoint(
    shared_data: Path, path: Path, drop: str | None = None, extra: str | None = None, values: bool = True
) -> dict[str, torch.Tensor]:
    """All 765 keys at their TSV shapes; values=False stores stride-0 views (a few KB on disk)
    for tests that only exercise the key and shape checks."""
    generator = torch.Generator().manual_seed(0)
    shapes = openphenom_shapes(shared_data)
    if values:
        state = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in shapes.items()}
    else:
        state = {k: torch.zeros(1).expand(shape) for k, shape in shapes.items()}
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(3)
    torch.save({"state_dict": state}, path)  # what OpenPhenom names model.safetensors
    return state


@pytest.fixture(scope="module")
def openphenom(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("openphenom") / "model.safetensors"
    state = random_openphenom_checkpoint(shared_data, path)
    return load_pretrained(path), state


@pytest.mark.slow
def test_openphenom_has_765_keys_and_loads_every_one(openphenom, shared_data):
    module, state = openphenom
    assert len(state) == 765 and isinstance(module, CAMAEModule) and not module.training
    loaded = module.state_dict()
    assert set(loaded) == set(state)
    for key in (
        "encoder.vit_backbone.blocks.11.in_proj.weight",
        "decoder.decoders.5.7.mlp.fc2.bias",
        "decoder.modality_tokens.3",
        "encoder_decoder_proj.weight",
        "decoder_pred.bias",
    ):
        torch.testing.assert_close(loaded[key], state[key])
    assert sum(p.numel() for p in module.parameters()) == pytest.approx(178.0e6, rel=5e-4)


@pytest.mark.slow
def test_openphenom_embeds_6x256x256_uint8_to_384(openphenom, shared_data):
    module, _ = openphenom
    images = real_crops(shared_data, 2, size=256, dtype=torch.uint8)
    embedding = module.embed(images)
    assert embedding.shape == (2, 384) and embedding.dtype == torch.float32
    assert module.embed(images, pooling="channelwise").shape == (2, 384 * 6)
    assert module.embed(images[:, [4, 1, 2]]).shape == (2, 384)  # fewer channels, other order


@pytest.mark.slow
def test_openphenom_embedding_matches_an_independent_computation(openphenom, shared_data):
    """OpenPhenom's embedding spelled out with torch primitives: x/255 -> InstanceNorm2d ->
    shared conv per channel -> + pos embed (CLS first) -> blocks -> mean of patch tokens."""
    module, state = openphenom
    images = real_crops(shared_data, 1, size=256, dtype=torch.uint8)
    x = torch.nn.InstanceNorm2d(6, affine=False, eps=1e-5)(images.float() / 255.0)
    vit = "encoder.vit_backbone."
    weight, bias = state[vit + "patch_embed.proj.weight"], state[vit + "patch_embed.proj.bias"]
    tokens = torch.cat(
        [F.conv2d(x[:, c : c + 1], weight, bias, stride=16).flatten(2).transpose(1, 2) for c in range(6)], 1
    )
    tokens = torch.cat([state[vit + "cls_token"], tokens], 1) + state[vit + "pos_embed"][:, : 1 + 6 * 256]
    with torch.no_grad():
        for block in module.encoder.vit_backbone.blocks:
            tokens = block(tokens)
    torch.testing.assert_close(module.embed(images), tokens[:, 1:].mean(1), atol=1e-5, rtol=1e-4)


def test_wrong_keys_are_listed(shared_data, tmp_path):
    path = tmp_path / "model.safetensors"
    random_openphenom_checkpoint(
        shared_data, path, drop="decoder.query_norm.weight", extra="encoder.vit_backbone.norm.weight", values=False
    )
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    message = str(err.value)
    assert "missing keys (1): decoder.query_norm.weight" in message
    assert "unexpected keys (1): encoder.vit_backbone.norm.weight" in message


def test_shape_mismatch_is_listed(shared_data, tmp_path):
    path = tmp_path / "model.safetensors"
    state = random_openphenom_checkpoint(shared_data, path, values=False)
    state["decoder_pred.weight"] = torch.zeros(128, 512)
    torch.save({"state_dict": state}, path)
    mismatch = r"shape mismatches \(1\): decoder_pred.weight \(128, 512\) \(model \(256, 512\)\)"
    with pytest.raises(ValueError, match=mismatch):
        load_pretrained(path)


def test_config_json_beside_the_checkpoint_is_used(shared_data, tmp_path):
    config = json.loads((shared_data / "formats/openphenom_config.json").read_text())
    config["decoder"]["num_modalities"] = 3  # a 3-channel CA-MAE: decoder tables shrink accordingly
    (tmp_path / "config.json").write_text(json.dumps(config))
    path = tmp_path / "model.safetensors"
    random_openphenom_checkpoint(shared_data, path, values=False)
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    assert r"unexpected keys (291): decoder.decoders.3.0" in str(err.value)  # stacks 3..5 (8 x 12 keys), tokens 3..5
    assert "decoder.pos_embeddings (1, 1537, 512) (model (1, 769, 512))" in str(err.value)


def test_phenoscale_lightning_checkpoint_loads(shared_data, tmp_path):
    module = tiny_module("camae")
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    loaded = load_pretrained(tmp_path / "tiny.ckpt")
    assert isinstance(loaded, CAMAEModule) and loaded.model_cfg == module.model_cfg
    images = real_crops(shared_data, 2)
    torch.testing.assert_close(loaded.embed(images), module.eval().embed(images))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_pretrained(tmp_path / "nothing.ckpt")


def test_each_checkpoint_kind_gets_its_mlp_bias_layout(shared_data, tmp_path):
    """OpenPhenom files: legacy; phenoscale checkpoints: what they were trained with (older ones,
    saved before the setting existed, trained on the fixed layout); new models: fixed."""
    random_openphenom_checkpoint(shared_data, tmp_path / "model.safetensors", values=False)
    assert load_pretrained(tmp_path / "model.safetensors").model_cfg.mlp_bias_layout == "legacy"
    module = tiny_module("camae")
    assert module.model_cfg.mlp_bias_layout == "fixed"
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(tiny_module("camae", mlp_bias_layout="legacy"))
    trainer.save_checkpoint(tmp_path / "legacy.ckpt")
    loaded = load_pretrained(tmp_path / "legacy.ckpt")
    assert {b.mlp_bias_layout for b in loaded.encoder.vit_backbone.blocks} == {"legacy"}
    payload = torch.load(tmp_path / "legacy.ckpt", weights_only=True)
    del payload["hyper_parameters"]["model_cfg"]["mlp_bias_layout"]
    torch.save(payload, tmp_path / "older.ckpt")
    assert load_pretrained(tmp_path / "older.ckpt").model_cfg.mlp_bias_layout == "fixed"


def test_damaged_or_foreign_files_report_their_own_error(tmp_path):
    module = tiny_module("camae")
    torch.save({"state_dict": module.state_dict()}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: cannot read this torch checkpoint: PytorchStreamReader"):
        load_pretrained(tmp_path / "cut.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"neither a torch checkpoint nor a safetensors file \(starts with b'hello'\)"):
        load_pretrained(tmp_path / "notes.txt")
