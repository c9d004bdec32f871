"""ShardDataModule: shards + manifest -> training batches and evaluation tiles (docs/data.md).

Everything that can be wrong with the input is checked when the module is built, before any
GPU is allocated: the shard pattern, manifest vs. shards, channel count vs. the model, pixel
type, crop size. What can only be seen while streaming (a corrupt sample, a truncated shard) is
skipped, counted (`bad_samples`) and logged with shard and key.

WebDataset 1.0.2 pitfalls (docs/data.md, Streaming) and how they are avoided here: shards are resampled
per (seed, epoch, rank, worker) by our own RNG, so there is no nodesplitter to raise, no finite
split to hang DDP and no "fewer shards than workers"; each worker yields an exact quota of
batches, so all ranks take the same number of steps and the loader has a length; the epoch
and the resume position travel to the workers through shared memory, read when each worker
starts an iteration, so they reach persistent and re-created workers alike.
"""

from __future__ import annotations

import logging
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader

from datamodules.config import DataConfig
from datamodules.distributed import rank_and_world
from datamodules.locations import load_manifest, shard_locations, shard_name
from datamodules.streams import BadSampleCounter, EvalStream, SampleFilter, TrainStream
from datamodules.transport import Transport, is_remote

log = logging.getLogger("datamodules")

#: how a training stream is drawn from its seeds; 2 (2026-12-04): shard order from its own RNG
#: (TrainStream._sites). A resume from a checkpoint of another order warns that the data differs.
STREAM_ORDER = 2


def resolve_shards(
    pattern: str, verify: bool = True, manifest_at: str | None = None, transport: Transport | None = None
) -> tuple[list[str], pl.DataFrame]:
    """Shard locations of `pattern` (datamodules.locations) and the manifest rows they hold.

    Raises ValueError if nothing matches, local tars span several directories, or the manifest
    and the shards disagree (shards missing on either side, keys differing inside a shard: checked
    for local shards under DDP by each rank for every world-size-th shard; a remote shard's keys
    are checked as it streams, since reading its headers would mean downloading it).
    """
    files = shard_locations(pattern)
    if not files:
        raise ValueError(f"shard pattern {pattern!r} matches no .tar files")
    remote = is_remote(files[0])
    if not remote:
        roots = {str(Path(f).parent) for f in files}
        if len(roots) > 1:
            raise ValueError(
                f"shard pattern {pattern!r} spans several directories {sorted(roots)}; "
                "each shard directory has its own manifest"
            )
    manifest, source = load_manifest(files, manifest_at, transport or Transport.from_config())
    names = [shard_name(f) for f in files]
    if len(set(names)) < len(names):
        raise ValueError(f"shard pattern {pattern!r} names the same shard file twice")
    unlisted = sorted(set(names) - set(manifest["shard"].to_list()))
    if unlisted:
        raise ValueError(f"{source} disagrees with the shards: {unlisted[:5]} are not in it")
    manifest = manifest.filter(pl.col("shard").is_in(sorted(names)))
    if verify and not remote:
        # each rank reads the tar headers of its own share of the shards (a thousand-shard set is
        # verified once per job, not once per GPU); a mismatch stops the rank that finds it
        rank, world = rank_and_world()
        keys = dict(manifest.group_by("shard").agg("key").iter_rows())
        for shard in files[rank::world]:
            check_shard_keys(Path(shard), set(keys.get(Path(shard).name, [])))
    return files, manifest


def check_shard_keys(shard: Path, expected: set[str]) -> None:
    """The sample keys inside `shard` must be those the manifest lists for it.

    A shard that is physically damaged is only warned about: its readable samples will be used and
    the rest skipped while streaming; a readable shard that holds other samples is an error.
    """
    try:
        with tarfile.open(shard, "r:") as tar:
            members = tar.getmembers()
        size = shard.stat().st_size
        truncated = bool(members) and members[-1].offset_data + members[-1].size > size
    except (tarfile.TarError, OSError, EOFError) as err:
        log.warning("shard %s is damaged (%s); its unreadable samples will be skipped", shard, err)
        return
    if truncated:
        log.warning("shard %s is truncated; its unreadable samples will be skipped", shard)
        return
    keys = {m.name.rsplit("/", 1)[-1].partition(".")[0] for m in members if m.isfile()}
    if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        raise ValueError(
            f"manifest disagrees with {shard}: keys only in the shard {extra[:3]}, only in the manifest {missing[:3]}"
        )


def channel_layout(manifest: pl.DataFrame, channels: list[str] | None, source: str) -> list[str]:
    """The stain names every batch will carry, checked against every site of the manifest."""
    layouts = manifest["channels"].unique().to_list()
    if channels is None:
        if len(layouts) > 1:
            raise ValueError(
                f"{source}: sites have different channel lists {layouts[:3]}; "
                "choose a common subset with DataConfig.channels"
            )
        return list(layouts[0])
    for layout in layouts:
        missing = [c for c in channels if c not in layout]
        if missing:
            key = manifest.filter(pl.col("channels") == pl.lit(layout, dtype=pl.List(pl.Utf8)))["key"][0]
            raise ValueError(
                f"{source}: site {key!r} has channels {layout}, lacking {missing} requested by DataConfig.channels"
            )
    return list(channels)


@dataclass
class StreamPosition:
    """Where this rank's training stream stands: the epoch and the batches handed out in it."""

    epoch: int = 0
    batches: int = 0


class TrainLoader(DataLoader):
    """DataLoader over a TrainStream that tells the workers where to start and counts batches."""

    def __init__(self, stream: TrainStream, position: StreamPosition, **kwargs: Any) -> None:
        super().__init__(stream, batch_size=None, **kwargs)
        self.position = position

    def __iter__(self):
        self.dataset.publish(self.position.epoch, self.position.batches)
        for batch in super().__iter__():
            self.position.batches += 1
            yield batch
        self.position.epoch += 1  # a pass that ran to the end completes the epoch
        self.position.batches = 0

    # Lightning checks for these to know the loader can resume mid-epoch. The position itself is
    # saved and restored by ShardDataModule.state_dict (it knows the trainer's progress, which the
    # loader cannot: the trainer fetches one batch ahead), so the loader's own state is empty.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore here: see state_dict."""


class ShardDataModule(L.LightningDataModule):
    """Training and evaluation loaders over WebDataset shards (see the module docstring)."""

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        super().__init__()
        if not cfg.train_shards or cfg.train_shards == "???":
            raise ValueError("DataConfig.train_shards is required: a shard directory or a glob of its .tar files")
        if cfg.crops_per_site < 1 or cfg.batch_size % cfg.crops_per_site:
            raise ValueError(
                f"DataConfig.batch_size ({cfg.batch_size}) must be a multiple of crops_per_site ({cfg.crops_per_site})"
            )
        self.cfg, self.seed = cfg, seed
        self.transport = Transport.from_config(cfg)
        self.train_files, self.train_manifest = resolve_shards(
            cfg.train_shards, cfg.verify_shards, cfg.manifest, self.transport
        )
        if cfg.eval_shards is None or cfg.eval_shards == cfg.train_shards:
            self.eval_files, self.manifest = self.train_files, self.train_manifest
        else:
            self.eval_files, self.manifest = resolve_shards(
                cfg.eval_shards, cfg.verify_shards, cfg.manifest, self.transport
            )
        self.channel_names = channel_layout(self.train_manifest, cfg.channels, cfg.train_shards)
        if self.manifest is not self.train_manifest:
            channel_layout(self.manifest, self.channel_names, cfg.eval_shards)
        if cfg.in_chans is not None and cfg.in_chans != self.in_chans:
            raise ValueError(
                f"the model expects {cfg.in_chans} channels but {cfg.train_shards} gives "
                f"{self.in_chans} ({self.channel_names}); set DataConfig.channels or the model's in_chans"
            )
        both = pl.concat(
            [
                self.train_manifest.select("key", "dtype", "height", "width"),
                self.manifest.select("key", "dtype", "height", "width"),
            ]
        )
        dtypes = both["dtype"].unique().to_list()
        if len(dtypes) != 1:
            raise ValueError(f"shards mix pixel types {dtypes}; convert them to one bit depth")
        self.dtype = dtypes[0]
        small = both.filter((pl.col("height") < cfg.crop_size) | (pl.col("width") < cfg.crop_size))
        if small.height:
            raise ValueError(
                f"{small.height} sites are smaller than crop_size {cfg.crop_size} (e.g. {small['key'][0]!r})"
            )
        if cfg.label_key not in self.train_manifest.columns:
            raise ValueError(
                f"label_key {cfg.label_key!r} is not a manifest column; available: {self.train_manifest.columns}"
            )
        labels = self.train_manifest[cfg.label_key].drop_nulls().cast(pl.Utf8).unique().sort()
        # perturbation -> class index (sorted, so the same manifest always gives the same labels)
        self.vocab = pl.DataFrame(
            {cfg.label_key: labels, "label": range(len(labels))}, schema={cfg.label_key: pl.Utf8, "label": pl.Int64}
        )
        self.position = StreamPosition()
        self._bad = BadSampleCounter(cfg.num_workers)
        self._stream: TrainStream | None = None

    # ------------------------------------------------------------------ facts for the model
    @property
    def in_chans(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        return self.vocab.height

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank per epoch (default: each training site visited ~once across ranks)."""
        if self.cfg.steps_per_epoch is not None:
            return self.cfg.steps_per_epoch
        _, world = rank_and_world()
        sites_per_step = self.cfg.batch_size // self.cfg.crops_per_site * world
        return max(1, math.ceil(self.train_manifest.height / sites_per_step))

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far as corrupt or unusable (all workers of this process)."""
        return self._bad.total

    # ------------------------------------------------------------------ training
    def _sample_filter(self) -> SampleFilter:
        return SampleFilter(self.dtype, self.cfg.channels, self.in_chans)

    def train_dataloader(self) -> TrainLoader:
        cfg = self.cfg
        if self._stream is None:
            rank, _ = rank_and_world()
            self._stream = TrainStream(
                self.train_files,
                cfg,
                seed=self.seed,
                rank=rank,
                transport=self.transport,
                steps_per_epoch=self.steps_per_epoch,
                sample_filter=self._sample_filter(),
                vocab=dict(self.vocab.iter_rows()),
                bad=self._bad,
            )
        workers = cfg.num_workers
        return TrainLoader(
            self._stream,
            self.position,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            pin_memory=self.pin_memory,
        )

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at its first batch (no-op if the stream is already in that epoch)."""
        if epoch != self.position.epoch:
            self.position.epoch, self.position.batches = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """The stream position, stored by Lightning in checkpoints (resume = same data position).

        Under a trainer, the batches *trained* in this epoch are taken from its progress counter,
        because the trainer fetches one batch ahead of the step it runs.
        """
        epoch, batches = self.position.epoch, self.position.batches
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            epoch = trainer.current_epoch
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= self.steps_per_epoch:
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches, **self._stream_identity()}

    def _stream_identity(self) -> dict[str, int]:
        """What, beside the position, determines the batches: resuming with other values is allowed
        (e.g. more nodes) but continues a different stream."""
        return {
            "seed": self.seed,
            "num_workers": self.cfg.num_workers,
            "world_size": rank_and_world()[1],
            "stream_order": STREAM_ORDER,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {"stream_order": 1, **state}  # checkpoints from before the key drew shards the first way
        changed = {k: (saved[k], v) for k, v in self._stream_identity().items() if k in saved and saved[k] != v}
        if changed:
            log.warning(
                "resuming with a different %s (saved, now): the data stream continues differently from the "
                "interrupted run's",
                changed,
            )
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= self.steps_per_epoch:  # the epoch is shorter now (e.g. more ranks): start the next one
            epoch, batches = epoch + 1, 0
        self.position.epoch, self.position.batches = epoch, batches

    # ------------------------------------------------------------------ evaluation
    def eval_dataloader(self) -> DataLoader:
        """Every site of `manifest` once across ranks (contiguous blocks of rows), tiled."""
        rank, world = rank_and_world()
        n = self.manifest.height
        lo, hi = rank * n // world, (rank + 1) * n // world
        rows = self.manifest.slice(lo, hi - lo).select("shard", "key").iter_rows()
        location = {shard_name(f): f for f in self.eval_files}
        sites = [(lo + i, location[shard], key) for i, (shard, key) in enumerate(rows)]
        crop = self.cfg.crop_size
        tiles_per_site = (self.manifest["height"].min() // crop) * (self.manifest["width"].min() // crop)
        stream = EvalStream(
            sites,
            sites_per_batch=max(1, self.cfg.batch_size // tiles_per_site),
            crop_size=self.cfg.crop_size,
            sample_filter=self._sample_filter(),
            bad=self._bad,
            transport=self.transport if is_remote(self.eval_files[0]) else None,
        )
        workers = min(self.cfg.num_workers, stream.parallelism)
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            pin_memory=self.pin_memory,
        )

    @property
    def pin_memory(self) -> bool:
        """data.pin_memory, or (unset) whether batches will go to a CUDA GPU: pinning pays only there."""
        return torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory

    def predict_dataloader(self) -> DataLoader:
        return self.eval_dataloader()


class StreamEpochCallback(L.Callback):
    """Tells the DataModule the trainer's epoch at each train epoch start (Lightning does not
    set the epoch of an IterableDataset)."""

    def __init__(self, datamodule: ShardDataModule) -> None:
        self.datamodule = datamodule

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.datamodule.set_epoch(trainer.current_epoch)


def build_datamodule(cfg: DataConfig, seed: int = 0) -> ShardDataModule:
    """The DataModule for `cfg`; raises ValueError on any input problem visible before training."""
    return ShardDataModule(cfg, seed=seed)
