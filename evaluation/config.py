"""EvalConfig: every setting of the EFAAR evaluation, owned by the evaluation package.

OmegaConf-friendly (plain types, lists, Optional) so phenoscale/config.py can compose it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from evaluation.aggregate import AGGREGATIONS
from evaluation.align import ALIGNMENTS
from evaluation.annotations import SOURCES
from evaluation.benchmarks import benchmark_names

POOLINGS = ("mean", "cls", "channelwise")


@dataclass
class EvalConfig:
    """What to evaluate and how. The first entry of `alignment` is the primary one (logged unprefixed)."""

    annotations: list[str] = field(default_factory=lambda: list(SOURCES))  # source names or file paths
    clusters: Optional[str] = "CORUM_clusters.tsv"  # file name in the annotations dir, or a path; None: skip
    alignment: list[str] = field(default_factory=lambda: ["tvn"])
    batch_column: Optional[str] = "experiment"  # alignment batches; None: one batch
    perturbation_column: str = "perturbation"
    control_column: str = "is_control"
    control_label: Optional[str] = None  # when set, controls are rows whose perturbation equals it
    experiment_column: str = "experiment"  # held-out unit of the generalisation benchmark
    aggregation: str = "mean"
    thresholds: list[list[float]] = field(default_factory=lambda: [[0.05, 0.95], [0.1, 0.9]])
    min_genes: int = 20
    cluster_min_genes: int = 10
    # registered benchmarks (evaluation.benchmarks); default: every one registered as a default
    benchmarks: list[str] = field(default_factory=lambda: list(benchmark_names(default_only=True)))
    n_null: int = 1000  # control sets in the consistency null (magnitude uses n_null // 5)
    map_null_size: int = 10000
    knn_k: int = 1
    every_n_epochs: int = 1
    pooling: str = "mean"
    blocks: Optional[list[int]] = None  # encoder blocks to score; None: the default embedding only
    truth_dir: Optional[str] = None  # synthetic screen truth/ directory for the oracle recall
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail at configuration time, naming the field and the allowed values."""
        checks = [
            ("alignment", self.alignment, ALIGNMENTS),
            ("benchmarks", self.benchmarks, benchmark_names()),
        ]
        for name, values, allowed in checks:
            bad = [v for v in values if v not in allowed]
            if bad or not values and name == "alignment":
                raise ValueError(f"EvalConfig.{name}: {bad or 'empty'} not allowed; choose from {list(allowed)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"EvalConfig.aggregation '{self.aggregation}' not in {list(AGGREGATIONS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"EvalConfig.pooling '{self.pooling}' not in {list(POOLINGS)}")
        for pair in self.thresholds:
            if len(pair) != 2 or not 0 < min(pair) < max(pair) < 1:
                raise ValueError(f"EvalConfig.thresholds: {pair} must be two numbers 0 < low < high < 1")
        if self.every_n_epochs < 1:
            raise ValueError("EvalConfig.every_n_epochs must be >= 1")
