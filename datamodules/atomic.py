"""Atomic file writes: a temp file in the target's directory, then one rename.

Every file phenoscale writes (shards, manifests, truth, configs, checkpoints, embeddings,
reports) goes through here, so a crash or `kill -9` leaves either the old file or the new one
under the final name, never half of one. It lives in the lowest package so all others can use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """Call `write(tmp)` for a temp path beside `path`, then rename it to `path`.

    `fsync=True` flushes the data to disk before the rename (checkpoints, configs: files a
    restart after a node failure must find intact); cheap files skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync)


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), fsync)
