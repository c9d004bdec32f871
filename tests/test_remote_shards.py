"""Shards from URLs: http:// from 127.0.0.1, object stores served on 127.0.0.1 and read through
fsspec as a real bucket would be (s3:// from moto's S3 server, gs:// from a GCS emulator, az://
from Azurite) and `pipe:` commands give the same training batches, resume and evaluation as the
local directory; a failing server (HTTP or S3) is retried, then named, never a hang; a missing
object, refused access or missing credentials fail at once; a truncated remote shard is a counted
skip."""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.registry import _registry as fsspec_registry  # protocol -> class, once imported

from benchmarks.harness import serve_directory, wait_for_port
from datamodules import build_datamodule
from datamodules.locations import shard_locations
from datamodules.samples import iter_shard, iter_shards, shard_entries
from datamodules.transport import ReadAhead, ShardUnavailableError, Transport
from run_helpers import audit, fail_on_bad, free_port, run_cli, tiny_overrides, train_cmd
from test_streaming import config, epoch_batches, same, write_toy_shards


def brace_pattern(shards: Path, prefix: str) -> str:
    """`prefix/<name>-{000000..00000N}.tar` over the shard files of `shards`."""
    names = sorted(p.name for p in shards.glob("*.tar"))
    stem = names[0].rsplit("-", 1)[0]
    assert names == [f"{stem}-{i:06d}.tar" for i in range(len(names))]
    return f"{prefix}/{stem}-{{000000..{len(names) - 1:06d}}}.tar"


def eval_tiles(dm) -> dict[int, list[int]]:
    """manifest row -> pixel sums of its tiles, over every evaluation batch."""
    tiles: dict[int, list[int]] = {}
    for batch in dm.eval_dataloader():
        for row, crop in zip(batch["site_index"].tolist(), batch["image"]):
            tiles.setdefault(row, []).append(int(crop.sum()))
    return tiles


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_toy_shards(tmp_path / "shards")


class LocalStore:
    """An object store served on 127.0.0.1 for the tests, its bucket `phenoscale-test` reached
    through `fs` (its fsspec filesystem) and as `scheme`:// URLs."""

    scheme: str
    fs: Any

    def upload(self, directory: Path) -> str:
        """`directory`'s files under a prefix named after its parent (each test's tmp_path): the URL."""
        self.fs.put(f"{directory}/", f"phenoscale-test/{directory.parent.name}/", recursive=True)
        return f"{self.scheme}://phenoscale-test/{directory.parent.name}"


class LocalS3(LocalStore):
    """moto's S3 server on 127.0.0.1, found by boto through AWS_ENDPOINT_URL as a real endpoint is;
    stop() / start() for outages (the buckets live in this process, so they survive a restart)."""

    scheme = "s3"

    def __init__(self, port: int) -> None:
        from s3fs import S3FileSystem

        self.port = port
        self.start()
        self.fs = S3FileSystem(skip_instance_cache=True)
        self.fs.mkdir("phenoscale-test")

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # moto leaves the socket listening: refuse, not queue, connections


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as env:  # also seen by DataLoader workers and CLI subprocesses
        port = free_port()
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "phenoscale-test",
            "AWS_SECRET_ACCESS_KEY": "phenoscale-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "1",  # botocore's own retries off: an outage reaches ours sooner
        }.items():
            env.setenv(name, value)
        store = LocalS3(port)
        yield store
        store.stop()


class LocalGCS(LocalStore):
    """A GCS emulator on 127.0.0.1 (gcp-storage-emulator), found by gcsfs through
    STORAGE_EMULATOR_HOST, the endpoint override Google's own clients read."""

    scheme = "gs"

    def __init__(self, port: int) -> None:
        from gcp_storage_emulator.server import create_server
        from gcsfs.core import GCSFileSystem

        self.server = create_server("127.0.0.1", port, in_memory=True)
        self.server.start()
        self.fs = GCSFileSystem(token="anon", skip_instance_cache=True)
        self.fs.mkdir("phenoscale-test")

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def gcs() -> Iterator[LocalGCS]:
    import fsspec
    from gcsfs.core import GCSFileSystem

    with pytest.MonkeyPatch.context() as env:  # also seen by DataLoader workers and CLI subprocesses
        port = free_port()
        env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        # gcsfs otherwise asks each bucket's layout over gRPC first, which an emulator does not serve
        # (60 s per bucket): read when gcsfs is imported (CLI subprocesses), so in this process,
        # where it may be imported already, fsspec is handed the class that setting selects
        env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        for protocol in ("gs", "gcs"):
            env.setitem(fsspec_registry, protocol, GCSFileSystem)
        env.setenv("FSSPEC_GCS_TOKEN", "anon")  # no Google login: fsspec's config, from the environment
        env.setitem(fsspec.config.conf, "gcs", {"token": "anon"})  # ... as fsspec read it at its import
        store = LocalGCS(port)
        yield store
        store.stop()


AZURITE = Path(sys.prefix) / "azurite/node_modules/.bin/azurite-blob"  # make install puts it there (npm)
#: the emulator's fixed development account (published in Azure's documentation, not a secret)
AZURITE_ACCOUNT = (
    "AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class LocalAzure(LocalStore):
    """Azurite's blob service on 127.0.0.1 (its own Node.js process, in memory), found by adlfs
    through AZURE_STORAGE_CONNECTION_STRING as a real account is."""

    scheme = "az"

    def __init__(self, port: int) -> None:
        from adlfs import AzureBlobFileSystem

        self.connection = (
            f"DefaultEndpointsProtocol=http;{AZURITE_ACCOUNT};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        )
        # --skipApiVersionCheck: the azure SDK may speak a newer API version than the pinned Azurite knows
        command = [AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
        self.process = subprocess.Popen(
            [*command, "--silent", "--skipApiVersionCheck"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(port, self.process)
        self.fs = AzureBlobFileSystem(connection_string=self.connection, skip_instance_cache=True)
        self.fs.mkdir("phenoscale-test")

    def stop(self) -> None:
        self.process.kill()  # in memory: nothing to flush, and Node.js does not always stop on SIGTERM
        self.process.wait(10)


@pytest.fixture(scope="module")
def azure() -> Iterator[LocalAzure]:
    if not AZURITE.exists():
        pytest.skip(f"az:// needs Azurite at {AZURITE}: make install puts it there where npm is installed")
    with pytest.MonkeyPatch.context() as env:  # also seen by DataLoader workers and CLI subprocesses
        store = LocalAzure(free_port())
        env.setenv("AZURE_STORAGE_CONNECTION_STRING", store.connection)
        yield store
        store.stop()


@pytest.mark.parametrize("workers", [0, 2])
def test_http_object_stores_and_pipe_match_the_local_directory(
    shards: Path, workers: int, s3: LocalS3, gcs: LocalGCS, azure: LocalAzure
) -> None:
    local = build_datamodule(config(shards, steps_per_epoch=12, num_workers=workers), seed=3)
    reference, tiles = epoch_batches(local.train_dataloader()), eval_tiles(local)
    assert len(tiles) == local.manifest.height
    bucket, gcs_bucket, container = s3.upload(shards), gcs.upload(shards), azure.upload(shards)
    with serve_directory(shards) as base:
        sources = {
            "http": (brace_pattern(shards, base), None),
            "s3": (brace_pattern(shards, bucket), None),
            "s3 prefix, listed": (bucket, None),
            "s3 glob, listed": (f"{bucket}/shard-00000*.tar", None),
            "gs": (brace_pattern(shards, gcs_bucket), None),
            "gs prefix, listed": (gcs_bucket, None),
            "az": (brace_pattern(shards, container), None),
            "az glob, listed": (f"{container}/shard-*.tar", None),
            "pipe": (brace_pattern(shards, f"pipe:cat {shards}"), None),
            "http, data.manifest": (brace_pattern(shards, base), str(shards / "manifest.parquet")),
        }
        for name, (pattern, manifest) in sources.items():
            remote = build_datamodule(
                config(pattern, steps_per_epoch=12, num_workers=workers, manifest=manifest), seed=3
            )
            assert remote.manifest.equals(local.manifest), name
            assert same(epoch_batches(remote.train_dataloader()), reference), name
            assert eval_tiles(remote) == tiles, name  # every site once, the same tiles
            resumed = build_datamodule(
                config(pattern, steps_per_epoch=12, num_workers=workers, manifest=manifest), seed=3
            )
            resumed.load_state_dict({"epoch": 0, "batches": 5})
            assert same(epoch_batches(resumed.train_dataloader()), reference[5:]), name
            assert remote.bad_samples == 0


class DyingHandler(http.server.SimpleHTTPRequestHandler):
    """Sends half of the first shard asked for, then the server goes away (or stalls, see `stall`)."""

    stall = False

    def do_GET(self) -> None:
        if not self.path.endswith(".tar"):
            return super().do_GET()
        data = Path(self.directory, self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        if self.stall:
            time.sleep(30)  # a server that hangs: only the client's read timeout gets past it
        else:
            self.server.shutdown()  # a handler thread, not the serving loop: this returns
            self.server.server_close()  # later connections are refused


@pytest.mark.parametrize("stall", [False, True], ids=["dies", "stalls"])
def test_a_server_failing_mid_shard_is_retried_then_named(
    shards: Path, stall: bool, caplog: pytest.LogCaptureFixture
) -> None:
    handler = type("Handler", (DyingHandler,), {"stall": stall})
    with serve_directory(shards, handler) as base:
        dm = build_datamodule(config(brace_pattern(shards, base), steps_per_epoch=4, io_retries=2, io_timeout=1.0))
        start = time.monotonic()
        with (
            caplog.at_level(logging.WARNING, logger="datamodules"),
            pytest.raises(ShardUnavailableError, match=rf"{base}/shard-0000\d\d\.tar.*after 2 retries"),
        ):
            epoch_batches(dm.train_dataloader())
        assert time.monotonic() - start < 20  # bounded: 2 retries x (backoff + 1 s timeout)
    # each shard in flight (the one read and the next, see iter_shards) used its budget of retries
    retried = collections.Counter(re.findall(r"retrying (\S+) at byte", caplog.text))
    assert 1 <= len(retried) <= 2 and set(retried.values()) == {2}, caplog.text


def test_a_truncated_remote_shard_is_a_counted_skip(shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    tar = shards / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with serve_directory(shards) as base, caplog.at_level(logging.WARNING, logger="datamodules"):
        dm = build_datamodule(config(brace_pattern(shards, base), steps_per_epoch=40), seed=0)
        assert len(epoch_batches(dm.train_dataloader())) == 40  # training went on, full epoch
        counted = dm.bad_samples
        assert counted >= 1 and f"{base}/shard-000001.tar" in caplog.text
        assert "unreadable from here on" in caplog.text
        tiles = eval_tiles(dm)
    assert 0 < dm.manifest.height - len(tiles) < 5  # only that shard's tail is missing
    assert dm.bad_samples > counted  # ... counted again by the evaluation pass


def test_remote_input_errors_name_the_location(shards: Path) -> None:
    with serve_directory(shards) as base:
        with pytest.raises(ValueError, match="names no .tar shard file"):
            build_datamodule(config(f"{base}/readme.txt"))
        with pytest.raises(ValueError, match=r"manifest.parquet disagrees with the shards: \['shard-000005.tar'"):
            build_datamodule(config(f"{base}/shard-{{000000..000099}}.tar"))
        with pytest.raises(ShardUnavailableError, match="HTTP 404"):
            build_datamodule(config(f"{base}/elsewhere/shard-000000.tar"))


#: a transport whose retries would take over 2 minutes: an answer that fails "at once" is no retry
PATIENT = Transport(timeout=10, retries=5, read_ahead=0, backoff=5.0)


@contextlib.contextmanager
def fresh_clients(filesystem: type) -> Iterator[None]:
    """`filesystem`'s cached clients dropped before and after: they hold the fixture's endpoint and keys."""
    filesystem.clear_instance_cache()
    try:
        yield
    finally:
        filesystem.clear_instance_cache()


#: what building a data module over a prefix in a missing bucket says (s3fs and adlfs list it as empty)
MISSING_BUCKET_LISTING = {
    "s3": "matches no .tar files",
    "gcs": "cannot list the shards .*FileNotFoundError",
    "azure": "matches no .tar files",
}


@pytest.mark.parametrize("store", list(MISSING_BUCKET_LISTING))
def test_a_missing_object_fails_at_once_naming_it(shards: Path, store: str, request: pytest.FixtureRequest) -> None:
    """A store's "no such key / bucket" is an answer, not a network failure: no retries, no backoff."""
    local: LocalStore = request.getfixturevalue(store)
    bucket = local.upload(shards)
    transport = Transport(timeout=10, retries=5, read_ahead=2**20, backoff=2.0)  # retrying would take > 60 s
    start = time.monotonic()
    for missing in (f"{bucket}/shard-000099.tar", f"{local.scheme}://no-such-bucket/shard-000000.tar"):
        with pytest.raises(ShardUnavailableError, match=rf"{re.escape(missing)}: not found"):
            list(iter_shard(missing, 1, fail_on_bad, transport))
    with pytest.raises(ShardUnavailableError, match=r"elsewhere/manifest.parquet: not found"):
        build_datamodule(config(f"{bucket}/elsewhere/shard-000000.tar"))
    with pytest.raises(ValueError, match=r"matches no .tar files"):
        build_datamodule(config(f"{bucket}/elsewhere/"))  # an empty prefix
    missing_bucket = f"{local.scheme}://no-such-bucket/rpi"
    with pytest.raises(
        (ValueError, ShardUnavailableError), match=rf"{re.escape(missing_bucket)}'?:? {MISSING_BUCKET_LISTING[store]}"
    ):
        build_datamodule(config(missing_bucket))
    assert time.monotonic() - start < 30


class RefusingGCS(http.server.SimpleHTTPRequestHandler):
    """Answers every request as Cloud Storage answers a caller it refuses, with `status`."""

    status = 403

    def do_GET(self) -> None:
        body = json.dumps({"error": {"code": self.status, "message": "caller does not have storage.objects.get"}})
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


@pytest.mark.parametrize(("status", "answer"), [(403, "access denied"), (401, "no usable credentials")])
def test_a_refused_gcs_caller_fails_at_once(
    gcs: LocalGCS, status: int, answer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gcsfs raises a 403 as a bare OSError and a 401 as its own HttpError: no retry changes either
    (both used to be retried with backoff, then reported as "unreachable")."""
    from gcsfs.core import GCSFileSystem

    url = "gs://phenoscale-test/rpi/shard-000000.tar"
    with serve_directory(tmp_path, type("Refusing", (RefusingGCS,), {"status": status})) as base:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", base)
        with fresh_clients(GCSFileSystem), pytest.raises(ShardUnavailableError, match=rf"{re.escape(url)}: {answer}"):
            PATIENT.open(url)


def test_an_s3_outage_is_retried_and_the_stream_goes_on(
    shards: Path, s3: LocalS3, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore reports a lost endpoint as its own EndpointConnectionError, not an OSError: it must
    reach the same retries as an HTTP failure (it used to end the run at once, naming no shard)."""
    url = f"{s3.upload(shards)}/shard-000000.tar"
    expected = (shards / "shard-000000.tar").read_bytes()
    transport = Transport(timeout=10, retries=8, read_ahead=0, backoff=0.25)
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        stream = transport.open(url)  # opened (s3fs has asked for the object's size)
        s3.stop()
        back = threading.Timer(1.5, s3.start)  # down for longer than s3fs's own retries
        back.start()
        try:
            data = stream.read()
        finally:
            back.join()
    assert data == expected
    assert f"retrying {url} at byte 0" in caplog.text


def test_an_s3_store_that_stays_down_is_named(shards: Path, s3: LocalS3) -> None:
    url = f"{s3.upload(shards)}/shard-000000.tar"
    stream = Transport(timeout=10, retries=1, read_ahead=0, backoff=0.1).open(url)
    s3.stop()
    try:
        with pytest.raises(ShardUnavailableError, match=rf"{re.escape(url)}: unreachable after 1 retries"):
            stream.read()
    finally:
        s3.start()


def test_missing_s3_credentials_fail_at_once(shards: Path, s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3fs import S3FileSystem

    url = f"{s3.upload(shards)}/shard-000000.tar"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find either
    with fresh_clients(S3FileSystem):
        with pytest.raises(ShardUnavailableError, match=rf"{re.escape(url)}: no usable credentials"):
            PATIENT.open(url)
        prefix = url.rsplit("/", 1)[0]
        with pytest.raises(ShardUnavailableError, match=rf"{re.escape(prefix)}: cannot list .*NoCredentialsError"):
            shard_locations(prefix)


def test_an_azure_store_without_an_account_fails_at_once(
    shards: Path, azure: LocalAzure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """adlfs refuses to start with no account or connection string (a ValueError): it used to be
    retried with backoff and then reported as "unreachable"."""
    from adlfs import AzureBlobFileSystem

    url = f"{azure.upload(shards)}/shard-000000.tar"
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME"):
        monkeypatch.delenv(name, raising=False)
    with fresh_clients(AzureBlobFileSystem):
        with pytest.raises(ShardUnavailableError, match=rf"{re.escape(url)}: cannot be opened as configured"):
            PATIENT.open(url)


def test_a_store_without_its_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "adlfs", None)  # as if not installed (an import of it fails) ...
    monkeypatch.delitem(fsspec_registry, "az", raising=False)  # ... nor imported yet
    with pytest.raises(ShardUnavailableError, match=r"az://c/shard-000000.tar: .*pip install 'phenoscale\[remote\]'"):
        Transport(timeout=1, retries=0, read_ahead=0).open("az://c/shard-000000.tar")


class Members:
    """A producer for ReadAhead: `count` members of `size` bytes, then `error` if given; records
    how many members it has handed over and whether it was closed."""

    def __init__(self, count: int, size: int, error: Exception | None = None) -> None:
        self.count, self.size, self.error = count, size, error
        self.produced, self.closed = 0, threading.Event()

    def __call__(self, cancelled: threading.Event):
        try:
            for i in range(self.count):
                yield f"m{i}", bytes([i]) * self.size
                self.produced += 1
            if self.error is not None:
                raise self.error
        finally:
            self.closed.set()


def wait_until(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("budget", [0, 1, 10**6])
def test_read_ahead_hands_over_every_member_and_the_error_in_order(budget: int) -> None:
    members = Members(5, 100, OSError("connection reset"))
    got = []
    with pytest.raises(OSError, match="connection reset"):
        for name, data in ReadAhead(members, budget):
            got.append((name, data[0], len(data)))
    assert got == [(f"m{i}", i, 100) for i in range(5)]  # a 100-byte member passes a 1-byte budget alone
    assert members.closed.is_set()


def test_read_ahead_stays_within_its_budget_and_stops_when_dropped() -> None:
    members = Members(20, 100)
    reader = ReadAhead(members, 350)
    assert next(reader)[0] == "m0"
    # 3 members (300 bytes) fit in the queue; the producer holds the 5th until there is room
    assert wait_until(lambda: members.produced == 4) and not wait_until(lambda: members.produced > 4, 0.3)
    assert [next(reader)[0] for _ in range(2)] == ["m1", "m2"]
    assert wait_until(lambda: members.produced == 6)
    reader.close()
    assert wait_until(members.closed.is_set)  # the producer closed its source in its own thread
    assert members.produced == 6


def test_a_closed_reader_stops_retrying_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """A shard dropped by its reader (the epoch ended, another shard failed) must not keep retrying
    and logging behind the run: close() ends the producer's backoff."""
    port = free_port()  # a port nothing listens on: every connect is refused
    transport = Transport(timeout=1, retries=5, read_ahead=2**20, backoff=0.5)
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        reader = shard_entries(f"http://127.0.0.1:{port}/shard-000000.tar", transport)
        assert wait_until(lambda: "retrying" in caplog.text)  # waiting out its first 0.5 s backoff
        reader.close()
        time.sleep(2.0)  # without the cancel: 2 more retries by now (after the 0.5 and 1 s backoffs)
    assert caplog.text.count("retrying") == 1


def test_a_failing_shard_stops_the_fetch_of_the_next_one_at_once(shards: Path) -> None:
    """The shard read fails for good after the next one was opened: the next one's producer stops
    then, not when the failure's traceback (kept by Lightning, pytest, a log handler) is collected."""
    first, second = sorted(shards.glob("*.tar"))[:2]
    before = set(threading.enumerate())

    def fetching() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "phenoscale-read-ahead" and t not in before]

    # half of the first shard, then the command fails: a read error, and with no retries left, fatal
    broken = f"pipe:head -c {first.stat().st_size // 2} {first}; exit 3"
    tiny_budget = Transport(timeout=10, retries=0, read_ahead=1)  # each producer blocks after one member
    with pytest.raises(ShardUnavailableError, match="exit 3") as failure:
        for _, samples in iter_shards([broken, f"pipe:cat {second}"], 1, fail_on_bad, tiny_budget):
            for _ in samples:
                pass
    assert failure.value.__traceback__ is not None  # the frames are still referenced here
    assert wait_until(lambda: not fetching())


def test_the_next_remote_shard_arrives_while_the_current_one_is_still_read(shards: Path, tmp_path: Path) -> None:
    """iter_shards opens shard k+1 once shard k has delivered a sample, before its samples are used
    up: a new connection's latency (and an object store's time to first byte) is hidden behind cropping."""
    files = sorted(shards.glob("*.tar"))[:2]
    expected = [[s.key for s in iter_shard(str(f), 1, fail_on_bad)] for f in files]
    assert len(expected[0]) >= 2
    urls = [f"pipe:touch {tmp_path}/opened-{i} && cat {f}" for i, f in enumerate(files)]
    opened_before_the_end = None
    got = []
    for path, samples in iter_shards(urls, 1, fail_on_bad, Transport(timeout=10, retries=0, read_ahead=2**30)):
        got.append([])
        for sample in samples:
            got[-1].append(sample.key)
            if path == urls[0] and len(got[-1]) == 1:
                time.sleep(0.2)
                assert not (tmp_path / "opened-1").exists()  # shard 0 has a head start
            if path == urls[0] and len(got[-1]) == 2:
                opened_before_the_end = wait_until(lambda: (tmp_path / "opened-1").exists())
    assert opened_before_the_end is True
    assert got == expected  # the same samples in the same order as read locally


@pytest.mark.slow
def test_tiny_fit_from_http_object_stores_and_pipe_sees_the_local_batches(
    screen: Path, tmp_path: Path, s3: LocalS3, gcs: LocalGCS, azure: LocalAzure
) -> None:
    shards = screen / "shards"
    checksums = {}
    with serve_directory(shards) as base:
        for name, source in (
            ("local", shards),
            ("http", brace_pattern(shards, base)),
            ("s3", brace_pattern(shards, s3.upload(shards))),
            ("gs", brace_pattern(shards, gcs.upload(shards))),
            ("az", brace_pattern(shards, azure.upload(shards))),
            ("pipe", brace_pattern(shards, f"pipe:cat {shards}")),
        ):
            done = run_cli(train_cmd(*tiny_overrides(source, tmp_path / name, "trainer.max_steps=6")))
            assert done.returncode == 0, done.stderr[-3000:]
            checksums[name] = audit(tmp_path / name)["checksum"].to_list()
    assert len(checksums["local"]) == 6
    assert len({tuple(sums) for sums in checksums.values()}) == 1, checksums  # http, s3, gs, az, pipe = local
