"""Shard bytes from wherever they live: http(s), object stores (s3/gs/az through fsspec) and
`pipe:CMD` commands (webdataset's convention), read as one forward stream with bounded retries.

A dropped connection or a stalled read (the socket timeout) is retried with exponential backoff
by reopening the source at the byte already reached (an HTTP Range request, a seek, or for a
pipe re-running the command and discarding what was read), so a transient failure changes
nothing in the sample stream; after `retries` reopenings it is a ShardUnavailableError naming
the URL. A source that ends early without an error (a truncated object) is not retried: the tar
reader sees the short stream, and the sample reader counts it as a skip, like a truncated local
file.

Bytes are fetched by a background thread up to `read_ahead` bytes ahead of the consumer
(`ReadAhead`): a socket read releases the GIL, so the next members arrive while the current ones
are cropped, instead of the loader alternating between waiting for the network and computing.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from webdataset.gopen import gopen

from datamodules.config import DataConfig

log = logging.getLogger("datamodules")

#: fsspec protocols read through fsspec (install the `remote` extra: s3fs, gcsfs, adlfs)
FSSPEC_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")
HTTP_SCHEMES = ("http://", "https://")
REMOTE_PREFIXES = (*HTTP_SCHEMES, *FSSPEC_SCHEMES, "pipe:")
_DISCARD_CHUNK = 1 << 20
_ANSWERS = {
    FileNotFoundError: "not found",
    PermissionError: "access denied",
    IsADirectoryError: "not an object",
    ValueError: "cannot be opened as configured",  # e.g. adlfs given no account or connection string
}
#: HTTP statuses that an SDK's own error carries (gcsfs's HttpError.code, azure's status_code) and
#: that no retry changes
_STATUS_ANSWERS = {401: "no usable credentials", 403: "access denied", 404: "not found"}
#: words in the names of the SDKs' credential errors (botocore's NoCredentialsError,
#: google.auth's DefaultCredentialsError, azure's ClientAuthenticationError)
_CREDENTIAL_WORDS = ("Credential", "Authentication")


def is_remote(location: str) -> bool:
    """True for a URL or `pipe:` command, False for a local path (read by memory mapping)."""
    return location.startswith(REMOTE_PREFIXES)


class ShardUnavailableError(RuntimeError):
    """A remote source that kept failing after every retry (not an OSError on purpose: the sample
    reader skips damaged shards, but an unreachable store must stop the run, naming the URL)."""


@dataclass(frozen=True)
class Transport:
    """How remote bytes are fetched: `timeout` seconds per connect/read, `retries` reopenings
    with backoff `backoff * 2**attempt` seconds (capped at 30) before giving up, and up to
    `read_ahead` bytes of a shard fetched ahead of its consumer (0: fetched when asked for)."""

    timeout: float
    retries: int
    read_ahead: int
    backoff: float = 0.5

    @classmethod
    def from_config(cls, cfg: DataConfig | type[DataConfig] = DataConfig) -> Transport:
        """The transport `cfg`'s io_* settings describe (default: DataConfig's defaults)."""
        return cls(timeout=cfg.io_timeout, retries=cfg.io_retries, read_ahead=cfg.io_read_ahead_mb * 2**20)

    def open(self, url: str, cancelled: threading.Event | None = None) -> RetryingStream:
        return RetryingStream(url, self, cancelled)

    def read_bytes(self, url: str) -> bytes:
        """The whole object at `url` (a manifest), with the same retries as a shard."""
        with self.open(url) as stream:
            chunks = iter(lambda: stream.read(_DISCARD_CHUNK), b"")
            return b"".join(chunks)


class RetryingStream:
    """A read-only forward stream over `url` that survives transient failures (module docstring).

    `cancelled`, once set, ends a backoff at once with ShardUnavailableError: a reader that was
    dropped (ReadAhead.close) does not keep retrying, and logging retries, behind the run's back.
    """

    def __init__(self, url: str, transport: Transport, cancelled: threading.Event | None = None) -> None:
        self.url, self.transport = url, transport
        self.cancelled = cancelled or threading.Event()
        self.position = 0
        self._raw: BinaryIO | None = None
        self._failures = 0  # since the stream last got past the byte where it failed
        self._failed_at = -1
        # what a failed open or read raises: an object store's SDK has its own exception types for
        # a lost connection (botocore's EndpointConnectionError, aiohttp's ClientError, azure's
        # ServiceRequestError), none an OSError, so through fsspec any Exception is retried
        self._transient = (Exception,) if url.startswith(FSSPEC_SCHEMES) else (OSError, http.client.HTTPException)
        self._open(None)

    def _open(self, error: BaseException | None) -> None:
        """Open at `position`; after a failure, back off and retry while the budget lasts."""
        while True:
            if error is not None:
                self._failures += 1
                if self._failures > self.transport.retries:
                    raise ShardUnavailableError(
                        f"{self.url}: unreachable after {self.transport.retries} retries "
                        f"at byte {self.position} ({error})"
                    ) from None
                if self.cancelled.is_set():
                    raise ShardUnavailableError(f"{self.url}: not retried, its reader was closed")
                delay = min(30.0, self.transport.backoff * 2 ** (self._failures - 1))
                log.warning(
                    "retrying %s at byte %d in %.1fs (%d of %d): %s",
                    self.url,
                    self.position,
                    delay,
                    self._failures,
                    self.transport.retries,
                    error,
                )
                if self.cancelled.wait(delay):
                    raise ShardUnavailableError(f"{self.url}: not retried, its reader was closed")
            try:
                self._raw = _open_at(self.url, self.position, self.transport.timeout)
                return
            except ShardUnavailableError:  # already final (a missing fsspec backend)
                raise
            except urllib.error.HTTPError as err:
                if err.code < 500 and err.code not in (408, 429):
                    raise ShardUnavailableError(f"{self.url}: HTTP {err.code} {err.reason}") from None
                error = err
            except self._transient as err:
                answer = _final_answer(err)
                if answer is not None:
                    raise ShardUnavailableError(f"{self.url}: {answer} ({err})") from None
                error = err

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                data = self._raw.read(size)
            except self._transient as err:
                self._close_raw()
                self._failed_at = self.position
                self._open(err)
                continue
            self.position += len(data)
            if self.position > self._failed_at:
                self._failures = 0  # progress: a later failure gets the full budget again
            return data

    def _close_raw(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.close()
            except self._transient:
                pass  # a failed pipe's exit status, a dead store: the reopen (or the caller) reports the failure

    def close(self) -> None:
        self._close_raw()

    def __enter__(self) -> RetryingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:  # webdataset's tar iterator names the stream in its errors
        return self.url


Member = tuple[str, bytes]


class ReadAhead(Iterator[Member]):
    """The (name, bytes) items of `members(cancelled)`, produced by a background thread that starts at once
    and runs at most `budget` bytes ahead of the consumer (always at least one item, however large).

    The items and an error raised by the producer arrive in the producer's order, so the consumer
    sees exactly what it would have read itself, at the same point. close(), or dropping the
    object, stops the producer at its next item and closes `members()` in its thread, which closes
    the stream; the consumer never waits for that. close() also sets the `cancelled` event handed
    to `members`, which a RetryingStream waiting out a backoff obeys at once. With `budget` <= 0
    there is no thread: `members` is read when asked.
    """

    def __init__(self, members: Callable[[threading.Event], Iterator[Member]], budget: int) -> None:
        self._direct: Iterator[Member] | None = None
        self._queue: _ReadAheadQueue | None = None
        self._finished = False
        if budget <= 0:
            self._direct = members(threading.Event())  # read in the caller's thread: nothing to cancel
            return
        self._queue = _ReadAheadQueue(budget)
        # the thread holds the queue, not this object, so dropping the reader reaches __del__
        threading.Thread(target=self._queue.produce, args=(members,), daemon=True, name="phenoscale-read-ahead").start()

    def __next__(self) -> Member:
        if self._direct is not None:
            return next(self._direct)
        if self._finished:  # the producer's end or error was handed over, or the reader was closed
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, tuple):
            return item
        self._finished = True
        if item is None:
            raise StopIteration
        raise item  # the producer's error, where the consumer would have met it

    def close(self) -> None:
        self._finished = True
        if self._queue is not None:
            self._queue.stop()
        if self._direct is not None:
            self._direct.close()

    def __del__(self) -> None:
        self.close()


class _ReadAheadQueue:
    """The hand-over between ReadAhead's producer thread and its consumer, bounded in bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0  # bytes queued, not yet taken by the consumer
        self.items: collections.deque[Member | BaseException | None] = collections.deque()  # None: the end
        self.cancelled = threading.Event()  # set by stop(); also seen by a producer blocked outside the queue
        self.changed = threading.Condition()

    def produce(self, members: Callable[[threading.Event], Iterator[Member]]) -> None:
        end: BaseException | None = None
        try:
            with contextlib.closing(members(self.cancelled)) as produced:
                for name, data in produced:
                    size = len(data)
                    with self.changed:
                        self.changed.wait_for(lambda size=size: self._may_queue(size))
                        if self.cancelled.is_set():
                            return
                        self.items.append((name, data))
                        self.held += size
                        self.changed.notify_all()
        except BaseException as err:  # handed to the consumer, which raises it where it would have
            end = err
        with self.changed:
            self.items.append(end)
            self.changed.notify_all()

    def _may_queue(self, size: int) -> bool:
        """Stopped, or room for `size` bytes (one member over the budget passes when nothing else is held)."""
        return self.cancelled.is_set() or not self.held or self.held + size <= self.budget

    def get(self) -> Member | BaseException | None:
        """The next item: a member, the producer's error, or None at the end."""
        with self.changed:
            self.changed.wait_for(lambda: self.items)
            item = self.items.popleft()
            if isinstance(item, tuple):
                self.held -= len(item[1])
                self.changed.notify_all()
        return item

    def stop(self) -> None:
        with self.changed:
            self.cancelled.set()
            self.changed.notify_all()


def _final_answer(err: Exception) -> str | None:
    """What a failed open says for good, which no retry changes, else None.

    s3fs maps a store's 404 / 403 to FileNotFoundError / PermissionError; gcsfs raises a 403 as a
    plain OSError("Forbidden: ...") and a 401 as its HttpError with the status in `code`; missing
    credentials are the SDK's own error class (botocore, google.auth, azure); a filesystem that
    refuses its settings raises ValueError (adlfs without an account, gcsfs's 400 "invalid").
    """
    for kind, text in _ANSWERS.items():
        if isinstance(err, kind):
            return text
    for attribute in ("status_code", "code"):
        status = getattr(err, attribute, None)
        if isinstance(status, int) and status in _STATUS_ANSWERS:
            return _STATUS_ANSWERS[status]
    if isinstance(err, OSError) and str(err).startswith("Forbidden:"):
        return "access denied"
    if any(word in cls.__name__ for cls in type(err).__mro__ for word in _CREDENTIAL_WORDS):
        return "no usable credentials"
    return None


def _open_at(url: str, offset: int, timeout: float) -> BinaryIO:
    """`url` opened for reading from byte `offset`."""
    if url.startswith(HTTP_SCHEMES):
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        response = urllib.request.urlopen(request, timeout=timeout)
        if offset and response.status != 206:  # the server ignores ranges: read up to where we were
            _discard(response, offset)
        return response
    if url.startswith(FSSPEC_SCHEMES):
        try:
            import fsspec

            stream = fsspec.open(url, "rb").open()
        except ImportError as err:  # fsspec itself, or the store's backend (s3fs, gcsfs, adlfs)
            raise ShardUnavailableError(
                f"{url}: reading object stores needs fsspec and its backend: pip install 'phenoscale[remote]' ({err})"
            ) from None
        stream.seek(offset)
        return stream
    if url.startswith("pipe:"):
        stream = gopen(url, "rb")
        _discard(stream, offset)
        return stream
    raise ValueError(f"{url!r} is not a remote location (allowed: {', '.join(REMOTE_PREFIXES)})")


def _discard(stream: BinaryIO, count: int) -> None:
    """Skip `count` bytes of a source that cannot seek; EOFError if it is shorter than that now."""
    left = count
    while left > 0:
        chunk = stream.read(min(left, _DISCARD_CHUNK))
        if not chunk:
            raise EOFError(f"source is now shorter than the {count} bytes read before the failure")
        left -= len(chunk)
