"""The run-overhead benchmark (`python -m benchmarks runs`) still drives phenoscale's own Trainer:
nothing else calls `build_trainer` outside `fit`, so a signature change broke it unnoticed once."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_runs


def test_the_trainer_overhead_row_measures_both_trainers(shared: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PHENOSCALE_SHARED", str(shared))
    row = bench_runs.bench_steps(tmp_path)
    rates = row.extra["all_rates"]
    assert len(rates["bare"]) == len(rates["phenoscale"]) == 3
    assert min(rates["bare"] + rates["phenoscale"]) > 0
    assert row.value == max(rates["phenoscale"]) and row.baseline_value == max(rates["bare"])
    assert row.ratio == pytest.approx(row.value / row.baseline_value)
