"""Figures of an evaluation (matplotlib, Agg backend: no display needed on cluster nodes)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from scipy.cluster.hierarchy import leaves_list, linkage  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

from datamodules.atomic import write_bytes_atomic  # noqa: E402
from evaluation.relate import cosine, knn, l2_normalised  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """PNG at 120 dpi, written atomically; closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def _first_threshold(recall: pl.DataFrame) -> pl.DataFrame:
    return recall.filter(pl.col("threshold_low") == recall["threshold_low"].min())


def plot_recall(recall: pl.DataFrame, path: Path) -> Path | None:
    """Recall per source (bars per alignment) against the random baseline (dashed)."""
    recall = _first_threshold(recall.drop_nulls("recall")) if len(recall) else recall
    if len(recall) == 0:
        return None
    sources = recall["source"].unique(maintain_order=True).to_list()
    alignments = recall["alignment"].unique(maintain_order=True).to_list()
    width = 0.8 / len(alignments)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(sources), 3.5))
    for k, alignment in enumerate(alignments):
        part = recall.filter(pl.col("alignment") == alignment)
        values = dict(zip(part["source"], part["recall"]))
        ax.bar(np.arange(len(sources)) + k * width, [values.get(s, np.nan) for s in sources], width, label=alignment)
    ax.axhline(recall["random_baseline"][0], color="k", ls="--", lw=1, label="random")
    ax.set_xticks(np.arange(len(sources)) + width * (len(alignments) - 1) / 2, sources, rotation=30, ha="right")
    low, high = recall["threshold_low"][0], recall["threshold_high"][0]
    ax.set_ylabel(f"recall ({low:g}, {high:g})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_similarity_heatmap(genes: np.ndarray, profiles: np.ndarray, path: Path, n_genes: int = 50) -> Path | None:
    """Cosine map of the `n_genes` genes with the strongest nearest neighbour, hierarchically ordered."""
    if len(genes) < 3:
        return None
    unit = l2_normalised(profiles)
    sims, _ = knn(unit, unit, 2)
    top = np.sort(np.argsort(-sims[:, 1])[:n_genes])
    block = cosine(unit[top], unit[top]).astype(np.float64)
    distance = np.clip(1 - (block + block.T) / 2, 0, 2)
    np.fill_diagonal(distance, 0)
    order = leaves_list(linkage(squareform(distance, checks=False), "average"))
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(block[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    labels = np.asarray(genes)[top][order]
    ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=5)
    ax.set_yticks(range(len(order)), labels, fontsize=5)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    return save_figure(fig, path)


def plot_model_vs_oracle(recall: pl.DataFrame, oracle: pl.DataFrame, alignment: str, path: Path) -> Path | None:
    """Model recall next to the planted-truth ceiling, per source."""
    model = _first_threshold(recall.filter(pl.col("alignment") == alignment)) if len(recall) else recall
    ceiling = _first_threshold(oracle)
    sources = ceiling["source"].to_list()
    if not sources:
        return None
    model_values = dict(zip(model["source"], model["recall"])) if len(model) else {}
    x = np.arange(len(sources))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(sources), 3.5))
    ax.bar(
        x - 0.2,
        [model_values.get(s) if model_values.get(s) is not None else np.nan for s in sources],
        0.4,
        label=f"model ({alignment})",
    )
    ax.bar(x + 0.2, [v if v is not None else np.nan for v in ceiling["recall"]], 0.4, label="oracle (planted truth)")
    ax.axhline(ceiling["random_baseline"][0], color="k", ls="--", lw=1, label="random")
    ax.set_xticks(x, sources, rotation=30, ha="right")
    ax.set_ylabel("recall")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
