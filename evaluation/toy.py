"""A seeded toy screen in the embeddings layout, for tests and benchmarks of the evaluation.

Genes fall into modules sharing a phenotype direction; every batch adds its own offset and
per-feature scale (the batch effect alignment must remove); controls carry only the batch
effect. Small enough for unit tests, and scales to genome-wide sizes for the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from evaluation.embeddings_io import embeddings_frame

CONTROL = "non-targeting"


def toy_screen(
    genes: np.ndarray | int,
    dim: int = 32,
    wells_per_gene: int = 4,
    controls_per_batch: int = 20,
    n_batches: int = 4,
    module_size: int = 4,
    batch_strength: float = 2.0,
    seed: int = 0,
    truth_dir: Path | None = None,
) -> pl.DataFrame:
    """Columns experiment, plate, well, perturbation, is_control, embedding (float32).

    Gene `i` belongs to module i // module_size; each gene's wells are spread over the batches.
    With `truth_dir`, the planted truth is written there in `phenoscale synth`'s truth/ layout
    (phenotypes.parquet, relationships.csv).
    """
    rng = np.random.default_rng(seed)
    names = np.array([f"G{i:05d}" for i in range(genes)]) if isinstance(genes, int) else np.asarray(genes, str)
    n_genes = len(names)
    modules = rng.normal(size=(n_genes // module_size + 1, dim)).astype(np.float32)
    phenotype = modules[np.arange(n_genes) // module_size] + 0.5 * rng.normal(size=(n_genes, dim)).astype(np.float32)
    if truth_dir is not None:
        _write_truth(Path(truth_dir), names, np.arange(n_genes) // module_size, phenotype, module_size)
    well_gene = np.repeat(np.arange(n_genes), wells_per_gene)
    gene_batch = np.arange(len(well_gene)) % n_batches
    ctrl_batch = np.repeat(np.arange(n_batches), controls_per_batch)
    batch = np.concatenate([gene_batch, ctrl_batch])
    signal = np.concatenate([phenotype[well_gene], np.zeros((len(ctrl_batch), dim), np.float32)])
    offset = batch_strength * rng.normal(size=(n_batches, dim)).astype(np.float32)
    scale = np.exp(0.3 * rng.normal(size=(n_batches, dim))).astype(np.float32)
    noise = rng.normal(size=signal.shape).astype(np.float32)
    features = (signal + noise) * scale[batch] + offset[batch]
    perturbation = np.concatenate([names[well_gene], np.full(len(ctrl_batch), CONTROL)])
    n = len(batch)
    metadata = pl.DataFrame(
        {
            "experiment": [f"exp{b}" for b in batch],
            "plate": [f"exp{b}_p1" for b in batch],
            "well": [f"w{i:06d}" for i in range(n)],
            "perturbation": perturbation,
            "is_control": perturbation == CONTROL,
        }
    )
    return embeddings_frame(metadata, features)


def toy_relationships(genes: np.ndarray | int, module_size: int = 4) -> pl.DataFrame:
    """All within-module pairs of toy_screen's genes: the screen's planted truth as entity1,entity2."""
    names = np.array([f"G{i:05d}" for i in range(genes)]) if isinstance(genes, int) else np.asarray(genes, str)
    module = np.arange(len(names)) // module_size
    i, j = np.triu_indices(len(names), 1)
    same = module[i] == module[j]
    return pl.DataFrame({"entity1": names[i[same]], "entity2": names[j[same]]})


def _write_truth(
    truth_dir: Path, names: np.ndarray, module: np.ndarray, phenotype: np.ndarray, module_size: int
) -> None:
    truth_dir.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"perturbation": names, "module": module}).with_columns(
        pl.Series("latent", phenotype, dtype=pl.Array(pl.Float32, phenotype.shape[1]))
    ).write_parquet(truth_dir / "phenotypes.parquet")
    toy_relationships(names, module_size).write_csv(truth_dir / "relationships.csv")
