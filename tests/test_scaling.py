"""`phenoscale scaling` on a 2x2 grid of tiny runs: every cell fitted, scored, collected, plotted."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import phenoscale.scaling
from evaluation import EvalConfig, read_embeddings, run_efaar
from evaluation.plots import save_figure
from phenoscale.cli import main
from phenoscale.grid import cells, load_grid

REPO = Path(__file__).resolve().parents[1]


def write_tiny_grid(path: Path) -> Path:
    tiny = REPO / "configs" / "experiments" / "tiny.yaml"
    path.write_text(f"""
name: tiny
screen: {{preset: demo, genes: 24, image_size: 64, seed: 3}}
overrides:
  - model.family=mae
  - model.backbone=vit_small_patch16_256
  - data.num_workers=0
  - eval.alignment=[tvn]
  - eval.benchmarks=[recall]
  - eval.batch_column=plate
  - eval.clusters=null
  - eval.min_genes=5
models:
  - {{name: MAE w16, family: mae, size: XS, config: {tiny}, overrides: [model.backbone_kwargs.embed_dim=16]}}
  - {{name: MAE w32, family: mae, size: S, config: {tiny}}}
crops: [16, 48]
""")
    return path


@pytest.mark.slow
def test_two_by_two_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    grid_file = write_tiny_grid(tmp_path / "grid.yaml")
    out = tmp_path / "scaling"
    figures = []  # the plot as drawn, before it becomes PNG bytes

    def keep_figure(fig, path):
        figures.append(
            [
                [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]
                for ax in fig.axes
            ]
        )
        return save_figure(fig, path)

    monkeypatch.setattr(phenoscale.scaling, "save_figure", keep_figure)
    assert main(["scaling", str(grid_file), "--out", str(out)]) == 0
    table = pl.read_parquet(out / "results.parquet")
    assert table.height == 4
    assert sorted(table["budget_crops"].to_list()) == [16.0, 16.0, 48.0, 48.0]
    # batch 8 per step: 16 crops -> 2 steps, 48 -> 6 steps; crops seen are whole steps
    assert sorted(table["steps"].to_list()) == [2, 2, 6, 6]
    assert (table["crops_seen"] == table["steps"] * 8).all()
    assert (table["train_flops"] == table["train_flops_per_crop"] * table["crops_seen"]).all()
    wide, narrow = (table.filter(pl.col("model") == name) for name in ("MAE w32", "MAE w16"))
    assert wide["params"][0] > narrow["params"][0]
    assert wide["train_flops_per_crop"][0] > narrow["train_flops_per_crop"][0]
    # each cell's recall is its own embeddings' recall, rescored here with the grid's eval settings
    relationships = out / "screen" / "truth" / "relationships.csv"
    eval_cfg = EvalConfig(
        annotations=[str(relationships)],
        alignment=["tvn"],
        benchmarks=["recall"],
        batch_column="plate",
        clusters=None,
        min_genes=5,
    )
    for row in table.iter_rows(named=True):
        embeddings = read_embeddings(out / "cells" / row["cell"] / "embeddings.parquet")
        width = 16 if row["model"] == "MAE w16" else 32  # each cell embedded with its own model
        assert embeddings.collect_schema()["embedding"] == pl.Array(pl.Float32, width)
        assert row["recall_mean"] == pytest.approx(run_efaar(embeddings, eval_cfg).summary()["recall_mean"], abs=1e-9)
    # the plot: one line per model in both panels, recall against training FLOPs and crops seen
    [panels] = figures
    for panel, x in zip(panels, ("train_flops", "crops_seen")):
        lines = {label: (xs, ys) for label, xs, ys in panel if label in ("MAE w16", "MAE w32")}
        assert set(lines) == {"MAE w16", "MAE w32"}
        for model, (xs, ys) in lines.items():
            part = table.filter(pl.col("model") == model).sort("crops_seen")
            assert xs == part[x].to_list() and ys == part["recall_mean"].to_list()
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MAE w32" in (out / "results.md").read_text()

    # a rerun finds every cell done and only collects
    before = {p: p.stat().st_mtime for p in (out / "cells").glob("*/result.json")}
    assert main(["scaling", str(grid_file), "--out", str(out), "--cell", "0"]) == 0
    assert before == {p: p.stat().st_mtime for p in (out / "cells").glob("*/result.json")}


def test_cells_are_numbered_for_array_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = load_grid(write_tiny_grid(tmp_path / "grid.yaml"))
    numbered = cells(grid)
    assert [(c.model.name, c.crops) for c in numbered] == [
        ("MAE w16", 16.0),
        ("MAE w16", 48.0),
        ("MAE w32", 16.0),
        ("MAE w32", 48.0),
    ]
    assert main(["scaling", str(tmp_path / "grid.yaml"), "--list"]) == 0
    assert capsys.readouterr().out.count("MAE w") == 4
    with pytest.raises(ValueError, match="no cell matches"):
        main(["scaling", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "o"), "--cell", "9"])
