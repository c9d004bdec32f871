"""The recall ceiling of a synthetic screen: recall of the planted latent phenotypes themselves.

`phenoscale synth OUT` writes OUT/truth/phenotypes.parquet (`perturbation`, `module`, `latent`
Array(Float32, K)) and OUT/truth/relationships.csv. A model's map can at best recover what was
planted, so its recall is read against the recall of the latents under the same benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from evaluation.annotations import load_relationships, pairs_in_map
from evaluation.benchmarks.recall import THRESHOLDS, known_relationship_recall


def load_truth(truth_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(perturbation names, (P, K) latent matrix) from truth/phenotypes.parquet."""
    path = Path(truth_dir) / "phenotypes.parquet"
    if not path.exists():
        raise FileNotFoundError(f"synthetic truth not found: {path} (expected from `phenoscale synth`)")
    frame = pl.read_parquet(path)
    missing = {"perturbation", "latent"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}; has {frame.columns}")
    latent = frame.get_column("latent")
    return frame.get_column("perturbation").cast(pl.String).to_numpy(), np.stack(latent.to_numpy()).astype(np.float32)


def truth_relationships(truth_dir: str | Path) -> pl.DataFrame:
    """The planted gene-gene relationships (truth/relationships.csv)."""
    return load_relationships(Path(truth_dir) / "relationships.csv")


def oracle_recall(
    truth_dir: str | Path, relationships: dict[str, pl.DataFrame], thresholds=THRESHOLDS, min_genes: int = 20
) -> pl.DataFrame:
    """Recall of the planted latents for each relationship source (schema of known_relationship_recall)."""
    genes, latent = load_truth(truth_dir)
    pairs = {name: pairs_in_map(rels, genes) for name, rels in relationships.items()}
    return known_relationship_recall(genes, latent, pairs, thresholds, min_genes)
