"""report.md and metrics.json of an evaluation: what was measured, under which alignment, and why
something could not be."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl

from datamodules.atomic import write_text_atomic
from evaluation.pipeline import EvalResult
from evaluation.plots import plot_model_vs_oracle, plot_recall, plot_similarity_heatmap


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(frame: pl.DataFrame) -> str:
    if frame.height == 0:
        return "_(empty)_"
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * frame.width]
    lines += ["| " + " | ".join(_format(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


def result_json(result: EvalResult) -> dict[str, Any]:
    """JSON-ready dict: summary, every metric row (None = not computable, with reason), recall, oracle."""
    return {
        "primary_alignment": result.primary_alignment,
        "n_dropped_nonfinite": result.n_dropped,
        "summary": result.summary(),
        "metrics": result.metrics.to_dicts(),
        "recall": result.recall.to_dicts(),
        "oracle": None if result.oracle is None else result.oracle.to_dicts(),
        "generalisation": result.generalisation.to_dicts(),
    }


def write_metrics_json(result: EvalResult, path: Path) -> Path:
    return write_text_atomic(path, json.dumps(result_json(result), indent=2, allow_nan=False, default=str))


def write_report(result: EvalResult, path: Path, source: str, figures: dict[str, Path | None]) -> Path:
    """report.md beside the figures (relative links)."""
    wide = result.metrics.filter(pl.col("alignment").is_not_null()).pivot(
        on="alignment", index=["benchmark", "metric"], values="value", aggregate_function="first"
    )
    missing = result.metrics.filter(pl.col("value").is_null()).select("alignment", "metric", "reason")
    recall = (
        result.recall.select(
            "alignment", "source", "threshold_low", "threshold_high", "recall", "random_baseline", "n_pairs", "n_null"
        )
        if result.recall.height
        else result.recall
    )
    parts = [
        f"# EFAAR evaluation of `{source}`",
        "",
        f"Primary alignment: **{result.primary_alignment}**. Rows dropped for NaN/inf embeddings: "
        f"{result.n_dropped}. Recall: fraction of annotated pairs whose cosine lies in the outer tails of "
        "the null of all gene pairs (random = low + 1 - high).",
        "",
        "## Metrics",
        markdown_table(wide),
        "",
        "## Known-relationship recall",
        markdown_table(recall),
    ]
    if result.oracle is not None:
        parts += [
            "",
            "## Oracle recall (planted truth, the ceiling)",
            markdown_table(result.oracle.select("source", "threshold_low", "recall", "n_pairs", "reason")),
        ]
    if result.clusters.height:
        summary = result.clusters.group_by("alignment", maintain_order=True).agg(
            complexes=pl.len(), significant=(pl.col("ks_pvalue") <= 0.05).mean(), median_ks=pl.col("ks_stat").median()
        )
        parts += ["", "## CORUM complexes (KS within vs between)", markdown_table(summary)]
    if missing.height:
        parts += ["", "## Not computable", markdown_table(missing)]
    parts += ["", "## Figures"]
    parts += [f"![{name}]({p.name})" for name, p in figures.items() if p is not None]
    return write_text_atomic(path, "\n".join(parts) + "\n")


def write_outputs(result: EvalResult, out: Path, source: str) -> Path:
    """OUT/metrics.json, OUT/report.md and the figures of one evaluation; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {"recall per source": plot_recall(result.recall, out / "recall.png")}
    genes, profiles = result.maps[result.primary_alignment]
    figures["most related genes"] = plot_similarity_heatmap(genes, profiles, out / "similarity_heatmap.png")
    if result.oracle is not None:
        figures["model vs oracle"] = plot_model_vs_oracle(
            result.recall, result.oracle, result.primary_alignment, out / "model_vs_oracle.png"
        )
    write_metrics_json(result, out / "metrics.json")
    return write_report(result, out / "report.md", source, figures)
