"""Multi-channel TIFF and OME-TIFF stacks: one file per site, one plane per channel.

Stains come from `--channel-map 1=DNA,2=ER,...` (plane numbers from 1, as Phenix channel numbers;
a map may keep a subset of the planes), else from the first file's OME channel names, else
`ch1..chC`. Metadata is what a file name can tell: key = the file's stem, plate = its folder;
for real perturbation metadata describe the sites in a table instead (`folder_sites`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import polars as pl

from datamodules.converters.common import FILES, PLANES, normalise_metadata, read_stack, safe_key

SUFFIXES = (".tif", ".tiff")


def stack_files(src: str | Path | Iterable[str | Path]) -> list[Path]:
    """The stack files of a folder (sorted) or a list of paths, checked to exist."""
    if isinstance(src, (str, Path)):
        folder = Path(src)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder of TIFF stacks")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise ValueError(f"{folder}: no .tif/.tiff files")
        return files
    files = [Path(p) for p in src]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ValueError(f"image files not found: {missing[:5]}")
    return files


def stack_channel_names(path: Path) -> list[str]:
    """OME channel names of a stack (ch1..chC when it has none or not one per plane)."""
    import tifffile

    n = len(read_stack(str(path)))
    names: list[str] = []
    with tifffile.TiffFile(path) as tif:
        if tif.ome_metadata:
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            channels = (image[0] if isinstance(image, list) else image)["Pixels"].get("Channel", [])
            names = [str(c.get("Name", "")) for c in (channels if isinstance(channels, list) else [channels])]
    return names if len(names) == n and all(names) else [f"ch{i + 1}" for i in range(n)]


def stack_sites(src: str | Path | Iterable[str | Path], channel_map: dict[int, str] | None = None) -> pl.DataFrame:
    """One row per stack file: required metadata, `channels`, `files` (the file per channel), `planes`."""
    files = stack_files(src)
    if channel_map is None:
        names = stack_channel_names(files[0])
        channel_map = {i + 1: name for i, name in enumerate(names)}
    indices = sorted(channel_map)
    rows = [
        {
            "key": path.stem,
            "experiment": path.parent.name,
            "plate": path.parent.name,
            "well": path.stem,
            "site": 1,
            "perturbation": "unknown",
            "perturbation_type": "unknown",
            "is_control": False,
            "cell_type": "unknown",
            "channels": [channel_map[i] for i in indices],
            FILES: [str(path)] * len(indices),
            PLANES: [i - 1 for i in indices],
        }
        for path in files
    ]
    sites = pl.DataFrame(rows)
    return normalise_metadata(sites.with_columns(safe_key(pl.col("key"))))
