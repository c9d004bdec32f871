"""Scaling grids: model sizes x training budgets, one YAML for a CPU box or a GPU cluster.

A grid names the data (a synthetic screen to make, or existing shards), the experiment file
under every cell, the models (each an experiment file plus overrides) and the training budgets
in crops seen. `phenoscale scaling` fits and evaluates every cell; `phenoscale plan --grid`
prices it. Cells are numbered so a SLURM array job can run one cell per task.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from phenoscale.config import ConfigError
from phenoscale.plan import Hardware, SiteFormat, crops_of


@dataclass
class ScreenSpec:
    """The training/evaluation data: synthesise a screen (preset + settings) or use shards."""

    preset: str = "demo"
    genes: Optional[int] = None
    image_size: Optional[int] = None
    seed: int = 0
    modules_from: Optional[str] = None
    shards: Optional[str] = None  # existing shard directory: used instead of synthesising
    truth: Optional[str] = None  # truth/ of a synthetic screen given by `shards`


@dataclass
class GridModel:
    """One line of the scaling plot: a family at one size."""

    name: str
    family: str  # mae | camae | wsl (the line's colour)
    size: str  # S, B, L, ... (the line's marker)
    config: str  # experiment YAML with the model/optim sections (e.g. configs/paper/*.yaml)
    overrides: list[str] = field(default_factory=list)


@dataclass
class GridConfig:
    name: str = "grid"
    base: Optional[str] = None  # experiment YAML under every cell (data, trainer, eval settings)
    overrides: list[str] = field(default_factory=list)  # dotlist applied to every cell
    screen: ScreenSpec = field(default_factory=ScreenSpec)
    models: list[GridModel] = field(default_factory=list)
    crops: list[str] = field(default_factory=list)  # training budgets: 2e4, '3.5B', ...
    # the plan's own dataclasses, so the grid YAML is checked (a GPU name, an mfu) when it loads
    hardware: Hardware = field(default_factory=Hardware)
    site: SiteFormat = field(default_factory=SiteFormat)

    @property
    def budgets(self) -> list[float]:
        return [crops_of(c) for c in self.crops]


@dataclass(frozen=True)
class Cell:
    """One fit of the grid: a model at one training budget."""

    index: int
    model: GridModel
    crops: float

    @property
    def name(self) -> str:
        return f"{self.index:03d}_{_slug(self.model.name)}_{self.crops:.3g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-").lower()


def load_grid(path: str | Path) -> GridConfig:
    """The grid YAML checked against GridConfig: a typo fails before any cell starts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(GridConfig), OmegaConf.load(path))
        grid: GridConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"{path}: {err.msg} (key '{err.full_key}'); allowed top-level keys: "
            f"{', '.join(GridConfig.__dataclass_fields__)}"
        ) from None
    except ValueError as err:  # a value the plan's dataclasses refuse (hardware.gpu, hardware.mfu, ...)
        raise ConfigError(f"{path}: {err}") from None
    if not grid.models or not grid.crops:
        raise ConfigError(f"{path}: a grid needs at least one entry in 'models' and in 'crops'")
    for model in grid.models:
        if not Path(model.config).is_file():
            raise ConfigError(f"{path}: model {model.name!r} points to missing config {model.config}")
    return grid


def cells(grid: GridConfig) -> list[Cell]:
    """Every (model, budget) pair, models outer, budgets ascending: a stable numbering."""
    budgets = sorted(grid.budgets)
    return [
        Cell(i * len(budgets) + j, model, crops)
        for i, model in enumerate(grid.models)
        for j, crops in enumerate(budgets)
    ]


def cell_layers(grid: GridConfig, cell: Cell) -> list[str]:
    """The cell's experiment files in merge order: the grid's base, then the model's (later wins)."""
    return [p for p in (grid.base, cell.model.config) if p]


def steps_for(crops: float, effective_batch: int) -> int:
    """Optimizer steps that see at least `crops` crops."""
    return max(1, math.ceil(crops / effective_batch))
