"""The steps every end-to-end job repeats: make a screen, fit, embed, score.

`phenoscale demo` and `phenoscale scaling` are both lists of these steps; keeping them here
means a demo row and a scaling-grid cell are computed by exactly the same code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

import datamodules
import lightning_modules
from datamodules.synthetic.design import preset
from datamodules.synthetic.screen import SCREEN_JSON, write_screen
from evaluation import EvalConfig, EvalResult, read_embeddings, run_efaar
from evaluation.report import write_outputs
from phenoscale.fitting import FitResult, fit
from phenoscale.run import RunDir


@dataclass(frozen=True)
class Screen:
    """Where a screen's shards and (for synthetic screens) its planted truth live."""

    shards: Path
    truth: Path | None

    @property
    def relationships(self) -> Path | None:
        return self.truth / "relationships.csv" if self.truth else None


def ensure_screen(out: Path, preset_name: str = "demo", **settings: Any) -> Screen:
    """Synthesise a screen into OUT once; a rerun with the same settings reuses it."""
    cfg = preset(preset_name, **settings)
    marker = out / SCREEN_JSON
    if marker.is_file():
        saved = json.loads(marker.read_text())["config"]
        wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as saved
        if saved != wanted:
            changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
            raise ValueError(
                f"{out} holds a screen made with other settings ({', '.join(changed)}); "
                "choose another output directory or delete it"
            )
    else:
        write_screen(cfg, out)
    return Screen(out / "shards", out / "truth")


def eval_data_config(
    shards: Path, crop_size: int, batch_size: int = 64, channels: list[str] | None = None, num_workers: int = 1
) -> datamodules.DataConfig:
    """Evaluation loading of `shards`: whole sites tiled into crops of the model's input size."""
    return datamodules.DataConfig(
        train_shards=str(shards),
        eval_shards=str(shards),
        crop_size=crop_size,
        batch_size=batch_size,
        channels=channels,
        num_workers=num_workers,
    )


def train(cfg: Any) -> tuple[FitResult, torch.nn.Module]:
    """Fit `cfg` (resuming or reusing a finished run in its run_dir) and load the trained module."""
    result = fit(cfg)
    checkpoint = RunDir(result.run_dir).last_checkpoint
    if checkpoint is None:
        raise RuntimeError(f"{result.run_dir} has no checkpoint after fitting")
    return result, lightning_modules.load_pretrained(checkpoint)


def score(embeddings: Path, eval_cfg: EvalConfig, out: Path | None = None) -> EvalResult:
    """EFAAR on one embeddings file; with OUT, also metrics.json, report.md and figures there."""
    result = run_efaar(read_embeddings(embeddings), eval_cfg)
    if out is not None:
        write_outputs(result, out, str(embeddings))
    return result


def recall_rows(result: EvalResult) -> pl.DataFrame:
    """Recall per (alignment, source) at the first threshold pair: the papers' headline numbers."""
    recall = result.recall
    if recall.height == 0:
        return pl.DataFrame(schema={"alignment": pl.String, "source": pl.String, "recall": pl.Float64})
    low = recall["threshold_low"].min()
    return recall.filter(pl.col("threshold_low") == low).select("alignment", "source", "recall")
