"""Fit and evaluate a grid of model sizes x training budgets; collect one table and the curves.

The grid YAML (configs/scaling/*.yaml) names the data, the models (experiment files) and the
training budgets in crops seen. Each cell writes OUT/cells/<cell>/result.json when done, so a
rerun continues where it stopped. On a cluster, run one cell per array task and collect after.

examples:
  phenoscale scaling configs/scaling/cpu.yaml --out runs/scaling          # the CPU grid (README.md: its time)
  phenoscale scaling configs/scaling/paper.yaml --list                    # the cells and their numbers
  srun ... phenoscale scaling configs/scaling/paper.yaml --out /scratch/scaling --cell $SLURM_ARRAY_TASK_ID
  phenoscale scaling configs/scaling/paper.yaml --out /scratch/scaling --collect
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "fit and evaluate a grid of model sizes x training crops -> results.parquet, results.md, scaling.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", type=Path, help="grid YAML, e.g. configs/scaling/cpu.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    parser.add_argument("--cell", type=int, nargs="+", default=None, help="run only these cell numbers")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--collect", action="store_true", help="only gather finished cells into the table")


def run(args: argparse.Namespace) -> int:
    from evaluation.report import markdown_table
    from phenoscale.grid import cells, load_grid
    from phenoscale.scaling import collect, run_grid

    grid = load_grid(args.grid)
    if args.list:
        for cell in cells(grid):
            print(f"{cell.index:4d}  {cell.model.name:<24} {cell.crops:.3g} crops  ({cell.model.config})")
        return 0
    table = collect(args.out) if args.collect else run_grid(grid, args.out, args.cell)
    if table is not None:
        print(
            markdown_table(
                table.select([c for c in ("model", "crops_seen", "train_flops", "recall_mean") if c in table.columns])
            )
        )
        print(f"wrote {args.out / 'results.parquet'}, {args.out / 'results.md'}, {args.out / 'scaling.png'}")
    return 0
