"""Where shards are: a `data.train_shards` / `data.eval_shards` string -> shard locations + manifest.

Accepted: a local directory, a glob, webdataset's brace notation (`shard-{000000..000099}.tar`,
also mixed with globs), URLs (http(s)://, s3://, gs://, az://) and `pipe:CMD` commands. An
object-store prefix or glob (`s3://bucket/rpi/`, `s3://bucket/rpi/shard-*.tar`) is listed
through fsspec, like a local directory; braces are expanded without listing (a role that may
read objects but not list the bucket still works), as for every other URL. The manifest is
`data.manifest` when set, else `manifest.parquet` beside the shards: the first shard's location
with its file name replaced, which for a pipe runs the same command on the manifest
(`pipe:aws s3 cp s3://b/shard-000000.tar -` -> `... s3://b/manifest.parquet -`).
"""

from __future__ import annotations

import glob
import io
import re
from pathlib import Path

import polars as pl
from braceexpand import braceexpand

from datamodules.shards import MANIFEST, check_manifest_columns, read_manifest
from datamodules.transport import FSSPEC_SCHEMES, ShardUnavailableError, Transport, is_remote

_SHARD_NAME = re.compile(r"[^/\s'\"?#=]+\.tar(?=$|[\s'\"?#])")
_GLOB = re.compile(r"[*?[]")


def shard_locations(pattern: str) -> list[str]:
    """The shards `pattern` names, in order: expanded braces (remote), or sorted matching files
    (local, or listed in an object store)."""
    if pattern.startswith(FSSPEC_SCHEMES) and (_GLOB.search(pattern) or not pattern.endswith(".tar")):
        return _listed_in_store(pattern)
    if is_remote(pattern):
        found = list(braceexpand(pattern))
        for location in found:
            shard_name(location)  # each must name a .tar
        return found
    path = Path(pattern)
    if path.is_dir():
        files = path.glob("*.tar")
    else:
        files = (Path(p) for part in braceexpand(pattern) for p in glob.glob(part))
    return sorted({str(f) for f in files if f.suffix == ".tar" and f.is_file()})


def _listed_in_store(pattern: str) -> list[str]:
    """The .tar objects under an object-store prefix (`s3://bucket/rpi`) or matching its glob, sorted."""
    import fsspec  # a dependency of torch and Lightning; the store's backend is the optional part

    found = set()
    for part in braceexpand(pattern):
        scheme = part[: part.index("://") + 3]
        try:
            fs, path = fsspec.core.url_to_fs(part)
            matches = fs.glob(path if _GLOB.search(path) else f"{path.rstrip('/')}/*.tar")
        except ImportError as err:  # the store's backend (s3fs, gcsfs, adlfs)
            raise ShardUnavailableError(f"{part}: pip install 'phenoscale[remote]' ({err})") from None
        except Exception as err:  # the SDK's own errors (no credentials, no network, access denied)
            raise ShardUnavailableError(f"{part}: cannot list the shards ({type(err).__name__}: {err})") from None
        found.update(f"{scheme}{match}" for match in matches if match.endswith(".tar"))
    return sorted(found)


def shard_name(location: str) -> str:
    """The file name a location refers to (the manifest's `shard` value); ValueError if none."""
    if not is_remote(location):
        return Path(location).name
    names = _SHARD_NAME.findall(location)
    if not names:
        raise ValueError(f"{location!r} names no .tar shard file (e.g. .../shard-000000.tar)")
    return names[-1]


def manifest_location(shards: list[str]) -> str:
    """manifest.parquet beside the shards (see the module docstring)."""
    first = shards[0]
    if not is_remote(first):
        return str(Path(first).parent / MANIFEST)
    name = shard_name(first)
    cut = first.rindex(name)
    return first[:cut] + MANIFEST + first[cut + len(name) :]


def load_manifest(shards: list[str], explicit: str | None, transport: Transport) -> tuple[pl.DataFrame, str]:
    """(manifest, where it was read) for `shards`; a local directory's is checked by read_manifest."""
    location = explicit or manifest_location(shards)
    if not is_remote(location) and explicit is None:
        return read_manifest(Path(location).parent), location
    try:
        data = transport.read_bytes(location) if is_remote(location) else Path(location).read_bytes()
        manifest = pl.read_parquet(io.BytesIO(data))
    except (OSError, pl.exceptions.PolarsError) as err:
        raise ValueError(f"cannot read the manifest {location} ({err}); set data.manifest to its location") from None
    check_manifest_columns(manifest, location)
    return manifest, location
