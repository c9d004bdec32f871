"""Known biology: gene-gene relationship files (`entity1,entity2`) and CORUM-style clusters."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
REPO = Path(__file__).resolve().parents[1]


def annotations_dir() -> Path:
    """$PHENOSCALE_SHARED/data/annotations (default ../shared next to the repository)."""
    return Path(os.environ.get("PHENOSCALE_SHARED", REPO.parent / "shared")) / "data" / "annotations"


def resolve_annotation(spec: str) -> tuple[str, Path]:
    """(source name, file) for a path or a source name such as `CORUM`."""
    path = Path(spec)
    if path.suffix and path.exists():
        return path.stem, path
    candidate = annotations_dir() / f"{spec}.txt"
    if candidate.exists():
        return spec, candidate
    raise FileNotFoundError(
        f"annotation '{spec}' is neither a file nor a source in {annotations_dir()} "
        f"(known sources: {', '.join(SOURCES)})"
    )


def load_sources(specs: list[str]) -> dict[str, pl.DataFrame]:
    """Relationship frames by source name (file stem or source name)."""
    sources = {}
    for spec in specs:
        name, path = resolve_annotation(spec)
        sources[name] = load_relationships(path)
    return sources


def load_relationships(path: str | Path) -> pl.DataFrame:
    """Unordered gene pairs (entity1 < entity2), self-pairs dropped, duplicates removed (as efaar)."""
    path = Path(path)
    try:
        raw = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.NoDataError as err:
        raise ValueError(f"annotation file {path} is empty") from err
    missing = {"entity1", "entity2"} - set(raw.columns)
    if missing:
        raise ValueError(
            f"annotation file {path} needs columns entity1,entity2; missing {sorted(missing)} (found {raw.columns})"
        )
    a, b = pl.col("entity1"), pl.col("entity2")
    return (
        raw.drop_nulls(["entity1", "entity2"])
        .select(
            pl.when(a <= b).then(a).otherwise(b).alias("entity1"),
            pl.when(a <= b).then(b).otherwise(a).alias("entity2"),
        )
        .filter(pl.col("entity1") != pl.col("entity2"))
        .unique(maintain_order=True)
    )


def pairs_in_map(relationships: pl.DataFrame, genes: np.ndarray) -> np.ndarray:
    """(n, 2) int64 map rows (i < j) of the pairs whose two genes are both in the map."""
    index = pl.DataFrame({"gene": np.asarray(genes).astype(str), "row": np.arange(len(genes), dtype=np.int64)})
    joined = (
        relationships.join(index, left_on="entity1", right_on="gene", how="inner")
        .rename({"row": "i"})
        .join(index, left_on="entity2", right_on="gene", how="inner")
        .rename({"row": "j"})
    )
    i, j = joined.get_column("i").to_numpy(), joined.get_column("j").to_numpy()
    pairs = np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def load_clusters(path: str | Path) -> dict[str, list[str]]:
    """`name TAB gene gene ...` per line (CORUM_clusters.tsv) -> {name: genes}."""
    clusters: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, genes = line.partition("\t")
        if not sep:
            raise ValueError(f"{path}:{number}: expected 'name<TAB>genes', got {line[:80]!r}")
        clusters[name] = genes.split()
    return clusters
