"""The real Opera Phenix Cell Painting field in ../shared, read once per process for every test that
needs real pixels (shards, streaming, converters, model crops, the synthetic screen's realism)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile

PEDIATRIC_FIELD = "images/pediatric_cancer_atlas_BR00143976_C03_f03"
PEDIATRIC_STAINS = ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]  # ch1..ch6, from its load_data parquet


@lru_cache(maxsize=2)
def pediatric_field(shared_data: Path) -> np.ndarray:
    """(6, 1080, 1080) uint16, channels in PEDIATRIC_STAINS order; read-only, since it is shared."""
    folder = shared_data / PEDIATRIC_FIELD
    field = np.stack([tifffile.imread(folder / f"r03c03f03p01-ch{c}sk1fk1fl1.tiff") for c in range(1, 7)])
    field.setflags(write=False)
    return field
