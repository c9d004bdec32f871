"""run_efaar end to end on a seeded toy screen, the exact streaming null, IO, CLI and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from evaluation import EvalConfig, read_embeddings, run_efaar, write_embeddings
from evaluation.benchmarks.recall import known_relationship_recall, rank_cutoffs
from evaluation.embeddings_io import embedding_matrix, embeddings_frame
from evaluation.relate import l2_normalised
from evaluation.toy import toy_relationships, toy_screen
from phenoscale.cli import main as cli

N_GENES = 80


@pytest.fixture
def relationships(tmp_path) -> Path:
    path = tmp_path / "planted.csv"
    toy_relationships(N_GENES).write_csv(path)
    return path


def _cfg(relationships: Path, **overrides) -> EvalConfig:
    settings = dict(
        annotations=[str(relationships)],
        clusters=None,
        alignment=["centerscale", "none"],
        n_null=100,
        map_null_size=200,
    )
    settings.update(overrides)
    return EvalConfig(**settings)


def _recall(result, source="planted", alignment=None):
    rows = result.recall.filter(
        (pl.col("source") == source)
        & (pl.col("threshold_low") == 0.05)
        & (pl.col("alignment") == (alignment or result.primary_alignment))
    )
    return rows["recall"][0], rows["reason"][0]


def test_pipeline_recovers_planted_modules_and_alignment_helps(relationships):
    result = run_efaar(toy_screen(N_GENES, seed=0, batch_strength=3.0), _cfg(relationships))
    summary = result.summary()
    assert summary["recall_planted"] > 0.5  # random = 0.10
    assert summary["consistency"] > summary["none/consistency"]
    assert summary["knn_accuracy"] > summary["none/knn_accuracy"]  # held-out experiments, batch effect removed
    assert summary["map_mean"] > summary["none/map_mean"]
    assert result.maps["centerscale"][1].shape == (N_GENES, 32)


@pytest.mark.parametrize("locator", ["whole", "sample", "histogram_fallback"])
def test_streaming_null_equals_brute_force_sort(monkeypatch, caplog, locator):
    """Many tiny blocks, and each way of locating the order statistics, give efaar's definition on a
    sorted full null."""
    from evaluation.benchmarks import recall

    if locator != "whole":
        monkeypatch.setattr(recall, "SMALL_NULL", 0)
        monkeypatch.setattr(recall, "SAMPLE_SIDE", 30)
    if locator == "histogram_fallback":
        monkeypatch.setattr(recall, "WINDOW_SE", -50.0)  # empty sampled windows force the fallback
    rng = np.random.default_rng(1)
    profiles = rng.normal(size=(150, 8)).astype(np.float32)
    genes = np.array([f"g{i}" for i in range(150)])
    pairs = {"a": np.unique(np.sort(rng.integers(0, 150, size=(400, 2)), axis=1), axis=0)}
    pairs["a"] = pairs["a"][pairs["a"][:, 0] != pairs["a"][:, 1]]
    streamed = known_relationship_recall(genes, profiles, pairs, block_elements=700)
    assert ("histogram locator" in caplog.text) == (locator == "histogram_fallback")
    unit = l2_normalised(profiles)
    sims = unit @ unit.T
    null = np.sort(sims[np.triu_indices(150, 1)])
    q = sims[pairs["a"][:, 0], pairs["a"][:, 1]]
    for low, high in [(0.05, 0.95), (0.1, 0.9)]:
        left = np.searchsorted(null, q, "left") / len(null)
        right = np.searchsorted(null, q, "right") / len(null)
        expected = ((right <= low) | (left >= high)).mean()
        got = streamed.filter(pl.col("threshold_low") == low)["recall"][0]
        assert got == pytest.approx(expected, abs=1e-12)
        k, upper = rank_cutoffs(len(null), low, high)
        row = streamed.filter(pl.col("threshold_low") == low)
        assert row["null_low"][0] == pytest.approx(null[k - 1], abs=1e-6)
        assert row["null_high"][0] == pytest.approx(null[upper - 1], abs=1e-6)


@pytest.mark.parametrize("m", [190, 1000, 4950, 123457])
def test_rank_cutoffs_follow_efaar_float_divisions(m):
    for low, high in [(0.05, 0.95), (0.1, 0.9)]:
        k1, upper = rank_cutoffs(m, low, high)
        ranks = np.arange(m + 1)
        assert k1 - 1 == ranks[ranks / m <= low].max()
        assert upper == ranks[ranks / m >= high].min()


def test_embeddings_round_trip_lazy_and_atomic(tmp_path):
    frame = toy_screen(10, dim=6, seed=2)
    path = write_embeddings(frame, tmp_path / "sub" / "emb.parquet")
    lazy = read_embeddings(path)
    assert isinstance(lazy, pl.LazyFrame)
    back = lazy.collect()
    assert back.schema["embedding"] == pl.Array(pl.Float32, 6)
    np.testing.assert_array_equal(embedding_matrix(back), embedding_matrix(frame))
    assert [p.name for p in path.parent.iterdir()] == ["emb.parquet"]  # no temp file left behind
    with pytest.raises(KeyError, match="no 'embedding' column"):
        write_embeddings(frame.drop("embedding"), tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_embeddings(tmp_path / "missing.parquet")


def test_embedding_matrix_is_a_view_without_copy():
    frame = toy_screen(10, dim=6, seed=2)
    first = embedding_matrix(frame)
    assert np.shares_memory(first, embedding_matrix(frame))


# ---------------------------------------------------------------- bad input


def test_annotation_file_without_the_two_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("gene_a,gene_b\nA,B\n")
    with pytest.raises(ValueError, match=r"bad.csv needs columns entity1,entity2"):
        run_efaar(toy_screen(N_GENES), _cfg(bad))


def test_unknown_annotation_source_names_the_known_ones(relationships):
    with pytest.raises(FileNotFoundError, match="CORUM"):
        run_efaar(toy_screen(N_GENES), _cfg(relationships, annotations=["NotASource"]))


def test_genes_that_never_match_are_not_computable_not_zero(relationships, shared_data):
    result = run_efaar(toy_screen(N_GENES), _cfg(relationships, annotations=[str(relationships), "CORUM"]))
    value, reason = _recall(result, "CORUM")
    assert value is None and "no annotated pair" in reason
    summary = result.summary()
    assert summary["recall_CORUM"] is None
    assert summary["recall_mean"] == summary["recall_planted"]  # the mean skips it rather than counting 0


def test_fewer_than_20_genes(relationships):
    result = run_efaar(toy_screen(15), _cfg(relationships))
    value, reason = _recall(result)
    assert value is None and "15 perturbations; at least 20" in reason
    assert result.summary()["recall_mean"] is None


def test_missing_control_label(relationships):
    with pytest.raises(ValueError, match="control label 'DMSO' not found in column 'perturbation'"):
        run_efaar(toy_screen(N_GENES), _cfg(relationships, control_label="DMSO"))
    with pytest.raises(KeyError, match="control column 'ctrl' missing"):
        run_efaar(toy_screen(N_GENES), _cfg(relationships, control_column="ctrl"))
    no_controls = toy_screen(N_GENES).with_columns(is_control=pl.lit(False))
    with pytest.raises(ValueError, match="never true"):
        run_efaar(no_controls, _cfg(relationships))


def test_nan_embeddings_are_dropped_counted_and_do_not_change_the_rest(relationships):
    clean = toy_screen(N_GENES, seed=3)
    x = embedding_matrix(clean).copy()
    x[[5, 17]] = np.nan
    x[40, 3] = np.inf
    dirty = embeddings_frame(clean.drop("embedding"), x)
    result = run_efaar(dirty, _cfg(relationships))
    assert result.n_dropped == 3 and result.summary()["n_dropped_nonfinite"] == 3
    keep = np.ones(len(x), bool)
    keep[[5, 17, 40]] = False
    reference = run_efaar(clean.filter(pl.Series(keep)), _cfg(relationships))
    assert result.summary()["recall_planted"] == reference.summary()["recall_planted"]
    all_nan = embeddings_frame(clean.drop("embedding"), np.full_like(x, np.nan))
    with pytest.raises(ValueError, match="all .* embeddings contain NaN"):
        run_efaar(all_nan, _cfg(relationships))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="alignment.*'combat'.*tvn"):
        EvalConfig(alignment=["combat"])
    with pytest.raises(ValueError, match="thresholds"):
        EvalConfig(thresholds=[[0.95, 0.95]])
    with pytest.raises(ValueError, match="aggregation"):
        EvalConfig(aggregation="max")


def test_single_experiment_generalisation_is_reported_as_not_computable(relationships):
    result = run_efaar(toy_screen(N_GENES, n_batches=1), _cfg(relationships))
    row = result.metrics.filter(pl.col("metric") == "knn_accuracy").row(0, named=True)
    assert row["value"] is None and "single experiment" in row["reason"]


# ---------------------------------------------------------------- CLI and oracle


def test_cli_writes_metrics_report_and_figures_with_oracle(tmp_path):
    truth = tmp_path / "truth"
    screen = toy_screen(N_GENES, seed=4, truth_dir=truth)
    emb = write_embeddings(screen, tmp_path / "emb.parquet")
    out = tmp_path / "eval"
    code = cli(
        [
            "evaluate",
            str(emb),
            "--annotations",
            str(truth / "relationships.csv"),
            "--alignment",
            "centerscale",
            "tvn",
            "--truth",
            str(truth),
            "--out",
            str(out),
            "--clusters",
            "",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    assert 0.3 < summary["recall_relationships"] <= summary["oracle_recall_truth"] <= 1.0
    assert summary["oracle_recall_truth"] > 0.9  # the latents are the planted truth
    report = (out / "report.md").read_text()
    assert "Oracle recall" in report and "recall_relationships" in report
    for figure in ["recall.png", "similarity_heatmap.png", "model_vs_oracle.png"]:
        assert (out / figure).stat().st_size > 5000
        assert figure in report


def test_a_benchmark_registered_outside_the_package_runs_in_run_efaar() -> None:
    """One function and one registration: requested by name, fed every alignment's map, its
    scalars in metrics and its frame in the table it names."""
    from evaluation.benchmarks import Benchmark, BenchmarkInput, register_benchmark

    def spread(given: BenchmarkInput) -> pl.DataFrame:
        norms = np.linalg.norm(given.profiles, axis=1)
        given.metric("profile_norm_mean", norms.mean())
        return pl.DataFrame({"perturbation": given.genes.astype(str), "norm": norms})

    register_benchmark(Benchmark("spread", spread, table="spread", default=False))
    assert "spread" not in EvalConfig().benchmarks  # not a default: existing configs keep their output
    frame = toy_screen(30, seed=1)
    result = run_efaar(
        frame,
        EvalConfig(
            annotations=[], clusters=None, alignment=["tvn", "none"], benchmarks=["spread", "consistency"], n_null=50
        ),
    )
    table = result.table("spread")
    assert table.group_by("alignment").len().sort("alignment")["len"].to_list() == [30, 30]
    by_alignment = dict(
        result.metrics.filter(pl.col("metric") == "profile_norm_mean").select("alignment", "value").iter_rows()
    )
    expected = table.group_by("alignment").agg(pl.col("norm").mean())
    for alignment, value in expected.iter_rows():
        assert by_alignment[alignment] == pytest.approx(value)
    assert by_alignment["tvn"] != pytest.approx(by_alignment["none"])  # each alignment's own map
