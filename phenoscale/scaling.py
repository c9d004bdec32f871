"""`phenoscale scaling`: fit and evaluate every cell of a grid, collect one table, plot the curves.

Each cell (a model at a training budget) writes OUT/cells/<cell>/result.json when it is done, so
a grid is resumable and can be spread over a SLURM array (`--cell $SLURM_ARRAY_TASK_ID`) and
gathered afterwards (`--collect`). Training FLOPs are counted on the cell's own model, not
looked up, so the x-axis of the curves is exact for any backbone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl

from datamodules.atomic import write_text_atomic
from evaluation.plots import save_figure
from evaluation.report import markdown_table
from lightning_modules.families import get_family
from phenoscale.config import load_config, plan_batch
from phenoscale.embedding import embed_model
from phenoscale.grid import Cell, GridConfig, cell_layers, cells, steps_for
from phenoscale.launch import detect_launch, resolve_topology
from phenoscale.plan import model_size
from phenoscale.workflow import Screen, ensure_screen, eval_data_config, recall_rows, score, train

RESULT = "result.json"


def grid_screen(grid: GridConfig, out: Path) -> Screen:
    """The grid's data: existing shards, or a synthetic screen made once under OUT/screen."""
    spec = grid.screen
    if spec.shards:
        return Screen(Path(spec.shards), Path(spec.truth) if spec.truth else None)
    return ensure_screen(
        out / "screen",
        spec.preset,
        genes=spec.genes,
        image_size=spec.image_size,
        seed=spec.seed,
        modules_from=spec.modules_from,
    )


def run_cell(grid: GridConfig, cell: Cell, screen: Screen, out: Path) -> dict | None:
    """Fit, embed and score one cell; returns its result row (rank 0) or None (other ranks)."""
    cell_dir = out / "cells" / cell.name
    done = cell_dir / RESULT
    if done.is_file():
        return json.loads(done.read_text())
    common = [f"data.train_shards={screen.shards}", f"run.run_dir={cell_dir / 'run'}"]
    if screen.relationships is not None:
        common += [f"eval.annotations=[{screen.relationships}]", f"eval.truth_dir={screen.truth}"]
    cfg = load_config(cell_layers(grid, cell), [*grid.overrides, *cell.model.overrides, *common])
    devices, num_nodes = resolve_topology(cfg.trainer.devices, cfg.trainer.num_nodes, detect_launch())
    effective = plan_batch(cfg, cfg.data.batch_size, devices, num_nodes).effective
    cfg.trainer.max_steps = steps_for(cell.crops, effective)

    start = time.perf_counter()
    fitted, model = train(cfg)
    seconds = time.perf_counter() - start
    embeddings = embed_model(
        model, eval_data_config(screen.shards, cfg.data.crop_size), cell_dir / "embeddings.parquet"
    )
    if embeddings is None:  # not rank 0: rank 0 scores and records the cell
        return None
    result = score(embeddings, cfg.eval, cell_dir / "eval")
    params, encoder_params, flops_per_crop = model_size(
        cfg.model, cfg.optim, model.in_chans, max(2, getattr(model, "num_classes", 0))
    )
    crops_seen = fitted.global_step * effective
    row = {
        "cell": cell.name,
        "model": cell.model.name,
        "family": cell.model.family,
        "size": cell.model.size,
        "params": params,
        "encoder_params": encoder_params,
        "train_flops_per_crop": flops_per_crop,
        "budget_crops": cell.crops,
        "steps": fitted.global_step,
        "crops_seen": crops_seen,
        "train_flops": flops_per_crop * crops_seen,
        "train_seconds": round(seconds, 1),
    }
    for r in recall_rows(result).iter_rows(named=True):
        row[f"recall_{r['alignment']}_{r['source']}"] = r["recall"]
    row["recall_mean"] = result.summary().get("recall_mean")
    if result.oracle is not None:
        row["oracle_recall_mean"] = result.summary().get("oracle_recall_mean")
    write_text_atomic(done, json.dumps(row, indent=2))
    return row


def collect(out: Path) -> pl.DataFrame:
    """Every finished cell's row -> OUT/results.parquet, results.md and scaling.png."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "cells").glob(f"*/{RESULT}"))]
    if not rows:
        raise FileNotFoundError(f"no finished cell under {out / 'cells'}; run the grid first")
    table = pl.DataFrame(rows, infer_schema_length=None).sort("cell")
    table.write_parquet(out / "results.parquet")
    shown = [
        "model",
        "family",
        "size",
        "params",
        "train_flops_per_crop",
        "crops_seen",
        "train_flops",
        "recall_mean",
        "train_seconds",
    ]
    write_text_atomic(
        out / "results.md",
        "# Scaling grid results\n\n"
        + markdown_table(table.select([c for c in shown if c in table.columns]))
        + "\n\n"
        + "![recall against training compute and crops seen](scaling.png)\n",
    )
    plot_scaling(table, out / "scaling.png")
    return table


SIZE_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_scaling(table: pl.DataFrame, path: Path) -> Path:
    """Recall against training FLOPs and against crops seen: one line per model (family x size)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    sizes = table["size"].unique(maintain_order=True).to_list()  # colour = family, marker = size
    for (model,), part in table.sort("crops_seen").group_by(["model"], maintain_order=True):
        family, marker = part["family"][0], SIZE_MARKERS[sizes.index(part["size"][0]) % len(SIZE_MARKERS)]
        for ax, x in zip(axes, ("train_flops", "crops_seen")):
            ax.plot(part[x], part["recall_mean"], marker=marker, color=get_family(family).colour, label=str(model))
    if "oracle_recall_mean" in table.columns and table["oracle_recall_mean"].drop_nulls().len():
        for ax in axes:
            ax.axhline(table["oracle_recall_mean"].drop_nulls()[0], color="k", ls=":", lw=1, label="oracle")
    for ax, label in zip(axes, ("training FLOPs", "training crops seen")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.axhline(0.10, color="k", ls="--", lw=1)
    axes[0].set_ylabel("mean known-relationship recall")
    axes[1].legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def run_grid(grid: GridConfig, out: Path, only: list[int] | None = None) -> pl.DataFrame | None:
    """Run the grid's cells (all, or the indices in `only`) and collect what is finished."""
    todo = [c for c in cells(grid) if only is None or c.index in only]
    if not todo:
        raise ValueError(f"no cell matches {only}; the grid has cells 0..{len(cells(grid)) - 1}")
    screen = grid_screen(grid, out)
    for cell in todo:
        print(f"[scaling] cell {cell.index}: {cell.model.name}, {cell.crops:.3g} crops", flush=True)
        run_cell(grid, cell, screen, out)
    return collect(out) if detect_launch().global_rank == 0 else None
