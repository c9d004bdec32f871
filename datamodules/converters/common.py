"""What every converter shares: reading one site's channel files and writing a site table to shards.

A converter only has to describe its sites as a polars frame (one row per site: the required
metadata, `channels` and the matching `files`); reading, checking and writing in parallel live
here once, so every layout gets the same pixel-exact reads, missing-file errors and progress bar.
"""

from __future__ import annotations

import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from datamodules.schema import REQUIRED_KEYS
from datamodules.shards import ShardWriter

# columns of a site table beside the metadata
FILES = "files"
# optional: per channel, the plane of its file that holds it (multi-channel TIFF / OME-TIFF stacks)
PLANES = "planes"
SITE_COLUMNS = [k for k in REQUIRED_KEYS if k != "channels"]


def parse_channel_map(text: str) -> dict[int, str]:
    """`'1=Brightfield,2=ER'` -> {1: 'Brightfield', 2: 'ER'} (file channel index -> stain name)."""
    mapping: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*=\s*([^=]+)", item)
        if not match:
            raise ValueError(f"--channel-map item {item!r} is not INDEX=STAIN (e.g. 1=Brightfield,2=ER)")
        index, stain = int(match.group(1)), match.group(2).strip()
        if index in mapping:
            raise ValueError(f"--channel-map names channel {index} twice")
        mapping[index] = stain
    if not mapping:
        raise ValueError("--channel-map is empty; expected INDEX=STAIN,... (e.g. 1=Brightfield,2=ER)")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"--channel-map gives the same stain to two channels: {text!r}")
    return mapping


def safe_key(key: pl.Expr) -> pl.Expr:
    """Tar-safe sample keys (WebDataset splits a key at its first dot, tar paths at '/')."""
    return key.str.replace_all(r"[^A-Za-z0-9_\-]", "-")


def checked_pixels(path: str, pixels: np.ndarray) -> np.ndarray:
    """`pixels` as uint8/uint16 at the bit depth acquired, or ValueError naming the file and its type."""
    if pixels.dtype in (np.uint8, np.uint16):
        return pixels
    if pixels.dtype.kind in "iu" and pixels.min() >= 0 and pixels.max() <= np.iinfo(np.uint16).max:
        return pixels.astype(np.uint16)  # PIL reads some 16-bit PNGs as int32; values are unchanged
    raise ValueError(f"{path}: pixel type {pixels.dtype} is not 8- or 16-bit unsigned")


def read_plane(path: str) -> np.ndarray:
    """One channel file as a 2-D uint8/uint16 array, bit depth as acquired (never rescaled)."""
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        plane = tifffile.imread(path)
    else:
        from PIL import Image

        with Image.open(path) as img:
            plane = np.asarray(img)
    if plane.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel 2-D image, got shape {plane.shape}")
    return checked_pixels(path, plane)


def read_stack(path: str) -> np.ndarray:
    """A multi-channel TIFF or OME-TIFF as C x H x W (uint8/uint16): the first series, whose axes
    other than the channel axis and Y, X must have length 1 (one site, one focal plane, one time)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, pixels = series.axes, series.asarray()
    singletons = [a for a, n in zip(axes, pixels.shape) if a not in "YX" and n == 1]
    pixels = pixels.reshape([n for a, n in zip(axes, pixels.shape) if a in "YX" or n != 1])
    axes = "".join(a for a in axes if a not in singletons)
    if axes == "YX":
        pixels, axes = pixels[None], "CYX"
    if len(axes) != 3 or axes[1:] != "YX":
        raise ValueError(
            f"{path}: expected one channel axis before Y, X; the TIFF's axes are {series.axes} "
            f"{tuple(series.shape)} (more than one Z plane, time point or sample?)"
        )
    return checked_pixels(path, pixels)


def read_site(task: tuple) -> tuple[np.ndarray, list[str]]:
    """Read and stack one site's channels; returns (C x H x W image, names of the channels kept).

    task: (key, files, channels, allow_missing[, planes]); with planes, channel i is plane
    planes[i] of files[i], each file read once.
    """
    key, files, channels, allow_missing = task[:4]
    planes = task[4] if len(task) > 4 else None
    missing = [f for f in files if not Path(f).is_file()]
    if missing and not allow_missing:
        raise ValueError(
            f"site {key!r}: missing channel files {sorted(set(missing))} (use --allow-missing to keep the present ones)"
        )
    kept = [(i, f, c) for i, (f, c) in enumerate(zip(files, channels)) if f not in missing]
    if not kept:
        raise ValueError(f"site {key!r}: none of its channel files exist: {files}")
    if planes is None:
        images = [read_plane(f) for _, f, _ in kept]
    else:
        stacks = {f: read_stack(f) for f in dict.fromkeys(f for _, f, _ in kept)}
        too_few = [f"{Path(f).name} plane {planes[i] + 1}" for i, f, _ in kept if planes[i] >= len(stacks[f])]
        if too_few:
            raise ValueError(
                f"site {key!r}: no such channel: {too_few} (files have "
                f"{ {Path(f).name: len(s) for f, s in stacks.items()} } channels)"
            )
        images = [stacks[f][planes[i]] for i, f, _ in kept]
    shapes = {p.shape for p in images}
    dtypes = {p.dtype.name for p in images}
    if len(shapes) > 1 or len(dtypes) > 1:
        detail = ", ".join(f"{Path(f).name}: {p.shape} {p.dtype}" for (_, f, _), p in zip(kept, images))
        raise ValueError(f"site {key!r}: channels differ in shape or bit depth ({detail})")
    return np.stack(images), [c for _, _, c in kept]


def site_tasks(sites: pl.DataFrame, allow_missing: bool) -> list[tuple]:
    """read_site's task of every row of a site table, in table order."""
    columns = ["key", FILES, "channels"] + ([PLANES] if PLANES in sites.columns else [])
    return [(row[0], row[1], row[2], allow_missing, *row[3:]) for row in sites.select(columns).iter_rows()]


def check_site_table(sites: pl.DataFrame, source: str) -> None:
    """A converter's output must carry every metadata column, files and channels, and unique keys."""
    missing = [c for c in (*SITE_COLUMNS, "channels", FILES) if c not in sites.columns]
    if missing:
        raise ValueError(f"{source}: site table lacks columns {missing}")
    if sites.height == 0:
        raise ValueError(f"{source}: no sites found")
    dupes = sites.filter(pl.col("key").is_duplicated())["key"].unique().to_list()
    if dupes:
        raise ValueError(f"{source}: duplicate site keys {dupes[:5]}")


def write_sites(
    sites: pl.DataFrame,
    out_dir: str | Path,
    *,
    allow_missing: bool = False,
    workers: int = 1,
    max_shard_mb: float = 512,
    source: str = "sites",
    overwrite: bool = False,
) -> pl.DataFrame:
    """Read every site of `sites` (in a process pool if workers > 1) and write shards + manifest.

    Sites are written in table order whatever the number of workers, so the output is
    reproducible. Returns the manifest.
    """
    check_site_table(sites, source)
    tasks = site_tasks(sites, allow_missing)
    metadata = sites.drop(FILES, "channels", PLANES, strict=False).to_dicts()
    writer = ShardWriter(out_dir, max_bytes=int(max_shard_mb * 2**20), overwrite=overwrite)
    with writer, tqdm(total=len(tasks), desc=f"shards {source}", unit="site", disable=None) as progress:
        if workers > 1:
            # spawn: forking a process that already runs polars/torch threads can deadlock; an
            # executor (unlike multiprocessing.Pool) raises if a worker dies instead of hanging
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                results = pool.map(read_site, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers))))
                for meta, (image, channels) in zip(metadata, results):
                    writer.write(image, {**meta, "channels": channels})
                    progress.update()
        else:
            for meta, task in zip(metadata, tasks):
                image, channels = read_site(task)
                writer.write(image, {**meta, "channels": channels})
                progress.update()
    return writer.manifest


def read_table(path: str | Path) -> pl.DataFrame:
    """A metadata table from CSV, TSV or parquet, every column read as text unless parquet."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metadata table {path} does not exist")
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    separator = "\t" if path.suffix in (".tsv", ".txt") else ","
    return pl.read_csv(path, separator=separator, infer_schema=False)


def normalise_metadata(sites: pl.DataFrame) -> pl.DataFrame:
    """Cast the required metadata columns to their contract types (str, site int, is_control bool)."""
    casts = []
    for name in SITE_COLUMNS:
        if name == "site":
            casts.append(pl.col(name).cast(pl.Int64))
        elif name == "is_control":
            casts.append(pl.col(name).cast(pl.Boolean))
        else:
            casts.append(pl.col(name).cast(pl.Utf8))
    return sites.with_columns(casts)
