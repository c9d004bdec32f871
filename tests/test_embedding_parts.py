"""`phenoscale embed` in parts: each rank embeds only its block of sites and writes its own parquet
part; merging the parts gives exactly the one-process file, and a missing or stale part is named."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from datamodules import build_datamodule
from evaluation import site_embedding
from evaluation.site_embedding import SiteSums, rank_site_sums
from phenoscale.cli import main
from phenoscale.embedding import embed_model, merge_parts, parts_directory, site_embeddings, write_part
from test_streaming import config, write_toy_shards
from tiny_models import TINY_CNN, tiny_module

RANKS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("parts")
    shards = write_toy_shards(root / "shards")
    torch.manual_seed(0)
    model = tiny_module("wsl", in_chans=3, num_classes=5, img_size=16, **TINY_CNN).eval()
    cfg = config(shards, batch_size=8)  # 16-px tiles of 40-px sites: 4 per site, 2 sites per batch
    whole = pl.read_parquet(embed_model(model, cfg, root / "one.parquet"))
    return model, cfg, whole


def write_rank_parts(model, cfg, out: Path, ranks: list[int], monkeypatch: pytest.MonkeyPatch) -> pl.DataFrame:
    """What `phenoscale embed` does on each of RANKS ranks (without a process group), for `ranks`."""
    monkeypatch.setenv("WORLD_SIZE", str(RANKS))
    for rank in ranks:
        monkeypatch.setenv("RANK", str(rank))
        dm = build_datamodule(cfg)
        loader = dm.eval_dataloader()
        sites = rank_site_sums(model, loader, torch.device("cpu"), progress=False)
        assert len(sites.rows) == dm.manifest.height // RANKS  # a rank holds its own sites only
        assert sites.rows.tolist() == list(loader.dataset.rows)  # the block the stream announced
        write_part(out, dm.manifest, sites, None, rank, RANKS)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    return dm.manifest


def test_parts_merge_to_exactly_the_one_process_file(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, cfg, whole = setup
    out = tmp_path / "split.parquet"
    manifest = write_rank_parts(model, cfg, out, list(range(RANKS)), monkeypatch)
    assert len(list(parts_directory(out).glob("*.parquet"))) == RANKS
    assert main(["embed", "not-loaded.ckpt", cfg.train_shards, str(out), "--merge"]) == 0
    merged = pl.read_parquet(out)
    assert merged.equals(whole)  # same rows, order, metadata and float32 values
    assert not parts_directory(out).exists()
    assert merged["key"].to_list() == manifest["key"].to_list()
    # and the values are the per-site means of the tile embeddings (the dense, whole-manifest path)
    sums, counts = site_embeddings(
        model, build_datamodule(cfg).eval_dataloader(), manifest.height, torch.device("cpu"), None, None, progress=False
    )
    assert counts.tolist() == [4.0] * manifest.height
    np.testing.assert_array_equal(merged["embedding"].to_numpy(), (sums / counts[:, None]).float().numpy())


def test_a_missing_or_stale_part_is_named(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, cfg, _ = setup
    out = tmp_path / "split.parquet"
    manifest = write_rank_parts(model, cfg, out, [0, 2], monkeypatch)
    with pytest.raises(RuntimeError, match=f"{manifest.height // RANKS} of {manifest.height} sites got no crop"):
        merge_parts(out, manifest)
    assert not out.exists()
    (parts_directory(out) / "rank00000-of-00002.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mixes parts of runs with \['00002', '00003'\] ranks"):
        merge_parts(out, manifest)


class _MeanEmbedder:
    """embed() = per-channel means of each crop: a model whose outputs are easy to sum by hand."""

    def embed(self, images: torch.Tensor, pooling=None, block=None) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))


@pytest.mark.parametrize(
    "rows", [None, range(2, 13), range(0, 20), range(5, 9)], ids=["unknown", "span", "wider", "narrower"]
)
def test_site_sums_of_batches_in_any_order_equal_their_combination(rows: range | None) -> None:
    """Rows arrive out of order, split over batches and with gaps (skipped sites): the running
    sums (sized from `rows` when given, right or wrong) grow to cover them and still equal
    SiteSums.combine of the per-batch sums."""
    generator = torch.Generator().manual_seed(0)
    site_rows = [[7, 7, 8], [3, 4], [12, 12], [8, 9], [2]]  # 8 split over two batches; 5, 6, 10, 11 skipped
    batches = [
        {"image": torch.rand(len(r), 3, 4, 4, generator=generator), "site_index": torch.tensor(r)} for r in site_rows
    ]
    sites = rank_site_sums(_MeanEmbedder(), batches, torch.device("cpu"), progress=False, rows=rows)
    per_batch = []
    for b in batches:
        rows, inverse = torch.unique(b["site_index"], return_inverse=True)
        crops = b["image"].mean(dim=(2, 3)).double()
        sums = torch.zeros(len(rows), 3, dtype=torch.float64).index_add_(0, inverse, crops)
        per_batch.append(SiteSums(rows, {None: sums}, torch.bincount(inverse).double()))
    expected = SiteSums.combine(per_batch)
    assert sites.rows.tolist() == [2, 3, 4, 7, 8, 9, 12]
    assert sites.counts.tolist() == expected.counts.tolist() == [1, 1, 1, 2, 2, 1, 2]
    torch.testing.assert_close(sites.sums[None], expected.sums[None], rtol=0, atol=1e-15)


class _AnnouncedBatches(list):
    """Batches whose `dataset` announces the manifest rows they cover, like a DataLoader over an EvalStream."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], rows: range) -> None:
        super().__init__(batches)
        self.dataset = SimpleNamespace(rows=rows)


def test_the_loaders_announced_rows_size_the_sums_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader whose dataset announces its rows (an EvalStream) gets one buffer of exactly that
    span, handed over as the result without a copy (what the EFAAR callback's gather pickles)."""
    made: list[site_embedding._DenseSums] = []

    class Recording(site_embedding._DenseSums):
        def __init__(self, expected: range | None = None) -> None:
            super().__init__(expected)
            made.append(self)

    monkeypatch.setattr(site_embedding, "_DenseSums", Recording)
    rows = [[3, 3, 4], [5, 6], [6, 7, 8]]
    batches = [{"image": torch.rand(len(r), 3, 4, 4), "site_index": torch.tensor(r)} for r in rows]
    sites = rank_site_sums(
        _MeanEmbedder(), _AnnouncedBatches(batches, range(3, 9)), torch.device("cpu"), progress=False
    )
    (acc,) = made
    assert acc.expected == range(3, 9) and len(acc.counts) == 6  # sized once, never grown
    assert sites.sums[None] is acc.sums[None] and sites.rows.tolist() == [3, 4, 5, 6, 7, 8]
    assert sites.counts.tolist() == [2, 1, 1, 2, 1, 1]
    unsized = rank_site_sums(_MeanEmbedder(), batches, torch.device("cpu"), progress=False)
    torch.testing.assert_close(unsized.sums[None], sites.sums[None], rtol=0, atol=0)
