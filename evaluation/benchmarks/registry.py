"""The registry of benchmarks: the one list of what `eval.benchmarks` may name.

`run_efaar` aligns and aggregates the embeddings once per alignment, then hands each requested
benchmark the same `BenchmarkInput`; a benchmark reports scalars through `BenchmarkInput.metric`
(value None plus a reason when the data cannot support it, never a made-up 0) and may return a
frame, which lands in the `EvalResult` table it names. A new benchmark is one function and one
`register_benchmark` call (docs/ARCHITECTURE.md, "Add a benchmark").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from registry import Registry

if TYPE_CHECKING:
    from evaluation.config import EvalConfig

#: p-value at or below which a perturbation or complex counts as significant, in every benchmark
SIGNIFICANCE = 0.05
#: (alignment, benchmark, metric, value, reason): one row of EvalResult.metrics
MetricRow = tuple[str | None, str, str, float | None, str | None]


@dataclass
class BenchmarkInput:
    """What one benchmark sees: per alignment (or once, on the unaligned features)."""

    benchmark: str
    cfg: EvalConfig
    alignment: str | None  # None for benchmarks that run once
    labels: np.ndarray  # perturbation of every row
    features: np.ndarray  # rows x D: aligned with `alignment`, or unaligned for run-once benchmarks
    is_control: np.ndarray
    batches: np.ndarray | None
    metadata: pl.DataFrame  # every row's metadata columns
    genes: np.ndarray | None = None  # the aggregated map (per alignment): one profile per perturbation
    profiles: np.ndarray | None = None
    prepared: Any = None  # what the benchmark's `prepare(cfg)` returned (annotations, clusters, ...)
    rows: list[MetricRow] = field(default_factory=list)

    def metric(self, name: str, value: float | None, reason: str | None = None, alignment: str | None = "") -> None:
        """Report one scalar; `alignment` defaults to this input's own."""
        where = self.alignment if alignment == "" else alignment
        if value is None and reason is None:
            reason = "not computable"
        self.rows.append((where, self.benchmark, name, None if value is None else float(value), reason))


@dataclass(frozen=True)
class Benchmark:
    """One biological benchmark and where its output goes."""

    name: str
    run: Callable[[BenchmarkInput], pl.DataFrame | None]
    table: str  # EvalResult table its frames join (benchmarks may share one, e.g. "perturbations")
    schema: dict[str, Any] | None = None  # of that table when nothing was computed
    per_alignment: bool = True  # False: run once, on the unaligned features (it aligns itself)
    prepare: Callable[[EvalConfig], Any] | None = None  # once per evaluation: load annotations etc.
    default: bool = True  # part of EvalConfig's default benchmarks


_BENCHMARKS: Registry[Benchmark] = Registry("benchmark", origin=lambda b: b.run.__module__)


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Add `benchmark`; a different one under a taken name is an error, the same one again a no-op."""
    return _BENCHMARKS.register(benchmark.name, benchmark)


def get_benchmark(name: str) -> Benchmark:
    return _BENCHMARKS.get(name)


def benchmark_names(default_only: bool = False) -> tuple[str, ...]:
    """Registered benchmarks in registration order (`default_only`: those run when none are named)."""
    return tuple(b.name for b in _BENCHMARKS.values() if b.default or not default_only)
