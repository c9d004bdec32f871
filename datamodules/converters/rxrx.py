"""RxRx1 (8-bit) and RxRx3 (16-bit) layouts: `{experiment}/Plate{plate}/{well}_s{site}_w{1..6}.png`.

Metadata follow the public READMEs (../shared/data/metadata/rxrx_docs). Negative controls
(`negative_control` well_type in RxRx1; `EMPTY_control` / `CRISPR_control` in RxRx3) become
`is_control`; positive controls are real siRNAs and stay perturbations.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from datamodules.converters.common import FILES, normalise_metadata, read_table, safe_key
from datamodules.converters.registry import Converter, register_converter

RXRX_STAINS = {1: "Hoechst", 2: "ConA", 3: "Phalloidin", 4: "Syto14", 5: "MitoTracker", 6: "WGA"}
CONTROL_LABELS = ["EMPTY_control", "CRISPR_control", "negative_control", "EMPTY"]
RXRX1_COLUMNS = ["site_id", "cell_type", "experiment", "plate", "well", "site", "well_type", "sirna"]
RXRX3_COLUMNS = [
    "well_id",
    "experiment_name",
    "plate",
    "address",
    "gene",
    "treatment",
    "perturbation_type",
    "cell_type",
]


def _image_root(src: Path) -> Path:
    """The released archives put images under `images/`; a bare experiment tree works too."""
    return src / "images" if (src / "images").is_dir() else src


def _metadata(src: Path, columns: list[str]) -> pl.DataFrame:
    """`SRC/metadata.csv`, checked to hold at least `columns` (the error names the missing ones)."""
    path = src / "metadata.csv"
    table = read_table(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected at least {columns}")
    return table


def _files_column(root: Path, channel_map: dict[int, str], address: str) -> pl.Expr:
    """`files`: one path per channel index, in the channel map's index order."""
    base = (
        pl.lit(str(root) + "/")
        + pl.col("_experiment")
        + pl.lit("/Plate")
        + pl.col("plate")
        + pl.lit("/")
        + pl.col(address)
    )
    return pl.concat_list(
        [base + pl.lit("_s") + pl.col("_site_text") + pl.lit(f"_w{index}.png") for index in sorted(channel_map)]
    ).alias(FILES)


def rxrx1_sites(src: str | Path, channel_map: dict[int, str] | None = None) -> pl.DataFrame:
    """One row per RxRx1 site from `SRC/metadata.csv`."""
    src = Path(src)
    channel_map = channel_map or RXRX_STAINS
    table = _metadata(src, RXRX1_COLUMNS)
    is_control = pl.col("well_type").is_in(CONTROL_LABELS) | pl.col("sirna").is_in(CONTROL_LABELS)
    extras = [c for c in ("dataset", "well_type", "sirna_id", "well_id") if c in table.columns]
    sites = table.with_columns(pl.col("experiment").alias("_experiment"), pl.col("site").alias("_site_text")).select(
        pl.col("site_id").alias("key"),
        "experiment",
        "plate",
        "well",
        "site",
        pl.col("sirna").alias("perturbation"),
        pl.when(is_control).then(pl.lit("control")).otherwise(pl.lit("sirna")).alias("perturbation_type"),
        is_control.alias("is_control"),
        "cell_type",
        *extras,
        pl.lit(list(channel_map[i] for i in sorted(channel_map))).alias("channels"),
        _files_column(_image_root(src), channel_map, "well"),
    )
    return normalise_metadata(sites.with_columns(safe_key(pl.col("key"))))


def rxrx3_sites(src: str | Path, channel_map: dict[int, str] | None = None) -> pl.DataFrame:
    """One row per RxRx3 well (one site each) from `SRC/metadata.csv`; 16-bit PNGs."""
    src = Path(src)
    channel_map = channel_map or RXRX_STAINS
    table = _metadata(src, RXRX3_COLUMNS)
    # CRISPR wells are named by gene, compound wells by treatment (compound synonym)
    perturbation = (
        pl.when(pl.col("perturbation_type").str.to_uppercase() == "CRISPR")
        .then(pl.col("gene"))
        .otherwise(pl.col("treatment"))
    )
    is_control = perturbation.is_in(CONTROL_LABELS) | pl.col("treatment").is_in(CONTROL_LABELS)
    is_crispr = pl.col("perturbation_type").str.to_uppercase() == "CRISPR"
    kind = pl.when(is_crispr).then(pl.lit("gene")).otherwise(pl.lit("compound"))
    extras = [c for c in ("treatment", "SMILES", "concentration") if c in table.columns]
    sites = table.with_columns(pl.col("experiment_name").alias("_experiment"), pl.lit("1").alias("_site_text")).select(
        (pl.col("well_id") + pl.lit("_1")).alias("key"),
        pl.col("experiment_name").alias("experiment"),
        "plate",
        pl.col("address").alias("well"),
        pl.lit(1).alias("site"),
        perturbation.alias("perturbation"),
        pl.when(is_control).then(pl.lit("control")).otherwise(kind).alias("perturbation_type"),
        is_control.alias("is_control"),
        "cell_type",
        *extras,
        pl.lit(list(channel_map[i] for i in sorted(channel_map))).alias("channels"),
        _files_column(_image_root(src), channel_map, "address"),
    )
    return normalise_metadata(sites.with_columns(safe_key(pl.col("key"))))


register_converter(
    Converter(
        "rxrx1",
        rxrx1_sites,
        "RxRx1: metadata.csv and {experiment}/Plate{n}/{well}_s{site}_w{1..6}.png",
        src_help="folder holding metadata.csv and the experiment folders",
    )
)
register_converter(
    Converter(
        "rxrx3",
        rxrx3_sites,
        "RxRx3: the rxrx1 layout with 16-bit PNGs and the RxRx3 metadata.csv",
        src_help="folder holding metadata.csv and the experiment folders",
    )
)
