"""ShardDataModule: batch contract, equal steps, determinism, epochs, exact resume, evaluation
tiling, channel options, bad input, a 2-process gloo run and a Lightning resume from checkpoint."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import pytest
import torch
import torch.multiprocessing as mp

from datamodules import DataConfig, ShardWriter, StreamEpochCallback, build_datamodule, read_manifest
from datamodules.streaming import STREAM_ORDER
from datamodules.transforms import copy_dihedral, dihedral, fill_random_crops, tile_origins
from real_field import PEDIATRIC_STAINS, pediatric_field
from run_helpers import site_meta

N_SITES, SIZE = 24, 40


def write_toy_shards(
    out: Path, n_sites: int = N_SITES, size: int = SIZE, sites_per_shard: int = 5, seed: int = 0
) -> Path:
    """Sites whose channel 0 is constant = the site number (so a crop says where it came from);
    channels 1-2 are noise. 4 perturbations + controls, several shards."""
    rng = np.random.default_rng(seed)
    image_bytes = 3 * size * size
    with ShardWriter(out, max_bytes=sites_per_shard * (image_bytes + 2048)) as writer:
        for i in range(n_sites):
            image = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
            image[0] = i
            writer.write(
                image,
                site_meta(
                    f"site{i:03d}",
                    ["DNA", "ER", "RNA"],
                    experiment="e1",
                    plate=f"P{i % 2}",
                    well=f"A{i:02d}",
                    perturbation="NTC" if i % 5 == 0 else f"GENE{i % 5}",
                    is_control=i % 5 == 0,
                    cell_type="toy",
                ),
            )
    return out


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_toy_shards(tmp_path / "shards")


def config(shards: Path, **overrides) -> DataConfig:
    values = dict(
        train_shards=str(shards), crop_size=16, crops_per_site=2, batch_size=4, num_workers=0, shuffle_buffer=4
    )
    values.update(overrides)
    return DataConfig(**values)


def epoch_batches(loader) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) for x, y in zip(a, b)
    )


def test_train_batch_contract_and_labels(shards):
    dm = build_datamodule(config(shards), seed=3)
    assert (dm.in_chans, dm.channel_names, dm.num_classes) == (3, ["DNA", "ER", "RNA"], 5)
    assert dm.vocab["perturbation"].to_list() == ["GENE1", "GENE2", "GENE3", "GENE4", "NTC"]
    site_numbers = pl.col("key").str.slice(4).cast(pl.Int64)
    perturbation = dict(read_manifest(shards).select(site_numbers, "perturbation").iter_rows())
    label_of = dict(dm.vocab.iter_rows())
    batches = epoch_batches(dm.train_dataloader())
    seen = set()
    for batch in batches:
        assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.uint8
        assert batch["label"].dtype == torch.int64
        for crop, label in zip(batch["image"], batch["label"]):
            site = int(crop[0, 0, 0])
            assert (crop[0] == site).all()
            assert int(label) == label_of[perturbation[site]]
            seen.add(site)
    assert len(seen) > N_SITES // 2  # sites come from all over the dataset


@pytest.mark.parametrize("workers", [0, 2])
def test_steps_per_epoch_equal_length_and_yield(shards, workers, monkeypatch):
    dm = build_datamodule(config(shards, num_workers=workers), seed=0)
    assert dm.steps_per_epoch == math.ceil(N_SITES / 2)  # 2 sites per batch, one rank
    loader = dm.train_dataloader()
    assert len(loader) == 12 and len(list(loader)) == 12
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert build_datamodule(config(shards), seed=0).steps_per_epoch == 6
    dm7 = build_datamodule(config(shards, num_workers=workers, steps_per_epoch=7), seed=0)
    assert len(list(dm7.train_dataloader())) == 7  # not a multiple of the workers


def test_determinism_epochs_and_epoch_reaches_persistent_workers(shards):
    def run(seed, epochs=2, start_epoch=0):
        dm = build_datamodule(config(shards, num_workers=2), seed=seed)
        dm.set_epoch(start_epoch)
        loader = dm.train_dataloader()
        return [epoch_batches(loader) for _ in range(epochs)]

    a, b = run(0), run(0)
    assert same(a[0], b[0]) and same(a[1], b[1])  # fixed seed: the same stream
    assert not same(a[0], a[1])  # a new stream each epoch, through persistent workers
    assert not same(a[0], run(1, epochs=1)[0])  # another seed, another stream
    assert same(a[1], run(0, epochs=1, start_epoch=1)[0])  # epoch 1 is a function of (seed, epoch)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_dict_continues_exactly(shards, workers):
    reference = build_datamodule(config(shards, num_workers=workers), seed=5)
    loader = reference.train_dataloader()
    expected = epoch_batches(loader) + epoch_batches(loader)  # epochs 0 and 1

    interrupted = build_datamodule(config(shards, num_workers=workers), seed=5)
    head = []
    for batch in interrupted.train_dataloader():
        head.append(batch)
        if len(head) == 5:
            break
    state = interrupted.state_dict()
    assert state == {
        "epoch": 0,
        "batches": 5,
        "seed": 5,
        "num_workers": workers,
        "world_size": 1,
        "stream_order": STREAM_ORDER,
    }

    resumed = build_datamodule(config(shards, num_workers=workers), seed=5)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    rest = epoch_batches(loader)
    assert len(rest) == 12 - 5
    assert same(head + rest, expected[:12])
    assert same(epoch_batches(loader), expected[12:])  # and the next epoch as well


def test_resume_into_a_shorter_epoch_starts_the_next_one(shards, caplog):
    dm = build_datamodule(config(shards, steps_per_epoch=4), seed=5)
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        # a checkpoint from before stream_order was saved: its shards were drawn the first way
        dm.load_state_dict({"epoch": 2, "batches": 9, "seed": 5, "num_workers": 0, "world_size": 2})
    assert "'world_size': (2, 1)" in caplog.text and f"'stream_order': (1, {STREAM_ORDER})" in caplog.text
    assert dm.state_dict()["epoch"] == 3 and dm.state_dict()["batches"] == 0
    fresh = build_datamodule(config(shards, steps_per_epoch=4), seed=5)
    fresh.set_epoch(3)
    assert same(epoch_batches(dm.train_dataloader()), epoch_batches(fresh.train_dataloader()))


def test_crops_flips_rotations_are_windows_of_the_site():
    rng = np.random.default_rng(0)
    image = np.arange(2 * 30 * 30, dtype=np.uint16).reshape(2, 30, 30)
    out = np.empty((64, 2, 8, 8), np.uint16)
    fill_random_crops(image, out, rng)
    orientations = set()
    for crop in out:
        # undo: find the window by its min pixel, then match one of the 8 symmetries
        top, left = divmod(int(crop[0].min()), 30)
        window = image[:, top : top + 8, left : left + 8]
        codes = [c for c in range(8) if np.array_equal(dihedral(window, c), crop)]
        assert codes, "crop is not a flip/rotation of a window of the site"
        orientations.add(codes[0])
    assert len(orientations) == 8
    assert len({dihedral(image, c).tobytes() for c in range(8)}) == 8


@pytest.mark.parametrize("dtype, size", [(np.uint8, 256), (np.uint16, 100), (np.uint8, 37)])
def test_fast_rotation_copy_matches_numpy_views(dtype, size):
    window = np.random.default_rng(1).integers(0, 1000, (3, size, size)).astype(dtype)
    out = np.empty_like(window)
    for code in range(8):
        copy_dihedral(window, code, out)
        np.testing.assert_array_equal(out, dihedral(window, code))
    np.testing.assert_array_equal(dihedral(window, 5), np.rot90(window, 1, axes=(1, 2)))  # flip cols, transpose


def test_channel_subset_and_permutation(tmp_path):
    with ShardWriter(tmp_path / "s") as writer:
        for i in range(4):
            image = np.stack([np.full((24, 24), 10 * (c + 1), np.uint8) for c in range(3)])
            writer.write(
                image,
                site_meta(
                    f"k{i}",
                    ["DNA", "ER", "RNA"],
                    experiment="e",
                    plate="p",
                    well="A01",
                    site=i,
                    perturbation="x",
                    cell_type="c",
                ),
            )
    dm = build_datamodule(config(tmp_path / "s", channels=["RNA", "DNA"], in_chans=2, augment=False), seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1] == 2
    assert (batch["image"][:, 0] == 30).all() and (batch["image"][:, 1] == 10).all()
    (tiles,) = list(dm.eval_dataloader())  # evaluation keeps the same stains, in the same order
    assert tiles["image"].shape == (4, 2, 16, 16) and (tiles["image"][:, 0] == 30).all()
    dm = build_datamodule(config(tmp_path / "s", channel_permute=True, steps_per_epoch=8), seed=0)
    orders = set()
    for batch in dm.train_dataloader():
        for crop in batch["image"]:
            order = tuple(int(v) for v in crop[:, 0, 0])
            assert sorted(order) == [10, 20, 30]
            orders.add(order)
    assert len(orders) > 2


def test_label_key_column_with_missing_values_gives_minus_one(tmp_path):
    with ShardWriter(tmp_path / "s") as writer:
        for i in range(4):
            writer.write(
                np.full((1, 16, 16), i, np.uint8),
                site_meta(
                    f"k{i}",
                    ["DNA"],
                    experiment="e",
                    plate="p",
                    well="A01",
                    site=i,
                    perturbation="x",
                    perturbation_type="sirna",
                    cell_type="c",
                    sirna_id=None if i == 3 else 10 + i % 2,
                ),
            )
    dm = build_datamodule(config(tmp_path / "s", label_key="sirna_id", crop_size=8, steps_per_epoch=6), seed=0)
    assert dm.vocab.rows() == [("10", 0), ("11", 1)]
    for batch in dm.train_dataloader():
        site = batch["image"][:, 0, 0, 0].long()
        expected = torch.where(site == 3, -1, site % 2)
        assert torch.equal(batch["label"], expected)


def test_eval_every_site_once_across_ranks_tiled(shards, monkeypatch):
    cfg = config(shards, crop_size=16, batch_size=8, num_workers=2)
    manifest = read_manifest(shards)
    site_rows = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = build_datamodule(cfg, seed=0)
        rows = []
        for batch in dm.eval_dataloader():
            assert batch["image"].shape[1:] == (3, 16, 16)
            assert batch["site_index"].shape[0] == batch["image"].shape[0]
            for crop, row in zip(batch["image"], batch["site_index"]):
                assert int(crop[0, 0, 0]) == int(manifest["key"][int(row)][4:])  # site_index is the manifest row
            rows += batch["site_index"].tolist()
        assert rows == sorted(rows)  # ordered
        site_rows += rows
    counts = np.bincount(site_rows)
    assert len(counts) == N_SITES and (counts == 4).all()  # 40px site, 16px tiles: 2 x 2 each, every site once


def test_eval_tiles_are_pixel_exact_on_the_real_field(tmp_path, shared_data):
    planes = pediatric_field(shared_data)
    with ShardWriter(tmp_path / "s") as writer:
        writer.write(
            planes,
            site_meta(
                "C03_3",
                PEDIATRIC_STAINS,
                experiment="BR00143976",
                plate="BR00143976",
                site=3,
                perturbation="DAOY",
                perturbation_type="control",
                is_control=True,
            ),
        )
    dm = build_datamodule(config(tmp_path / "s", crop_size=256, batch_size=16, crops_per_site=4), seed=0)
    (batch,) = list(dm.eval_dataloader())
    assert batch["image"].shape == (16, 6, 256, 256) and batch["image"].dtype == torch.uint16
    origins = tile_origins(1080, 1080, 256)
    assert origins[0].tolist() == [28, 28] and origins[-1].tolist() == [796, 796]
    for tile, (top, left) in zip(batch["image"].numpy(), origins):
        np.testing.assert_array_equal(tile, planes[:, top : top + 256, left : left + 256])
    train = next(iter(dm.train_dataloader()))
    assert train["image"].dtype == torch.uint16 and train["image"].shape == (16, 6, 256, 256)


def corrupt_one_header(shard: Path) -> None:
    """Overwrite the magic of the first .npy in the tar: that sample becomes unreadable."""
    data = bytearray(shard.read_bytes())
    at = data.index(b"\x93NUMPY")
    data[at : at + 6] = b"garbag"
    shard.write_bytes(bytes(data))


def test_corrupt_sample_and_truncated_shard_are_skipped_counted_logged(shards, caplog):
    tars = sorted(shards.glob("*.tar"))
    corrupt_one_header(tars[0])
    tars[1].write_bytes(tars[1].read_bytes()[: tars[1].stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        dm = build_datamodule(config(shards, steps_per_epoch=40), seed=0)  # verify warns, does not raise
        batches = list(dm.train_dataloader())
    assert len(batches) == 40  # training went on, full epoch
    assert dm.bad_samples >= 2
    assert "site000" in caplog.text and tars[0].name in caplog.text  # shard and key named
    assert tars[1].name in caplog.text and "unreadable from here on" in caplog.text
    evaluated = {int(r) for b in dm.eval_dataloader() for r in b["site_index"]}
    assert 0 not in evaluated and len(evaluated) < N_SITES and 10 in evaluated


def test_bad_input_is_a_clear_error_before_training(shards, tmp_path):
    with pytest.raises(ValueError, match="matches no .tar files"):
        build_datamodule(config(shards, train_shards=str(shards / "nothing-*.tar")))
    with pytest.raises(ValueError, match="expects 4 channels but .* gives 3"):
        build_datamodule(config(shards, in_chans=4))
    with pytest.raises(ValueError, match="lacking \\['Mito'\\]"):
        build_datamodule(config(shards, channels=["DNA", "Mito"]))
    with pytest.raises(ValueError, match="multiple of crops_per_site"):
        build_datamodule(config(shards, batch_size=5))
    with pytest.raises(ValueError, match="label_key 'sirna'"):
        build_datamodule(config(shards, label_key="sirna"))
    with pytest.raises(ValueError, match="smaller than crop_size"):
        build_datamodule(config(shards, crop_size=64))
    # a shard the manifest does not know
    other = write_toy_shards(tmp_path / "other", n_sites=3, seed=1)
    shutil.copy(other / "shard-000000.tar", shards / "shard-000099.tar")
    with pytest.raises(ValueError, match="disagrees with the shards: \\['shard-000099.tar'\\]"):
        build_datamodule(config(shards))
    (shards / "shard-000099.tar").unlink()
    # a shard whose samples are not the ones the manifest lists for it
    renamed = write_toy_shards(tmp_path / "renamed", n_sites=N_SITES, seed=0)
    shutil.copy(renamed / "shard-000001.tar", shards / "shard-000000.tar")
    with pytest.raises(ValueError, match="manifest disagrees with .*shard-000000.tar"):
        build_datamodule(config(shards))


def test_each_rank_verifies_its_own_share_of_the_shards(shards, tmp_path, monkeypatch):
    """Under DDP the tar-header check is split over ranks: rank 1 of 2 checks shards 1, 3, ...
    and so does not see a bad shard 0, which rank 0 reports."""
    renamed = write_toy_shards(tmp_path / "renamed", n_sites=N_SITES, seed=0)
    shutil.copy(renamed / "shard-000001.tar", shards / "shard-000000.tar")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    build_datamodule(config(shards))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="manifest disagrees with .*shard-000000.tar"):
        build_datamodule(config(shards))


def _ddp_worker(rank: int, world: int, shards: str, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dm = build_datamodule(config(Path(shards), num_workers=1), seed=11)
        loader = dm.train_dataloader()
        epochs = [[b["image"][:, 0, 0, 0].tolist() for b in loader] for _ in range(2)]
        steps = torch.tensor([len(epochs[0]), len(epochs[1]), len(loader)])
        gathered = [torch.zeros_like(steps) for _ in range(world)]
        torch.distributed.all_gather(gathered, steps)  # would hang if ranks disagreed on collectives
        record = {"epochs": epochs, "steps": [g.tolist() for g in gathered]}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        torch.distributed.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_two_rank_gloo_equal_steps_different_streams(shards, tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(shards), str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [[6, 6, 6], [6, 6, 6]]  # ceil(24 sites / (2 x 2))
    assert ranks[0]["epochs"][0] != ranks[1]["epochs"][0]  # each rank draws its own stream
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # and a new one each epoch


class RecordingModule(L.LightningModule):
    """The smallest trainable module that remembers which sites each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, int, tuple[int, ...]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_idx, tuple(batch["image"][:, 0, 0, 0].tolist())))
        return self.layer(batch["image"][:, :1, 0, 0].float()).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(dm, module, tmp_path, ckpt_path=None, **kwargs):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[StreamEpochCallback(dm), *kwargs.pop("callbacks", [])],
        **kwargs,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
def test_lightning_epochs_and_resume_from_checkpoint(shards, tmp_path):
    full = RecordingModule()
    fit(build_datamodule(config(shards), seed=2), full, tmp_path / "full", enable_checkpointing=False)
    assert [(e, i) for e, i, _ in full.seen] == [(e, i) for e in range(2) for i in range(12)]
    assert [s for e, _, s in full.seen if e == 0] != [s for e, _, s in full.seen if e == 1]

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    fit(
        build_datamodule(config(shards), seed=2),
        RecordingModule(),
        tmp_path / "first",
        callbacks=[checkpoint],
        max_steps=5,
    )
    (ckpt,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert torch.load(ckpt, weights_only=False)["ShardDataModule"]["batches"] == 5

    resumed = RecordingModule()
    fit(build_datamodule(config(shards), seed=2), resumed, tmp_path / "resumed", ckpt_path=str(ckpt))
    assert resumed.seen == full.seen[5:]  # same data position, same batches to the end
