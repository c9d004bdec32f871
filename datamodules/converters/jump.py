"""JUMP-CP / Opera Phenix fields: `r{row}c{col}f{field}p01-ch{n}sk1fk1fl1.tiff`, 16-bit TIFF.

The channel-number-to-stain map differs between JUMP sources, so it is never assumed from the
file index: it comes from a CellProfiler load_data table (`FileName_Orig<Stain>` columns, also the
`Image_`-prefixed CytoTable form) or from `--channel-map 1=Brightfield,2=ER,...`.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from datamodules.converters.common import FILES, normalise_metadata, read_table, safe_key
from datamodules.converters.registry import Converter, ConverterOption, register_converter

PHENIX_NAME = re.compile(r"r(\d+)c(\d+)f(\d+)p(\d+)-ch(\d+)sk\d+fk\d+fl\d+\.tiff?$", re.IGNORECASE)
ORIG_COLUMN = re.compile(r"^(?:Image_)?FileName_Orig(\w+)$")
PLATE_COLUMNS = ("Metadata_Plate", "Image_Metadata_Plate")


def channel_map_from_load_data(table: pl.DataFrame, source: str) -> dict[int, str]:
    """{channel number: stain} read from the file names a load_data table gives per stain."""
    mapping: dict[int, str] = {}
    for column in table.columns:
        match = ORIG_COLUMN.match(column)
        if not match:
            continue
        numbers = {int(m.group(5)) for v in table[column].drop_nulls().to_list() if (m := PHENIX_NAME.search(str(v)))}
        if len(numbers) != 1:
            raise ValueError(f"{source}: column {column} does not name one Phenix channel (found {sorted(numbers)})")
        mapping[numbers.pop()] = match.group(1)
    if not mapping:
        raise ValueError(f"{source}: no FileName_Orig<Stain> columns to take the channel map from")
    return mapping


def _find_load_data(src: Path) -> Path | None:
    """A single load_data-like table (parquet/csv) beside the TIFFs, if there is one."""
    candidates = sorted([*src.glob("*.parquet"), *src.glob("*.csv")])
    return candidates[0] if len(candidates) == 1 else None


def well_name(row: int, col: int) -> str:
    """Phenix r03c03 -> 'C03' (row letters beyond Z continue as AA, AB, ... as in 1536-well plates)."""
    letters = ""
    row -= 1
    while True:
        letters = chr(ord("A") + row % 26) + letters
        row = row // 26 - 1
        if row < 0:
            return f"{letters}{col:02d}"


def jump_sites(
    src: str | Path,
    channel_map: dict[int, str] | None = None,
    load_data: str | Path | None = None,
    plate: str | None = None,
    experiment: str | None = None,
    well_metadata: str | Path | None = None,
) -> pl.DataFrame:
    """One row per Phenix field in SRC; perturbations from `well_metadata` (a table with `well`)."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src} is not a directory of Phenix TIFFs")
    table_path = Path(load_data) if load_data else _find_load_data(src)
    table = read_table(table_path) if table_path else None
    if channel_map is None:
        if table is None:
            raise ValueError(
                f"{src}: no channel map; pass --channel-map 1=Stain,2=Stain,... or --load-data TABLE "
                "(the stain of a Phenix channel number is never assumed)"
            )
        channel_map = channel_map_from_load_data(table, str(table_path))
    if plate is None and table is not None:
        plate = next((str(table[c][0]) for c in PLATE_COLUMNS if c in table.columns), None)
    plate = plate or src.name
    fields = sorted({m.groups()[:3] for p in src.iterdir() if (m := PHENIX_NAME.search(p.name))})
    if not fields:
        raise ValueError(f"{src}: no Opera Phenix TIFFs named r..c..f..p..-ch..sk1fk1fl1.tiff")
    indices = sorted(channel_map)
    rows = []
    for r, c, f in fields:
        well, site = well_name(int(r), int(c)), int(f)
        rows.append(
            {
                "key": f"{plate}_{well}_{site}",
                "experiment": experiment or plate,
                "plate": plate,
                "well": well,
                "site": site,
                "perturbation": "unknown",
                "perturbation_type": "unknown",
                "is_control": False,
                "cell_type": "unknown",
                "channels": [channel_map[i] for i in indices],
                FILES: [str(src / f"r{r}c{c}f{f}p01-ch{i}sk1fk1fl1.tiff") for i in indices],
            }
        )
    sites = pl.DataFrame(rows)
    if well_metadata:
        sites = apply_well_metadata(sites, read_table(well_metadata), str(well_metadata))
    return normalise_metadata(sites.with_columns(safe_key(pl.col("key"))))


def apply_well_metadata(sites: pl.DataFrame, wells: pl.DataFrame, source: str) -> pl.DataFrame:
    """Overwrite perturbation/perturbation_type/is_control/cell_type from a per-well table."""
    if "well" not in wells.columns:
        raise ValueError(
            f"{source}: a well metadata table needs a 'well' column (and any of "
            "perturbation, perturbation_type, is_control, cell_type)"
        )
    columns = [c for c in ("perturbation", "perturbation_type", "is_control", "cell_type") if c in wells.columns]
    if not columns:
        raise ValueError(f"{source}: no perturbation/perturbation_type/is_control/cell_type column")
    wells = wells.select("well", *columns).unique("well", keep="first")
    if "is_control" in columns:
        wells = wells.with_columns(pl.col("is_control").cast(pl.Utf8).str.to_lowercase().is_in(["true", "1", "yes"]))
    joined = sites.drop(columns).join(wells, on="well", how="left")
    unmatched = joined.filter(pl.col(columns[0]).is_null())["well"].unique().to_list()
    if unmatched:
        raise ValueError(f"{source}: no row for wells {unmatched[:5]}")
    return joined


register_converter(
    Converter(
        "jump",
        jump_sites,
        "a folder of Opera Phenix TIFFs; channel map from --load-data, a load_data table in SRC or --channel-map",
        src_help="folder of Phenix TIFFs (r..c..f..p..-ch..sk..fk..fl...tiff)",
        options=(
            ConverterOption("load_data", "CellProfiler load_data table giving FileName_Orig<Stain> per channel"),
            ConverterOption("plate", "plate name (default: the load_data table's Metadata_Plate, else SRC's name)"),
            ConverterOption("experiment", "experiment / batch name (default: the plate)"),
            ConverterOption(
                "well_metadata", "table with 'well' + perturbation, perturbation_type, is_control, cell_type"
            ),
        ),
    )
)
