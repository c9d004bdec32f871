"""The ground truth of a synthetic screen on disk: OUT/truth/{relationships.csv, modules.csv,
phenotypes.parquet}. relationships.csv has the format of the real annotation files
(`entity1,entity2`, both orders of every pair, like CORUM.txt), so the evaluation scores a
synthetic screen exactly as it scores a real one against CORUM or HuMAP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from datamodules.atomic import atomic_write
from datamodules.synthetic.design import ScreenDesign

RELATIONSHIPS = "relationships.csv"
MODULES = "modules.csv"
PHENOTYPES = "phenotypes.parquet"


def write_truth(design: ScreenDesign, truth_dir: str | Path) -> Path:
    """Write the three truth files of `design` into `truth_dir` (created if needed)."""
    truth_dir = Path(truth_dir)
    truth_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(truth_dir / RELATIONSHIPS, design.relationships.write_csv)
    atomic_write(truth_dir / MODULES, design.modules.write_csv)
    atomic_write(truth_dir / PHENOTYPES, design.phenotypes.write_parquet)
    return truth_dir


@dataclass(frozen=True)
class Truth:
    """What was planted: pairs (entity1, entity2), module membership, latent phenotypes."""

    relationships: pl.DataFrame
    modules: pl.DataFrame
    phenotypes: pl.DataFrame


def read_truth(truth_dir: str | Path) -> Truth:
    """Read OUT/truth/ back; a clear error names a missing file."""
    truth_dir = Path(truth_dir)
    missing = [n for n in (RELATIONSHIPS, MODULES, PHENOTYPES) if not (truth_dir / n).is_file()]
    if missing:
        raise ValueError(f"{truth_dir}: missing truth files {missing}; written by `phenoscale synth`")
    return Truth(
        relationships=pl.read_csv(truth_dir / RELATIONSHIPS, schema={"entity1": pl.Utf8, "entity2": pl.Utf8}),
        modules=pl.read_csv(truth_dir / MODULES, schema={"module": pl.Utf8, "gene": pl.Utf8}),
        phenotypes=pl.read_parquet(truth_dir / PHENOTYPES),
    )
