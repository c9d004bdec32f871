"""The two iterable datasets behind the DataModule: an endless resampled training stream and a
finite, ordered evaluation pass.

Training stream, per (rank, worker): shards drawn with replacement by an RNG seeded from
(seed, epoch, rank, worker) -> checked samples -> shuffle buffer -> groups of
batch_size / crops_per_site sites -> random crops + flips/rotations -> one collated batch.
Worker w of W yields exactly the batches j = w, w+W, ... < steps_per_epoch of its rank, so every
rank runs the same number of steps and the loader has a length. Batch t of a worker's stream
is a pure function of (seed, epoch, rank, worker, t) and the shards' bytes, so a run resumed at
batch n can fast-forward by reading, not decoding, the batches before n.
"""

from __future__ import annotations

import itertools
import math
import mmap
import tarfile
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.config import DataConfig
from datamodules.samples import BadSampleError, RawSample, iter_shards, log_bad_sample, member_view, parse_sample
from datamodules.transforms import fill_random_crops, tile_crops
from datamodules.transport import Transport


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class SampleFilter:
    """What every sample of a loader must satisfy beyond being readable: the dataset's pixel type
    and the stains to keep. Resolves, per sample, the indices of the kept channels."""

    def __init__(self, dtype: str, channels: list[str] | None, n_channels: int) -> None:
        self.dtype = np.dtype(dtype)
        self.channels = channels
        self.n_channels = n_channels
        self._indices: dict[tuple[str, ...], np.ndarray | None] = {}

    def indices(self, sample: RawSample) -> np.ndarray | None:
        """Channel indices to keep for this sample (None: all); BadSampleError if it cannot comply."""
        if sample.dtype != self.dtype:
            raise BadSampleError(f"pixel type {sample.dtype}, the dataset's is {self.dtype}")
        names = tuple(sample.meta["channels"])
        if names not in self._indices:
            if self.channels is None:
                if len(names) != self.n_channels:
                    raise BadSampleError(f"{len(names)} channels, expected {self.n_channels}")
                self._indices[names] = None
            else:
                missing = [c for c in self.channels if c not in names]
                if missing:
                    raise BadSampleError(f"lacks channels {missing} (has {list(names)})")
                self._indices[names] = np.array([names.index(c) for c in self.channels])
        return self._indices[names]


class BadSampleCounter:
    """Skipped samples, counted per worker slot in shared memory so the main process can read
    the total (a test, a progress log) while the workers keep running."""

    def __init__(self, slots: int) -> None:
        self.counts = torch.zeros(max(1, slots), dtype=torch.int64).share_memory_()

    def __call__(self, shard: str, key: str, reason: str) -> None:
        log_bad_sample(shard, key, reason)
        worker, _ = _worker()
        self.counts[worker % len(self.counts)] += 1

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class TrainStream(IterableDataset):
    """Endless resampled crops, cut into epochs of exactly `steps_per_epoch` batches per rank."""

    def __init__(
        self,
        shards: list[str],
        cfg: DataConfig,
        *,
        seed: int,
        rank: int,
        steps_per_epoch: int,
        sample_filter: SampleFilter,
        vocab: dict[str, int],
        bad: BadSampleCounter,
        transport: Transport | None = None,
    ) -> None:
        """What a batch is (size, crops, augmentation, labels) is read from `cfg`; the rest is what
        the DataModule derived from the shards and the run (rank, epoch length, label vocabulary)."""
        super().__init__()
        self.shards = shards  # local paths (memory-mapped) or remote locations (streamed through `transport`)
        self.transport = transport
        self.seed, self.rank = seed, rank
        self.steps_per_epoch = steps_per_epoch
        # copied out of `cfg`: read per sample, where an attribute of our own is the cheapest read
        self.batch_size, self.crops_per_site, self.crop_size = cfg.batch_size, cfg.crops_per_site, cfg.crop_size
        self.sites_per_batch = cfg.batch_size // cfg.crops_per_site
        self.shuffle_buffer = max(1, cfg.shuffle_buffer)
        self.filter = sample_filter
        self.augment, self.channel_permute = cfg.augment, cfg.channel_permute
        self.label_key, self.vocab = cfg.label_key, vocab
        self.bad = bad
        # (epoch, first batch) of the next pass; shared memory so persistent workers see it too
        self.start = torch.zeros(2, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def publish(self, epoch: int, batches_done: int) -> None:
        """Where the next iteration starts; read by every worker when its iteration begins."""
        self.start[0], self.start[1] = epoch, batches_done

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = _worker()
        epoch, done = (int(v) for v in self.start)
        remaining = max(0, self.steps_per_epoch - done)
        quota = len(range(worker, remaining, workers))
        # after a resume at batch `done`, physical worker p plays the stream that worker
        # (done + p) % W played in the uninterrupted run, from its batch (done + p) // W
        stream_id, skip = (done + worker) % workers, (done + worker) // workers
        sites = self._sites(epoch, stream_id)
        t = 0
        while quota > 0:
            group = [next(sites) for _ in range(self.sites_per_batch)]
            if t >= skip:
                yield self._batch(group, np.random.default_rng([self.seed, epoch, self.rank, stream_id, 1, t]))
                quota -= 1
            t += 1

    def _checked(self, shard: str, samples: Iterator[RawSample]) -> Iterator[tuple[RawSample, np.ndarray | None]]:
        for sample in samples:
            try:
                yield sample, self.filter.indices(sample)
            except BadSampleError as err:
                self.bad(shard, sample.key, str(err))

    def _sites(self, epoch: int, stream_id: int) -> Iterator[tuple[RawSample, np.ndarray | None]]:
        """Checked samples of resampled shards through a shuffle buffer, endlessly."""
        # which shards, from a generator of its own: the next shard is known (and fetched, if
        # remote) while this one is read, whatever the shuffle below has drawn
        order = np.random.default_rng([self.seed, epoch, self.rank, stream_id, 2])
        rng = np.random.default_rng([self.seed, epoch, self.rank, stream_id, 0])
        resampled = (self.shards[int(order.integers(len(self.shards)))] for _ in itertools.count())
        buffer: list[tuple[RawSample, np.ndarray | None]] = []
        empty: set[str] = set()
        for shard, samples in iter_shards(resampled, self.crop_size, self.bad, self.transport):
            found = False
            for item in self._checked(shard, samples):
                found = True
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                i = int(rng.integers(len(buffer)))
                yield buffer[i]
                buffer[i] = item
            if not found:
                empty.add(shard)
                if len(empty) == len(self.shards):
                    raise RuntimeError(f"no readable sample in any of the {len(self.shards)} training shards")

    def _batch(
        self, group: list[tuple[RawSample, np.ndarray | None]], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        n_channels = len(self.filter.channels) if self.filter.channels else self.filter.n_channels
        image = np.empty((self.batch_size, n_channels, self.crop_size, self.crop_size), dtype=self.filter.dtype)
        labels = np.empty(self.batch_size, dtype=np.int64)
        k = self.crops_per_site
        for i, (sample, indices) in enumerate(group):
            fill_random_crops(
                sample.image(),
                image[i * k : (i + 1) * k],
                rng,
                augment=self.augment,
                channels=indices,
                permute=self.channel_permute,
            )
            labels[i * k : (i + 1) * k] = self.vocab.get(str(sample.meta.get(self.label_key)), -1)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(labels)}


class EvalStream(IterableDataset):
    """This rank's sites, each once, tiled into non-overlapping crops.

    Local shards are read by key (random access into the mapped file), batch j from worker j % W.
    Remote shards (`transport` given) can only be read front to back, so each worker streams
    whole shards, shard i of the rank's by worker i % W, and no batch spans two shards: every
    byte is fetched once, and the batch count does not depend on the number of workers.
    """

    def __init__(
        self,
        sites: list[tuple[int, str, str]],
        *,
        sites_per_batch: int,
        crop_size: int,
        sample_filter: SampleFilter,
        bad: BadSampleCounter,
        transport: Transport | None = None,
    ) -> None:
        super().__init__()
        self.sites = sites  # (manifest row, shard location, key), in manifest order
        self.sites_per_batch = max(1, sites_per_batch)
        self.crop_size = crop_size
        self.filter = sample_filter
        self.bad = bad
        self.transport = transport
        self.by_shard: dict[str, dict[str, int]] = {}  # shard -> key -> manifest row, in order
        for row, shard, key in sites:
            self.by_shard.setdefault(shard, {})[key] = row

    @property
    def rows(self) -> range:
        """The manifest rows this stream's sites cover (one contiguous block per rank)."""
        return range(self.sites[0][0], self.sites[-1][0] + 1) if self.sites else range(0)

    def __len__(self) -> int:
        if self.transport is None:
            return math.ceil(len(self.sites) / self.sites_per_batch)
        return sum(math.ceil(len(keys) / self.sites_per_batch) for keys in self.by_shard.values())

    @property
    def parallelism(self) -> int:
        """How many workers can be kept busy: one per batch (local) or per shard (remote)."""
        return len(self) if self.transport is None else len(self.by_shard)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.transport is not None:
            yield from self._streamed()
            return
        worker, workers = _worker()
        reader = ShardReader(self.bad)
        try:
            for j in range(worker, len(self), workers):
                group = self.sites[j * self.sites_per_batch : (j + 1) * self.sites_per_batch]
                batch = self._tiles((row, reader.read(shard, key, self.crop_size)) for row, shard, key in group)
                if batch is not None:
                    yield batch
        finally:
            reader.close()

    def _streamed(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = _worker()
        mine = list(self.by_shard)[worker::workers]
        for shard, samples in iter_shards(mine, self.crop_size, self.bad, self.transport):
            wanted = dict(self.by_shard[shard])
            group: list[tuple[int, RawSample]] = []
            for sample in samples:
                row = wanted.pop(sample.key, None)
                if row is None:
                    continue  # another rank's site, or one the manifest leaves out
                group.append((row, sample))
                if len(group) == self.sites_per_batch:
                    batch, group = self._tiles(group), []
                    if batch is not None:
                        yield batch
            for key in wanted:
                self.bad(shard, key, "not found in the shard stream")
            batch = self._tiles(group)
            if batch is not None:
                yield batch

    def _tiles(self, group) -> dict[str, torch.Tensor] | None:
        """One batch from (manifest row, sample or None) pairs; None if no sample was usable."""
        crops, index = [], []
        for row, sample in group:
            if sample is None:
                continue
            try:
                tiles = tile_crops(sample.image(), self.crop_size, self.filter.indices(sample))
            except BadSampleError as err:
                self.bad(sample.shard, sample.key, str(err))
                continue
            crops.append(tiles)
            index.append(np.full(len(tiles), row, dtype=np.int64))
        if not crops:
            return None
        return {"image": torch.from_numpy(np.concatenate(crops)), "site_index": torch.from_numpy(np.concatenate(index))}


class ShardReader:
    """Random access to samples by key, keeping the current shard mapped with its tar index (sites
    of a rank are contiguous in the manifest, so consecutive reads mostly hit the same shard)."""

    def __init__(self, on_bad: Callable[[str, str, str], None]) -> None:
        self.on_bad = on_bad
        self.path: str | None = None
        self.view: memoryview | None = None
        self.members: dict[str, dict[str, tarfile.TarInfo]] = {}

    def _open(self, path: str) -> None:
        self.close()
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for info in tar.getmembers():
                key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
                members.setdefault(key, {})[ext] = info
            view = memoryview(mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ))
        self.path, self.view, self.members = path, view, members

    def read(self, path: str, key: str, min_size: int) -> RawSample | None:
        try:
            if path != self.path:
                self._open(path)
            data = {ext: member_view(self.view, info) for ext, info in self.members.get(key, {}).items()}
            return parse_sample(key, path, data.get("npy"), data.get("json"), min_size)
        except (BadSampleError, tarfile.TarError, OSError, EOFError, ValueError) as err:
            self.on_bad(path, key, str(err))
            return None

    def close(self) -> None:
        """Forget the current shard (the mapping is released once no sample views it)."""
        self.path, self.view, self.members = None, None, {}
