"""ShardWriter / read_manifest: pixel-exact round trips of real images, size limits, validation,
atomic writes. WebDataset itself reads the shards back as the peer-library cross-check."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tifffile
import webdataset as wds

from datamodules import ShardWriter, read_manifest
from datamodules.samples import iter_shard
from real_field import pediatric_field
from run_helpers import fail_on_bad, site_meta

HUMAN = "images/cellprofiler_ExampleHuman"


@pytest.fixture(scope="module")
def phenix_field(shared_data: Path) -> np.ndarray:
    """The real 6-channel uint16 field, 256x256 corner (enough for format tests, fast)."""
    return np.ascontiguousarray(pediatric_field(shared_data)[:, :256, :256])


@pytest.fixture(scope="module")
def human_field(shared_data: Path) -> np.ndarray:
    return np.stack([tifffile.imread(f) for f in sorted((shared_data / HUMAN).glob("*.tif"))])


def test_round_trip_is_pixel_exact_uint16_and_uint8(tmp_path, phenix_field, human_field):
    with ShardWriter(tmp_path) as writer:
        writer.write(phenix_field, site_meta("phenix", ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"], dose=0.5))
        writer.write(human_field, site_meta("human", ["DNA", "PH3", "Cell"]))
    manifest = read_manifest(tmp_path)
    assert manifest["key"].to_list() == ["phenix", "human"]
    assert manifest["dtype"].to_list() == ["uint16", "uint8"]
    assert manifest["height"].to_list() == [256, 512]
    assert manifest["dose"].to_list() == [0.5, None]  # extra metadata becomes a column
    assert manifest["channels"][1].to_list() == ["DNA", "PH3", "Cell"]
    # peer library: WebDataset decodes our npy + json
    samples = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False).decode()}
    np.testing.assert_array_equal(samples["phenix"]["npy"], phenix_field)
    assert samples["phenix"]["npy"].dtype == np.uint16
    np.testing.assert_array_equal(samples["human"]["npy"], human_field)
    assert samples["human"]["json"]["channels"] == ["DNA", "PH3", "Cell"]
    # our own reader: the same pixels
    ours = {s.key: s.image() for s in iter_shard(str(tmp_path / "shard-000000.tar"), 1, fail_on_bad)}
    np.testing.assert_array_equal(ours["phenix"], phenix_field)


def test_size_limit_splits_shards_and_manifest_points_to_them(tmp_path, human_field):
    site_bytes = human_field.nbytes  # ~786 kB
    with ShardWriter(tmp_path, max_bytes=int(2.5 * site_bytes)) as writer:
        for i in range(5):
            writer.write(human_field, site_meta(f"s{i}", ["DNA", "PH3", "Cell"]))
    manifest = read_manifest(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["shard"].to_list() == [shards[0]] * 2 + [shards[1]] * 2 + [shards[2]]
    for shard in shards:
        assert (tmp_path / shard).stat().st_size <= 2.5 * site_bytes
        keys = {m.split(".")[0] for m in tarfile.open(tmp_path / shard).getnames()}
        assert keys == set(manifest.filter(pl.col("shard") == shard)["key"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("perturbation"), "'perturbation' is missing"),
        (lambda m: m.update(site="1"), "'site' must be int"),
        (lambda m: m.update(is_control="no"), "'is_control' must be bool"),
        (lambda m: m.update(channels=["a", "b"]), "names 2 channels but the image has 3"),
        (lambda m: m.update(key="a.b"), "without '.'"),
        (lambda m: m.update(key="k" * 91), "1-90 characters"),
        (lambda m: m.update(shard="x"), "reserved"),
        (lambda m: m.update(notes=[1, 2]), "extra metadata key 'notes'"),
    ],
)
def test_bad_metadata_raises_naming_the_key(tmp_path, change, message):
    m = site_meta("site1", ["a", "b", "c"])
    change(m)
    with ShardWriter(tmp_path) as writer, pytest.raises(ValueError, match=message):
        writer.write(np.zeros((3, 8, 8), np.uint8), m)


def test_bad_images_and_duplicate_keys_raise(tmp_path):
    with ShardWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="dtype float32 not allowed"):
            writer.write(np.zeros((3, 8, 8), np.float32), site_meta("a", ["x", "y", "z"]))
        with pytest.raises(ValueError, match="C x H x W"):
            writer.write(np.zeros((8, 8), np.uint8), site_meta("a", ["x"]))
        writer.write(np.zeros((3, 8, 8), np.uint8), site_meta("a", ["x", "y", "z"]))
        with pytest.raises(ValueError, match="duplicate key"):
            writer.write(np.zeros((3, 8, 8), np.uint8), site_meta("a", ["x", "y", "z"]))
    assert read_manifest(tmp_path).height == 1


def test_crash_leaves_only_complete_shards_and_no_manifest(tmp_path):
    image = np.ones((3, 64, 64), np.uint8)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_bytes=image.nbytes * 2 + 8192) as writer:
            for i in range(5):
                writer.write(image, site_meta(f"s{i}", ["a", "b", "c"]))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    for shard in tmp_path.glob("*.tar"):  # complete, readable tars
        assert len(tarfile.open(shard).getnames()) == 4
    with pytest.raises(ValueError, match="no manifest.parquet"):
        read_manifest(tmp_path)


def test_stale_temp_files_are_removed_and_existing_shards_protected(tmp_path):
    (tmp_path / ".shard-000003.tar.tmp").write_bytes(b"half written")
    with ShardWriter(tmp_path) as writer:
        writer.write(np.zeros((1, 4, 4), np.uint8), site_meta("a", ["x"]))
    assert not list(tmp_path.glob(".*"))
    with pytest.raises(ValueError, match="already holds shards"):
        ShardWriter(tmp_path)
    with ShardWriter(tmp_path, overwrite=True) as writer:
        writer.write(np.zeros((1, 4, 4), np.uint8), site_meta("b", ["x"]))
    assert read_manifest(tmp_path)["key"].to_list() == ["b"]


def test_read_manifest_rejects_missing_shards(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.write(np.zeros((1, 4, 4), np.uint8), site_meta("a", ["x"]))
    (tmp_path / "shard-000000.tar").unlink()
    with pytest.raises(ValueError, match="lists shards that do not exist"):
        read_manifest(tmp_path)


def test_npy_bytes_are_standard(tmp_path):
    """The .npy member is a plain numpy file any tool can read (np.load, no pickle)."""
    image = np.arange(2 * 3 * 5, dtype=np.uint16).reshape(2, 3, 5)
    with ShardWriter(tmp_path) as writer:
        writer.write(image, site_meta("a", ["x", "y"]))
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        loaded = np.load(io.BytesIO(tar.extractfile("a.npy").read()), allow_pickle=False)
    np.testing.assert_array_equal(loaded, image)
