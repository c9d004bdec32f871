"""The demo's report: the recall table, and the figures people read it by (OUT/report.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from datamodules.atomic import write_text_atomic
from evaluation.plots import save_figure
from evaluation.report import markdown_table as markdown

RANDOM_RECALL = 0.10  # two-sided 5% tails of the null: what an uninformative embedding recalls


def plot_recall_by_embedder(table: pl.DataFrame, path: Path) -> Path:
    """Bars: recall without and with TVN per embedder; dashed line: random."""
    first = table.filter(pl.col("source") == table["source"][0])
    names = first["embedder"].to_list()
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(names), 3.8))
    ax.bar(x - 0.2, first["recall_none"].fill_null(np.nan).to_numpy(), 0.4, label="no alignment", color="#bbbbbb")
    ax.bar(x + 0.2, first["recall_tvn"].fill_null(np.nan).to_numpy(), 0.4, label="TVN", color="#3b75af")
    ax.axhline(RANDOM_RECALL, color="k", ls="--", lw=1, label="random (0.10)")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylabel("known-relationship recall (0.05, 0.95)")
    ax.set_title(f"Recall of planted relationships ({table['source'][0]})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_blocks(blocks: pl.DataFrame, path: Path) -> Path:
    """Recall per encoder block (TVN), the Phenom-2 style layer scan."""
    part = blocks.filter(pl.col("alignment") == "tvn")
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for source in part["source"].unique(maintain_order=True):
        s = part.filter(pl.col("source") == source).sort("block")
        ax.plot(s["block"], s["recall"], marker="o", label=source)
    ax.axhline(RANDOM_RECALL, color="k", ls="--", lw=1)
    ax.set_xlabel("encoder block")
    ax.set_ylabel("recall (TVN)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_demo_report(
    out: Path,
    table: pl.DataFrame,
    channels: pl.DataFrame,
    blocks: pl.DataFrame,
    settings: Any,
    order: dict[str, float] | None = None,
) -> Path:
    """OUT/report.md, the tables behind it (recall_table, channel_generalisation and
    recall_by_block .parquet, channel_order_check.json) and the figures."""
    table.write_parquet(out / "recall_table.parquet")
    if order is not None:
        write_text_atomic(out / "channel_order_check.json", json.dumps(order, indent=2))
    for frame, name in ((channels, "channel_generalisation"), (blocks, "recall_by_block")):
        if frame.height:
            frame.write_parquet(out / f"{name}.parquet")
    figures = {"Recall per embedder": plot_recall_by_embedder(table, out / "recall_by_embedder.png")}
    lines = [
        "# phenoscale demo",
        "",
        f"Synthetic screen: {settings.genes} genes, seed {settings.seed} (`{out / 'screen'}`). "
        "Recall of the planted relationships at the (0.05, 0.95) percentiles of all gene pairs; "
        "random = 0.10. Training budgets are given per model; `embed_precision` is that of each "
        "embedder's embed() pass (see phenoscale.demo.EMBED_PRECISION).",
        "",
        markdown(table),
        "",
    ]
    if channels.height:
        wide = channels.filter(pl.col("alignment") == "tvn").select("channels", "source", "recall")
        lines += ["## Channel generalisation (CA-MAE, no retraining)", "", markdown(wide), ""]
    if order is not None:
        lines += [
            f"Stains in reversed order: the CA-MAE's embeddings of {order['crops']} crops differ from the "
            f"original order by {order['relative_difference']:.1e} (relative; worst crop "
            f"{order['worst_crop_relative_difference']:.1e}): equal up to summation order, as the "
            "channel-agnostic encoder is by construction.",
            "",
        ]
    if blocks.height:
        tvn = blocks.filter(pl.col("alignment") == "tvn")
        best = tvn.sort("recall", descending=True, nulls_last=True).row(0, named=True)
        figures["Recall per MAE encoder block"] = plot_blocks(blocks, out / "recall_by_block.png")
        lines += [
            "## Intermediate layers (MAE)",
            "",
            f"Best block: {best['block']} (recall {best['recall']:.3f} with TVN).",
            "",
            markdown(tvn.select("block", "source", "recall")),
            "",
        ]
    for title, path in figures.items():
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    lines += ["Per-model EFAAR reports: `eval/<name>/report.md`.", ""]
    return write_text_atomic(out / "report.md", "\n".join(lines))
