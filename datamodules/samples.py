"""Reading samples out of shard tars, with bad input skipped, counted and logged, never fatal.

A sample is checked when it is read (npy header, JSON, channel count, size), before it enters
the shuffle buffer: the check costs microseconds, and a sample that passes it cannot fail to
decode later. That keeps the batch stream a pure function of the seed, which exact resume
(fast-forwarding without decoding) relies on.
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import tarfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from datamodules.schema import ALLOWED_DTYPES
from datamodules.transport import ReadAhead, Transport, is_remote

log = logging.getLogger("datamodules")


@dataclass(slots=True)
class RawSample:
    """A checked, not yet decoded site: metadata and the .npy bytes with their parsed header."""

    key: str
    shard: str
    meta: dict
    data: bytes | memoryview  # a view into the memory-mapped shard when streaming
    offset: int
    shape: tuple[int, int, int]
    dtype: np.dtype

    def image(self) -> np.ndarray:
        """The C x H x W array, zero-copy over the shard bytes (read-only)."""
        count = self.shape[0] * self.shape[1] * self.shape[2]
        return np.frombuffer(self.data, self.dtype, count, self.offset).reshape(self.shape)


class BadSampleError(ValueError):
    """A sample that cannot be used; the reader logs it with shard and key and moves on."""


NPY_HEADER_MAX = 4096  # a C x H x W header is ~128 bytes; only the header is copied to parse it


def parse_sample(
    key: str, shard: str, npy: bytes | memoryview | None, meta_json: bytes | memoryview | None, min_size: int
) -> RawSample:
    """Check a sample's bytes without decoding the pixels; raise BadSampleError saying why."""
    if npy is None or meta_json is None:
        raise BadSampleError("missing .npy or .json member")
    try:
        meta = json.loads(bytes(meta_json))
    except (ValueError, UnicodeDecodeError) as err:
        raise BadSampleError(f"unreadable JSON ({err})") from None
    stream = io.BytesIO(bytes(npy[:NPY_HEADER_MAX]))
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except (ValueError, OSError, SyntaxError) as err:
        raise BadSampleError(f"unreadable .npy header ({err})") from None
    if fortran or len(shape) != 3 or dtype not in ALLOWED_DTYPES:
        raise BadSampleError(
            f".npy is {dtype} {shape}{' fortran' if fortran else ''}, expected C-order C x H x W uint8/uint16"
        )
    offset = stream.tell()
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(npy) - offset != expected:
        raise BadSampleError(f".npy truncated: {len(npy) - offset} of {expected} pixel bytes")
    channels = meta.get("channels") if isinstance(meta, dict) else None
    if not isinstance(channels, list) or len(channels) != shape[0]:
        raise BadSampleError(f"JSON channels {channels!r} do not match the {shape[0]} image channels")
    if shape[1] < min_size or shape[2] < min_size:
        raise BadSampleError(f"image {shape[1]}x{shape[2]} is smaller than the {min_size}px crop")
    return RawSample(key, shard, meta, npy, offset, tuple(int(s) for s in shape), dtype)


#: a shard's (file name, bytes) in stored order; closed once read (a generator or a ReadAhead)
Entries = Generator[tuple[str, bytes | memoryview], None, None] | ReadAhead


def iter_shard(
    path: str,
    min_size: int,
    on_bad: Callable[[str, str, str], None],
    transport: Transport | None = None,
    entries: Entries | None = None,
) -> Iterator[RawSample]:
    """Checked samples of one tar, in stored order; bad samples and a broken tail go to `on_bad`.

    A local shard is memory-mapped and samples are views into it: no copy of the pixels is made
    before cropping, and the page cache is shared by all workers reading the same shard. A URL
    or `pipe:` shard is read as one forward tar stream (`transport` says how, datamodules.transport);
    an unreachable one raises ShardUnavailableError rather than being skipped. `entries` are the
    shard's files when shard_entries opened it already (iter_shards does, to fetch ahead).
    """
    key, members = None, {}
    try:
        entries = entries if entries is not None else shard_entries(path, transport)
        for name, data in entries:
            member_key, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if member_key != key:
                if key is not None:
                    yield from _checked(key, path, members, min_size, on_bad)
                key, members = member_key, {}
            members[ext] = data
        if key is not None:
            yield from _checked(key, path, members, min_size, on_bad)
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        on_bad(path, key or "?", f"shard unreadable from here on ({err})")
    finally:  # read to the end, failed or dropped: a remote shard's producer stops now, not when collected
        if entries is not None:
            entries.close()


def iter_shards(
    paths: Iterable[str], min_size: int, on_bad: Callable[[str, str, str], None], transport: Transport | None = None
) -> Iterator[tuple[str, Iterator[RawSample]]]:
    """(path, its samples as iter_shard reads them) for each of `paths`, in order.

    A remote shard is opened when the reader asks for the second sample of the one before it, so two
    arrive at once (each up to the transport's read-ahead budget): the reader does not stall on
    every new connection, and two connections keep it fed where one alone is slower than the
    cropping (a TCP window still opening, an object store's rate per connection). Each shard's
    samples must be used up before the next pair is asked for; dropping them ends the sequence
    (the shard fetched ahead is closed with them).
    """
    paths = iter(paths)
    current = _open_next(paths, transport)
    while current is not None:
        path, entries = current
        following = _Following(paths, transport)
        yield path, following.while_reading(iter_shard(path, min_size, on_bad, entries=entries))
        current = following.take()


def shard_entries(path: str, transport: Transport | None = None) -> Entries:
    """The (name, bytes) files of one shard: views into the mapped file (local, read when asked
    for), or for a remote shard a ReadAhead that starts fetching now."""
    if is_remote(path):
        transport = transport or Transport.from_config()
        return ReadAhead(lambda cancelled: _tar_stream_members(path, transport, cancelled), transport.read_ahead)
    return _mapped_members(path)


def _open_next(paths: Iterator[str], transport: Transport | None) -> tuple[str, Entries] | None:
    path = next(paths, None)
    return None if path is None else (path, shard_entries(path, transport))


class _Following:
    """The shard after the one being read, opened once that one has started (iter_shards)."""

    def __init__(self, paths: Iterator[str], transport: Transport | None) -> None:
        self.paths, self.transport = paths, transport
        self.opened = False
        self.shard: tuple[str, Entries] | None = None

    def open(self) -> None:
        if not self.opened:
            self.opened = True
            self.shard = _open_next(self.paths, self.transport)

    def while_reading(self, samples: Iterator[RawSample]) -> Iterator[RawSample]:
        try:
            for sample in samples:
                yield sample
                self.open()  # once this shard has delivered a sample: it had a head start
        except BaseException:  # the run stops (an unreachable store) or the reader let go: not wanted
            if self.shard is not None:
                self.shard[1].close()
            raise

    def take(self) -> tuple[str, Entries] | None:
        self.open()
        return self.shard


def _mapped_members(path: str) -> Generator[tuple[str, memoryview], None, None]:
    """(name, bytes) of a local tar's files: views into the mapped file."""
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        view = memoryview(mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ))
        for info in tar:
            if info.isfile():
                yield info.name, member_view(view, info)
            tar.members.clear()  # sequential pass: do not keep every TarInfo of a 1 GB shard


def _tar_stream_members(url: str, transport: Transport, cancelled: threading.Event) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of a remote tar's files, read as a stream: one read per header and per member.

    Not webdataset's tar_file_iterator (tarfile's stream mode): that reads in 10 KB records and
    copies each member twice, which halved the HTTP loader's throughput (benchmarks/bench_loader.py).
    Handles ustar, pax (`path`) and GNU long-name headers; a short read is a tarfile.ReadError.
    """
    with transport.open(url, cancelled) as stream:
        long_name: str | None = None
        while not cancelled.is_set():  # a closed reader: no more members fetched for nobody
            header = stream.read(tarfile.BLOCKSIZE)
            if not header or header == tarfile.NUL * tarfile.BLOCKSIZE:
                return  # end of archive (a tar may end without its two zero blocks)
            if len(header) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"truncated tar header ({len(header)} bytes)")
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            data = _read_exactly(stream, info.size)
            _read_exactly(stream, -info.size % tarfile.BLOCKSIZE)  # padding to the next block
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(tarfile.NUL).decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                long_name = _pax_path(data) or long_name
            elif info.type in tarfile.REGULAR_TYPES:
                yield (long_name or info.name), data
                long_name = None


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size) if size else b""
    while len(data) < size:  # a source may return less than asked before its end
        more = stream.read(size - len(data))
        if not more:
            raise tarfile.ReadError(f"unexpected end of data ({len(data)} of {size} bytes)")
        data += more
    return data


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<name>\\n" records)."""
    for record in data.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[5:].decode("utf-8", "surrogateescape")
    return None


def member_view(view: memoryview, info: tarfile.TarInfo) -> memoryview:
    """The bytes of one tar member inside the mapped shard; ReadError if the file ends early."""
    data = view[info.offset_data : info.offset_data + info.size]
    if len(data) != info.size:
        raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
    return data


def _checked(key: str, path: str, members: dict, min_size: int, on_bad) -> Iterator[RawSample]:
    try:
        yield parse_sample(key, path, members.get("npy"), members.get("json"), min_size)
    except BadSampleError as err:
        on_bad(path, key, str(err))


def log_bad_sample(shard: str, key: str, reason: str) -> None:
    """Default report of a skipped sample: a warning naming shard and key."""
    log.warning("skipping bad sample %r in %s: %s", key, shard, reason)
