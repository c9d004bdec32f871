"""Embedding raw images without shards gives the shard path's embeddings, on the real Phenix field."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import pytest
import tifffile
import torch

import phenoscale
from evaluation.embeddings_io import embedding_matrix
from phenoscale.cli import main as cli
from real_field import PEDIATRIC_FIELD, PEDIATRIC_STAINS, pediatric_field
from run_helpers import child_env
from test_hub import REPO_ID, cache_repo
from tiny_models import tiny_module


@pytest.fixture(scope="module")
def model_and_shard_embeddings(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny CA-MAE on 256-px crops (the field tiles 4 x 4), its checkpoint and export, and
    `phenoscale embed` of the field's shards (written by `phenoscale shards jump`)."""
    root = tmp_path_factory.mktemp("embed_images")
    torch.manual_seed(2)
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(tiny_module("camae", img_size=256, patch_size=32))
    trainer.save_checkpoint(root / "tiny.ckpt")
    assert cli(["export", str(root / "tiny.ckpt"), str(root / "export"), "--channels", ",".join(PEDIATRIC_STAINS)]) == 0
    assert cli(["shards", "jump", str(shared_data / PEDIATRIC_FIELD), str(root / "shards"), "--workers", "1"]) == 0
    assert (
        cli(
            ["embed", str(root / "tiny.ckpt"), str(root / "shards"), str(root / "shards.parquet"), "--num-workers", "0"]
        )
        == 0
    )
    return root, pl.read_parquet(root / "shards.parquet")


def test_images_cli_matches_the_shard_path_bit_for_bit(model_and_shard_embeddings, shared_data):
    root, from_shards = model_and_shard_embeddings
    assert (
        cli(
            [
                "embed",
                str(root / "tiny.ckpt"),
                "--images",
                str(shared_data / PEDIATRIC_FIELD),
                str(root / "images.parquet"),
            ]
        )
        == 0
    )
    from_images = pl.read_parquet(root / "images.parquet")
    assert from_shards.height == 1 and from_images.equals(from_shards)  # metadata, channels and embedding


def test_python_api_on_multichannel_and_ome_tiff_stacks(model_and_shard_embeddings, shared_data, tmp_path):
    root, from_shards = model_and_shard_embeddings
    field = pediatric_field(shared_data)
    tifffile.imwrite(tmp_path / "plain.tif", field)
    tifffile.imwrite(
        tmp_path / "field.ome.tif",
        field[None, :, None],
        ome=True,
        metadata={"axes": "TCZYX", "Channel": {"Name": PEDIATRIC_STAINS}},
    )
    expected = embedding_matrix(from_shards)
    frame = phenoscale.embed_images(root / "export", tmp_path, progress=False)
    assert frame["key"].to_list() == ["field-ome", "plain"]
    assert frame["channels"].to_list() == [PEDIATRIC_STAINS, PEDIATRIC_STAINS]  # the first file's OME names
    assert np.array_equal(embedding_matrix(frame), np.concatenate([expected, expected]))
    subset = phenoscale.embed_images(
        root / "export",
        [tmp_path / "plain.tif"],
        progress=False,
        channel_map={1: "Brightfield", 5: "DNA", 6: "RNA"},
        channels=["DNA", "RNA"],
    )
    assert embedding_matrix(subset).shape == (1, 32)


def test_bad_images_are_clear_errors(model_and_shard_embeddings, shared_data, tmp_path):
    root, _ = model_and_shard_embeddings
    partial = tmp_path / "partial"
    partial.mkdir()
    for tiff in sorted((shared_data / PEDIATRIC_FIELD).glob("*ch[1-5]*.tiff")):
        os.symlink(tiff, partial / tiff.name)
    with pytest.raises(ValueError, match=r"missing channel files \[.*ch6sk1fk1fl1.tiff'\]"):
        phenoscale.embed_images(root / "tiny.ckpt", partial, channel_map=dict(enumerate(PEDIATRIC_STAINS, 1)))
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((6, 300, 300), np.float32))
    with pytest.raises(ValueError, match="float.tif: pixel type float32 is not 8- or 16-bit unsigned"):
        phenoscale.embed_images(root / "tiny.ckpt", [tmp_path / "float.tif"])
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((6, 200, 300), np.uint16))
    with pytest.raises(ValueError, match="site 'small': image 200x300 is smaller than the model's 256px crop"):
        phenoscale.embed_images(root / "tiny.ckpt", [tmp_path / "small.tif"])
    shutil.copy(shared_data / PEDIATRIC_FIELD / "r03c03f03p01-ch1sk1fk1fl1.tiff", tmp_path / "one.tiff")
    with pytest.raises(ValueError, match="lacks channels"):
        phenoscale.embed_images(root / "export", [tmp_path / "one.tiff"])


@pytest.mark.slow
def test_one_command_from_an_offline_hub_cache(model_and_shard_embeddings, shared_data, tmp_path):
    """`phenoscale embed hf://... --images FIELD OUT` in a fresh process: HF_HOME's cache, no network."""
    root, from_shards = model_and_shard_embeddings
    cache_repo(tmp_path / "hf_home" / "hub", REPO_ID, root / "export")
    env = {**child_env(), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.parquet"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "phenoscale.cli",
            "embed",
            f"hf://{REPO_ID}",
            "--images",
            str(shared_data / PEDIATRIC_FIELD),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert pl.read_parquet(out).equals(from_shards)
