"""Any folder of per-channel image files described by a CSV: one row per site, one column per channel.

The table follows CellProfiler's LoadData convention, which most imaging pipelines already
export: `FileName_<Stain>` columns (channel order = column order), optional `PathName_<Stain>`
(else paths are relative to the table's folder), and metadata columns named as in the shard
contract, plain or `Metadata_`-prefixed. `plate` and `well` are required; the rest defaults to
experiment=plate, site=1, perturbation/perturbation_type/cell_type='unknown', is_control=false.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from datamodules.converters.common import FILES, SITE_COLUMNS, normalise_metadata, read_table, safe_key
from datamodules.converters.registry import Converter, register_converter

DEFAULTS = {
    "site": "1",
    "perturbation": "unknown",
    "perturbation_type": "unknown",
    "is_control": "false",
    "cell_type": "unknown",
}


def _metadata_name(column: str) -> str:
    """`Metadata_Plate` -> `plate` for contract keys (case-insensitive); other names lose the prefix only."""
    name = column.removeprefix("Metadata_")
    return next((key for key in SITE_COLUMNS if key == name.lower()), name)


def folder_sites(table_path: str | Path) -> pl.DataFrame:
    """One row per site of the table at `table_path` (CSV/TSV/parquet)."""
    table_path = Path(table_path)
    table = read_table(table_path).with_columns(pl.all().cast(pl.Utf8))
    table = table.rename(
        {
            c: _metadata_name(c)
            for c in table.columns
            if c.startswith("Metadata_") and _metadata_name(c) not in table.columns
        }
    )
    stains = [c.removeprefix("FileName_") for c in table.columns if c.startswith("FileName_")]
    if not stains:
        raise ValueError(f"{table_path}: no FileName_<Stain> columns; one column per channel file is required")
    missing = [c for c in ("plate", "well") if c not in table.columns]
    if missing:
        raise ValueError(f"{table_path}: missing metadata columns {missing}")
    table = table.with_columns(
        [pl.lit(value).alias(name) for name, value in DEFAULTS.items() if name not in table.columns]
    )
    if "experiment" not in table.columns:
        table = table.with_columns(pl.col("plate").alias("experiment"))
    if "key" not in table.columns:
        table = table.with_columns((pl.col("plate") + "_" + pl.col("well") + "_" + pl.col("site")).alias("key"))
    folder = str(table_path.parent.resolve())
    paths = [
        (pl.col(f"PathName_{s}") if f"PathName_{s}" in table.columns else pl.lit(folder))
        + "/"
        + pl.col(f"FileName_{s}")
        for s in stains
    ]
    channel_columns = [c for c in table.columns if c.startswith(("FileName_", "PathName_"))]
    sites = table.with_columns(
        pl.concat_list(paths).alias(FILES),
        pl.lit(stains).alias("channels"),
        pl.col("is_control").str.to_lowercase().is_in(["true", "1", "yes"]).alias("is_control"),
    ).drop(channel_columns)
    return normalise_metadata(sites.with_columns(safe_key(pl.col("key"))))


register_converter(
    Converter(
        "folder",
        folder_sites,
        "a CSV/TSV/parquet site table with FileName_<Stain> columns",
        src_help="the site table (CSV, TSV or parquet)",
        channel_map=False,
    )
)
