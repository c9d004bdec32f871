"""WebDataset shards: one sample per site, `<key>.npy` (C x H x W, acquired dtype) + `<key>.json`.

Raw .npy is the default because it decodes far faster than one PNG per channel (docs/data.md);
the loader, not the disk, is the bottleneck on GPU nodes. Writes are atomic at two levels: each
shard is written under a hidden temp name and renamed when complete, and the manifest is written
last, so a crash never leaves a half-written file under a final name.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from datamodules.atomic import atomic_write
from datamodules.schema import REQUIRED_KEYS, SHARD_COLUMNS, validate_image, validate_metadata

MANIFEST = "manifest.parquet"
TMP_SUFFIX = ".tmp"


def encode_npy(image: np.ndarray) -> bytes:
    """The .npy bytes of `image` (C-contiguous, native byte order kept in the header)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(image), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Inverse of encode_npy without pickle (shards may come from anywhere)."""
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


class ShardWriter:
    """Write site images + metadata into size-limited tar shards and a manifest.parquet.

    Use as a context manager; `close()` (called on a clean exit) finalises the last shard and
    writes the manifest. On an exception, the shard in progress is deleted and no manifest is
    written, so the directory holds only complete shards.
    """

    def __init__(
        self, out_dir: str | Path, max_bytes: int = 512 * 2**20, prefix: str = "shard", overwrite: bool = False
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if not prefix or any(c in prefix for c in "./\\"):
            raise ValueError(f"prefix {prefix!r} must be non-empty without '.', '/' or '\\'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.prefix = prefix
        existing = sorted(self.out_dir.glob(f"{prefix}-*.tar"))
        if existing or (self.out_dir / MANIFEST).exists():
            if not overwrite:
                raise ValueError(
                    f"{self.out_dir} already holds shards ({len(existing)} x {prefix}-*.tar) or a manifest; "
                    "write to an empty directory or pass overwrite=True"
                )
            for path in existing:
                path.unlink()
            (self.out_dir / MANIFEST).unlink(missing_ok=True)
        for stale in self.out_dir.glob(f".{prefix}-*.tar{TMP_SUFFIX}"):
            stale.unlink()  # left by a crashed run: never complete, never referenced
        self._rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._shard_index = -1
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._shard_bytes = 0
        self._closed = False
        self.manifest: pl.DataFrame | None = None

    # ------------------------------------------------------------------ shard lifecycle
    def _shard_name(self) -> str:
        return f"{self.prefix}-{self._shard_index:06d}.tar"

    def _open_next(self) -> None:
        self._shard_index += 1
        self._tmp_path = self.out_dir / f".{self._shard_name()}{TMP_SUFFIX}"
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self._shard_bytes = 0

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp_path, self.out_dir / self._shard_name())
        self._tar = None
        self._tmp_path = None

    def _abort_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = None
            self._tmp_path = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # reproducible shards: same inputs, same bytes
        self._tar.addfile(info, io.BytesIO(data))

    # ------------------------------------------------------------------ public API
    def write(self, image: np.ndarray, meta: dict) -> None:
        """Append one site. Validates image and metadata; raises ValueError naming the bad key."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        key = meta.get("key", "?") if isinstance(meta, dict) else "?"
        validate_image(image, key)
        meta = validate_metadata(meta, n_channels=image.shape[0])
        key = meta["key"]
        if key in self._keys:
            raise ValueError(f"sample {key!r}: duplicate key; every site needs a unique 'key'")
        npy = encode_npy(image)
        js = json.dumps(meta, sort_keys=True).encode()
        size = len(npy) + len(js) + 3 * 512  # two tar headers + padding, roughly
        if self._tar is None or (self._shard_bytes > 0 and self._shard_bytes + size > self.max_bytes):
            self._finish_current()
            self._open_next()
        self._add(f"{key}.npy", npy)
        self._add(f"{key}.json", js)
        self._shard_bytes += size
        self._keys.add(key)
        self._rows.append(
            {
                **meta,
                "shard": self._shard_name(),
                "height": int(image.shape[1]),
                "width": int(image.shape[2]),
                "dtype": str(image.dtype),
            }
        )

    def close(self) -> pl.DataFrame:
        """Finish the last shard, write manifest.parquet atomically and return the manifest."""
        if self._closed:
            return self.manifest
        self._finish_current()
        self._closed = True
        self.manifest = manifest_frame(self._rows)
        atomic_write(self.out_dir / MANIFEST, self.manifest.write_parquet)
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress (complete shards stay); no manifest is written."""
        self._abort_current()
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def manifest_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rows (metadata + shard columns) as a manifest frame with stable column types and order."""
    fixed = {
        "key": pl.Utf8,
        "experiment": pl.Utf8,
        "plate": pl.Utf8,
        "well": pl.Utf8,
        "site": pl.Int64,
        "perturbation": pl.Utf8,
        "perturbation_type": pl.Utf8,
        "is_control": pl.Boolean,
        "cell_type": pl.Utf8,
        "channels": pl.List(pl.Utf8),
        "shard": pl.Utf8,
        "height": pl.Int64,
        "width": pl.Int64,
        "dtype": pl.Utf8,
    }
    if not rows:
        return pl.DataFrame(schema=fixed)
    frame = pl.from_dicts(rows, infer_schema_length=None)
    frame = frame.with_columns([pl.col(name).cast(kind) for name, kind in fixed.items()])
    extra = [c for c in frame.columns if c not in fixed]
    return frame.select([*fixed, *extra])


def read_manifest(shard_dir: str | Path) -> pl.DataFrame:
    """The manifest beside the shards, checked: required columns present, listed shards exist."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {shard_dir}; shards must be written by datamodules.ShardWriter")
    manifest = pl.read_parquet(path)
    check_manifest_columns(manifest, str(path))
    missing_shards = [s for s in manifest["shard"].unique().sort().to_list() if not (shard_dir / s).is_file()]
    if missing_shards:
        raise ValueError(f"{path} lists shards that do not exist in {shard_dir}: {missing_shards[:5]}")
    return manifest


def check_manifest_columns(manifest: pl.DataFrame, source: str) -> None:
    """ValueError naming `source` unless the manifest has every required column."""
    missing_cols = [c for c in (*REQUIRED_KEYS, *SHARD_COLUMNS) if c not in manifest.columns]
    if missing_cols:
        raise ValueError(f"{source}: missing manifest columns {missing_cols}")
